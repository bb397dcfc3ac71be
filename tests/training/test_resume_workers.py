"""Exact resume with DataLoader workers: per-sample augmentation is a function of (seed, epoch,
index), not of which worker drew it, how many workers there are, or where a run was resumed."""
from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, run_train, start_train
from helpers import final_metrics

from data.fakes import make_photo_crops, write_truncated
from data.modules import ImageFolderDataModule

BATCH = 4


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> Path:
    """24 real-photo crops to train on (6 batches of 4), one of them a truncated JPEG."""
    root = make_photo_crops(tmp_path_factory.mktemp("crops"), train=23, val=10)
    first = sorted((root / "train").rglob("*.jpg"))[0]
    write_truncated(first, first.with_name("zz_truncated.jpg"), keep=0.4)
    return root


def _datamodule(root: Path, num_workers: int) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(str(root), image_size=32, batch_size=BATCH, num_workers=num_workers,
                               skip_corrupt=True, augment=dict(recipe="imagenet"))
    dm.setup("fit")
    return dm


def _images(batches) -> torch.Tensor:
    return torch.cat([batch[0] for batch in batches])


def _epoch(root: Path, num_workers: int, epoch: int) -> torch.Tensor:
    """The epoch's augmented training images, through the train loader."""
    loader = _datamodule(root, num_workers).train_dataloader()
    loader.sampler.set_epoch(epoch)
    return _images(loader)


def _order(root: Path, epoch: int) -> list[int]:
    """The epoch's sample order: the training sampler yields ``(epoch, index)``."""
    sampler = _datamodule(root, 0).train_dataloader().sampler
    sampler.set_epoch(epoch)
    return [index for _, index in sampler]


def test_augmented_sample_depends_on_seed_epoch_and_index_not_on_workers(crops):
    """Full photo recipe (random-resized-crop, flip, RandAugment) and a skipped corrupt file."""
    by_main, by_workers = _epoch(crops, 0, epoch=1), _epoch(crops, 2, epoch=1)
    assert by_main.shape == (24, 3, 32, 32)
    assert torch.equal(by_main, by_workers)  # 0 or 2 workers: the same pixels

    order = _order(crops, epoch=1)
    dataset = _datamodule(crops, 0).train_dataloader().dataset
    for position in reversed(range(len(order))):  # any order, one at a time, in this process
        image = dataset[(1, order[position])][0]
        assert torch.equal(image, by_main[position]), position

    epoch0 = dict(zip(_order(crops, epoch=0), _epoch(crops, 0, epoch=0)))
    changed = sum(not torch.equal(epoch0[i], image) for i, image in zip(order, by_main))
    assert changed >= 20  # epochs differ (a 40x5 crop, say, can come out the same: no room to crop)


