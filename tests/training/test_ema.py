"""EMA of the weights (``ema_decay``): the average matches a hand-computed EMA of the raw weights,
validation and test run on it, checkpoints hold it, and a resumed run continues it exactly."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from fault_helpers import Crash, CrashAtStep
from helpers import cfg_with
from lightning.pytorch.callbacks import ModelCheckpoint

from data.datamodule import ShapesDataModule
from vision_attn.callbacks import EMA, ema
from vision_attn.errors import ConfigError
from vision_attn.fault import AtomicCheckpointIO, FaultTolerance
from vision_attn.module import ClassificationModule

OPTIM = dict(opt="adamw", lr=2e-3, weight_decay=0.05, warmup_epochs=0.0, warmup_lr=1e-5, min_lr=1e-5)
DECAY = 0.6


def flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.detach().float().flatten() for k, v in state.items() if "metrics" not in k])


def params(module: L.LightningModule) -> torch.Tensor:
    return flat({k: v for k, v in module.state_dict().items()})


class Probe(L.Callback):
    """Records the weights after every optimizer step and the weights validation/test run with."""

    def __init__(self) -> None:
        self.raw, self.val, self.test = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.raw.append(params(pl_module))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and not trainer.sanity_checking:
            self.val.append(params(pl_module))

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0:
            self.test.append(params(pl_module))


def fit(tmp_path, decay=DECAY, max_epochs=2, crash_at=None, resume=False, extra=()):
    L.seed_everything(5, workers=True)
    dm = ShapesDataModule(image_size=32, batch_size=16, train_size=64, val_size=16, test_size=16)
    module = ClassificationModule(dict(variant="swin", size="pico", embed_dim=16), 8, 32, OPTIM)
    ckpt_dir = tmp_path / "checkpoints"
    probe = Probe()
    callbacks = [ema(decay), probe,
                 ModelCheckpoint(dirpath=ckpt_dir, filename="e{epoch}", auto_insert_metric_name=False, save_top_k=-1),
                 FaultTolerance(str(ckpt_dir), every_n_train_steps=3)]
    callbacks += list(extra)
    if crash_at:
        callbacks.append(CrashAtStep(crash_at))
    trainer = L.Trainer(max_epochs=max_epochs, deterministic=True, logger=False, callbacks=callbacks,
                        plugins=[AtomicCheckpointIO()], enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt_dir / "last.ckpt") if resume else None)
    except Crash:
        return None
    return module, trainer, probe, dm


def hand_ema(raw: list[torch.Tensor], decay: float) -> list[torch.Tensor]:
    """EMA after each step: the first step's weights, then decay * ema + (1 - decay) * weights."""
    out = [raw[0]]
    for w in raw[1:]:
        out.append(decay * out[-1] + (1 - decay) * w)
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ema")
    return tmp, *fit(tmp)


def test_validation_runs_on_the_hand_computed_ema_of_the_raw_weights(run):
    _, module, trainer, probe, _ = run
    assert trainer.global_step == 8 and len(probe.raw) == 8 and len(probe.val) == 2
    expected = hand_ema(probe.raw, DECAY)
    for epoch, step in enumerate((3, 7)):  # 4 steps an epoch: validation after steps 4 and 8
        assert torch.allclose(probe.val[epoch], expected[step], atol=1e-6), epoch
        assert not torch.allclose(probe.val[epoch], probe.raw[step], atol=1e-4)  # not the raw weights


def test_checkpoints_hold_the_ema_and_the_raw_weights(run):
    tmp, _, _, probe, _ = run
    ckpt = torch.load(tmp / "checkpoints" / "e1.ckpt", weights_only=True)
    assert torch.allclose(flat(ckpt["state_dict"]), probe.val[1], atol=1e-6)  # EMA = what validation used
    assert torch.allclose(flat(ckpt["current_model_state"]), probe.raw[-1], atol=1e-6)
    assert int(ckpt["averaging_state"]["n_averaged"]) == 8


def test_test_uses_the_checkpoints_ema_weights(run):
    tmp, module, trainer, probe, dm = run
    trainer.test(module, datamodule=dm, ckpt_path=str(tmp / "checkpoints" / "e0.ckpt"), verbose=False)
    assert torch.allclose(probe.test[-1], probe.val[0], atol=1e-6)  # epoch 0's EMA, not its raw weights
    assert isinstance(trainer.callbacks[0], EMA)


def test_resume_mid_epoch_continues_the_ema_exactly(run, tmp_path):
    _, _, _, ref_probe, _ = run
    assert fit(tmp_path, crash_at=5) is None  # last.ckpt written at step 3, mid-epoch 0... then epoch 1
    module, trainer, probe, _ = fit(tmp_path, resume=True)
    assert trainer.global_step == 8
    assert torch.equal(probe.raw[-1], ref_probe.raw[-1])  # raw weights
    assert torch.equal(probe.val[-1], ref_probe.val[-1])  # EMA weights, validated
    assert torch.equal(params(module), ref_probe.val[-1])  # after fit the model holds the EMA


def test_ema_decay_key():
    assert ema(None) is None
    assert isinstance(ema(0.999), EMA)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ConfigError, match="ema_decay"):
            ema(bad)


def test_ema_decay_config_key_adds_or_leaves_out_the_callback():
    from vision_attn.run import instantiate_group

    for decay, expected in ((None, 0), (0.99, 1)):
        cfg = cfg_with(f"ema_decay={'null' if decay is None else decay}", "callbacks.checkpoint=null",
                       "callbacks.fault_tolerance=null", "callbacks.images=null")
        callbacks = instantiate_group(cfg.callbacks)
        found = [c for c in callbacks if isinstance(c, EMA)]
        assert len(found) == expected and all(c is not None for c in callbacks)


class SaveMidValidation(L.Callback):
    """Writes a checkpoint in the middle of the last validation, as a SIGTERM there does."""

    def __init__(self, path) -> None:
        self.path = path

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and not trainer.sanity_checking and trainer.current_epoch == 1:
            trainer.save_checkpoint(self.path)


def test_a_checkpoint_written_mid_validation_keeps_ema_and_raw_apart(tmp_path):
    _, _, probe, _ = fit(tmp_path, extra=[SaveMidValidation(tmp_path / "mid.ckpt")])
    ckpt = torch.load(tmp_path / "mid.ckpt", weights_only=True)
    assert torch.allclose(flat(ckpt["state_dict"]), probe.val[1], atol=1e-6)  # the EMA
    assert torch.allclose(flat(ckpt["current_model_state"]), probe.raw[-1], atol=1e-6)  # the raw weights
