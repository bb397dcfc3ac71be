"""``python -m vision_attn.bench resolution``: how far up in resolution each variant trains.

    python -m vision_attn.bench resolution                                   # all variants, pico
    python -m vision_attn.bench resolution --variants swin swin_local --resolutions 256 512 1024

For every variant, with and without gradient checkpointing (``model.grad_checkpointing``), at
batch 1: one training step of ``ClassificationModule`` (forward, loss, backward, AdamW step; the
step of ``bench knobs``) at each resolution in turn, smallest first.

* Every point runs in a fresh process. Memory ("step") is the peak of that process: on CPU its
  high-water resident set (``VmHWM``: Python, torch, weights, optimizer state, activations, a
  random float input), on CUDA ``torch.cuda.max_memory_allocated``.
* Beside it, what a user sees ("train.py"): the peak resident set of a whole ``train.py`` run at
  that point (``data=shapes``, batch 1, one training step, one test batch:
  :func:`train_command`), read from the child's own rusage (``ru_maxrss``, ``os.wait4``, as
  ``/usr/bin/time -f %M`` reads it): data
  drawing, loading, the Lightning loop and the model together, from the start of ``fit`` (the
  ``PeakMemory`` callback resets the kernel's high-water mark there). It runs only where the step ran;
  ``--no-whole-process`` leaves it out. On CUDA it is host memory (the step's figure is the device's).
  Time: one untimed warm-up step, then the median of up
  to ``--reps`` steps (fewer where steps are slow: timing stops once half of
  ``--max-seconds-per-point`` is spent, after at least one step).
* Never out of memory: before a point runs, its peak is predicted from the series' earlier
  points (the step's growth above the resting process, fitted on a log-log scale through the last
  two points, slope at least 1; with one point, linear in pixels, quadratic for the dense-global
  ``swin_global`` and ``swin_sr``). Over ``--mem-budget-gb`` (default 80 % of MemAvailable, or
  of free GPU memory) it is skipped, as are larger ones. Likewise a point whose predicted two
  steps exceed ``--max-seconds-per-point`` is skipped, and a point that runs past it is killed.
* Tiles: ``--tile-size T [--memory-tokens M]`` adds a tiled series per variant and checkpointing
  setting (``model.tile_size=T model.memory_tokens=M``: tiles in raster order with a recurrent
  memory, each tile recomputed in backward; see ``vision_attn/tiling.py``).
* Output: ``--out``/resolution.md (a headline with the largest trainable resolution per variant,
  then the full table) and resolution.png (peak memory and step time against pixels, log-log:
  one colour per variant, solid circles without checkpointing, dashed squares with it).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from vision_attn.bench.common import machine, markdown_table, median, save_loglog_figure
from vision_attn.memory import cpu_peak_kib, proc_status_kib
from vision_attn.variants import VARIANTS

RESOLUTIONS = [256, 512, 1024, 2048, 4096]
QUADRATIC = {"swin_global", "swin_sr"}  # dense attention over all tokens (sr: over pooled keys)


@dataclass
class Point:
    """One measured (or skipped) resolution of a series."""

    res: int
    peak_mb: Optional[float] = None  # whole-process peak (CPU RSS high-water / CUDA allocator peak)
    base_mb: Optional[float] = None  # resting memory between steps (model, optimizer state, input)
    step_s: Optional[float] = None  # median time of one training step
    reps: int = 0
    skip: Optional[str] = None  # why it was not measured
    process_mb: Optional[float] = None  # peak RSS of a whole train.py run at this point (ru_maxrss)
    process_skip: Optional[str] = None  # why that run gave no figure

    @property
    def pixels(self) -> int:
        return self.res * self.res


@dataclass
class Series:
    variant: str
    ckpt: bool
    points: list[Point] = field(default_factory=list)
    tile: Optional[int] = None  # model.tile_size (None: untiled)
    memory: int = 0  # model.memory_tokens

    @property
    def name(self) -> str:
        """The variant, with its tiling when tiled: ``swin_local, tiles 512 + 8 memory``."""
        return self.variant if self.tile is None else f"{self.variant}, tiles {self.tile} + {self.memory} memory"

    @property
    def label(self) -> str:
        return f"{self.name} ({'ckpt' if self.ckpt else 'no ckpt'})"

    def overrides(self) -> dict:
        return {} if self.tile is None else dict(tile_size=self.tile, memory_tokens=self.memory)

    def measured(self) -> list[Point]:
        return [p for p in self.points if p.skip is None]

    def largest(self) -> Optional[int]:
        done = self.measured()
        return max(p.res for p in done) if done else None


# ----------------------------------------------------------------------------- prediction


def extrapolate(xs: Sequence[float], ys: Sequence[float], x: float, one_point_exponent: float,
                min_exponent: float = 1.0) -> float:
    """``y`` at ``x`` from a power law through the last two ``(xs, ys)`` (log-log), exponent at
    least ``min_exponent``; through one point with ``one_point_exponent``."""
    if not xs:
        raise ValueError("extrapolate needs at least one point")
    if len(xs) == 1 or xs[-1] == xs[-2] or min(ys[-2:]) <= 0:
        exponent = one_point_exponent
    else:
        exponent = math.log(ys[-1] / ys[-2]) / math.log(xs[-1] / xs[-2])
    return ys[-1] * (x / xs[-1]) ** max(exponent, min_exponent)


def predict_peak_mb(points: Sequence[Point], res: int, quadratic: bool) -> float:
    """Predicted whole-process peak at ``res``: the step's growth above the resting memory
    extrapolated in pixels, plus the last resting memory."""
    done = [p for p in points if p.skip is None]
    growth = [max(p.peak_mb - p.base_mb, 1e-3) for p in done]  # type: ignore[operator]
    pred = extrapolate([p.pixels for p in done], growth, res * res, 2.0 if quadratic else 1.0)
    return done[-1].base_mb + pred  # type: ignore[operator]


def predict_step_s(points: Sequence[Point], res: int, quadratic: bool) -> float:
    """Predicted time of one training step at ``res``."""
    done = [p for p in points if p.skip is None]
    return extrapolate([p.pixels for p in done], [p.step_s for p in done], res * res,  # type: ignore[misc]
                       2.0 if quadratic else 1.0)


def skip_reason(points: Sequence[Point], res: int, quadratic: bool, budget_mb: float,
                max_seconds: float) -> Optional[str]:
    """Why ``res`` must not run (a smaller size of the series was skipped or failed, or its predicted
    memory or time is over budget), or None to run it."""
    failed = next((p for p in points if p.skip is not None), None)
    if failed is not None:
        return f"skipped ({failed.res}² was)"
    if not points:
        return None
    mem = predict_peak_mb(points, res, quadratic)
    if mem > budget_mb:
        return f"predicted {mem / 1024:.1f} GB > budget {budget_mb / 1024:.1f} GB"
    secs = 2 * predict_step_s(points, res, quadratic)  # the warm-up step and one timed step at least
    if secs > max_seconds:
        return f"predicted time {secs:.0f} s > {max_seconds:.0f} s"
    return None


# ----------------------------------------------------------------------------- measurement


def default_budget_mb(device: str) -> float:
    """80 % of the memory free now: MemAvailable on CPU, the device's free memory on CUDA."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return 0.8 * free / 2**20
    with open("/proc/meminfo") as f:
        avail_kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    return 0.8 * avail_kib / 1024


