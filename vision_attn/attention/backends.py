"""Which kernel runs an attention call: every route, and the one function that picks among them.

Kinds that share kernels form a *family*: ``window`` (window, shifted_window) and
``neighborhood`` (neighborhood, dilated). Each route registers here with what it cannot serve
(:class:`Route`); :func:`choose` picks one per call from the :class:`Call` (device, dtype, bias,
whether the bias trains, attention dropout, log-sum-exp, number of windows).

Forcing a route, most specific first:

- ``with backends.force("per_head"):`` (benchmarks, tests);
- ``model.attn_backend=<route>`` (each module's setting, from the config);
- ``$VISION_ATTN_BACKEND`` (the default for every model in the process);
- ``$VISION_ATTN_NA_KERNEL`` = ``fused`` / ``torch`` (older name for the neighborhood family's
  ``fused`` / ``tiled``).

A value is ``auto`` or a comma-separated list of route names, at most one per family
(``per_head,tiled``); a family with no name in it stays on ``auto``. A forced route that cannot
serve a call is a :class:`~vision_attn.errors.ConfigError` naming the setting and the reason.
"""
from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterator, Optional

import torch

from ..errors import ConfigError
from . import fused

BACKEND_KEY = "model.attn_backend"
ENV = "VISION_ATTN_BACKEND"
LEGACY_NA_ENV = "VISION_ATTN_NA_KERNEL"  # auto | fused | torch: the CPU neighborhood kernel (older setting)
FAMILIES = ("window", "neighborhood")

#: Batch sizes (windows) from which one GEMM per head beats SDPA's math path, which copies q, k, v
#: into one (B*nW*heads) batch. Measured on CPU in a module forward+backward (Swin-T shapes, batch
#: 4): 256 windows x 3 heads 1.13x faster, 64 x 6 even, 16 x 12 0.95x.
PER_HEAD_MIN_WINDOWS = 128


@dataclass(frozen=True)
class Call:
    """What the route depends on, for one attention call."""

    family: str
    device: str  # "cpu", "cuda", ...
    dtype: torch.dtype  # the dtype the kernel computes in (autocast's where it is on)
    bias: bool = False  # an additive bias (relative position bias) is added to the scores
    grad: bool = False  # autograd records the call (gradients of q, k, v and the bias)
    bias_grad: bool = False  # ... and the bias itself trains
    dropout: bool = False  # attention dropout (training)
    lse: bool = False  # the per-query log-sum-exp is needed too (global tokens)
    windows: int = 0  # window family: batch x windows


@dataclass(frozen=True)
class Route:
    """One kernel: its family, a one-line description and why it cannot serve a call (None: it can)."""

    name: str
    family: str
    doc: str
    refuses: "Refusal"


ROUTES: dict[str, Route] = {}


Refusal = Callable[[Call], Optional[str]]


