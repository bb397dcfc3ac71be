"""``python -m vision_attn.bench ablation``: the 448 px ablation's table by distance bins, and its GPU run.

Report a sweep (any multirun or run directory whose runs wrote ``results.json``)::

    python -m vision_attn.bench ablation multirun/<date>/<time> [--out bench_out/ablation_448]

One row per variant (and per setting that differs between runs, e.g. ``model.memory_tokens=8``):
best val top-1 as mean ± std over seeds, then the same for each bin of distance between the
evidence (``val_acc_by_distance`` in ``results.json``; ``data=shapes_far``), images/s and seconds
a run. Writes ``ablation.md`` (the table) and ``ablation.png`` (top-1 against distance, one line
per row, seed spread as error bars) under ``--out``.

Run both presets and report them (``make gpu-ablation``)::

    python -m vision_attn.bench ablation --run [--out bench_out/ablation_448] [--budget-s 470]

``experiment=attention_ablation_448`` (7 variants x 3 seeds) and
``experiment=attention_ablation_448_memory`` (memory tokens 8 vs 0, 3 seeds) with ``trainer=gpu``
(bf16 mixed precision), as ``--streams`` concurrent ``train.py -m`` processes (one per seed of the
448 px preset, one for the memory preset; pico fills a fraction of one GPU), each run capped by
``trainer.max_time`` (``--run-max-s``) and the whole command by ``--budget-s`` (streams still
running then are stopped; the report says which runs are missing). Without CUDA it is a CPU dry
run, said so in every output: one seed, 64 px, a few images, the same commands otherwise, into
``<out>_dryrun``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence

from vision_attn.bench.common import markdown_table
from vision_attn.review import mean_std, row_name, varying_settings

ROOT = Path(__file__).resolve().parents[2]  # the repository: train.py and conf/
PRESET, MEMORY_PRESET = "attention_ablation_448", "attention_ablation_448_memory"
SEEDS = (0, 1, 2)
DRY_RUN = ("data.image_size=64", "data.train_size=16", "data.val_size=16", "data.batch_size=8",
           "trainer.max_epochs=1", "trainer.num_sanity_val_steps=0")
DRY_RUN_MEMORY = ("model.tile_size=32",)  # 64 px images in 32 px tiles: still several tiles an image


def summarize(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[float, float]]]:
    """Rows (one per variant and setting, seeds aggregated) and the distance bins ``(lo, hi)`` px.

    Each row: ``variant``, ``setting``, ``seeds``, ``acc`` / ``acc_sd`` (best val top-1),
    ``bins``: per bin ``(mean, sd, seeds, n)`` (``n``: val images in the bin, the first run's),
    ``ips`` (images/s, mean), ``wall`` (s a run, mean). Runs that recorded other bins than the
    first run's are an error (the table would mix geometries)."""
    records = [r for r in records if r.get("best_val_acc1") is not None]
    bins: list[tuple[float, float]] = []
    for r in records:
        edges = [(b["lo"], b["hi"]) for b in r.get("val_acc_by_distance") or ()]
        if edges and not bins:
            bins = edges
        elif edges and edges != bins:
            raise ValueError(f"{r.get('dir')}: distance bins {edges} differ from another run's {bins}: "
                             "report runs of one image size together")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    several_data = len({r.get("data") for r in records}) > 1  # e.g. shapes_far and shapes_far_dense: apart
    for r, setting in zip(records, varying_settings(records)):
        if several_data:
            setting = " ".join(filter(None, [f"data={r.get('data')}", setting]))
        groups[(r["variant"], setting)].append(r)
    rows = []
    for (variant, setting), runs in groups.items():
        acc, acc_sd, seeds = mean_std([r["best_val_acc1"] for r in runs])
        per_bin = []
        for i in range(len(bins)):
            cells = [r["val_acc_by_distance"][i] for r in runs if r.get("val_acc_by_distance")]
            mean, sd, k = mean_std([c["acc"] for c in cells])
            per_bin.append((mean, sd, k, cells[0]["n"] if cells else 0))
        rows.append({"variant": variant, "setting": setting, "seeds": seeds, "acc": acc, "acc_sd": acc_sd,
                     "bins": per_bin, "ips": mean_std([r.get("images_per_sec") for r in runs])[0],
                     "wall": mean_std([r.get("wall_time_s") for r in runs])[0]})
    rows.sort(key=lambda r: (-(r["acc"] if r["acc"] == r["acc"] else -1.0), r["variant"], r["setting"]))
    return rows, bins


def _pct(mean: float, sd: float, k: int) -> str:
    if mean != mean:
        return "n/a"
    return f"{100 * mean:.1f}" + (f" ± {100 * sd:.1f}" if k > 1 else "")


def table(rows: list[dict[str, Any]], bins: list[tuple[float, float]]) -> str:
    """Markdown: variant, seeds, best val top-1, one column per distance bin, images/s, s/run."""
    n = rows[0]["bins"] if rows else []
    header = (["variant", "seeds", "best val top-1 (%)"]
              + [f"{lo:.0f}-{hi:.0f} px (n={n[i][3]})" for i, (lo, hi) in enumerate(bins)]
              + ["images/s", "s / run"])
    body = [[row_name(r), r["seeds"], _pct(r["acc"], r["acc_sd"], r["seeds"])]
            + [_pct(m, s, k) for m, s, k, _ in r["bins"]]
            + [f"{r['ips']:.0f}" if r["ips"] == r["ips"] else "n/a",
               f"{r['wall']:.0f}" if r["wall"] == r["wall"] else "n/a"] for r in rows]
    return markdown_table(header, body)


def plot(rows: list[dict[str, Any]], bins: list[tuple[float, float]], path: Path, title: str) -> None:
    """Top-1 against the distance between the evidence: one line per row, seed std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vision_attn.visualize import series_styles

    style = series_styles([row_name(r) for r in rows])
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    centres = [(lo + hi) / 2 for lo, hi in bins]
    for r in rows:
        ys = [100 * m for m, _, _, _ in r["bins"]]
        err = [100 * s for _, s, _, _ in r["bins"]]
        ax.errorbar(centres, ys, yerr=err, capsize=3, markersize=6, label=row_name(r), **style[row_name(r)])
    ax.axhline(50, color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xlabel("distance between the two disks' centres (px)")
    ax.set_ylabel("best val top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the legend sits right of the axes
    plt.close(fig)


def report(run_dirs: Sequence[Path], out: Path, title: str, notes: Sequence[str] = ()) -> int:
    """Read every run below ``run_dirs``, print and write ``ablation.md`` and ``ablation.png``."""
    from vision_attn.review import read_dir

    records = [r for d in run_dirs if d.is_dir() for r in read_dir(d)]
    if not any(r.get("best_val_acc1") is not None for r in records):
        print(f"no finished runs (results.json) under {', '.join(map(str, run_dirs))}", file=sys.stderr)
        return 1
    groups: dict[Optional[int], list[dict[str, Any]]] = defaultdict(list)  # one table per image size (px bins)
    for r in records:
        groups[r.get("image_size")].append(r)
    out.mkdir(parents=True, exist_ok=True)
    if any(str(r.get("data") or "").endswith("_dense") for r in records):
        notes = [*notes, "dense label (data=shapes_far_dense): top-1 over the labelled last-stage cells; "
                         "per bin, each image's share of right cells, averaged"]
    lines = [f"# {title}", "", *[f"- {n}" for n in notes]]
    for i, (size, recs) in enumerate(sorted(groups.items(), key=lambda kv: kv[0] or 0)):
        rows, bins = summarize(recs)
        md = table(rows, bins)
        lines += ["", f"## {size} px" if size else "## runs", "", md]
        png = out / ("ablation.png" if i == 0 else f"ablation_{size}.png")
        plot(rows, bins, png, f"{title}: {size} px" if size else title)
        lines += ["", f"![top-1 by distance]({png.name})"]
        print(f"\n{size} px\n{md}\nplot: {png}")
    missing = [r["dir"] for r in records if r.get("best_val_acc1") is None]
    if missing:
        lines += ["", "Runs without a result: " + ", ".join(missing)]
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'ablation.md'}")
    return 0


def streams(out: Path, cuda: bool, run_max_s: int, workers: int) -> list[list[str]]:
    """The ``train.py -m`` commands of ``--run``: one per seed of the 448 px preset, one for the
    memory preset; on CPU (no CUDA) the dry run's: seed 0 and the memory preset, tiny."""
    runs = out / "runs"
    hh, rest = divmod(run_max_s, 3600)
    common = ["logger=csv", f"data.num_workers={workers}",
              f"trainer.max_time=00:{hh:02d}:{rest // 60:02d}:{rest % 60:02d}"]  # DD:HH:MM:SS
    common += ["trainer=gpu"] if cuda else ["trainer=default", *DRY_RUN]
    seeds = SEEDS if cuda else SEEDS[:1]
    base = [sys.executable, str(ROOT / "train.py"), "-m"]
    cmds = [base + [f"experiment={PRESET}", f"seed={s}", f"hydra.sweep.dir={runs / f'448_seed{s}'}", *common]
            for s in seeds]
    memory = [f"experiment={MEMORY_PRESET}", f"hydra.sweep.dir={runs / 'memory'}", *common]
    if not cuda:
        memory += ["seed=0", *DRY_RUN_MEMORY]
    cmds.append(base + memory)
    return cmds


STOP_GRACE_S = 60.0  # after SIGTERM, how long a stream may take to stop before SIGKILL


def stop(proc: subprocess.Popen) -> None:
    """End a stream's whole process group (train.py, its sweep jobs, their loader workers): SIGTERM,
    so the run in progress stops without a results.json, then SIGKILL after ``STOP_GRACE_S``."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run(out: Path, cuda: bool, budget_s: float, run_max_s: int, workers: int) -> list[str]:
    """Start every stream at once, wait up to ``budget_s``, stop what still runs. Returns notes.
    Each stream has a session of its own, so Ctrl-C reaches only this process: on any way out
    (an error, KeyboardInterrupt) the streams still running are stopped, none left on the GPU."""
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        procs: list[subprocess.Popen] = []
        stack.callback(lambda: [stop(p) for p in procs])
        for i, cmd in enumerate(streams(out, cuda, run_max_s, workers)):
            log = stack.enter_context(open(out / f"stream{i}.log", "w"))
            print("+ " + " ".join(cmd), flush=True)
            procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        start, notes = time.monotonic(), []
        for i, p in enumerate(procs):
            try:
                p.wait(timeout=max(1.0, budget_s - (time.monotonic() - start)))
            except subprocess.TimeoutExpired:
                stop(p)
                notes.append(f"stream {i} stopped at the {budget_s:.0f} s budget (stream{i}.log)")
            if p.returncode not in (0, -15, 143):
                notes.append(f"stream {i} exited {p.returncode} (stream{i}.log)")
    notes.append(f"wall time {time.monotonic() - start:.0f} s for {len(procs)} concurrent streams")
    return notes


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vision_attn.bench ablation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", nargs="*", type=Path, help="multirun or run directories to report")
    p.add_argument("--run", action="store_true", help="run both presets first (make gpu-ablation)")
    p.add_argument("--out", type=Path, default=Path("bench_out/ablation_448"), help="where the table and plot go")
    p.add_argument("--budget-s", type=float, default=470.0, help="--run: stop the streams after this long")
    p.add_argument("--run-max-s", type=int, default=90, help="--run: trainer.max_time of each run (seconds)")
    p.add_argument("--workers", type=int, default=3, help="--run: data.num_workers of each run (images are drawn)")
    p.add_argument("--no-cuda", action="store_true", help="--run: the CPU dry run even where CUDA is present")
    args = p.parse_args(argv)
    if args.run == bool(args.path):
        p.error("give run directories to report, or --run (not both)")
    if not args.run:
        return report(args.path, args.out, "attention ablation by distance between the evidence")
    import torch

    cuda = torch.cuda.is_available() and not args.no_cuda
    out = args.out if cuda else args.out.with_name(args.out.name + "_dryrun")
    if not cuda:
        print("no CUDA: a CPU dry run (seed 0, 64 px, 16 images; checks the commands and the report, measures "
              f"nothing) into {out}", flush=True)
    notes = run(out, cuda, args.budget_s if cuda else 1800.0, args.run_max_s if cuda else 600, args.workers)
    if not cuda:
        notes.insert(0, "CPU DRY RUN (no CUDA): 64 px, 16 images, one seed: these figures measure nothing")
    return report([out / "runs"], out, f"{PRESET} + {MEMORY_PRESET}" + ("" if cuda else " (CPU dry run)"), notes)