def measure_here(variant: str, size: str, res: int, ckpt: bool, reps: int, device: str,
                 max_seconds: float, **overrides: object) -> dict:
    """One point, in this (fresh) process: resting memory, peak memory, median step time."""
    from vision_attn.bench.knobs import make_step

    cuda = device.startswith("cuda")
    step = make_step("grad_ckpt" if ckpt else "fp32", variant, size, res, 1, device, **overrides)
    start = time.perf_counter()
    try:
        step()  # warm-up: optimizer state, lazily built index plans
        base_mb = torch.cuda.memory_allocated() / 2**20 if cuda else (proc_status_kib("VmRSS") or 0) / 1024
        times: list[float] = []
        while len(times) < reps and (not times or time.perf_counter() - start + median(times) < max_seconds / 2):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        return {"skip": "out of memory"}
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else cpu_peak_kib() / 1024
    return {"peak_mb": peak_mb, "base_mb": base_mb, "step_s": median(times), "reps": len(times)}


def measure(variant: str, size: str, res: int, ckpt: bool, reps: int, device: str, threads: int,
            max_seconds: float, tile: Optional[int] = None, memory: int = 0) -> Point:
    """:func:`measure_here` in a fresh interpreter, killed after ``max_seconds`` (plus start-up)."""
    cmd = [sys.executable, "-m", "vision_attn.bench.resolution", "--point", variant, size, str(res),
           str(int(ckpt)), "--reps", str(reps), "--device", device, "--threads", str(threads),
           "--max-seconds-per-point", str(max_seconds)]
    if tile is not None:
        cmd += ["--tile-size", str(tile), "--memory-tokens", str(memory)]
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
               MALLOC_MMAP_THRESHOLD_="65536")  # freed tensors go back to the OS (as bench knobs)
    try:
        res_ = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=max_seconds + 60)
    except subprocess.TimeoutExpired:
        return Point(res, skip=f"over {max_seconds:.0f} s (killed)")
    if res_.returncode:
        tail = (res_.stderr.strip().splitlines() or ["?"])[-1][:80]
        why = "killed (out of memory?)" if res_.returncode in (-9, 137) else f"failed: {tail}"
        return Point(res, skip=why)
    return Point(res, **json.loads(res_.stdout.strip().splitlines()[-1]))


