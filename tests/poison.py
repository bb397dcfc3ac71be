"""A test-only callback that makes a training step non-finite, to test the divergence guards.

Added from the command line, never in the configs:
``+callbacks.poison._target_=tests.poison.PoisonAt +callbacks.poison.step=5 +callbacks.poison.what=loss``.
"""
from __future__ import annotations

from typing import Any

import lightning as L
import torch


class PoisonAt(L.Callback):
    """At global step ``step``: NaN input pixels (``what="loss"``, so the loss is NaN) or one Inf
    gradient entry before the optimizer step (``what="grad"``: a finite loss, a bf16-like overflow)."""

    def __init__(self, step: int, what: str = "loss") -> None:
        if what not in ("loss", "grad"):
            raise ValueError(f"what must be 'loss' or 'grad', got {what!r}")
        self.step, self.what = step, what

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.what == "loss" and trainer.global_step == self.step:
            batch[0].fill_(float("nan"))

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self.what == "grad" and trainer.global_step == self.step:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            grads[0].view(-1)[0] = float("inf")
