"""``python -m vision_attn.bench gpu`` (make gpu-check): the CPU dry run lists every row, passes its CPU
rows with real figures and skips the CUDA rows; a failing row makes it exit non-zero; the CUDA rows'
code paths that can run on a CPU do, at toy sizes."""
from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from helpers import cfg_with

from vision_attn.attention import attention_kinds, backends
from vision_attn.bench import gpu
from vision_attn.bench.__main__ import main as bench_main
from vision_attn.variants import VARIANTS

NO_CUDA = "skipped: no CUDA"
SDPA_ROUTES = [
    "window, no bias",
    "window, padded map (mask), no bias",
    "shifted_window (region mask), no bias",
    "window + bias, inference",
    "window + bias, training, 8 < 128 windows",
    "window + bias, training, 128 windows",
    "shifted_window + bias, training, 128 windows",
]
STEP_SETTINGS = ["bf16-mixed, channels-last", "+ grad checkpointing", "+ model.compile"]


def expected_rows() -> dict[tuple[str, str], str]:
    """Every row the issue asks for -> where it runs ("cpu" always, "cuda" only with CUDA)."""
    rows: dict[tuple[str, str], str] = {}
    for kind in attention_kinds():
        for label in ("fp32", "bf16 autocast"):
            rows[(f"attention {kind}", f"cpu {label} vs float64")] = "cpu"
            rows[(f"attention {kind}", f"cuda {label} vs cpu fp32")] = "cuda"
    rows.update({("sdpa route", route): "cpu" for route in SDPA_ROUTES})
    rows.update({("natten route", kind): "cpu" for kind in ("neighborhood", "dilated")})
    for kind in ("window", "shifted_window", "neighborhood", "dilated"):
        family = "window" if "window" in kind else "neighborhood"
        rows.update({(f"route {kind}", route): "cpu" for route in backends.routes(family)})
    for variant in VARIANTS:
        for size in ("pico", "tiny"):
            for setting in STEP_SETTINGS:
                rows[(f"train step {variant} {size}", setting)] = "cuda" if "compile" in setting else "cpu"
    rows[("swin-T vs timm swin-T", "224², batch 64, bf16: train + inference img/s")] = "cuda"
    for size in (56, 112, 224):
        rows[(f"attention time {size}²", "neighborhood vs window, fwd+bwd")] = "cuda"
    rows[("train.py + W&B offline", "trainer=debug, CPU, 32², embed_dim 16")] = "cpu"
    rows[("ddp nccl", "trainer=ddp trainer.devices=1")] = "cuda"
    rows[("perf swin-T vs timm swin-T compiled", "224², batch 64, bf16, both torch.compile")] = "cuda"
    rows[("perf window + bias vs timm", "56², batch 64, fwd+bwd, every route")] = "cuda"
    rows[("perf dilated vs neighborhood", "56², d = 2..8, fwd+bwd")] = "cuda"
    rows[("perf local vs swin", "tiny 224², batch 32, train img/s + attention share")] = "cuda"
    return rows


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the first markdown table in ``text`` (cells unescaped)."""
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    return [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", ln)[1:-1]] for ln in lines[1:]]


#: CPU rows that cannot run there, and why (a forced route that does not serve CPU training).
CPU_NOT_APPLICABLE = {"flex": "no backward on CPU", "natten": "not installed|CUDA only"}


def check_cpu_row(check: str, setting: str, result: str, figures: str) -> None:
    """A CPU row passed, with figures of its kind that are real numbers (or is n/a, saying why)."""
    if check.startswith("route ") and setting in CPU_NOT_APPLICABLE:
        assert result == "n/a" and re.search(CPU_NOT_APPLICABLE[setting], figures), (check, setting, figures)
        return
    assert result == "pass", (check, setting, figures)
    if check.startswith("attention ") or check in ("sdpa route", "natten route") or check.startswith("route "):
        diffs = [float(d) for d in re.findall(r"(?:out|dx|dW|diff) (\d\.\de[-+]\d\d)", figures)]
        assert diffs and all(0 <= d < 1e-1 for d in diffs), figures
    if check.startswith("attention "):
        assert re.search(r"kernels: (tiled \(ours\)|fused CPU \(ours\)|math|flash|no SDPA)", figures), figures
    if check.startswith("train step"):
        m = re.search(r"loss (\d+\.\d+) \(finite at all \d+ steps\), (\d+\.\d) img/s", figures)
        assert m and float(m.group(2)) > 0, figures
    if check.startswith("train.py"):
        assert re.search(r"exit 0 .*W&B offline run finished: "
                         r"val/acc1 \d\.\d{3}, test/acc1 \d\.\d{3}, \d+ img/s", figures)


def check_table(rows: list[list[str]], expected: dict[tuple[str, str], str]) -> None:
    assert sorted((r[0], r[1]) for r in rows) == sorted(expected)
    for check, setting, device, result, figures, _ in rows:
        assert device == expected[(check, setting)]
        if device == "cuda":
            assert result == NO_CUDA and figures == "", (check, setting)
        else:
            check_cpu_row(check, setting, result, figures)


def test_list_names_every_row_and_where_it_runs(capsys) -> None:
    assert gpu.main(["--no-cuda", "--list"]) == 0
    rows = table_rows(capsys.readouterr().out)
    expected = expected_rows()
    assert len(rows) == len(expected) == 111 + 16 + 4
    assert {(c, s): d for c, s, d in rows} == expected


SUBSET = ("attention (window|lsh) |sdpa route|natten route|route dilated|train step swin pico|^swin-T|"
          "attention time 56|ddp")


def test_cpu_dry_run_subset_passes_cpu_rows_with_figures_and_skips_cuda_rows(tmp_path: Path, capsys) -> None:
    """One attention kind with discrete choices and one without, every route, a variant's steps."""
    assert gpu.main(["--no-cuda", "--only", SUBSET, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    md = (tmp_path / "gpu_check.md").read_text()
    rows = table_rows(md)
    expected = {k: v for k, v in expected_rows().items() if re.search(SUBSET, " ".join(k))}
    assert len(expected) == 8 + 7 + 2 + 4 + 3 + 1 + 1 + 1
    check_table(rows, expected)
    assert table_rows(out) == rows  # the printed table is the file's
    assert "gpu: none (CPU dry run: CUDA rows skipped)" in md and re.search(r"machine: .*torch .*CPU capability", md)
    assert re.search(r"27 rows: 17 pass, 0 FAIL, 2 n/a, 8 skipped: no CUDA, 0 skipped: time budget", md)
    lsh = next(r for r in rows if r[0] == "attention lsh" and r[1].startswith("cpu bf16"))
    assert re.search(r"choices differing from the reference's own: \d+\.\d% \(replayed\)", lsh[4])
    routes = {r[1]: r[4] for r in rows if r[0] == "sdpa route"}
    assert routes["window + bias, training, 128 windows"].startswith("fp32: per-head bmm (ours)")
    assert routes["window + bias, training, 8 < 128 windows"].startswith("fp32: math")
    natten = next(r for r in rows if r[:2] == ["natten route", "neighborhood"])[4]
    from vision_attn.attention import fused

    cpu_route = "fused" if fused.library() is not None else "tiled"  # CPU: the fused kernel where it builds
    assert f"bias: picked {cpu_route}, took {cpu_route}" in natten
    assert f"no bias: picked {cpu_route}, took {cpu_route}" in natten
    forced = {r[1]: r[4] for r in rows if r[0] == "route dilated"}
    assert forced["tiled"].startswith("fp32: tiled (ours)") and "bf16: tiled (ours)" in forced["tiled"]
    if cpu_route == "fused":
        assert forced["fused"].startswith("fp32: fused CPU (ours)")


@pytest.mark.slow
def test_full_cpu_dry_run_every_row(tmp_path: Path) -> None:
    """``make gpu-check`` without CUDA: every row, through the CLI, exit 0 (about a minute on 2 cores)."""
    proc = subprocess.run([sys.executable, "-m", "vision_attn.bench", "gpu", "--no-cuda", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    check_table(table_rows((tmp_path / "gpu_check.md").read_text()), expected_rows())


def test_zero_tolerance_fails_the_rows_and_the_exit_status(tmp_path: Path, capsys) -> None:
    code = bench_main(["gpu", "--no-cuda", "--only", "attention window cpu", "--tol-scale", "0",
                       "--out", str(tmp_path)])
    assert code == 1
    rows = table_rows((tmp_path / "gpu_check.md").read_text())
    assert [r[3] for r in rows] == ["FAIL", "FAIL"]
    assert all(r[4].startswith("over tolerance: rel. max abs diff out") for r in rows)


def test_a_kind_wrong_in_fp32_fails_only_its_fp32_row(tmp_path: Path, monkeypatch) -> None:
    """A module off by 1e-3 of its output scale in fp32 (right in float64 and bf16): caught."""
    real = gpu.create_attention

    def off_in_fp32(*args, **kwargs) -> torch.nn.Module:
        module = real(*args, **kwargs)
        forward = module.forward

        def wrong(x: torch.Tensor) -> torch.Tensor:
            out = forward(x)
            return out + 1e-3 * out.detach().abs().amax() if out.dtype == torch.float32 else out

        module.forward = wrong
        return module

    monkeypatch.setattr(gpu, "create_attention", off_in_fp32)
    assert gpu.main(["--no-cuda", "--only", "attention window cpu", "--out", str(tmp_path)]) == 1
    rows = {r[1]: r for r in table_rows((tmp_path / "gpu_check.md").read_text())}
    fp32, bf16 = rows["cpu fp32 vs float64"], rows["cpu bf16 autocast vs float64"]
    assert fp32[3] == "FAIL" and float(re.search(r"out (\S+),", fp32[4]).group(1)) == pytest.approx(1e-3, rel=0.05)
    assert bf16[3] == "pass"


def test_a_crashing_row_is_a_failed_row_and_the_others_still_run(tmp_path: Path, monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setattr(gpu, "create_attention", boom)
    code = gpu.main(["--no-cuda", "--only", "attention window cpu fp32|ddp", "--out", str(tmp_path)])
    assert code == 1
    rows = table_rows((tmp_path / "gpu_check.md").read_text())
    assert [r[3:5] for r in rows] == [["FAIL", "RuntimeError: kernel exploded"], [NO_CUDA, ""]]


# ----------------------------------------------------------------------------- CUDA rows' code on CPU


def test_cuda_speed_rows_run_on_cpu_at_toy_sizes() -> None:
    text = gpu.attention_time(gpu.CPU, 14, batch=1, reps=1)
    assert re.fullmatch(r"batch 1, 3 heads x 32, k = window = 7, bias, bf16 autocast, fwd\+bwd median of 1: "
                        r"window \d+\.\d\d ms, neighborhood \((fused|tiled)\) \d+\.\d\d ms \(\d+\.\d\dx window; target "
                        r"<= 1\.5x\); flash floor \(window, no bias\) \d+\.\d\d ms", text), text
    text = gpu.swin_vs_timm(gpu.CPU, batch=1, img=64, reps=1, warmup=0)
    assert re.fullmatch(r"64², batch 1, bf16 autocast, eager, median of 1: train ours \d+ img/s, timm \d+ img/s "
                        r"\(\d\.\d\dx\); inference ours \d+, timm \d+ \(\d\.\d\dx\)", text), text


def test_compile_row_runs_with_dynamo_and_reports_graph_breaks(monkeypatch) -> None:
    """The compile rows' code (dynamo reset, counters) with the eager backend: no inductor build on CPU."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    text = gpu.train_step_check("swin", "pico", "+ model.compile")(gpu.Ctx(gpu.CPU, quick=True))
    assert re.search(r"loss \d+\.\d+ \(finite at all 2 steps\), .*warm-up \(compile\) \d+ s, dynamo graph breaks \d+$",
                     text), text


def test_no_tf32_turns_tf32_off_for_cuda_fp32_and_restores_it() -> None:
    flags = gpu._tf32_flags()
    before = [getattr(obj, name) for obj, name, _ in flags]
    with gpu.no_tf32(torch.device("cuda")):
        assert [getattr(obj, name) for obj, name, _ in flags] == [v for *_, v in flags]
        assert {v for *_, v in flags} <= {"ieee", False}
    assert [getattr(obj, name) for obj, name, _ in flags] == before


def test_kernel_labels_from_profiler_op_names() -> None:
    names = {
        "aten::scaled_dot_product_attention",
        "aten::_scaled_dot_product_efficient_attention", "aten::_efficient_attention_backward",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "autograd::engine::evaluate_function: _WindowAttentionFunctionBackward",
        "aten::bmm",
    }
    assert gpu.kernel_labels(names) == ["flash", "efficient", "per-head bmm (ours)"]
    assert gpu.kernel_labels({"aten::_scaled_dot_product_cudnn_attention", "aten::_scaled_dot_product_attention_math",
                              "_TiledAttentionBackward"}) == ["cudnn", "math", "tiled (ours)"]
    assert gpu.kernel_labels({"aten::mm", "aten::softmax"}) == []
    # NATTEN by its op namespace only: a bare "natten" substring showed on an H100 without NATTEN.
    assert gpu.kernel_labels({"natten::na2d_forward_op", "aten::some_natten_like_op"}) == ["natten"]
    assert gpu.kernel_labels({"aten::_scaled_dot_product_cudnn_attention", "some_natten_named_kernel"}) == ["cudnn"]


def test_subprocess_rows_compose_to_the_intended_configs(tmp_path: Path) -> None:
    """The CUDA-only train.py commands are valid overrides of conf/ (checked here, before a GPU run)."""
    ddp, e2e, cpu = (cfg_with(*overrides) for overrides in (gpu.DDP_TRAIN, gpu.GPU_TRAIN, gpu.CPU_TRAIN))
    assert (ddp.trainer.strategy, ddp.trainer.devices, ddp.trainer.accelerator) == ("ddp", 1, "gpu")
    assert ddp.trainer.precision == "bf16-mixed" and ddp.trainer.max_epochs == 1
    assert (e2e.trainer.accelerator, e2e.trainer.precision, e2e.trainer.max_epochs) == ("gpu", "bf16-mixed", 1)
    assert e2e.trainer.limit_train_batches == 40 and "wandb" in e2e.logger
    assert cpu.trainer.accelerator == "cpu" and "wandb" in cpu.logger


def test_lsh_bf16_needs_its_hash_buckets_replayed(tmp_path: Path, monkeypatch) -> None:
    """Under bf16 autocast about 1% of lsh's key buckets differ from float64's hash, which moves chunk
    boundaries for many queries: without replaying the buckets the row fails; with it, it passes."""
    assert gpu.main(["--no-cuda", "--only", "attention lsh cpu bf16", "--out", str(tmp_path)]) == 0
    monkeypatch.setattr(gpu, "DECISIONS", {k: v for k, v in gpu.DECISIONS.items() if k != "lsh"})
    assert gpu.main(["--no-cuda", "--only", "attention lsh cpu bf16", "--out", str(tmp_path)]) == 1
    row = table_rows((tmp_path / "gpu_check.md").read_text())[0]
    assert row[3] == "FAIL" and float(re.search(r"out (\S+),", row[4]).group(1)) > 0.1


def test_time_budget_skips_rows_that_would_overrun_it(tmp_path: Path) -> None:
    assert gpu.main(["--no-cuda", "--only", "attention window cpu fp32|ddp", "--budget-s", "0",
                     "--out", str(tmp_path)]) == 0
    rows = table_rows((tmp_path / "gpu_check.md").read_text())
    assert [r[3] for r in rows] == ["skipped: time budget", NO_CUDA]
    assert rows[0][4] == "not started: 0 s of --budget-s left, it needs 0; run it alone with --only"
    # A compiled row (on a CUDA machine) starts only with COMPILE_NEEDS_S of the budget left.
    ran: list[int] = []
    check = gpu.Check("train step swin tiny", "+ model.compile", lambda ctx: str(ran.append(1)), device="cuda",
                      needs_s=gpu.COMPILE_NEEDS_S["tiny"])
    ctx = gpu.Ctx(gpu.CPU, quick=True)
    needs = gpu.COMPILE_NEEDS_S["tiny"]
    assert gpu.run_check(check, ctx, has_cuda=True, left_s=needs - 1).result == "skipped: time budget" and not ran
    assert gpu.run_check(check, ctx, has_cuda=True, left_s=needs + 1).result == "pass" and ran == [1]


def test_a_failed_child_is_reported_by_its_exception_line_not_its_last_output() -> None:
    """train.py's failure on a GPU read "exit 1: Total FLOPs: 39.6 M" (its last stdout line); the row
    must name the exception."""
    proc = subprocess.CompletedProcess(
        [], 1, stdout="Epoch 0\nTotal FLOPs: 39.6 M\n",
        stderr="Traceback (most recent call last):\n  File \"x.py\", line 1\n"
               "RuntimeError: expected scalar type Float but found BFloat16\n\nSet HYDRA_FULL_ERROR=1 for a trace.\n")
    assert gpu._tail(proc) == "RuntimeError: expected scalar type Float but found BFloat16"
    warn_only = subprocess.CompletedProcess([], 1, stdout="last\n", stderr="UserWarning: x\nkilled by signal\n")
    assert gpu._tail(warn_only) == "killed by signal"
    assert gpu._tail(subprocess.CompletedProcess([], 1, stdout="a\nb\n", stderr="")) == "b"
    assert gpu._tail(subprocess.CompletedProcess([], 1, stdout="", stderr="")) == "(no output)"


def test_perf_rows_run_on_cpu_at_toy_sizes_and_report_every_case() -> None:
    """The timing rows of the GPU targets (``--perf``) are CUDA-only; their code runs here, tiny."""
    ctx = gpu.Ctx(torch.device("cpu"), quick=True)
    text = gpu.window_vs_timm(ctx)
    for case in ("ours sdpa", "ours sdpa_5d", "ours sdpa_heads", "ours per_head", "ours auto", "timm fused",
                 "timm explicit", "flash floor (no bias)"):
        assert re.search(re.escape(case) + r" \d+\.\d\d ms", text), (case, text)
    assert re.search(r"auto \(sdpa_5d\) / faster timm: \d+\.\d\dx \(target <= 0\.8x\)", text), text
    text = gpu.dilated_vs_neighborhood(ctx)
    assert re.search(r"neighborhood \d+\.\d\d ms, dilated_2 \d+\.\d\d ms; worst dilated_2 / neighborhood "
                     r"\d+\.\d\dx", text), text
    text = gpu.local_vs_swin(ctx)
    share = r"attention (\d+% of the step|share below the timing noise)"  # toy CPU timings can invert
    assert re.search(r"swin_local \d+ img/s \(\d+\.\d\dx swin, " + share + r"\)", text), text
    assert (gpu._share_text(0.254), gpu._share_text(-1.86)) == ("attention 25% of the step",
                                                             "attention share below the timing noise")
    text = gpu.attention_time(torch.device("cpu"), 14, batch=1, reps=1)
    assert re.search(r"neighborhood \((fused|tiled)\) \d+\.\d\d ms .* flash floor \(window, no bias\) \d+\.\d\d ms",
                     text), text


def test_perf_flag_keeps_the_timing_rows(capsys) -> None:
    assert gpu.main(["--no-cuda", "--perf", "--list"]) == 0
    rows = table_rows(capsys.readouterr().out)
    names = {r[0] for r in rows}
    assert {"perf window + bias vs timm", "perf dilated vs neighborhood", "perf local vs swin",
            "perf swin-T vs timm swin-T compiled", "swin-T vs timm swin-T", "attention time 224²"} <= names
    assert sum(r[0].startswith("train step") for r in rows) == len(VARIANTS)  # every variant, tiny, eager