def train_command(variant: str, size: str, res: int, ckpt: bool, device: str, out_dir: str,
                  tile: Optional[int] = None, memory: int = 0) -> list[str]:
    """The ``train.py`` run of a point: batch 1, one training step, one test batch, no logger."""
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, str(root / "train.py"), f"model={variant}", f"model.size={size}",
           f"model.grad_checkpointing={str(ckpt).lower()}"]
    if tile is not None:
        cmd += [f"model.tile_size={tile}", f"model.memory_tokens={memory}"]
    return cmd + [f"data.image_size={res}", "data.batch_size=1", "data.num_workers=0", "trainer.max_steps=1",
                  "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "trainer.num_sanity_val_steps=0",
                  "logger=none", f"trainer.accelerator={'gpu' if device.startswith('cuda') else 'cpu'}",
                  "trainer.devices=1", f"hydra.run.dir={out_dir}"]


# Forked from a big process, a child's ``ru_maxrss`` would count the parent's pages it held
# before exec (Linux keeps the high-water mark across execve): a bare interpreter starts the run.
_LAUNCHER = """
import json, os, subprocess, sys, threading
proc = subprocess.Popen(sys.argv[2:], stdout=subprocess.DEVNULL)
timer = threading.Timer(float(sys.argv[1]), proc.kill)
timer.start()
_, status, usage = os.wait4(proc.pid, 0)
timer.cancel()
print(json.dumps({"maxrss_kib": usage.ru_maxrss, "exitcode": os.waitstatus_to_exitcode(status)}))
"""


def child_peak_mb(cmd: list[str], timeout_s: float) -> tuple[Optional[float], Optional[str]]:
    """Run ``cmd``; its peak resident set in MB (``ru_maxrss`` from ``os.wait4``, started from a bare
    interpreter), or None and why (failed, killed after ``timeout_s``)."""
    done = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, str(timeout_s), *cmd],
                          capture_output=True, text=True)
    if done.returncode:
        return None, f"launcher failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:80]}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["exitcode"] in (-9, 137):
        return None, f"train.py over {timeout_s:.0f} s or out of memory (killed)"
    if result["exitcode"]:
        return None, f"train.py failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:80]}"
    return result["maxrss_kib"] / 1024, None  # Linux: KiB


