"""``python -m vision_attn.bench resolution``: the memory/time predictor, the report, one real tiny run."""
from __future__ import annotations

import pytest

from vision_attn.bench import resolution as bench


def point(res: int, growth_mb: float, step_s: float = 0.1, base_mb: float = 500.0) -> bench.Point:
    return bench.Point(res, peak_mb=base_mb + growth_mb, base_mb=base_mb, step_s=step_s, reps=1)


def test_extrapolate_follows_linear_and_quadratic_power_laws():
    # y = 3x and y = x^2 / 10 through two points: the next value exactly on the curve
    assert bench.extrapolate([100, 400], [300, 1200], 1600, 1.0) == pytest.approx(4800)
    assert bench.extrapolate([100, 400], [1000, 16000], 1600, 1.0) == pytest.approx(256000)
    # one point: the given exponent; a flat curve still grows at least linearly
    assert bench.extrapolate([100], [50], 400, 2.0) == pytest.approx(800)
    assert bench.extrapolate([100, 400], [50, 50], 1600, 1.0) == pytest.approx(200)


def test_predicted_peak_adds_the_resting_memory_to_the_extrapolated_growth():
    local = [point(256, 100), point(512, 400)]  # growth linear in pixels: 4x per doubling of the side
    assert bench.predict_peak_mb(local, 1024, quadratic=False) == pytest.approx(500 + 1600)
    glob = [point(256, 100), point(512, 1600)]  # quadratic: 16x per doubling
    assert bench.predict_peak_mb(glob, 1024, quadratic=True) == pytest.approx(500 + 25600)
    # one point: linear for local kinds, quadratic for dense global attention
    assert bench.predict_peak_mb([point(256, 100)], 512, quadratic=False) == pytest.approx(900)
    assert bench.predict_peak_mb([point(256, 100)], 512, quadratic=True) == pytest.approx(2100)


def test_skip_decision_against_the_budget():
    local = [point(256, 100, 1.0), point(512, 400, 4.0)]
    glob = [point(256, 100, 1.0), point(512, 1600, 16.0)]
    budget_mb, max_s = 4000.0, 300.0
    assert bench.skip_reason([], 256, False, budget_mb, max_s) is None  # nothing known: run it
    assert bench.skip_reason(local, 1024, False, budget_mb, max_s) is None  # 2.1 GB predicted: fits
    assert bench.skip_reason(local, 2048, False, budget_mb, max_s) == "predicted 6.7 GB > budget 3.9 GB"
    assert bench.skip_reason(glob, 1024, True, budget_mb, max_s) == "predicted 25.5 GB > budget 3.9 GB"
    # time: 16 s -> 256 s per step at 1024², two steps over the cap (memory generous)
    assert bench.skip_reason(glob, 1024, True, 1e9, max_s) == "predicted time 512 s > 300 s"
    # after a skipped or failed size, larger ones are not tried
    failed = local + [bench.Point(1024, skip="killed (out of memory?)")]
    assert bench.skip_reason(failed, 2048, False, 1e9, 1e9) == "skipped (1024² was)"


def fake_series() -> list[bench.Series]:
    ok = bench.Series("swin_local", True, [point(256, 100, 0.5), point(512, 400, 2.0),
                                           bench.Point(1024, skip="predicted 9.0 GB > budget 8.0 GB")])
    plain = bench.Series("swin_local", False, [point(256, 200, 0.4), bench.Point(512, skip="over 300 s (killed)"),
                                               bench.Point(1024, skip="skipped (512² was)")])
    none = bench.Series("swin_global", False, [bench.Point(256, skip="killed (out of memory?)")])
    return [plain, ok, none]


def test_table_and_headline_from_fake_measurements():
    series = fake_series()
    head = bench.headline(series).splitlines()
    assert head[2:] == ["| swin_local | 256² | 512² |", "| swin_global | none | - |"]
    rows = bench.table(series, [1024, 256, 512]).splitlines()
    assert rows[0] == "| variant | grad ckpt | 256² | 512² | 1024² |"
    assert rows[2] == "| swin_local | no | 700 MB / 0.40 s | over 300 s (killed) | skipped (512² was) |"
    assert rows[3] == "| swin_local | yes | 600 MB / 0.50 s | 900 MB / 2.00 s | predicted 9.0 GB > budget 8.0 GB |"
    assert rows[4] == "| swin_global | no | killed (out of memory?) | - | - |"


def test_cli_rejects_unknown_variants(capsys):
    with pytest.raises(SystemExit):
        bench.parse(["--variants", "swin", "nope"])
    assert "unknown variant(s) ['nope'] (--variants)" in capsys.readouterr().err


