"""End-to-end: train.py composed by Hydra leaves a W&B offline run we can read back."""
from __future__ import annotations

import csv
import json

import torch
import yaml
from helpers import TINY, inspect_wandb, wandb_records

from data.fakes import make_imagefolder


def test_training_run_leaves_an_offline_wandb_run_with_metrics_and_resolved_config(train_runner, tmp_path):
    run_dir = tmp_path / "run"
    proc = train_runner(*TINY, "model=swin", "seed=5", "logger.wandb.log_model=true", f"hydra.run.dir={run_dir}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "final metrics:" in out and "epoch 0 val/acc1=" in out  # plain progress lines off a tty

    run = inspect_wandb(run_dir)
    assert run["state"] == "finished" and run["exit_code"] == 0
    summary = run["summary"]
    for key in ("val/acc1", "val/acc5", "val/loss", "train/loss_epoch", "test/acc1", "model/params", "model/gflops"):
        assert key in summary, f"{key} missing from W&B summary {sorted(summary)}"
    assert 0.0 <= float(summary["val/acc1"]) <= 1.0
    assert any(k.startswith("lr-") for k in summary) and float(summary["train/images_per_sec"]) > 0
    assert float(summary["train/peak_mem_mb"]) > 0
    config = run["config"]
    # The resolved config: interpolations are filled in, overrides applied.
    assert config["model"]["variant"] == "swin" and config["model"]["embed_dim"] == 16
    assert config["seed"] == 5 and config["data"]["image_size"] == 32
    assert config["module"]["img_size"] == 32 and config["run_name"] == "swin-pico-seed5"
    assert set(run["tags"]) >= {"swin", "pico", "shapes"}
    # The kernel route of each stage: what backends picks for a CPU fp32 step at batch 16 (at most 4
    # windows a map x 16 < PER_HEAD_MIN_WINDOWS: SDPA's math path), in W&B and results.json.
    routes = ["window: sdpa_5d / shifted_window: sdpa_5d"] * 4
    assert config["model_routes"] == routes
    assert json.loads((run_dir / "results.json").read_text())["routes"] == routes
    assert ("kernel routes (training on cpu, float32, batch 16):\n"
            "  stage 1: window: sdpa_5d / shifted_window: sdpa_5d") in out
    assert (run_dir / ".hydra" / "config.yaml").exists()
    aliases = {a for r in wandb_records(run_dir, "artifact") for a in r["artifact"]["aliases"]}
    assert {"best", "latest"} <= aliases  # logger.wandb.log_model=true: checkpoints as artifacts
    assert (run_dir / "checkpoints" / "last.ckpt").exists()


def test_csv_logger_writes_metrics_and_throughput(train_runner, tmp_path):
    run_dir = tmp_path / "run"
    proc = train_runner(*TINY, "logger=csv", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    columns = set(rows[0])
    assert {"val/acc1", "val/loss", "train/loss_step", "lr-AdamW/pg1", "train/images_per_sec"} <= columns
    assert not (run_dir / "wandb").exists()
    throughput = [float(r["train/images_per_sec"]) for r in rows if r["train/images_per_sec"]]
    assert throughput and all(t > 0 for t in throughput)


def test_image_folder_class_count_reaches_the_model_the_logged_config_and_results(train_runner, tmp_path):
    """data.num_classes: null -> train.py takes the count from the DataModule (4 class folders)."""
    root = make_imagefolder(tmp_path / "photos", classes=("apple", "bird", "cat", "dog"), train=2, val=1)
    run_dir = tmp_path / "run"
    proc = train_runner("data=imagefolder", f"data.root={root}", "trainer=debug", "data.image_size=32",
                        "data.batch_size=4", "data.num_workers=0", "model.embed_dim=16", "logger=csv",
                        "callbacks.images=null", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
                        "test_after_fit=false", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    hparams = yaml.safe_load(open(run_dir / "csv" / "hparams.yaml"))
    assert hparams["data"]["num_classes"] == 4 and hparams["module"]["num_classes"] == 4
    augment = hparams["data"]["augment"]  # recipe=auto resolved: what was used, not "auto"
    assert augment["recipe"] == "light" and augment["mixup"] == 0.0 and list(augment["scale"]) == [0.6, 1.0]
    assert "recipe 'light' chosen by recipe=auto: 8 training images in 4 classes" in proc.stdout + proc.stderr
    assert json.loads((run_dir / "results.json").read_text())["num_classes"] == 4
    ckpt = next((run_dir / "checkpoints").glob("epoch*.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["hyper_parameters"]["num_classes"] == 4
    head = [v for k, v in state["state_dict"].items() if k.endswith("head.fc.weight")]
    assert head and head[0].shape[0] == 4