def measure_process(series: Series, point: Point, args: argparse.Namespace) -> None:
    """Fill ``point``'s whole-process figure from a ``train.py`` run in a temporary run dir."""
    with tempfile.TemporaryDirectory(prefix="bench_resolution_") as out_dir:
        cmd = train_command(series.variant, args.size, point.res, series.ckpt, args.device, out_dir,
                            series.tile, series.memory)
        point.process_mb, point.process_skip = child_peak_mb(cmd, args.max_seconds_per_point + 120)


def run_series(series: Series, resolutions: Sequence[int], args: argparse.Namespace, budget_mb: float) -> None:
    """Measure ``series`` at each resolution, smallest first, skipping what the predictor rules out."""
    quadratic = series.variant in QUADRATIC and series.tile is None
    for res in sorted(resolutions):
        why = skip_reason(series.points, res, quadratic, budget_mb, args.max_seconds_per_point)
        t0 = time.perf_counter()
        point = Point(res, skip=why) if why else measure(
            series.variant, args.size, res, series.ckpt, args.reps, args.device, args.threads,
            args.max_seconds_per_point, series.tile, series.memory)
        if point.skip is None and args.whole_process:
            measure_process(series, point, args)
        series.points.append(point)
        print(f"{series.label} {res}²: {cell(point)}  [{time.perf_counter() - t0:.0f} s]", flush=True)


# ----------------------------------------------------------------------------- report


def cell(p: Point) -> str:
    """``step MB / s``, with ``(train.py MB)`` or why not after the step's memory where measured."""
    if p.skip is not None:
        return p.skip
    process = ""
    if p.process_mb is not None:
        process = f" (train.py {p.process_mb:.0f} MB)"
    elif p.process_skip is not None:
        process = f" ({p.process_skip})"
    return f"{p.peak_mb:.0f} MB{process} / {p.step_s:.2f} s"


def headline(series: Sequence[Series]) -> str:
    """The largest trainable resolution per variant, without and with checkpointing."""
    variants = list(dict.fromkeys(s.name for s in series))
    rows = []
    for v in variants:
        row = [v]
        for ckpt in (False, True):
            s = next((s for s in series if s.name == v and s.ckpt == ckpt), None)
            big = s.largest() if s else None
            row.append("-" if s is None else ("none" if big is None else f"{big}²"))
        rows.append(row)
    return markdown_table(["variant", "largest trainable (no ckpt)", "largest trainable (ckpt)"], rows)


def table(series: Sequence[Series], resolutions: Sequence[int]) -> str:
    """Rows: variant x checkpointing; columns: resolutions, "peak MB / s per step" or why skipped."""
    rows = []
    for s in series:
        by_res = {p.res: p for p in s.points}
        rows.append([s.name, "yes" if s.ckpt else "no"] +
                    [cell(by_res[r]) if r in by_res else "-" for r in sorted(resolutions)])
    return markdown_table(["variant", "grad ckpt"] + [f"{r}²" for r in sorted(resolutions)], rows)


def report(series: Sequence[Series], resolutions: Sequence[int], args: argparse.Namespace, budget_mb: float) -> str:
    mem = "CUDA allocator peak" if args.device.startswith("cuda") else "peak process RSS"
    whole = (" (train.py: peak RSS of a whole train.py run, data=shapes, 1 step + 1 test batch)"
             if args.whole_process else "")
    return "\n".join([
        f"{args.size}, batch 1, train step (fwd+bwd+AdamW), {args.device}; cells: step {mem} MB{whole} / "
        f"median s per step (<= {args.reps} steps after a warm-up); budget {budget_mb / 1024:.1f} GB, "
        f"{args.max_seconds_per_point:.0f} s per point",
        f"machine: {machine()}",
        "",
        "Largest trainable resolution:",
        "",
        headline(series),
        "",
        table(series, resolutions),
    ])