def test_real_tiny_run_measures_in_subprocesses_and_skips_by_prediction(tmp_path, capsys):
    # 64² and 256² run (~0.9 GB peak, mostly the resting process; 256² is predicted at ~1.2 GB from
    # 64²). 2048² is predicted above the 2.5 GB budget (the step's growth above the resting memory,
    # measured 40-60 MB at 256², extrapolated at least linearly: 64x) and skipped, not run.
    argv = ["--variants", "swin", "swin_local", "--size", "pico", "--resolutions", "64", "256", "2048",
            "--ckpt", "off", "--reps", "1", "--mem-budget-gb", "2.5", "--threads", "1", "--out", str(tmp_path),
            "--no-whole-process"]  # (the train.py runs: test_whole_process_point_runs_train_py)
    assert bench.main(argv) == 0
    md = (tmp_path / "resolution.md").read_text()
    assert (tmp_path / "resolution.png").stat().st_size > 10_000
    assert "machine: " in md and "budget 2.5 GB" in md
    assert "| swin | 256² | - |" in md and "| swin_local | 256² | - |" in md  # headline
    for variant in ("swin", "swin_local"):
        row = next(line for line in md.splitlines() if line.startswith(f"| {variant} | no |"))
        cells = [c.strip() for c in row.split("|")[3:-1]]
        (m64, s64), (m256, s256) = ([float(x.split()[0]) for x in c.split(" / ")] for c in cells[:2])
        assert 200 < m64 < m256 < 2560, row  # a whole process's peak, growing with the image
        assert 0 < s64 < s256 < 60, row
        assert cells[2].startswith("predicted ") and cells[2].endswith("> budget 2.5 GB"), row


def test_bench_entry_point_lists_resolution(capsys):
    from vision_attn.bench.__main__ import main

    with pytest.raises(SystemExit):
        main(["resolution", "--help"])
    assert "largest trainable resolution" in capsys.readouterr().out


def test_tiled_series_pass_their_tiles_to_the_child_and_get_their_own_rows(monkeypatch, tmp_path):
    seen = []

    class Done:
        returncode, stderr = 0, ""
        stdout = '{"peak_mb": 900.0, "base_mb": 800.0, "step_s": 0.5, "reps": 1}\n'

    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, **kw: seen.append(cmd) or Done())
    argv = ["--variants", "swin_local", "--resolutions", "256", "--ckpt", "off", "--tile-size", "64",
            "--memory-tokens", "8", "--mem-budget-gb", "4", "--out", str(tmp_path), "--no-whole-process"]
    assert bench.main(argv) == 0
    seen = [c for c in seen if "--point" in c]  # (machine() runs commands too)
    assert [c[c.index("--point") + 1:c.index("--point") + 5] for c in seen] == [["swin_local", "pico", "256", "0"]] * 2
    assert "--tile-size" not in seen[0] and seen[1][-4:] == ["--tile-size", "64", "--memory-tokens", "8"]
    md = (tmp_path / "resolution.md").read_text()
    assert "| swin_local, tiles 64 + 8 memory | no | 900 MB / 0.50 s |" in md
    assert "| swin_local, tiles 64 + 8 memory | 256² | - |" in md
    for bad in (["--tile-size", "48"], ["--memory-tokens", "4"]):
        with pytest.raises(SystemExit):
            bench.parse(["--variants", "swin"] + bad)


def test_tiled_point_builds_a_tiled_model(monkeypatch):
    from vision_attn.bench import knobs

    built = {}
    real = knobs.make_step

    def spy(*args, **overrides):
        built.update(overrides)
        return real(*args, **overrides)

    monkeypatch.setattr(knobs, "make_step", spy)
    out = bench.measure_here("swin_local", "pico", 64, False, 1, "cpu", 60.0, tile_size=32, memory_tokens=2)
    assert built == dict(tile_size=32, memory_tokens=2) and out["step_s"] > 0


def test_child_peak_is_that_childs_own_resident_set():
    import sys

    grow = "import numpy as np; a = np.ones(300 * 2**20, np.uint8); print(a.sum())"
    mb, why = bench.child_peak_mb([sys.executable, "-c", grow], 60)
    assert why is None and 300 < mb < 600, mb
    mb, why = bench.child_peak_mb([sys.executable, "-c", "raise SystemExit('nope')"], 60)
    assert mb is None and why == "train.py failed: nope"


def test_whole_process_figure_sits_beside_the_steps_in_the_table():
    p = point(256, 100)
    assert bench.cell(p) == "600 MB / 0.10 s"
    p.process_mb = 1234.4
    assert bench.cell(p) == "600 MB (train.py 1234 MB) / 0.10 s"
    p.process_mb, p.process_skip = None, "train.py failed: boom"
    assert bench.cell(p) == "600 MB (train.py failed: boom) / 0.10 s"
    cmd = bench.train_command("swin_local", "pico", 4096, True, "cpu", "/tmp/x", tile=512, memory=8)
    for arg in ("model=swin_local", "model.grad_checkpointing=true", "model.tile_size=512", "model.memory_tokens=8",
                "data.image_size=4096", "data.batch_size=1", "trainer.max_steps=1", "logger=none",
                "hydra.run.dir=/tmp/x"):
        assert arg in cmd


@pytest.mark.slow  # a train.py run beside the step's point: ~40 s on a quiet 2-core host
def test_whole_process_point_runs_train_py(tmp_path):
    argv = ["--variants", "swin_local", "--size", "pico", "--resolutions", "64", "--ckpt", "on", "--reps", "1",
            "--tile-size", "32", "--memory-tokens", "2", "--threads", "1", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    md = (tmp_path / "resolution.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| swin_local, tiles 32 + 2 memory | yes |"))
    step, rest = row.split("|")[3].strip().split(" MB (train.py ")
    process = float(rest.split(" MB)")[0])
    assert 200 < float(step) < 4000 and 500 < process < 4000, row  # a whole Lightning process: > 0.5 GB
