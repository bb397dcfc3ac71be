"""Callbacks: progress for terminals and batch logs, throughput, peak memory, images, EMA weights."""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ProgressBar, RichProgressBar
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.seed import isolate_rng
from PIL import Image

from .errors import ConfigError
from .memory import peak_memory_mb, reset_peak_memory


def _fmt(metrics: dict[str, Any], prefix: str) -> str:
    items = [(k, v) for k, v in sorted(metrics.items()) if k.startswith(prefix) and not k.endswith("_step")]
    return "  ".join(f"{k.removesuffix('_epoch')}={float(v):.4f}" for k, v in items)


class PlainProgressBar(ProgressBar):
    """One log line every ``every_n_steps`` training steps and one per validation: for logs."""

    def __init__(self, every_n_steps: int = 50) -> None:
        super().__init__()
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._t0 = time.monotonic()

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self._enabled and self.every_n_steps and step % self.every_n_steps == 0:
            total = trainer.num_training_batches
            metrics = self.get_metrics(trainer, pl_module)
            loss = metrics.get("train/loss_step", metrics.get("train/loss", float("nan")))
            rank_zero_info(
                f"epoch {trainer.current_epoch} batch {batch_idx + 1}/{total} step {step} "
                f"loss {float(loss):.4f} ({time.monotonic() - self._t0:.0f}s)"
            )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._enabled and not trainer.sanity_checking:
            rank_zero_info(f"epoch {trainer.current_epoch} {_fmt(trainer.callback_metrics, 'val/')}")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._enabled:
            rank_zero_info(f"test {_fmt(trainer.callback_metrics, 'test/')}")


def interactive() -> bool:
    """True on a terminal; False under CI, SLURM batch jobs or redirected output."""
    return sys.stdout.isatty() and not os.environ.get("CI") and "SLURM_JOB_ID" not in os.environ


def progress_bar(every_n_steps: int = 50) -> ProgressBar:
    """A Rich progress bar on interactive terminals, plain periodic log lines otherwise."""
    return RichProgressBar() if interactive() else PlainProgressBar(every_n_steps)


class Throughput(L.Callback):
    """Training images/s of the whole job, data loading included (running epoch mean).

    ``train/images_per_sec``: all devices together (under DDP the ranks' image counts are summed,
    at the logging steps only); ``train/images_per_sec_per_device``: that over the world size.
    Lightning's ThroughputMonitor logs to the loggers only; these also reach ``callback_metrics``,
    so ``results.json`` and sweepers can read them.
    """

    def __init__(self, log_every_n_steps: int = 10) -> None:
        self.log_every_n_steps = log_every_n_steps
        self._t0: Optional[float] = None
        self._images = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0, self._images = None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._images += batch[0].shape[0]
        if batch_idx and batch_idx % self.log_every_n_steps == 0:
            self._log(trainer, pl_module, on_step=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._images:
            self._log(trainer, pl_module, on_step=False)

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, on_step: bool) -> None:
        rate = self.rate(trainer)
        per_device = rate / trainer.world_size
        for key, value in (("train/images_per_sec", rate), ("train/images_per_sec_per_device", per_device)):
            pl_module.log(key, value, on_step=on_step, on_epoch=not on_step)

    def rate(self, trainer: Optional[L.Trainer] = None) -> float:
        """Images/s since the epoch's first batch: this process's, or every rank's summed (``trainer``)."""
        images = float(self._images)
        if trainer is not None and trainer.world_size > 1:  # every rank reaches the same logging steps
            total = torch.tensor(images, device=trainer.strategy.root_device)
            images = float(trainer.strategy.reduce(total, reduce_op="sum"))
        return images / max(time.perf_counter() - (self._t0 or time.perf_counter()), 1e-9)