def plot(series: Sequence[Series], path: Path) -> None:
    """Peak memory and step time against pixels (log-log): a colour per variant, a marker and
    line style per checkpointing setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vision_attn.visualize import series_styles

    colors = series_styles(list(dict.fromkeys(s.name for s in series)))
    fig, axes = plt.subplots(1, 2, figsize=(13.5, 4.8))
    for s in series:
        pts = s.measured()
        if not pts:
            continue
        style = dict(color=colors[s.name]["color"], marker="s" if s.ckpt else "o",
                     linestyle="--" if s.ckpt else "-")
        px = [p.pixels for p in pts]
        axes[0].plot(px, [p.peak_mb for p in pts], label=s.label, **style)
        whole = [(p.pixels, p.process_mb) for p in pts if p.process_mb is not None]
        if whole:
            axes[0].plot(*zip(*whole), color=style["color"], marker="x", linestyle=":", label=f"{s.label}, train.py")
        axes[1].plot(px, [p.step_s for p in pts], label=s.label, **style)
    save_loglog_figure(fig, axes, "pixels (H*W)", ("peak memory (MB)", "time per training step (s, median)"),
                       "training step (batch 1) against resolution", path)


# ----------------------------------------------------------------------------- CLI


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vision_attn.bench resolution", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"subset of {list(VARIANTS)}")
    p.add_argument("--size", default="pico", help="model.size (pico, nano, tiny, small, base)")
    p.add_argument("--resolutions", type=int, nargs="+", default=RESOLUTIONS, help="square image sides")
    p.add_argument("--ckpt", choices=["both", "on", "off"], default="both", help="gradient checkpointing")
    p.add_argument("--reps", type=int, default=3, help="timed steps per point at most (median)")
    p.add_argument("--mem-budget-gb", type=float, default=None,
                   help="skip points predicted above this (default: 80%% of MemAvailable / free GPU memory)")
    p.add_argument("--max-seconds-per-point", type=float, default=300.0,
                   help="skip points predicted to take longer (two steps), kill those that do")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads per point (0 = torch default)")
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="directory for resolution.{md,png}")
    p.add_argument("--tile-size", type=int, default=None,
                   help="also run each variant as tiles of this many pixels (model.tile_size)")
    p.add_argument("--memory-tokens", type=int, default=0, help="model.memory_tokens of the tiled series")
    p.add_argument("--no-whole-process", dest="whole_process", action="store_false",
                   help="skip the whole train.py run per point (its peak RSS beside the step's)")
    p.add_argument("--point", nargs=4, metavar=("VARIANT", "SIZE", "RES", "CKPT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variant(s) {unknown} (--variants); choose from {sorted(VARIANTS)}")
    if any(r <= 0 for r in args.resolutions):
        p.error(f"--resolutions must be positive, got {args.resolutions}")
    if args.reps < 1:
        p.error(f"--reps must be at least 1, got {args.reps}")
    if args.tile_size is not None and (args.tile_size < 32 or args.tile_size % 32):
        p.error(f"--tile-size must be a positive multiple of 32 (the backbone's stride), got {args.tile_size}")
    if args.memory_tokens < 0 or (args.memory_tokens and args.tile_size is None):
        p.error(f"--memory-tokens {args.memory_tokens} needs --tile-size and must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.point:
        variant, size, res, ckpt = args.point
        tiles = {} if args.tile_size is None else dict(tile_size=args.tile_size, memory_tokens=args.memory_tokens)
        print(json.dumps(measure_here(variant, size, int(res), bool(int(ckpt)), args.reps, args.device,
                                      args.max_seconds_per_point, **tiles)))
        return 0
    budget_mb = args.mem_budget_gb * 1024 if args.mem_budget_gb is not None else default_budget_mb(args.device)
    ckpts = {"both": [False, True], "on": [True], "off": [False]}[args.ckpt]
    series = [Series(v, c) for v in args.variants for c in ckpts]
    if args.tile_size is not None:
        series += [Series(v, c, tile=args.tile_size, memory=args.memory_tokens) for v in args.variants for c in ckpts]
    for s in series:
        run_series(s, args.resolutions, args, budget_mb)
    text = report(series, args.resolutions, args, budget_mb)
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "resolution.md").write_text(text + "\n")
    plot(series, args.out / "resolution.png")
    print(f"\nwrote {args.out / 'resolution.md'}, {args.out / 'resolution.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
