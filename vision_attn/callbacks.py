"""Callbacks: progress reporting for terminals and for batch logs (CI, SLURM)."""
from __future__ import annotations

import os
import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, ThroughputMonitor
from lightning.pytorch.utilities import rank_zero_info


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

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
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


def throughput_monitor(window_size: int = 10) -> ThroughputMonitor:
    """Lightning's throughput monitor: logs images/s (``train/samples_per_sec``)."""
    return ThroughputMonitor(batch_size_fn=lambda batch: batch[0].shape[0], window_size=window_size)