class PeakMemory(L.Callback):
    """Logs ``train/peak_mem_mb``, this run's peak so far, at the end of every training epoch."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        reset_peak_memory(pl_module.device)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.log("train/peak_mem_mb", peak_memory_mb(pl_module.device), rank_zero_only=True)


def log_image(trainer: L.Trainer, key: str, image: np.ndarray, out_dir: Optional[str], caption: str = "") -> None:
    """Send an image to every image-capable logger (W&B) and save it as a PNG in ``out_dir``."""
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):
            extra = {"caption": [caption]} if caption else {}
            logger.log_image(key=key, images=[image], step=trainer.global_step, **extra)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        Image.fromarray(image).save(os.path.join(out_dir, f"{key.replace('/', '_')}.png"))


class ImageLogger(L.Callback):
    """After each validation: a grid of predictions and attention maps over a validation image.

    Two attention pictures: the receptive field of every registered kind at stage 1 (fresh
    modules, uniform weights over the allowed keys) and this model's learned stage-1 weights.
    """

    def __init__(self, out_dir: Optional[str] = None, num_images: int = 16, every_n_epochs: int = 1) -> None:
        self.out_dir, self.num_images, self.every_n_epochs = out_dir, num_images, every_n_epochs
        self._batch: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0:
            self._batch = (batch[0][: self.num_images].detach(), batch[1][: self.num_images].detach())

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self._batch is None or trainer.current_epoch % self.every_n_epochs:
            return
        if self._batch[1].ndim > 1:  # dense targets (data=shapes_far_dense): no one label per image to show
            return
        from .visualize import attention_figure, denormalize, kind_patterns, learned_maps, prediction_grid

        images, targets = self._batch
        dm = trainer.datamodule
        classes = list(getattr(dm, "classes", [])) or [str(i) for i in range(pl_module.model.num_classes)]
        raw = images.dtype == torch.uint8  # a tile stream's batch: normalised tile by tile in the model
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            preds = pl_module(images).argmax(-1)
            maps, points = learned_maps(pl_module.model, images, prepare=dm.normalize if raw else None)
        pl_module.train(was_training)
        pixels = images.permute(0, 2, 3, 1).cpu().numpy() if raw else denormalize(images, dm.mean, dm.std)
        log_image(trainer, "val/predictions", prediction_grid(pixels, targets.tolist(), preds.tolist(), classes),
                  self.out_dir, "true → predicted")
        log_image(trainer, "attention/learned", attention_figure(pixels[0], maps, points, "learned stage-1 attention"),
                  self.out_dir)
        stage = pl_module.model.layers[0]
        attn, spec = stage.blocks[0].attn, max(stage.specs, key=lambda s: s.dilation)
        h, w = next(iter(maps.values())).shape[-2:]
        with isolate_rng():  # fresh modules: their initialisation must not draw from training's streams
            patterns = kind_patterns(attn.dim, attn.num_heads, h, w, spec)
        log_image(trainer, "attention/patterns",
                  attention_figure(pixels[0], patterns, points, "receptive field of each attention kind (stage 1)"),
                  self.out_dir)


class EMA(EMAWeightAveraging):
    """Lightning's exponential moving average of the weights, used for validation and test.

    Validation swaps the EMA weights in (so ``val/acc1`` and the best checkpoint are the EMA's);
    checkpoints hold the EMA weights as ``state_dict`` and the raw ones as ``current_model_state``,
    with the average's own state, so a resumed run continues both exactly. Outside ``fit``
    (``trainer.test(ckpt_path=...)``) the checkpoint's ``state_dict``, the EMA weights, is what
    the model keeps: Lightning would put the raw weights back. A checkpoint written during
    validation (a SIGTERM there) keeps the same layout, although the weights are swapped then.
    """

    _swapped = False  # True inside validation, while the model holds the EMA weights

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_epoch_start(trainer, pl_module)
        self._swapped = self._average_model is not None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_epoch_end(trainer, pl_module)
        self._swapped = False

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._swapped and "current_model_state" in checkpoint:  # saved mid-validation (SIGTERM)
            checkpoint["state_dict"], checkpoint["current_model_state"] = (
                checkpoint["current_model_state"], checkpoint["state_dict"])

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


def ema(decay: Optional[float], update_every_n_steps: int = 1) -> Optional[EMA]:
    """The ``ema_decay`` config key: an :class:`EMA` callback, or None when it is null (off)."""
    if decay is None:
        return None
    if not 0.0 < float(decay) < 1.0:
        raise ConfigError(f"ema_decay={decay} must be in (0, 1), e.g. 0.999 (null = off)")
    return EMA(decay=float(decay), update_every_n_steps=update_every_n_steps)
