"""SIGTERM in every phase of train.py: exit 143, never a result claiming a killed run."""
from __future__ import annotations

import signal
from contextlib import contextmanager
from types import FrameType
from typing import Any, Callable, Iterator, Optional

from lightning.pytorch.utilities.exceptions import SIGTERMException


class Terminated(SystemExit):
    """SIGTERM stopped train.py in ``phase``: exit status 143 (128 + SIGTERM)."""

    def __init__(self, phase: str) -> None:
        super().__init__(143)
        self.phase = phase


class SigtermGuard:
    """A SIGTERM handler for the whole of train.py. Outside Lightning's loops it raises
    :class:`Terminated` at once; inside them (Lightning chains this handler behind its own, which
    lets the loops stop at the next batch boundary) it only records the signal, and
    :meth:`check` raises :class:`Terminated` when the Trainer call returns without raising."""

    def __init__(self) -> None:
        self.received = False
        self.phase = "setup"
        self._previous: Any = None

    def install(self) -> "SigtermGuard":
        self._previous = signal.signal(signal.SIGTERM, self)
        return self

    def uninstall(self) -> None:
        if signal.getsignal(signal.SIGTERM) is self:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)

    def __call__(self, signum: int, frame: Optional[FrameType]) -> None:
        self.received = True
        if signal.getsignal(signal.SIGTERM) is self:  # not behind Lightning's handler: stop now
            raise Terminated(self.phase)

    def check(self) -> None:
        """Raise :class:`Terminated` if a SIGTERM came in (e.g. during a Trainer call that finished)."""
        if self.received:
            raise Terminated(self.phase)

    @contextmanager
    def during(self, phase: str, on_stop: Optional[Callable[[], None]] = None) -> Iterator[None]:
        """Run one phase of train.py: a SIGTERM before, inside (Lightning's ``SIGTERMException`` too) or
        recorded by its end raises :class:`Terminated` naming ``phase``, after ``on_stop()`` (e.g. a
        log line saying where the checkpoint is, or removing a half-written results file)."""
        self.check()
        self.phase = phase
        try:
            yield
            self.check()
        except (SIGTERMException, Terminated):  # SIGTERMException: a SystemExit without a code (exit 0)
            if on_stop is not None:
                on_stop()
            raise Terminated(phase) from None
