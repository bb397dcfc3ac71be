"""Hydra multirun: one W&B run per job in a shared group, named by its overrides; review command;
Optuna sweeps kept in sqlite storage and continued by a second launch."""
from __future__ import annotations

import json
import subprocess
import sys

import optuna
from conftest import ROOT
from helpers import TINY, inspect_wandb, wandb_records

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


# One optuna trial in about a second: 1 train + 1 val batch of 8 px-32 images, nothing written
# but the results (no logger, checkpoints, images or test).
OPTUNA_TINY = ["hparams_search=optuna", "hydra.sweeper.n_trials=2", "trainer=debug", "data.image_size=32",
               "data.batch_size=8", "data.train_size=16", "data.val_size=8", "data.test_size=8",
               "model.embed_dim=16", "logger=none", "test_after_fit=false", "callbacks.images=null",
               "callbacks.checkpoint=null", "callbacks.fault_tolerance=null", "trainer.limit_train_batches=1",
               "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0", "trainer.enable_model_summary=false"]


def test_optuna_sweep_keeps_its_study_in_sqlite_and_a_second_launch_continues_it(train_runner, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    launches = [[], ["hydra.sweeper.sampler.seed=1"]]  # a continuing launch samples with its own seed
    for n, extra in enumerate(launches, start=1):
        sweep_dir = tmp_path / f"launch{n}"
        proc = train_runner("-m", *OPTUNA_TINY, f"hydra.sweeper.storage={storage}", f"hydra.sweep.dir={sweep_dir}",
                            *extra)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        study = optuna.load_study(study_name="swin-pico", storage=storage)  # ${model.variant}-${model.size}
        trials = study.get_trials(deepcopy=False)
        assert len(trials) == 2 * n, [t.number for t in trials]
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
        # This launch's trials are its jobs: the value told to optuna is the job's monitored val/acc1.
        for job, trial in enumerate(trials[-2:]):
            results = json.loads((sweep_dir / str(job) / "results.json").read_text())
            assert trial.value == results["best_val_acc1"] and 0.0 <= trial.value <= 1.0
            assert f"optim.lr={trial.params['optim.lr']}" in results["overrides"]
    points = {tuple(sorted(t.params.items())) for t in trials}
    assert len(points) == 4  # the second launch explored new points
    assert (tmp_path / "launch2" / "optimization_results.yaml").exists()
