"""Compare runs: ``python -m vision_attn.review <multirun dir> [--out plot.png]``.

Reads every run below the directory (``results.json``, written by train.py; for runs without
one, the W&B offline run via ``wandb leet inspect --summary --json``), or a W&B project with
``--wandb entity/project`` when online. Prints a table sorted by accuracy (seeds aggregated as
mean ± std) and writes a PNG of accuracy against training throughput.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence

COLUMNS = ["variant", "size", "data", "seeds", "params (M)", "GFLOPs", "best val top-1", "images/s", "peak mem (MB)",
           "wall time (s)"]
REACH_COLUMN = "reach per stage (what one query sees)"


def _from_wandb_offline(run_dir: Path) -> Optional[dict[str, Any]]:
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    if not runs:
        return None
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json", str(runs[-1])],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode:
        return None
    run = json.loads(proc.stdout)
    s, c = run.get("summary", {}), run.get("config", {})
    return {
        "variant": c.get("model", {}).get("variant"),
        "size": c.get("model", {}).get("size"),
        "data": (run.get("tags") or [None] * 3)[-1],
        "seed": c.get("seed"),
        "params": s.get("model/params"),
        "gflops": s.get("model/gflops"),
        "best_val_acc1": s.get("val/acc1"),
        "images_per_sec": s.get("train/images_per_sec"),
        "peak_mem_mb": s.get("train/peak_mem_mb"),
        "wall_time_s": s.get("_runtime"),
        "reach": c.get("model_reach"),
    }


def read_dir(root: Path) -> list[dict[str, Any]]:
    """One record per run directory below ``root`` (a run dir holds ``.hydra/``)."""
    records = []
    for hydra_dir in sorted(root.rglob(".hydra")):
        run_dir = hydra_dir.parent
        path = run_dir / "results.json"
        record = json.loads(path.read_text()) if path.exists() else _from_wandb_offline(run_dir)
        if record is not None:
            records.append({**record, "dir": str(run_dir)})
    return records


def read_wandb_project(project: str) -> list[dict[str, Any]]:
    """Finished runs of an online W&B project (needs network and a login)."""
    import wandb

    records = []
    for run in wandb.Api().runs(project, filters={"state": "finished"}):
        s, c = run.summary, run.config
        records.append({
            "variant": c.get("model", {}).get("variant"), "size": c.get("model", {}).get("size"),
            "data": (run.tags or [None])[-1], "seed": c.get("seed"), "params": s.get("model/params"),
            "gflops": s.get("model/gflops"), "best_val_acc1": s.get("val/acc1"),
            "images_per_sec": s.get("train/images_per_sec"), "peak_mem_mb": s.get("train/peak_mem_mb"),
            "wall_time_s": s.get("_runtime"), "dir": run.url,
        })
    return records


def mean_std(xs: Sequence[Optional[float]]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count of the values that are not None
    (``nan, 0, 0`` for none)."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return float("nan"), 0.0, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), len(xs)


_NAMED = {"seed", "model", "model.size", "data", "experiment"}  # already a column, or what seeds vary


def varying_settings(records: list[dict[str, Any]]) -> list[str]:
    """Per run, the command-line overrides in which it differs from other runs (beyond the variant,
    size, data and seed), e.g. ``"model.memory_tokens=8"``: a sweep over them is not a sweep over seeds."""
    def overrides(r: dict[str, Any]) -> dict[str, str]:
        pairs = (o.split("=", 1) for o in r.get("overrides") or () if "=" in o)
        return {k.lstrip("+~"): v for k, v in pairs if k.lstrip("+~") not in _NAMED}

    per_run = [overrides(r) for r in records]
    known = [o for r, o in zip(records, per_run) if r.get("overrides") is not None]  # W&B records have none
    varying = sorted(k for k in set().union(*known) if len({o.get(k) for o in known}) > 1)
    return [" ".join(f"{k}={o[k]}" for k in varying if k in o) for o in per_run]


def aggregate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group runs by (variant, size, data, setting); mean ± std over seeds; sorted by accuracy."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r, setting in zip(records, varying_settings(records)):
        groups[(r["variant"], r["size"], r.get("data"), setting)].append(r)
    rows = []
    for (variant, size, data, setting), runs in groups.items():
        runs = [r for r in runs if r.get("best_val_acc1") is not None] or runs  # unfinished runs don't count
        acc, acc_sd, _ = mean_std([r.get("best_val_acc1") for r in runs])
        ips, ips_sd, _ = mean_std([r.get("images_per_sec") for r in runs])
        rows.append({
            "variant": variant, "setting": setting, "size": size, "data": data,
            "seeds": sum(r.get("best_val_acc1") is not None for r in runs),
            "params": runs[0].get("params"), "gflops": runs[0].get("gflops"),
            "acc": acc, "acc_sd": acc_sd, "ips": ips, "ips_sd": ips_sd,
            "mem": max((r.get("peak_mem_mb") or 0) for r in runs),
            "wall": mean_std([r.get("wall_time_s") for r in runs])[0],
            "reach": next((r["reach"] for r in runs if r.get("reach")), None),
        })
    return sorted(rows, key=lambda r: (-(r["acc"] if r["acc"] == r["acc"] else -1), row_name(r)))


def row_name(row: dict[str, Any]) -> str:
    """The variant, and the setting that tells its rows apart (``swin_local [model.memory_tokens=8]``)."""
    return f"{row['variant']} [{row['setting']}]" if row.get("setting") else row["variant"]


def _fmt(x: Optional[float], spec: str) -> str:
    return "n/a" if x is None or x != x else format(x, spec)


def _reach(stages: Optional[list[str]]) -> str:
    """``["48x48 tokens: window 4 (16 px)", ...]`` -> ``"window 4 (16 px); ..."`` (one cell)."""
    return "; ".join(s.split(": ", 1)[-1] for s in stages) if stages else "n/a"


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`aggregate`'s rows; a reach column when the runs recorded one."""
    reach = any(r.get("reach") for r in rows)
    columns = COLUMNS + [REACH_COLUMN] * reach
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        acc = f"{100 * r['acc']:.2f}" + (f" ± {100 * r['acc_sd']:.2f}" if r["seeds"] > 1 else "")
        cells = [row_name(r), r["size"], r["data"] or "", str(r["seeds"]),
                 _fmt(r["params"] / 1e6 if r["params"] else None, ".2f"), _fmt(r["gflops"], ".3f"), acc,
                 _fmt(r["ips"], ".0f"), _fmt(r["mem"], ".0f"), _fmt(r["wall"], ".0f")]
        cells += [_reach(r.get("reach"))] * reach
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy against training throughput: one panel per dataset, one colour and marker per
    (variant, size) shared by all panels and named in the legend, seed spread as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .visualize import series_styles

    datasets = sorted({r["data"] or "" for r in rows})
    models = sorted({(row_name(r), r["size"]) for r in rows})
    style = series_styles(models)
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets) + 2.2, 4.2), squeeze=False)
    for ax, data in zip(axes[0], datasets):
        for r in rows:
            if (r["data"] or "") == data:
                ax.errorbar(r["ips"], 100 * r["acc"], xerr=r["ips_sd"], yerr=100 * r["acc_sd"], capsize=3,
                            markersize=7, linestyle="none", **style[(row_name(r), r["size"])])
        ax.set_title(data or "runs")
        ax.set_xlabel("training throughput (images/s)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("best val top-1 (%)")
    handles = [plt.Line2D([], [], linestyle="none", markersize=7, **style[m]) for m in models]
    labels = [f"{v} ({s})" if len({s for _, s in models}) > 1 else v for v, s in models]
    fig.legend(handles, labels, loc="center right", frameon=False, fontsize=9)
    fig.suptitle("accuracy vs throughput (mean ± std over seeds)")
    fig.tight_layout(rect=(0, 0, 1 - 2.0 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vision_attn.review", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", nargs="?", help="a multirun (or single run) directory")
    p.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read an online W&B project instead")
    p.add_argument("--out", help="PNG path (default: <path>/review.png, or ./review.png)")
    args = p.parse_args(argv)
    if not args.path and not args.wandb:
        p.error("give a run directory or --wandb ENTITY/PROJECT")
    if args.path and not Path(args.path).is_dir():
        p.error(f"{args.path} is not a directory (expected e.g. multirun/2026-11-22/10-00-00)")
    records = read_wandb_project(args.wandb) if args.wandb else read_dir(Path(args.path))
    if not records:
        print(f"no finished runs found under {args.path or args.wandb}", file=sys.stderr)
        return 1
    rows = aggregate(records)
    print(table(rows))
    out = Path(args.out) if args.out else (Path(args.path) / "review.png" if args.path else Path("review.png"))
    plot(rows, out)
    print(f"\nplot: {out}  ({len(records)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