def register(name: str, family: str, doc: str) -> Callable[[Refusal], Refusal]:
    """Decorator: register a route whose function returns why it cannot serve a call (None: it can)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown route family {family!r}")

    def add(refuses: Refusal) -> Refusal:
        if name in ROUTES:
            raise ValueError(f"route {name!r} is registered twice")
        ROUTES[name] = Route(name, family, doc, refuses)
        return refuses

    return add


def routes(family: Optional[str] = None) -> list[str]:
    """Names of the registered routes (of one family)."""
    return [n for n, r in ROUTES.items() if family is None or r.family == family]


# ----------------------------------------------------------------------------- availability


@lru_cache(maxsize=1)
def natten_installed() -> bool:
    return importlib.util.find_spec("natten") is not None


def flex_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def _fused_built() -> bool:
    return fused.library() is not None


# ----------------------------------------------------------------------------- window routes


def _serves_every_call(call: Call) -> Optional[str]:
    return None


register("sdpa", "window", "F.scaled_dot_product_attention on (B*nW, heads, N, D): flash / cuDNN / "
         "memory-efficient kernels; a mask is expanded over the batch")(_serves_every_call)
register("sdpa_5d", "window", "SDPA on (B, nW, heads, N, D) with a (nW, heads, N, N) mask broadcast "
         "over the batch (the math path: it returns the mask's gradient)")(_serves_every_call)
register("sdpa_heads", "window", "SDPA on (B, nW*heads, N, D) with the bias and region mask as "
         "(1, nW*heads, N, N): CUDA's memory-efficient kernel returns the bias gradient")(_serves_every_call)


@register("per_head", "window", "one batched GEMM per head over all windows, explicit backward "
          "returning the bias gradient (CPU, from PER_HEAD_MIN_WINDOWS windows)")
def _per_head(call: Call) -> Optional[str]:
    if call.dropout:
        return "it has no attention dropout"
    return None


# ----------------------------------------------------------------------------- neighborhood routes


@register("fused", "neighborhood", "the fused exact C++ CPU kernel (k*k keys per query, bias and its gradient)")
def _fused(call: Call) -> Optional[str]:
    if call.device != "cpu":
        return f"it runs on CPU only, not {call.device}"
    if call.dropout:
        return "it has no attention dropout"
    if not _fused_built():
        return "it could not be built (see the log line above)"
    return None


register("tiled", "neighborhood",
         "the pure-PyTorch tiled kernel (query tiles x key halos, batched GEMMs)")(_serves_every_call)


@register("flex", "neighborhood", "FlexAttention (compiled on CUDA) with a cached BlockMask and the bias in score_mod")
def _flex(call: Call) -> Optional[str]:
    if not flex_available():
        return "torch.nn.attention.flex_attention is missing from this torch"
    if call.dropout:
        return "FlexAttention has no attention dropout"
    if call.lse:
        return "global tokens need the log-sum-exp's gradient, which this route does not return"
    if call.device == "cpu" and call.grad:
        return "FlexAttention has no backward on CPU (use it for inference there)"
    return None


@register("natten", "neighborhood", "NATTEN's fused kernel (CUDA, no bias)")
def _natten(call: Call) -> Optional[str]:
    if not natten_installed():
        return "NATTEN is not installed (pip install natten)"
    if call.device != "cuda":
        return f"its backward runs on CUDA only, not {call.device}"
    if call.bias:
        return "NATTEN has no relative position bias: set model.rel_pos_bias=false to use it"
    if call.dropout or call.lse:
        return "it has no attention dropout and no log-sum-exp"
    return None


# ----------------------------------------------------------------------------- the choice


def _auto(call: Call) -> str:
    """The default route: the fastest measured one that serves the call."""
    if call.family == "window":
        if not call.bias_grad:
            return "sdpa"  # flash / cuDNN, or a fused CPU kernel
        if call.device == "cpu":
            return "per_head" if not call.dropout and call.windows >= PER_HEAD_MIN_WINDOWS else "sdpa_5d"
        return "sdpa_heads"
    if call.device == "cpu":
        legacy = _legacy_na_route()
        if legacy == "tiled" or call.dropout:
            return "tiled"
        reason = _fused(call)
        if reason is not None and legacy == "fused":
            raise ConfigError(f"${LEGACY_NA_ENV}=fused, but the fused kernel cannot serve this call: {reason}; "
                              f"unset it to fall back to the tiled kernel")
        return "tiled" if reason else "fused"
    for name in ("natten", "flex"):
        if ROUTES[name].refuses(call) is None:
            return name
    return "tiled"


def _legacy_na_route() -> str:
    """``$VISION_ATTN_NA_KERNEL`` (auto | fused | torch) as a neighborhood route name, or ``auto``."""
    value = os.environ.get(LEGACY_NA_ENV, "auto").strip().lower() or "auto"
    names = {"auto": "auto", "fused": "fused", "torch": "tiled"}
    if value not in names:
        raise ConfigError(f"${LEGACY_NA_ENV}={value!r}: expected one of {', '.join(names)}")
    return names[value]


def parse(value: Optional[str], source: str = BACKEND_KEY) -> dict[str, str]:
    """``auto`` / ``None`` -> {}; ``"per_head,tiled"`` -> ``{"window": "per_head", "neighborhood": "tiled"}``."""
    if value is None or str(value).strip().lower() in ("", "auto"):
        return {}
    out: dict[str, str] = {}
    for name in (n.strip().lower() for n in str(value).split(",")):
        if name not in ROUTES:
            raise ConfigError(f"{source}={value!r}: unknown route {name!r}; choose auto or route names from "
                              + "; ".join(f"{f}: {', '.join(routes(f))}" for f in FAMILIES))
        family = ROUTES[name].family
        if family in out:
            raise ConfigError(f"{source}={value!r}: two routes for the {family} family ({out[family]}, {name})")
        out[family] = name
    return out


_FORCED: list[tuple[dict[str, str], str]] = []


@contextmanager
def force(value: Optional[str]) -> Iterator[None]:
    """Force routes inside (``None`` or ``auto``: leave the choice as it is), e.g. ``force("per_head")``."""
    _FORCED.append((parse(value, f"backends.force({value!r})"), f"backends.force({value!r})"))
    try:
        yield
    finally:
        _FORCED.pop()


def requested(family: str, setting: Optional[str] = None) -> tuple[str, str]:
    """The route asked for ``family`` and who asks: ``(name or "auto", source)``."""
    for forced, source in reversed(_FORCED):
        if family in forced:
            return forced[family], source
    wanted = parse(setting)
    if family in wanted:
        return wanted[family], f"{BACKEND_KEY}={setting}"
    env = os.environ.get(ENV)
    wanted = parse(env, f"${ENV}")
    if family in wanted:
        return wanted[family], f"${ENV}={env}"
    return "auto", "auto"


SKIP = "skip"  # what :func:`choose` returns inside :func:`attention_free`
_FREE: list[bool] = []


@contextmanager
def attention_free() -> Iterator[None]:
    """Inside, every routed attention call returns its values unchanged (route ``skip``): benchmarks
    measure the attention share of a step by the difference."""
    _FREE.append(True)
    try:
        yield
    finally:
        _FREE.pop()


_COUNTERS: list[list[int]] = []


@contextmanager
def exact_work() -> Iterator[list[int]]:
    """Count attention's exact work, whatever route would run: inside, routed kernels (and the tiled
    kernel, whose halos hold keys outside a query's window) run nothing (route ``skip``) and add the
    multiply-adds of ``q k^T`` and ``p v`` over the keys each query really sees to ``counter[0]``."""
    counter = [0]
    _COUNTERS.append(counter)
    _FREE.append(True)
    try:
        yield counter
    finally:
        _FREE.pop()
        _COUNTERS.pop()


def counting() -> bool:
    """Inside :func:`exact_work`?"""
    return bool(_COUNTERS)


def add_work(macs: int) -> None:
    """Add a skipped kernel's exact multiply-adds to the innermost :func:`exact_work` counter."""
    if _COUNTERS:
        _COUNTERS[-1][0] += int(macs)


