"""Test-only callbacks for fault-injection runs of train.py (``+callbacks.x._target_=tests.fault_helpers.X``)."""
from __future__ import annotations

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    """SIGKILL this process (no cleanup at all) at the end of training step ``step``."""

    def __init__(self, step: int, sig: str = "SIGKILL") -> None:
        self.step, self.sig = step, getattr(signal, sig)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            print(f"killing at step {trainer.global_step} (epoch {trainer.current_epoch}, batch {batch_idx})", flush=True)
            os.kill(os.getpid(), self.sig)


class Crash(Exception):
    """Raised by :class:`CrashAtStep`: an in-process stand-in for a killed run."""


class CrashAtStep(L.Callback):
    """Raise :class:`Crash` at the end of training step ``step`` (in-process resume tests)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Crash(f"step {self.step}")
