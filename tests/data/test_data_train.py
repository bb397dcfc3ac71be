"""End to end: ``python train.py data=imagefolder data.root=<tiny tree>`` (subprocess), with the
photo recipe (RandAugment, random erasing, Mixup/CutMix), workers, and corrupt files counted
per epoch; bad roots and corrupt files fail with one clean line."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from data.fakes import make_imagefolder, write_truncated

TINY = [
    "data=imagefolder",
    "trainer=debug",
    "data.image_size=32",
    "data.batch_size=4",
    "model.embed_dim=16",
    "callbacks.throughput.log_every_n_steps=1",
    "logger=csv",
]


@pytest.fixture
def tree(tmp_path) -> Path:
    """3 classes x (4 train, 2 val); one train and one val file corrupt (12 + 6 files: full batches)."""
    root = make_imagefolder(tmp_path / "photos")
    write_truncated(root / "train" / "apple" / "apple_0.jpg", root / "train" / "bird" / "bird_3.jpg", keep=0.4)
    (root / "val" / "cat" / "cat_1.jpg").write_bytes(b"not a jpeg")
    return root


def column(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


def test_train_py_trains_on_an_image_folder_and_logs_skipped_images_per_epoch(train_runner, tmp_path, tree):
    run_dir = tmp_path / "run"
    proc = train_runner(
        *TINY,
        f"data.root={tree}",
        "data.num_workers=2",
        "data.skip_corrupt=true",
        "trainer.max_epochs=2",
        f"hydra.run.dir={run_dir}",
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    assert column(rows, "data/skipped_corrupt") == [1.0, 1.0]  # one per training epoch, counted across 2 workers
    assert column(rows, "data/skipped_corrupt_val") == [1.0, 1.0]
    assert column(rows, "data/skipped_corrupt_test") == [1.0]
    assert len(column(rows, "val/acc3")) == 2  # num_classes=3 counted from the folders reached the model
    assert all(0.0 <= v <= 1.0 for v in column(rows, "val/acc1"))
    assert str(tree / "train" / "bird" / "bird_3.jpg") in out and str(tree / "val" / "cat" / "cat_1.jpg") in out
    assert "epoch 0: skipped 1 unreadable train image(s)" in out


def test_train_py_missing_root_prints_one_config_error_line(train_runner, tmp_path):
    missing = tmp_path / "no-such-data"
    proc = train_runner(*TINY, f"data.root={missing}", f"hydra.run.dir={tmp_path / 'run'}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-4000:]
    lines = [line for line in out.splitlines() if "config error:" in line]
    assert len(lines) == 1 and str(missing / "train") in lines[0] and "train/ and val/" in lines[0]
    assert "Traceback" not in out


def test_train_py_corrupt_image_without_skip_names_the_file_in_one_line(train_runner, tmp_path, tree):
    proc = train_runner(*TINY, f"data.root={tree}", "data.num_workers=2", f"hydra.run.dir={tmp_path / 'run'}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-4000:]
    lines = [line for line in out.splitlines() if "config error:" in line]
    assert len(lines) == 1 and "cannot decode image" in lines[0] and "data.skip_corrupt=true" in lines[0]
    assert (str(tree / "val" / "cat" / "cat_1.jpg") in lines[0]
            or str(tree / "train" / "bird" / "bird_3.jpg") in lines[0])
    assert "Traceback" not in out


@pytest.mark.slow
def test_a_full_epoch_of_the_imagenet_recipe_on_1000_real_photo_crops_with_workers(train_runner, tmp_path):
    """RandAugment m9 (about 1 image in 45 draws a magnitude >= 10), Mixup/CutMix and random erasing
    on real-photo crops of every size (many smaller than the crop), mode and format, 2 workers."""
    import json

    from data.fakes import make_photo_crops

    root = make_photo_crops(tmp_path / "crops", train=1024, val=200)
    run_dir = tmp_path / "run"
    proc = train_runner(
        "data=imagefolder", f"data.root={root}", "augment=imagenet", "data.image_size=64", "data.batch_size=32",
        "data.num_workers=2", "model.size=pico", "trainer.max_epochs=1", "trainer.log_every_n_steps=1", "logger=csv",
        "test_after_fit=false",
        f"hydra.run.dir={run_dir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "recipe=auto" not in proc.stderr + proc.stdout  # the recipe asked for, not a size-based choice
    results = json.loads((run_dir / "results.json").read_text())
    assert results["epochs"] == 1 and 0.0 <= results["best_val_acc1"] <= 1.0
    rows = list(csv.DictReader(open(next(run_dir.rglob("metrics.csv")))))
    steps = {int(r["step"]) for r in rows if r.get("train/loss_step")}
    assert max(steps) == 1024 // 32 - 1  # every batch of the epoch trained
    assert all(0 < v < 10 for v in column(rows, "train/loss_step"))
