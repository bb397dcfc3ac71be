"""``tensor_cache``: ``functools.lru_cache`` for functions that build index / mask tensors.

A cache filled while torch traces would keep what tracing builds: ``torch.export`` runs Python on
fake tensors, so a plain ``lru_cache`` hands those fake tensors to every later eager call (and
their values, e.g. a check on an index tensor, cannot be read). While ``torch.export`` traces, the
function runs with fake mode off (real tensors, cached; the exported graph holds them as
constants); while ``torch.compile`` traces, it runs uncached and dynamo traces through it.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def tracing() -> bool:
    """Is torch tracing this call (``torch.compile`` or ``torch.export``)?"""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def tensor_cache(maxsize: int = 128) -> Callable[[F], F]:
    """Decorator: ``lru_cache(maxsize)``, bypassed while torch traces (see the module docstring)."""

    def wrap(fn: F) -> F:
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def call(*args: Any) -> Any:
            if torch.compiler.is_exporting():
                # private: torch has no public way to build a real constant under export's fake mode
                from torch._subclasses.fake_tensor import unset_fake_temporarily

                with unset_fake_temporarily():
                    return cached(*args)
            return fn(*args) if torch.compiler.is_compiling() else cached(*args)

        call.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
        call.cache_info = cached.cache_info  # type: ignore[attr-defined]
        return call  # type: ignore[return-value]

    return wrap
