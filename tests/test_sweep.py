"""Hydra multirun: one W&B run per job in a shared group, named by its overrides; review command."""
from __future__ import annotations

import subprocess
import sys

from conftest import ROOT
from test_train import TINY, inspect_wandb, wandb_records
from vision_attn.loggers import _swept_keys


def run_group(run_dir) -> str:
    """The run's group, read from its records (``leet inspect --summary`` does not print it)."""
    return wandb_records(run_dir, "run")[0]["run"].get("run_group", "")


def test_swept_keys_parse_hydra_sweep_syntax():
    argv = ["-m", "model=swin,swin_local", "seed=0,1", "data.image_size=32", "model.depths=[1,1,2,1]",
            "optim.lr=interval(1e-4,1e-2)", "+x=range(3)"]
    assert _swept_keys(argv) == {"model", "seed", "optim.lr", "x"}


def test_multirun_jobs_are_separate_finished_runs_in_one_group_and_review_reads_them(train_runner, tmp_path):
    sweep_dir = tmp_path / "multirun" / "2026-01-01" / "00-00-00"
    proc = train_runner("-m", *TINY, "model=swin,swin_window", "seed=3", f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    ids, groups = set(), set()
    for job, variant in zip(jobs, ["swin", "swin_window"]):
        run = inspect_wandb(job)
        assert run["state"] == "finished" and run["exit_code"] == 0
        assert run["name"] == f"model={variant}"
        assert run["config"]["model"]["variant"] == variant
        assert "val/acc1" in run["summary"] and "train/loss_epoch" in run["summary"]
        for image in ("val/predictions", "attention/patterns", "attention/learned"):
            assert run["summary"][image]["_type"] in ("image-file", "images/separated"), image
            assert run["summary"][image]["count"] == 1
        assert (job / "images" / "attention_patterns.png").stat().st_size > 10_000
        ids.add(run["run_id"])
        groups.add(run_group(job))
    assert len(ids) == 2 and groups == {"sweep-2026-01-01_00-00-00"}

    review = subprocess.run([sys.executable, "-m", "vision_attn.review", str(sweep_dir)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert review.returncode == 0, review.stderr
    lines = review.stdout.splitlines()
    assert lines[0].startswith("| variant | size | data | seeds | params (M) | GFLOPs | best val top-1 | images/s")
    body = [line for line in lines[2:] if line.startswith("| ")]
    assert {row.split("|")[1].strip() for row in body} == {"swin", "swin_window"}
    accs = [float(row.split("|")[7].split("±")[0]) for row in body]
    assert accs == sorted(accs, reverse=True)
    png = sweep_dir / "review.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000
