"""Exact resume with DataLoader workers: per-sample augmentation is a function of (seed, epoch,
index), not of which worker drew it, how many workers there are, or where a run was resumed."""
from __future__ import annotations

import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, run_train
from data.fakes import make_photo_crops, write_truncated
from data.modules import ImageFolderDataModule
from test_fault import final_metrics

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


# --- kill -9 mid-epoch with 2 workers and the photo recipe, resume, compare ----------------------


@pytest.mark.slow
def test_sigkill_mid_epoch_with_workers_and_the_photo_recipe_then_resume_matches(tmp_path):
    """64 real-photo crops, batch 8: 8 steps an epoch, 2 epochs, 2 workers, augment=imagenet
    (RandAugment, random erasing, Mixup/CutMix); last.ckpt every 4 steps; SIGKILL at step 14;
    resume=true. Bit-identical weights and metrics to an uninterrupted run."""
    root = make_photo_crops(tmp_path / "crops", train=64, val=16)
    args = ["data=imagefolder", f"data.root={root}", "augment=imagenet", "data.image_size=32", "data.batch_size=8",
            "data.num_workers=2", "model.embed_dim=16", "trainer=debug", "trainer.max_epochs=2",
            "trainer.limit_train_batches=null", "trainer.deterministic=true", "checkpoint_every_n_steps=4", "seed=3",
            "logger=none"]
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full = run_train([*args, f"hydra.run.dir={full_dir}"], tmp_path)
    assert full.returncode == 0, (full.stdout + full.stderr)[-3000:]

    killed = run_train([*args, f"hydra.run.dir={cut_dir}", "+callbacks.killer._target_=fault_helpers.KillAtStep",
                        "+callbacks.killer.step=14"], tmp_path, env={"PYTHONPATH": str(ROOT / "tests")})
    assert killed.returncode == -signal.SIGKILL, (killed.stdout + killed.stderr)[-3000:]
    assert torch.load(cut_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12

    resumed = run_train([*args, f"hydra.run.dir={cut_dir}", "resume=true"], tmp_path)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-3000:]
    assert "resuming from" in out and "not resumable" not in out

    a = torch.load(full_dir / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(cut_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 16 and a["epoch"] == b["epoch"]
    diff = max((a["state_dict"][k] - b["state_dict"][k]).abs().max().item() for k in a["state_dict"])
    print(f"max |weight diff| {diff:.3g}")
    assert diff == 0.0
    ma, mb = final_metrics(full.stdout + full.stderr), final_metrics(out)
    for key in ("val/loss", "val/acc1", "test/loss", "test/acc1"):
        assert mb[key] == ma[key], key
