"""vision_attn/lightning_compat.py: the one place that touches Lightning's internals. Its version
check, and a test that fails once Lightning fixes #20550 (so the workaround can go)."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from data.datamodule import ShapesDataModule
from vision_attn import lightning_compat as compat
from vision_attn.fault import AtomicCheckpointIO, FaultTolerance
from vision_attn.module import ClassificationModule

OPTIM = dict(lr=2e-3, weight_decay=0.05, warmup_epochs=0.5)


def test_another_lightning_minor_version_fails_loudly_naming_this_module() -> None:
    compat.check_version(f"{compat.TESTED}.99")
    with pytest.raises(RuntimeError, match=r"lightning 2\.99\.0 is installed, but vision_attn/lightning_compat\.py "
                                           r"uses Lightning 2\.6's internals"):
        compat.check_version("2.99.0")


class SeePending(L.Callback):
    """Records, at train start and before FaultTolerance's workaround runs, whether Lightning left
    the checkpoint's loader position unloaded."""

    pending: bool = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.pending = compat.loader_states_pending(trainer)


def _trainer(tmp_path, callbacks: list, max_steps: int) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, logger=False, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                     limit_val_batches=1, num_sanity_val_steps=0, default_root_dir=tmp_path)


def test_lightning_20550_is_still_there_so_the_workaround_is_needed(tmp_path) -> None:
    """A mid-epoch checkpoint of a module whose configure_optimizers reads
    trainer.estimated_stepping_batches: on resume Lightning 2.6 leaves the loader position
    unloaded (#20550). When this fails, Lightning restores it itself: remove
    compat.restore_train_loader_position and its call in FaultTolerance.on_train_start."""
    ckpt_dir = tmp_path / "checkpoints"

    def fit(max_steps: int, ckpt: str | None) -> SeePending:
        L.seed_everything(0, workers=True)
        dm = ShapesDataModule(image_size=32, batch_size=8, train_size=48, val_size=8, test_size=8)
        module = ClassificationModule(dict(variant="swin", size="pico", embed_dim=16), 8, 32, OPTIM)
        probe = SeePending()
        ft = FaultTolerance(str(ckpt_dir), every_n_train_steps=2)
        _trainer(tmp_path, [probe, ft], max_steps).fit(module, datamodule=dm, ckpt_path=ckpt)
        return probe

    fit(2, None)  # last.ckpt at step 2 of a 6-batch epoch
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == 2
    probe = fit(4, str(ckpt_dir / "last.ckpt"))
    assert probe.pending, ("Lightning #20550 looks fixed: the loader position was restored before train start; "
                           "remove lightning_compat.restore_train_loader_position")