def choose(call: Call, setting: Optional[str] = None) -> str:
    """The route for ``call``; ``setting`` is the module's ``model.attn_backend`` (None: auto)."""
    if _FREE:
        return SKIP
    name, source = requested(call.family, setting)
    if name == "auto":
        return _auto(call)
    reason = ROUTES[name].refuses(call)
    if reason is not None:
        raise ConfigError(f"{source}: route {name!r} cannot serve this {call.family} call on {call.device} "
                          f"({call.dtype}, {'with' if call.bias else 'no'} bias{', training' if call.grad else ''}): "
                          f"{reason}; set {BACKEND_KEY}=auto or another route ({', '.join(routes(call.family))})")
    return name


def validate(setting: Optional[str], families: set[str]) -> None:
    """Check a model's ``model.attn_backend`` at build time: known names, each for a family it has."""
    for family, name in parse(setting).items():
        if family not in families:
            raise ConfigError(f"{BACKEND_KEY}={setting!r}: route {name!r} is for {family} attention, which this "
                              f"model does not use (its attention: {', '.join(sorted(families)) or 'none routed'})")


def call_of(family: str, q: torch.Tensor, bias: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
            lse: bool = False, windows: int = 0) -> Call:
    """The :class:`Call` of real tensors (autocast's dtype where it is on)."""
    dev = q.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else q.dtype
    grad = torch.is_grad_enabled() and (q.requires_grad or (bias is not None and bias.requires_grad))
    bias_grad = torch.is_grad_enabled() and bias is not None and bias.requires_grad
    return Call(family, dev, dtype, bias is not None, grad, bias_grad, dropout_p > 0.0, lse, windows)
