"""Test-only callbacks for fault-injection runs of train.py (``+callbacks.x._target_=fault_helpers.X``, with
tests/ on PYTHONPATH as the tests set it)."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import lightning as L


class KillAtStep(L.Callback):
    """SIGKILL this process (no cleanup at all) at the end of training step ``step``."""

    def __init__(self, step: int, sig: str = "SIGKILL") -> None:
        self.step, self.sig = step, getattr(signal, sig)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            print(f"killing at step {trainer.global_step} (epoch {trainer.current_epoch}, batch {batch_idx})",
                  flush=True)
            os.kill(os.getpid(), self.sig)


class PauseAtStep(L.Callback):
    """At the end of training step ``step`` (after that step's checkpoint), create ``marker`` and
    wait up to ``seconds`` for another process to kill this one (then carry on)."""

    def __init__(self, step: int, marker: str, seconds: float = 120.0) -> None:
        self.step, self.marker, self.seconds = step, Path(marker), seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            print(f"paused at step {trainer.global_step} (epoch {trainer.current_epoch}, batch {batch_idx})",
                  flush=True)
            self.marker.touch()
            time.sleep(self.seconds)


class Crash(Exception):
    """Raised by :class:`CrashAtStep`: an in-process stand-in for a killed run."""


class CrashAtStep(L.Callback):
    """Raise :class:`Crash` at the end of training step ``step`` (in-process resume tests)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Crash(f"step {self.step}")


class SigtermAt(L.Callback):
    """SIGTERM this process at the start of batch ``batch`` of ``stage``: "test", or "validation"
    (the fit's, after the sanity check, in epoch ``epoch``)."""

    def __init__(self, stage: str = "test", batch: int = 0, epoch: int = 0) -> None:
        self.stage, self.batch, self.epoch, self.sent = stage, batch, epoch, False

    def _maybe_kill(self, trainer, batch_idx: int) -> None:
        epoch_ok = self.stage == "test" or trainer.current_epoch == self.epoch
        if not self.sent and batch_idx == self.batch and epoch_ok and not trainer.sanity_checking:
            self.sent = True
            print(f"sending SIGTERM at {self.stage} batch {batch_idx} (epoch {trainer.current_epoch})", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.stage == "test":
            self._maybe_kill(trainer, batch_idx)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.stage == "validation":
            self._maybe_kill(trainer, batch_idx)