def test_the_seed_changes_the_augmentation(crops, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # seed_everything's, read by the train loader
    dataset = _datamodule(crops, 0).train_dataloader().dataset
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")
    reseeded = _datamodule(crops, 0).train_dataloader().dataset
    assert not torch.equal(dataset[(0, 3)][0], reseeded[(0, 3)][0])
    assert torch.equal(reseeded[(0, 3)][0], reseeded[(0, 3)][0])


def test_loading_in_the_main_process_leaves_the_global_rngs_alone(crops):
    """num_workers=0: the per-sample seeding must not move the training RNGs (drop path, Mixup)."""
    loader = _datamodule(crops, 0).train_dataloader()
    torch.manual_seed(11), random.seed(11), np.random.seed(11)
    expected = torch.rand(3), random.random(), np.random.rand()
    torch.manual_seed(11), random.seed(11), np.random.seed(11)
    list(loader)
    assert torch.equal(torch.rand(3), expected[0])
    assert (random.random(), np.random.rand()) == expected[1:]


@pytest.mark.parametrize("workers", [0, 2])
def test_validation_and_test_loaders_leave_the_global_rng_alone(crops, workers):
    """Creating an eval loader's iterator draws its workers' base seed from the loader's own
    generator, not from the global torch RNG that training draws from (drop path, random erasing)."""
    dm = _datamodule(crops, workers)
    torch.manual_seed(11)
    expected = torch.rand(3)
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        torch.manual_seed(11)
        for _ in range(2):  # a persistent-worker iterator is made once; without workers, every epoch
            next(iter(loader))
        assert torch.equal(torch.rand(3), expected)


def test_loader_with_workers_resumed_mid_epoch_continues_with_the_same_pixels(crops):
    """The loader-level view of kill -9 + resume, 2 persistent workers."""
    reference = _datamodule(crops, 2).train_dataloader()
    reference.sampler.set_epoch(1)
    full = _images(reference)
    first = _datamodule(crops, 2).train_dataloader()
    first.sampler.set_epoch(1)
    it = iter(first)
    seen = [next(it) for _ in range(2)]
    state = first.state_dict()
    resumed = _datamodule(crops, 2).train_dataloader()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert torch.equal(_images(seen + rest), full)


# --- whole runs on real photos: 0 vs 2 workers; kill -9 mid-epoch with 2 workers, resume ------------
#
# 64 real-photo crops, batch 8: 8 steps an epoch, 2 epochs with validation after each, the photo
# recipe (RandAugment, random erasing, Mixup/CutMix), drop path, last.ckpt every 3 steps. Epoch 1's
# training randomness must not depend on how (and in which process) epoch 0's validation ran.

RUN = ["data=imagefolder", "augment=imagenet", "data.image_size=32", "data.batch_size=8", "model.size=pico",
       "model.embed_dim=16", "trainer.max_epochs=2", "trainer.limit_val_batches=2", "trainer.limit_test_batches=1",
       "trainer.deterministic=true", "checkpoint_every_n_steps=3", "seed=3", "logger=csv"]


def _train(root: Path, run_dir: Path, workers: int, tmp_path: Path, *extra: str) -> str:
    """An uninterrupted run of :data:`RUN`; its output."""
    done = run_train([*RUN, f"data.root={root}", f"data.num_workers={workers}", f"hydra.run.dir={run_dir}", *extra],
                     tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    return out


def _last(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


def _assert_same_run(a_dir: Path, a_out: str, b_dir: Path, b_out: str) -> None:
    """Bit-identical final weights (and optimizer step) and the same val/test metrics."""
    a, b = _last(a_dir), _last(b_dir)
    assert a["global_step"] == b["global_step"] == 16 and a["epoch"] == b["epoch"]
    diff = max((a["state_dict"][k] - b["state_dict"][k]).abs().max().item() for k in a["state_dict"])
    ma, mb = final_metrics(a_out), final_metrics(b_out)
    print(f"max |weight diff| {diff:.3g}; val/loss {ma['val/loss']:.4f} vs {mb['val/loss']:.4f}")
    assert diff == 0.0
    for key in ("val/loss", "val/acc1", "test/loss", "test/acc1"):
        assert mb[key] == ma[key], key


@pytest.fixture(scope="module")
def photo_run(tmp_path_factory) -> tuple[Path, Path, str]:
    """(crops, run dir, output) of an uninterrupted run of :data:`RUN` with 2 loader workers."""
    tmp = tmp_path_factory.mktemp("photo_run")
    root = make_photo_crops(tmp / "crops", train=64, val=16)
    return root, tmp / "full", _train(root, tmp / "full", 2, tmp)


@pytest.mark.slow
def test_zero_and_two_workers_train_the_same_weights_with_validation_between_epochs(photo_run, tmp_path):
    root, full_dir, full_out = photo_run
    out = _train(root, tmp_path / "main", 0, tmp_path)
    _assert_same_run(full_dir, full_out, tmp_path / "main", out)


@pytest.mark.slow
def test_sigkill_mid_epoch_with_workers_and_the_photo_recipe_then_resume_matches(photo_run, tmp_path):
    """2 workers; another process SIGKILLs the run after the step-3 last.ckpt of epoch 0 (at step
    4, which is lost); resume=true redoes step 4, epoch 0's validation and epoch 1. Bit-identical
    weights and metrics to the uninterrupted run."""
    root, full_dir, full_out = photo_run
    cut_dir, marker = tmp_path / "cut", tmp_path / "paused"
    args = [*RUN, f"data.root={root}", "data.num_workers=2", f"hydra.run.dir={cut_dir}"]
    pause = ["+callbacks.pause._target_=fault_helpers.PauseAtStep", "+callbacks.pause.step=4",
             f"+callbacks.pause.marker={marker}"]
    proc = start_train([*args, *pause], tmp_path, tmp_path / "cut.log", env={"PYTHONPATH": str(ROOT / "tests")})
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), (tmp_path / "cut.log").read_text()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _last(cut_dir)["global_step"] == 3 and _last(cut_dir)["epoch"] == 0

    resumed = run_train([*args, "resume=true"], tmp_path)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-3000:]
    assert "resuming from" in out and "not resumable" not in out
    _assert_same_run(full_dir, full_out, cut_dir, out)
