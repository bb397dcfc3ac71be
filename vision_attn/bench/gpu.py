"""``python -m vision_attn.bench gpu``: one command that checks every CUDA route, in one table.

Each row says pass, FAIL (with the reason), ``n/a`` (with the reason), ``skipped: no CUDA`` or
``skipped: time budget``,
with its figures. Exit status 1 when any row that ran failed, else 0. The table is also written
to ``--out``/gpu_check.md. Rows, in the order they run:

- ``attention <kind>``: every registered kind's module (dim 32, 2 heads, a 13 x 11 map: padding
  and borders), forward + backward with a fixed upstream gradient. Figures: max |diff| of the
  output, the input gradient and the worst weight gradient, each divided by the reference's max
  |value| (``rel``), against a tolerance. CPU rows: fp32 and bf16 autocast against float64. CUDA
  rows: fp32 (TF32 off) and bf16 autocast against the CPU fp32 result of the same weights and
  inputs. Discrete choices (lsh hash buckets, routed regions) are replayed from the run under test
  into the reference, and the share that differs from the reference's own choice is reported.
  ``kernels`` names what ran, read from ``torch.profiler`` op names: SDPA's flash, efficient,
  cudnn or math backend, our per-head bmm window function, our tiled kernel, NATTEN.
- ``sdpa route``: the window route :mod:`~vision_attn.attention.backends` picks in each case (no
  bias, padding mask, shift mask, bias at inference, bias in training below / above
  ``PER_HEAD_MIN_WINDOWS``), fp32 and bf16, on CUDA when present (else CPU): the kernels each
  used, checked against the reference.
- ``natten route``: neighborhood / dilated with and without bias: the route ``backends`` picks
  and the kernel the profiler saw, checked.
- ``route <kind>``: every kind that has routes x every route of its family, forced through
  ``backends.force``, training with a bias (NATTEN: without), fp32 and bf16 against the reference;
  ``n/a`` with the reason where the route cannot serve the call on this device.
- ``train step``: every variant, pico and tiny, as ``trainer=gpu`` trains (bf16 autocast,
  channels-last), then with gradient checkpointing, then (CUDA only, last) with ``model.compile``:
  loss finite at every step, images/s, peak CUDA memory (``torch.cuda.max_memory_allocated``).
- ``swin-T vs timm`` (CUDA): ours and ``timm`` ``swin_tiny_patch4_window7_224`` (same random
  weights), training and inference images/s, bf16 autocast, interleaved (``bench model``'s steps).
- ``attention time`` (CUDA): neighborhood vs window forward + backward at 56², 112², 224²
  (``bench attention``'s kernels, bias included), ~1M tokens per batch, bf16 autocast.
- ``train.py``: ``train.py trainer=gpu trainer.max_epochs=1`` (CPU: a tiny ``trainer=debug`` run)
  in a temporary run dir, its W&B offline run read back with ``wandb leet inspect``.
- ``ddp`` (CUDA): ``trainer=ddp trainer.devices=1``: the NCCL process group initialises.

Without CUDA (or with ``--no-cuda``) the CUDA-only rows say ``skipped: no CUDA`` and the rest run
on CPU at small sizes (``--quick``, the default there): about a minute on a 2-core machine.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Optional
from unittest import mock

import torch
from torch import nn

from vision_attn.attention import AttnSpec, attention_class, attention_kinds, backends, create_attention
from vision_attn.attention import lsh as lsh_module
from vision_attn.attention import routed as routed_module
from vision_attn.attention.backends import PER_HEAD_MIN_WINDOWS
from vision_attn.attention.rel_pos import new_bias_table
from vision_attn.bench import model as model_bench  # timm's Swin runs its fused SDPA attention (timm's default)
from vision_attn.bench.common import interleaved, machine, markdown_table, median
from vision_attn.variants import VARIANTS

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
NO_CUDA = "skipped: no CUDA"
NOT_APPLICABLE = "n/a"
OVER_BUDGET = "skipped: time budget"

# ----------------------------------------------------------------------------- rows


class CheckFailed(Exception):
    """A check ran and its result is wrong; the message is the row's figures."""


class NotApplicable(Exception):
    """What the row checks cannot run on this device (e.g. a CUDA-only route); the message says why."""


@dataclass
class Ctx:
    """What every check may read: the device under test and the run's settings."""

    device: torch.device
    quick: bool
    tol_scale: float = 1.0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


@dataclass
class Check:
    name: str
    setting: str
    fn: Callable[[Ctx], str]  # returns the figures; raises CheckFailed (or anything) on failure
    device: Optional[str] = None  # "cpu": always on CPU; "cuda": only with CUDA; None: the device under test
    needs_s: float = 0.0  # start only with this much of --budget-s left (a long row must not overrun it)

    @property
    def cuda_only(self) -> bool:
        return self.device == "cuda"

    def where(self, has_cuda: bool) -> str:
        return self.device or ("cuda" if has_cuda else "cpu")


@dataclass
class Row:
    check: str
    setting: str
    device: str
    result: str
    figures: str
    seconds: float = 0.0

    def cells(self) -> list[str]:
        return [self.check, self.setting, self.device, self.result, self.figures.replace("|", "\\|"),
                f"{self.seconds:.1f}"]


HEADER = ["check", "setting", "device", "result", "figures", "s"]


def run_check(check: Check, ctx: Ctx, has_cuda: bool, left_s: float = float("inf")) -> Row:
    """One row: skipped, or run with every exception turned into a FAIL naming it."""
    device = check.where(has_cuda)
    if check.cuda_only and not has_cuda:
        return Row(check.name, check.setting, device, NO_CUDA, "")
    if left_s <= check.needs_s:
        return Row(check.name, check.setting, device, OVER_BUDGET,
                   f"not started: {max(left_s, 0):.0f} s of --budget-s left, it needs {check.needs_s:.0f}; "
                   "run it alone with --only")
    t0 = time.perf_counter()
    try:
        result, figures = "pass", check.fn(ctx)
    except CheckFailed as e:
        result, figures = "FAIL", str(e)
    except NotApplicable as e:
        result, figures = NOT_APPLICABLE, str(e)
    except Exception as e:  # a crash is a failed row, not a crashed table
        result, figures = "FAIL", (
            f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300])
    finally:
        _free(ctx.device)
    return Row(check.name, check.setting, device, result, figures, time.perf_counter() - t0)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- kernels seen


KERNEL_LABELS = (  # (label, substring of a torch.profiler op name), first match wins per op
    ("cudnn", "cudnn_attention"),
    ("flash", "flash_attention"),
    ("efficient", "efficient_attention"),
    ("math", "attention_math"),
    ("overrideable", "attention_overrideable"),
    ("per-head bmm (ours)", "WindowAttentionFunction"),
    ("tiled (ours)", "TiledAttention"),
    ("fused CPU (ours)", "na2d_cpu"),
    ("natten", "natten::"),  # NATTEN's torch ops (a bare "natten" matched a cuDNN op name on an H100)
    ("flex", "flex_attention"),
)
#: The profiler label of each neighborhood route (what ``natten route`` checks it saw).
NA_ROUTE_LABELS = {"fused": "fused CPU (ours)", "tiled": "tiled (ours)", "natten": "natten", "flex": "flex"}


def kernel_labels(op_names: set[str]) -> list[str]:
    """Which attention kernels these profiler op names show, in :data:`KERNEL_LABELS` order."""
    found = {label for name in op_names for label, key in KERNEL_LABELS if key.lower() in name.lower()}
    return [label for label, _ in KERNEL_LABELS if label in found]


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (kineto prints start/stop lines from C++ on every profile)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def profiled_ops() -> Iterator[set[str]]:
    """The names of every op run inside (forward and backward), filled in on exit."""
    from torch.profiler import ProfilerActivity, profile

    names: set[str] = set()
    prof = profile(activities=[ProfilerActivity.CPU])  # aten op names are CPU-side events for CUDA too
    with _quiet_stderr():
        prof.start()
    try:
        yield names
    finally:
        with _quiet_stderr():
            prof.stop()
        raw = getattr(prof.profiler, "kineto_results", None)  # the raw events: prof.events() parses them (~0.2 s)
        if raw is not None:
            names.update(e.name() for e in raw.events())
        else:
            names.update(e.name for e in prof.events())


# ----------------------------------------------------------------------------- module vs reference

DIM, HEADS = 32, 2
KIND_SPEC = AttnSpec.of(window_size=4, kernel_size=5, dilation=2, sr_ratio=2, lsh_chunk=16, routed_topk=2)
KIND_SHAPE = (2, 13, 11)  # batch, H, W: neither a multiple of the window nor of the kernel
# Relative tolerances (output and input gradient, weight gradients): max abs(test - ref) <= tol *
# max abs(ref), per tensor. CPU, 4 seeds: fp32 vs float64 <= 1.1e-6; bf16 autocast vs float64 <= 1e-2
# for outputs and input gradients, <= 1.4e-2 for weight gradients except routed's bias table, 5.8e-2
# (its gather's backward sums in bf16; the window and tiled kernels sum the bias gradient in fp32).
TOL = {("fp32", "cpu"): (1e-5, 1e-5), ("fp32", "cuda"): (1e-4, 1e-4),
       ("bf16", "cpu"): (5e-2, 1e-1), ("bf16", "cuda"): (5e-2, 1e-1)}
# Discrete choices that rounding may flip: replayed from the run under test into the reference.
# (module, function, whether the choice is a set: routed's top-k regions in any order are the same)
DECISIONS: dict[str, tuple[Any, str, bool]] = {"lsh": (lsh_module, "lsh_hash", False),
                                               "routed": (routed_module, "route", True)}


@dataclass
class Run:
    """One forward (+ backward) of a module: output, gradients, kernels seen, discrete choices."""

    out: torch.Tensor
    grads: dict[str, Optional[torch.Tensor]]
    kernels: list[str]
    decisions: list[torch.Tensor] = field(default_factory=list)


@contextlib.contextmanager
def _decisions(kind: str, record: list[torch.Tensor], replay: Optional[list[torch.Tensor]] = None) -> Iterator[None]:
    """Record the discrete choices ``kind`` makes (see :data:`DECISIONS`), or replay given ones."""
    if kind not in DECISIONS:
        yield
        return
    module, name, _ = DECISIONS[kind]
    real = getattr(module, name)
    queue = list(replay) if replay is not None else None

    def choose(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = queue.pop(0).to(args[0].device) if queue else real(*args, **kwargs)
        record.append(out.detach().cpu())
        return out

    with mock.patch.object(module, name, choose):
        yield


def _tf32_flags() -> list[tuple[Any, str, Any]]:
    """(object, attribute, value meaning fp32) of the CUDA matmul and cuDNN convolution TF32 switches:
    the ``fp32_precision`` API where torch has it (2.9+; mixing it with the old flags raises), else
    ``allow_tf32``."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):
        return [(torch.backends.cuda.matmul, "fp32_precision", "ieee"), (conv, "fp32_precision", "ieee")]
    return [(torch.backends.cuda.matmul, "allow_tf32", False), (torch.backends.cudnn, "allow_tf32", False)]


@contextlib.contextmanager
def no_tf32(device: torch.device) -> Iterator[None]:
    """fp32 on CUDA computes in fp32: TF32 off for matmuls and cuDNN convolutions, restored after."""
    flags = _tf32_flags() if device.type == "cuda" else []
    saved = [getattr(obj, name) for obj, name, _ in flags]
    try:
        for obj, name, value in flags:
            setattr(obj, name, value)
        yield
    finally:
        for (obj, name, _), value in zip(flags, saved):
            setattr(obj, name, value)


def run_module(kind: str, build: Callable[[], nn.Module], state: dict, x: torch.Tensor, grad_out: torch.Tensor,
               device: torch.device, dtype: torch.dtype, bf16: bool, train: bool = True,
               replay: Optional[list[torch.Tensor]] = None, profile: bool = False) -> Run:
    """``build()`` with ``state`` on ``device``/``dtype``, forward (bf16 autocast if asked) + backward;
    with ``profile``, the kernels it ran (the profiler costs far more than these small modules)."""
    module = build()
    module.load_state_dict(state)
    module.to(device=device, dtype=dtype).train()
    xx = x.detach().to(device, dtype).requires_grad_(train)
    decisions: list[torch.Tensor] = []
    with (profiled_ops() if profile else contextlib.nullcontext(set())) as ops, _decisions(kind, decisions, replay):
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16), torch.set_grad_enabled(train):
            out = module(xx)
        if train:
            out.backward(grad_out.to(device, out.dtype))
        _sync(device)
    grads = {"dx": xx.grad} if train else {}
    if train:
        grads.update({f"d{n}": p.grad for n, p in module.named_parameters()})
    cpu64 = lambda t: None if t is None else t.detach().to(CPU, torch.float64)  # noqa: E731
    return Run(cpu64(out), {k: cpu64(g) for k, g in grads.items()}, kernel_labels(ops), decisions)


def rel_diffs(test: Run, ref: Run) -> dict[str, float]:
    """max |test - ref| / max |ref| of the output and every gradient (inf where one is missing)."""
    pairs = {"out": (test.out, ref.out), **{k: (g, ref.grads.get(k)) for k, g in test.grads.items()}}
    diffs = {}
    for name, (a, b) in pairs.items():
        if a is None and b is None:
            continue
        if a is None or b is None or a.shape != b.shape:
            diffs[name] = float("inf")
            continue
        scale = b.abs().max().item()
        err = (a - b).abs().max().item()
        diffs[name] = err / scale if scale > 0 else err
    return diffs


def _decision_share(kind: str, test: list[torch.Tensor], own: list[torch.Tensor]) -> Optional[float]:
    """Share of the reference's own discrete choices that the run under test made differently
    (lsh: each key's bucket; routed: each region's set of gathered regions, per entry)."""
    if not test:
        return None
    differ = total = 0
    for a, b in zip(test, own):
        if DECISIONS[kind][2]:
            a, b = a.sort(-1).values, b.sort(-1).values
        differ += int((a != b).sum())
        total += a.numel()
    return differ / max(total, 1)


@dataclass
class Comparison:
    """A run under test against its reference, with the verdict."""

    diffs: dict[str, float]
    tol: tuple[float, float]  # output and input gradient, weight gradients
    kernels: list[str]
    decisions_differ: Optional[float]

    def tolerance(self, name: str) -> float:
        return self.tol[0] if name in ("out", "dx") else self.tol[1]

    @property
    def ok(self) -> bool:
        return all(d <= self.tolerance(name) for name, d in self.diffs.items())

    def tol_text(self) -> str:
        return f"tol {self.tol[0]:.0e}" + (f" (dW {self.tol[1]:.0e})" if self.tol[1] != self.tol[0] else "")

    def worst(self) -> float:
        return max(self.diffs.values())

    def figures(self) -> str:
        weights = {k: v for k, v in self.diffs.items() if k not in ("out", "dx")}
        parts = [f"out {self.diffs['out']:.1e}"]
        if "dx" in self.diffs:
            parts.append(f"dx {self.diffs['dx']:.1e}")
        if weights:
            name = max(weights, key=weights.get)  # type: ignore[arg-type]
            parts.append(f"dW {weights[name]:.1e} ({name[1:]})")
        text = (f"rel. max abs diff {', '.join(parts)}; {self.tol_text()}; "
                f"kernels: {', '.join(self.kernels) or 'no SDPA'}")
        if self.decisions_differ is not None:
            text += f"; choices differing from the reference's own: {self.decisions_differ:.1%} (replayed)"
        return text


def compare_module(kind: str, build: Callable[[], nn.Module], shape: tuple[int, int, int], device: torch.device,
                   precision: str, tol_scale: float = 1.0, train: bool = True,
                   around_test: Callable[[], ContextManager[Any]] = contextlib.nullcontext) -> Comparison:
    """``build()``'s module on ``device`` in ``precision`` (fp32 | bf16 autocast) against the reference:
    float64 on CPU when ``device`` is the CPU, else CPU fp32; same weights, input and upstream gradient."""
    torch.manual_seed(0)
    state = build().state_dict()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, DIM, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(*shape, DIM, generator=gen, dtype=torch.float64)
    ref_dtype = torch.float64 if device.type == "cpu" else torch.float32
    with around_test(), (no_tf32(device) if precision == "fp32" else contextlib.nullcontext()):
        test = run_module(kind, build, state, x, grad_out, device, torch.float32, precision == "bf16", train,
                          profile=True)
    own = run_module(kind, build, state, x, grad_out, CPU, ref_dtype, False, train) if test.decisions else None
    ref = run_module(kind, build, state, x, grad_out, CPU, ref_dtype, False, train, replay=test.decisions)
    share = _decision_share(kind, test.decisions, own.decisions) if own is not None else None
    tol = tuple(t * tol_scale for t in TOL[(precision, device.type)])
    return Comparison(rel_diffs(test, ref), tol, test.kernels, share)  # type: ignore[arg-type]


def _verdict(cmp: Comparison) -> str:
    text = cmp.figures()
    if not cmp.ok:
        raise CheckFailed("over tolerance: " + text)
    return text


def attention_check(kind: str, precision: str, device: torch.device) -> Callable[[Ctx], str]:
    """Row: ``kind``'s module on ``device`` in ``precision`` against its reference."""

    def check(ctx: Ctx) -> str:
        build = lambda: create_attention(kind, DIM, HEADS, KIND_SPEC)  # noqa: E731
        return _verdict(compare_module(kind, build, KIND_SHAPE, device, precision, ctx.tol_scale))

    return check


# ----------------------------------------------------------------------------- routes

_WIDE = PER_HEAD_MIN_WINDOWS // 16  # batch of 16 x 16 maps (16 windows of 4 x 4 each) reaching the threshold
SDPA_ROUTES: dict[str, tuple[str, dict[str, Any], tuple[int, int, int], bool]] = {
    # name: (kind, AttnSpec overrides, (batch, H, W), training)
    "window, no bias": ("window", dict(rel_pos_bias=False), (2, 8, 8), True),
    "window, padded map (mask), no bias": ("window", dict(rel_pos_bias=False), (2, 10, 10), True),
    "shifted_window (region mask), no bias": ("shifted_window", dict(rel_pos_bias=False), (2, 8, 8), True),
    "window + bias, inference": ("window", {}, (2, 8, 8), False),
    f"window + bias, training, 8 < {PER_HEAD_MIN_WINDOWS} windows": ("window", {}, (2, 8, 8), True),
    f"window + bias, training, {PER_HEAD_MIN_WINDOWS} windows": ("window", {}, (_WIDE, 16, 16), True),
    f"shifted_window + bias, training, {PER_HEAD_MIN_WINDOWS} windows": ("shifted_window", {}, (_WIDE, 16, 16), True),
}


def _spec(**overrides: Any) -> AttnSpec:
    return dataclasses.replace(KIND_SPEC, **overrides)


def _fp32_and_bf16(kind: str, build: Callable[[], nn.Module], shape: tuple[int, int, int], ctx: Ctx,
                   train: bool = True, around: Callable[[], ContextManager[Any]] = contextlib.nullcontext) -> str:
    """A route row's figures: ``build()``'s module in fp32 and in bf16 autocast against the reference,
    the kernels each ran; :class:`CheckFailed` when either is over tolerance."""
    parts, ok = [], True
    for precision in ("fp32", "bf16"):
        cmp = compare_module(kind, build, shape, ctx.device, precision, ctx.tol_scale, train, around_test=around)
        ok &= cmp.ok
        parts.append(f"{precision}: {', '.join(cmp.kernels) or 'no SDPA'} (rel. max abs diff {cmp.worst():.1e}, "
                     f"{cmp.tol_text()})")
    text = "; ".join(parts)
    if not ok:
        raise CheckFailed("over tolerance: " + text)
    return text


def sdpa_route_check(route: str) -> Callable[[Ctx], str]:
    """Row: one window route, fp32 and bf16, on the device under test: kernels used, checked."""
    kind, overrides, shape, train = SDPA_ROUTES[route]

    def check(ctx: Ctx) -> str:
        build = lambda: create_attention(kind, DIM, HEADS, _spec(**overrides))  # noqa: E731
        return _fp32_and_bf16(kind, build, shape, ctx, train)

    return check


def natten_route_check(kind: str) -> Callable[[Ctx], str]:
    """Row: neighborhood/dilated with and without bias: the route picked, the kernel seen, checked."""

    def check(ctx: Ctx) -> str:
        parts = [f"natten {'installed' if backends.natten_installed() else 'not installed'}"]
        bad = []
        for bias in (True, False):
            call = backends.Call("neighborhood", ctx.device.type, torch.float32, bias, True, bias)
            picked = backends.choose(call)
            build = lambda: create_attention(kind, DIM, HEADS, _spec(rel_pos_bias=bias))  # noqa: E731
            cmp = compare_module(kind, build, KIND_SHAPE, ctx.device, "fp32", ctx.tol_scale)
            seen = [r for r, label in NA_ROUTE_LABELS.items() if label in cmp.kernels]
            route = "/".join(seen) or "none"
            parts.append(f"{'bias' if bias else 'no bias'}: picked {picked}, took {route} "
                         f"(rel. max abs diff {cmp.worst():.1e})")
            if route != picked:
                bad.append(f"{'bias' if bias else 'no bias'} took {route}, backends picked {picked}")
            if not cmp.ok:
                bad.append(f"{'bias' if bias else 'no bias'} over tolerance ({cmp.tol_text()})")
        if bad:
            raise CheckFailed("; ".join(bad) + " | " + "; ".join(parts))
        return "; ".join(parts)

    return check


ROUTED_KINDS = {"window": (_WIDE, 16, 16), "shifted_window": (_WIDE, 16, 16), "neighborhood": KIND_SHAPE,
                "dilated": KIND_SHAPE}


def forced_route_check(kind: str, route: str) -> Callable[[Ctx], str]:
    """Row: ``kind`` forced onto ``route``, training (with a bias; NATTEN without), fp32 and bf16."""
    family = attention_class(kind).route_family
    bias = route != "natten"

    def check(ctx: Ctx) -> str:
        call = backends.Call(family, ctx.device.type, torch.float32, True, True, bias,
                             windows=ROUTED_KINDS[kind][0] * 16)
        reason = backends.ROUTES[route].refuses(call)
        if reason is not None:
            raise NotApplicable(f"{'bias' if bias else 'no bias'}, training on {ctx.device.type}: {reason}")
        build = lambda: create_attention(kind, DIM, HEADS, _spec(rel_pos_bias=bias))  # noqa: E731
        return _fp32_and_bf16(kind, build, ROUTED_KINDS[kind], ctx, around=lambda: backends.force(route))

    return check


# ----------------------------------------------------------------------------- training steps

# Budget a compiled row must find left (inductor, cold cache). H100, torch 2.11: swin pico's warm-up
# took 81 s, swin_window's 54 s, swin_local's over 60 s (a 60 s guess let it overrun the budget).
COMPILE_NEEDS_S = {"pico": 150.0, "tiny": 240.0}
SETTINGS = {  # setting name: ClassificationModule model flags on top of trainer=gpu's bf16 + channels-last
    "bf16-mixed, channels-last": {},
    "+ grad checkpointing": {"grad_checkpointing": True},
    "+ model.compile": {"compile": True},
}


@dataclass(frozen=True)
class StepShape:
    img: int
    batch: int
    warmup: int
    steps: int


def step_shape(ctx: Ctx, size: str, compiled: bool) -> StepShape:
    """Training-step sizes: 224² on CUDA; 32² and one timed step on CPU."""
    if not ctx.cuda:
        return StepShape(32, 4, 1, 1)
    batch = 32 if size == "tiny" else 64
    if ctx.quick:
        return StepShape(224, batch // 2, 2 if compiled else 1, 2)
    return StepShape(224, batch, 3 if compiled else 2, 5)


def _dynamo_graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def train_step_check(variant: str, size: str, setting: str) -> Callable[[Ctx], str]:
    """Row: ``ClassificationModule`` training steps as ``trainer=gpu`` runs them (bf16 autocast,
    channels-last, AdamW), with ``setting``'s flags: loss finite at every step, images/s, peak memory."""

    def check(ctx: Ctx) -> str:
        from vision_attn.module import ClassificationModule

        flags = SETTINGS[setting]
        shape = step_shape(ctx, size, "compile" in flags)
        if "compile" in flags:
            from torch import _dynamo

            _dynamo.reset()
            _dynamo.utils.counters.clear()
        torch.manual_seed(0)
        module = ClassificationModule(model=dict(variant=variant, size=size, channels_last=True, **flags),
                                      num_classes=100, img_size=shape.img,
                                      optim=dict(opt="adamw", lr=1e-4, weight_decay=0.05)).to(ctx.device)
        module.train()
        opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
        x = torch.randn(shape.batch, 3, shape.img, shape.img, device=ctx.device)
        y = torch.randint(0, 100, (shape.batch,), device=ctx.device)
        losses: list[float] = []

        def step() -> None:
            with torch.autocast(ctx.device.type, torch.bfloat16):
                loss = nn.functional.cross_entropy(module(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())  # synchronises
            if not math.isfinite(losses[-1]):
                raise CheckFailed(f"loss {losses[-1]} at step {len(losses)}")

        t0 = time.perf_counter()
        for _ in range(shape.warmup):
            step()
        first = time.perf_counter() - t0
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats(ctx.device)
        t0 = time.perf_counter()
        for _ in range(shape.steps):
            step()
        per_step = (time.perf_counter() - t0) / shape.steps
        peak = f"peak {torch.cuda.max_memory_allocated(ctx.device) / 2**20:.0f} MB" if ctx.cuda else "peak n/a (CPU)"
        text = (f"{shape.img}², batch {shape.batch}: loss {losses[-1]:.3f} (finite at all {len(losses)} steps), "
                f"{shape.batch / per_step:.1f} img/s, {peak}")
        if "compile" in flags:
            text += f"; warm-up (compile) {first:.0f} s, dynamo graph breaks {_dynamo_graph_breaks()}"
        return text

    return check


# ----------------------------------------------------------------------------- speed (CUDA)


def _timed(fn: Callable[[], object], device: torch.device, bf16: bool = True) -> Callable[[], None]:
    """``fn`` under bf16 autocast, synchronised, for :func:`interleaved`."""

    def run() -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            fn()
        _sync(device)

    return run


def swin_vs_timm(device: torch.device, batch: int = 64, img: int = 224, reps: int = 10, warmup: int = 2,
                 compiled: bool = False) -> str:
    """Our Swin-T vs timm's, same random weights: training and inference images/s, bf16 autocast
    (``compiled``: both under ``torch.compile``; the warm-ups compile)."""
    name = model_bench.TIMM_NAMES["tiny"]
    import timm

    from vision_attn import create_model

    torch.manual_seed(0)
    theirs = timm.create_model(name, num_classes=1000, img_size=img)
    ours = create_model("swin", "tiny", num_classes=1000, img_size=img)
    ours.load_state_dict(theirs.state_dict())
    ours.to(device)
    theirs.to(device)
    if compiled:
        ours, theirs = torch.compile(ours), torch.compile(theirs)
    x = torch.randn(batch, 3, img, img, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    train = interleaved({n: _timed(model_bench._train_step(m, x, y, torch.optim.SGD(m.parameters(), lr=1e-4)), device)
                         for n, m in (("ours", ours), ("timm", theirs))}, reps, warmup)
    infer = interleaved({n: _timed(model_bench._infer(m, x), device) for n, m in (("ours", ours), ("timm", theirs))},
                        reps, warmup)
    ips = {f"{k}|{n}": batch / median(t[n]) for k, t in (("train", train), ("infer", infer)) for n in t}
    mode = "both compiled" if compiled else "eager"
    return (f"{img}², batch {batch}, bf16 autocast, {mode}, median of {reps}: "
            f"train ours {ips['train|ours']:.0f} img/s, "
            f"timm {ips['train|timm']:.0f} img/s ({ips['train|ours'] / ips['train|timm']:.2f}x); "
            f"inference ours {ips['infer|ours']:.0f}, timm {ips['infer|timm']:.0f} "
            f"({ips['infer|ours'] / ips['infer|timm']:.2f}x)")


TIME_SIZES = (56, 112, 224)
TOKENS_PER_BATCH = 2**20  # batch = this / map tokens: ~1M queries x 3 heads fill an H100


def attention_time(device: torch.device, size: int, batch: Optional[int] = None, reps: int = 10) -> str:
    """Neighborhood vs window forward + backward (``bench attention``'s kernels and shapes, bias
    included) at ``size``², bf16 autocast, interleaved; median ms and the ratio."""
    from vision_attn.attention.rel_pos import bias_grid
    from vision_attn.bench.attention import HEAD_DIM, KERNEL, kernel_for
    from vision_attn.bench.attention import HEADS as B_HEADS

    batch = batch or max(1, TOKENS_PER_BATCH // size**2)
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, B_HEADS, size, size, HEAD_DIM, device=device, requires_grad=True) for _ in range(3))
    table = nn.Parameter(new_bias_table(B_HEADS, KERNEL).detach().to(device))
    up = torch.randn(batch, B_HEADS, size, size, HEAD_DIM, device=device)

    def step(kind: str) -> Callable[[], None]:
        fn = kernel_for(kind)

        def run() -> None:
            out = fn(q, k, v, bias_grid(table))
            torch.autograd.grad(out, (q, k, v, table), up.to(out.dtype))

        return _timed(run, device)

    def floor() -> None:  # window attention without bias: SDPA's flash kernel
        out = kernel_for("window")(q, k, v, None)
        torch.autograd.grad(out, (q, k, v), up.to(out.dtype))

    kinds = ("window", "neighborhood")
    cases = {kind: step(kind) for kind in kinds}
    cases["floor"] = _timed(floor, device)
    times = interleaved(cases, reps, warmup=2)
    ms = {kind: median(t) * 1e3 for kind, t in times.items()}
    na_route = backends.choose(backends.Call("neighborhood", device.type, torch.bfloat16, True, True, True))
    return (f"batch {batch}, {B_HEADS} heads x {HEAD_DIM}, k = window = {KERNEL}, bias, bf16 autocast, fwd+bwd "
            f"median of {reps}: window {ms['window']:.2f} ms, neighborhood ({na_route}) {ms['neighborhood']:.2f} ms "
            f"({ms['neighborhood'] / ms['window']:.2f}x window; target <= 1.5x); flash floor (window, no bias) "
            f"{ms['floor']:.2f} ms")


# ----------------------------------------------------------------------------- perf: the GPU targets


def _grad_step(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, up: torch.Tensor,
               params: list[torch.Tensor]) -> Callable[[], None]:
    """Forward ``fn(x)`` and backward with the upstream gradient ``up`` into ``x`` and ``params``."""

    def run() -> None:
        out = fn(x)
        torch.autograd.grad(out, [x, *params], up.to(out.dtype), allow_unused=True)  # the floor has no bias

    return run


def _window_modules(device: torch.device, dim: int, heads: int, window: int) -> tuple[nn.Module, nn.Module]:
    """Our WindowAttention and timm's, same weights (qkv, proj, bias table)."""
    from timm.models.swin_transformer import WindowAttention as TimmWindowAttention

    torch.manual_seed(0)
    ours = create_attention("window", dim, heads, _spec(window_size=window)).to(device)
    theirs = TimmWindowAttention(dim, heads, window_size=window).to(device)
    theirs.load_state_dict(ours.state_dict(), strict=False)  # its relative_position_index is a buffer of its own
    return ours, theirs


def window_vs_timm(ctx: Ctx) -> str:
    """Row: window + bias attention fwd+bwd (Swin-T stage 1: 56², 96 ch, 3 heads, window 7, batch 64)
    on each of our window routes and a compiled matmul-softmax, against timm's ``WindowAttention``
    (fused SDPA and its explicit path) and the flash floor (SDPA without bias); bf16 autocast."""
    from timm.models.swin_transformer import window_partition, window_reverse

    batch, size, dim, heads, win = (2, 14, 32, 2, 7) if ctx.quick else (64, 56, 96, 3, 7)
    reps = 2 if ctx.quick else 10
    ours, theirs = _window_modules(ctx.device, dim, heads, win)
    x = torch.randn(batch, size, size, dim, device=ctx.device, requires_grad=True)
    up = torch.randn_like(x)

    def ours_on(route: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(t: torch.Tensor) -> torch.Tensor:
            with backends.force(route):
                return ours(t)
        return fn

    def timm_with(fused: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(t: torch.Tensor) -> torch.Tensor:
            theirs.fused_attn = fused
            windows = window_partition(t, (win, win)).view(-1, win * win, dim)
            return window_reverse(theirs(windows).view(-1, win, win, dim), (win, win), size, size)
        return fn

    def floor(t: torch.Tensor) -> torch.Tensor:  # flash: the same q, k, v, no bias
        windows = window_partition(t, (win, win)).view(-1, win * win, dim)
        q, k, v = ours.qkv(windows).view(-1, win * win, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return window_reverse(ours.proj(out.transpose(1, 2).reshape(-1, win, win, dim)), (win, win), size, size)

    explicit = _explicit_window(ours, win)
    cases = {f"ours {r}": ours_on(r) for r in backends.routes("window")}
    cases.update({"ours auto": ours_on("auto"), "compiled matmul-softmax": explicit,
                  "timm fused": timm_with(True), "timm explicit": timm_with(False), "flash floor (no bias)": floor})
    if ctx.quick:
        cases.pop("compiled matmul-softmax")  # no compile in the CPU dry run
    params = [p for p in ours.parameters()]
    steps = {n: _timed(_grad_step(f, x, up, params if n.startswith(("ours", "compiled", "flash")) else
                                  list(theirs.parameters())), ctx.device) for n, f in cases.items()}
    ms = {n: median(t) * 1e3 for n, t in interleaved(steps, reps, warmup=2).items()}
    best_timm = min(ms["timm fused"], ms["timm explicit"])
    auto = backends.choose(backends.Call("window", ctx.device.type, torch.bfloat16, True, True, True,
                                         windows=batch * (size // win) ** 2))
    parts = ", ".join(f"{n} {v:.2f} ms" for n, v in ms.items())
    return (f"batch {batch}, {size}², {dim} ch, {heads} heads, window {win}, bias trained, median of {reps}: {parts}; "
            f"auto ({auto}) / faster timm: {ms['ours auto'] / best_timm:.2f}x (target <= 0.8x)")


def _explicit_window(module: nn.Module, win: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.compile`` of an explicit matmul + bias + softmax window attention with ``module``'s weights."""
    from timm.models.swin_transformer import window_partition, window_reverse

    from vision_attn.attention.rel_pos import window_bias

    heads, dim = module.num_heads, module.dim

    def fn(t: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = t.shape
        windows = window_partition(t, (win, win)).view(-1, win * win, dim)
        q, k, v = module.qkv(windows).view(-1, win * win, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        scores = (q * module.scale) @ k.transpose(-1, -2) + window_bias(module.bias_grid(), win, win).to(q.dtype)
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(-1, win, win, dim)
        return window_reverse(module.proj(out), (win, win), H, W)

    return torch.compile(fn)


DILATIONS = (2, 3, 4, 5, 6, 7, 8)


def dilated_vs_neighborhood(ctx: Ctx) -> str:
    """Row: dilated (d = 2..8) / neighborhood attention fwd+bwd with bias, 56², ~1M tokens, auto routes."""
    from vision_attn.attention.rel_pos import bias_grid
    from vision_attn.bench.attention import HEAD_DIM, KERNEL, kernel_for
    from vision_attn.bench.attention import HEADS as B_HEADS

    size = 14 if ctx.quick else 56
    batch = 1 if ctx.quick else max(1, TOKENS_PER_BATCH // size**2)
    reps = 2 if ctx.quick else 10
    dilations = [d for d in DILATIONS if d * KERNEL <= size] or [1]
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, B_HEADS, size, size, HEAD_DIM, device=ctx.device, requires_grad=True)
               for _ in range(3))
    table = nn.Parameter(new_bias_table(B_HEADS, KERNEL).detach().to(ctx.device))
    up = torch.randn(batch, B_HEADS, size, size, HEAD_DIM, device=ctx.device)

    def step(kind: str) -> Callable[[], None]:
        fn = kernel_for(kind)

        def run() -> None:
            out = fn(q, k, v, bias_grid(table))
            torch.autograd.grad(out, (q, k, v, table), up.to(out.dtype))

        return _timed(run, ctx.device)

    kinds = ["neighborhood"] + [f"dilated_{d}" for d in dilations]
    ms = {kd: median(t) * 1e3 for kd, t in interleaved({kd: step(kd) for kd in kinds}, reps, warmup=2).items()}
    worst = max(kinds[1:] or kinds, key=ms.get)
    return (f"{size}², batch {batch}, k {KERNEL}, bias, bf16 autocast, median of {reps}: "
            + ", ".join(f"{kd} {v:.2f} ms" for kd, v in ms.items())
            + f"; worst {worst} / neighborhood {ms[worst] / ms['neighborhood']:.2f}x (target <= 1.1x)")


LOCAL_VS_SWIN = ("swin", "swin_local", "swin_dilated")
#: The rows of the GPU targets (``--perf``): kernels, whole models, every variant's tiny training step.
PERF = r"^perf |^swin-T|^attention time|^train step \S+ tiny bf16-mixed, channels-last$"


def local_vs_swin(ctx: Ctx) -> str:
    """Row: swin_local and swin_dilated tiny training img/s against swin tiny (224², batch 32, bf16),
    each with its attention share (the same step with attention replaced by ``out = v``)."""
    from vision_attn import create_model

    batch, img, reps = (2, 32, 1) if ctx.quick else (32, 224, 5)
    size = "pico" if ctx.quick else "tiny"
    x = torch.randn(batch, 3, img, img, device=ctx.device)
    y = torch.randint(0, 1000, (batch,), device=ctx.device)
    steps = {}
    for variant in LOCAL_VS_SWIN:
        torch.manual_seed(0)
        m = create_model(variant, size, num_classes=1000, img_size=img).to(ctx.device)
        step = model_bench._train_step(m, x, y, torch.optim.SGD(m.parameters(), lr=1e-4))
        steps[variant] = _timed(step, ctx.device)
        steps[f"{variant} (attention free)"] = _timed(_attention_free(step), ctx.device)
    times = {n: median(t) for n, t in interleaved(steps, reps, warmup=1).items()}
    ips = {v: batch / times[v] for v in LOCAL_VS_SWIN}
    share = {v: 1 - times[f"{v} (attention free)"] / times[v] for v in LOCAL_VS_SWIN}
    return (f"{size}, {img}², batch {batch}, bf16, median of {reps}: "
            + "; ".join(f"{v} {ips[v]:.0f} img/s ({ips[v] / ips['swin']:.2f}x swin, {_share_text(share[v])})"
                        for v in LOCAL_VS_SWIN) + " (target >= 0.85x)")


def _share_text(share: float) -> str:
    """The attention share of a step; an attention-free step that timed slower is noise, said as such."""
    return f"attention {share:.0%} of the step" if share >= 0 else "attention share below the timing noise"


def _attention_free(step: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        with backends.attention_free():
            step()

    return run


# ----------------------------------------------------------------------------- train.py end to end

CPU_TRAIN = ["trainer=debug", "trainer.accelerator=cpu", "data.image_size=32", "data.batch_size=16",
             "data.train_size=64", "data.val_size=32", "data.test_size=32", "model.embed_dim=16"]
GPU_TRAIN = ["trainer=gpu", "trainer.max_epochs=1", "trainer.limit_train_batches=40", "trainer.limit_val_batches=4",
             "trainer.limit_test_batches=4"]
DDP_TRAIN = ["trainer=ddp", "trainer.devices=1", "trainer.accelerator=gpu", "trainer.precision=bf16-mixed",
             "trainer.max_epochs=1", "trainer.limit_train_batches=10", "trainer.limit_val_batches=2",
             "trainer.limit_test_batches=2", "logger=csv"]


def run_train(args: list[str], tmp: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python train.py <args>`` from the repository root, W&B offline, its files under ``tmp``."""
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    env.update({f"WANDB_{d}_DIR": str(tmp / f"wandb_{d.lower()}") for d in ("CACHE", "CONFIG", "DATA")})
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


_ERROR_LINE = re.compile(r"^(\w+\.)*\w*(Error|Exception|Interrupt)\b|^Error\b")


def _tail(proc: subprocess.CompletedProcess) -> str:
    """The line that says why a child failed: its last exception line (stderr first), else the
    last line of stderr, else of stdout."""
    for stream in (proc.stderr, proc.stdout):
        lines = [ln.strip() for ln in stream.strip().splitlines() if ln.strip()]
        errors = [ln for ln in lines if _ERROR_LINE.match(ln)]
        if errors or (lines and stream is proc.stderr):
            return (errors or lines)[-1][:240]
    lines = proc.stdout.strip().splitlines()
    return lines[-1][:240] if lines else "(no output)"


def wandb_summary(run_dir: Path) -> dict:
    """``python -m wandb leet inspect --summary --json`` of the one offline run under ``run_dir``."""
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    if len(runs) != 1:
        raise CheckFailed(f"expected one W&B offline run in {run_dir / 'wandb'}, found {len(runs)}")
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json", str(runs[0])],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode:
        raise CheckFailed(f"wandb leet inspect exit {proc.returncode}: {_tail(proc)}")
    return json.loads(proc.stdout)


def train_e2e(ctx: Ctx) -> str:
    """Row: ``train.py`` end to end in a temporary run dir; the W&B offline run read back."""
    args = GPU_TRAIN if ctx.cuda else CPU_TRAIN
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        run_dir = Path(tmp) / "run"
        t0 = time.perf_counter()
        proc = run_train([*args, f"hydra.run.dir={run_dir}"], Path(tmp))
        wall = time.perf_counter() - t0
        if proc.returncode:
            raise CheckFailed(f"train.py exit {proc.returncode}: {_tail(proc)}")
        run = wandb_summary(run_dir)
    summary = run.get("summary", {})
    if run.get("state") != "finished" or run.get("exit_code") != 0:
        raise CheckFailed(f"W&B run state {run.get('state')}, exit code {run.get('exit_code')}")
    missing = [k for k in ("val/acc1", "test/acc1", "train/images_per_sec", "train/peak_mem_mb") if k not in summary]
    if missing:
        raise CheckFailed(f"W&B summary lacks {missing}")
    if not float(summary["train/images_per_sec"]) > 0:
        raise CheckFailed(f"train/images_per_sec = {summary['train/images_per_sec']}")
    return (f"exit 0 in {wall:.0f} s; W&B offline run finished: val/acc1 {float(summary['val/acc1']):.3f}, "
            f"test/acc1 {float(summary['test/acc1']):.3f}, {float(summary['train/images_per_sec']):.0f} img/s, "
            f"peak {float(summary['train/peak_mem_mb']):.0f} MB")


NCCL_BANNER = "distributed_backend=nccl"
REGISTERED = "All distributed processes registered. Starting with 1 processes"


def ddp_nccl(ctx: Ctx) -> str:
    """Row: ``trainer=ddp`` on one GPU: Lightning initialises an NCCL process group and trains."""
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        t0 = time.perf_counter()
        proc = run_train([*DDP_TRAIN, f"hydra.run.dir={Path(tmp) / 'run'}"], Path(tmp))
        wall = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    if proc.returncode:
        raise CheckFailed(f"train.py exit {proc.returncode}: {_tail(proc)}")
    missing = [s for s in (NCCL_BANNER, REGISTERED) if s not in out]
    if missing:
        raise CheckFailed(f"exit 0 but the log lacks {missing}")
    final = re.search(r"val/acc1=([0-9.]+)", out.split("final metrics:")[-1])
    return (f"exit 0 in {wall:.0f} s; {NCCL_BANNER}, 1 process registered"
            + (f"; final val/acc1 {final.group(1)}" if final else ""))


# ----------------------------------------------------------------------------- the table


def checks(device: torch.device) -> list[Check]:
    """Every row, in the order it runs (the compiled training steps last: they take longest)."""
    cuda = torch.device("cuda")
    rows: list[Check] = []
    for kind in attention_kinds():
        for precision in ("fp32", "bf16"):
            label = "bf16 autocast" if precision == "bf16" else "fp32"
            rows.append(Check(f"attention {kind}", f"cpu {label} vs float64", attention_check(kind, precision, CPU),
                              device="cpu"))
            rows.append(Check(f"attention {kind}", f"cuda {label} vs cpu fp32", attention_check(kind, precision, cuda),
                              device="cuda"))
    rows += [Check("sdpa route", route, sdpa_route_check(route)) for route in SDPA_ROUTES]
    rows += [Check("natten route", kind, natten_route_check(kind)) for kind in ("neighborhood", "dilated")]
    rows += [Check(f"route {kind}", route, forced_route_check(kind, route))
             for kind in ROUTED_KINDS for route in backends.routes(attention_class(kind).route_family)]
    steps = [(v, s, st) for st in SETTINGS for s in ("pico", "tiny") for v in VARIANTS]
    rows += [Check(f"train step {v} {s}", st, train_step_check(v, s, st)) for v, s, st in steps if "compile" not in st]
    rows.append(Check("swin-T vs timm swin-T", "224², batch 64, bf16: train + inference img/s",
                      lambda ctx: swin_vs_timm(ctx.device, *((32, 224, 3) if ctx.quick else (64, 224, 10))),
                      device="cuda"))
    for size in TIME_SIZES:
        rows.append(Check(f"attention time {size}²", "neighborhood vs window, fwd+bwd",
                          lambda ctx, size=size: attention_time(ctx.device, size, reps=3 if ctx.quick else 10),
                          device="cuda"))
    rows.append(Check("perf swin-T vs timm swin-T compiled", "224², batch 64, bf16, both torch.compile",
                      lambda ctx: swin_vs_timm(ctx.device, *((32, 224, 3) if ctx.quick else (64, 224, 10)), warmup=3,
                                               compiled=True), device="cuda", needs_s=300))
    rows.append(Check("perf window + bias vs timm", "56², batch 64, fwd+bwd, every route", window_vs_timm,
                      device="cuda", needs_s=90))
    rows.append(Check("perf dilated vs neighborhood", "56², d = 2..8, fwd+bwd", dilated_vs_neighborhood,
                      device="cuda", needs_s=60))
    rows.append(Check("perf local vs swin", "tiny 224², batch 32, train img/s + attention share", local_vs_swin,
                      device="cuda", needs_s=60))
    e2e = "trainer=gpu trainer.max_epochs=1" if device.type == "cuda" else "trainer=debug, CPU, 32², embed_dim 16"
    rows.append(Check("train.py + W&B offline", e2e, train_e2e))
    rows.append(Check("ddp nccl", "trainer=ddp trainer.devices=1", ddp_nccl, device="cuda"))
    rows += [Check(f"train step {v} {s}", st, train_step_check(v, s, st), device="cuda", needs_s=COMPILE_NEEDS_S[s])
             for v, s, st in steps if "compile" in st]
    return rows


def header_lines(device: torch.device, argv: list[str]) -> list[str]:
    """What the figures come from: the command, the CPU (and its ISA), the GPU and the packages."""
    import lightning
    import timm

    lines = [f"command: python -m vision_attn.bench gpu {' '.join(argv)}".rstrip(),
             f"machine: {machine()}; CPU capability {torch.backends.cpu.get_cpu_capability()}"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        import torch.distributed as dist

        version = torch.cuda.nccl.version() if dist.is_nccl_available() else "absent"
        nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        lines.append(f"gpu: {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, "
                     f"cuDNN {torch.backends.cudnn.version()}, NCCL {nccl}")
    else:
        lines.append("gpu: none (CPU dry run: CUDA rows skipped)")
    natten = "not installed"
    if backends.natten_installed():
        import natten as natten_pkg

        natten = getattr(natten_pkg, "__version__", "installed")
    lines.append(f"packages: timm {timm.__version__}, lightning {lightning.__version__}, natten {natten}")
    return lines


def run_rows(selected: list[Check], ctx: Ctx, has_cuda: bool, budget_s: float) -> list[Row]:
    """Run the checks in order, one progress line each; none starts after ``budget_s`` seconds."""
    t0, rows = time.perf_counter(), []
    for i, check in enumerate(selected, 1):
        row = run_check(check, ctx, has_cuda, left_s=budget_s - (time.perf_counter() - t0))
        rows.append(row)
        print(f"[{i}/{len(selected)}] {row.check} | {row.setting}: {row.result} ({row.seconds:.1f} s) {row.figures}",
              flush=True)
    return rows


def summary_line(rows: list[Row]) -> str:
    counts = {r: sum(row.result == r for row in rows) for r in ("pass", "FAIL", NOT_APPLICABLE, NO_CUDA, OVER_BUDGET)}
    return (f"{len(rows)} rows: {counts['pass']} pass, {counts['FAIL']} FAIL, {counts[NOT_APPLICABLE]} n/a, "
            f"{counts[NO_CUDA]} {NO_CUDA}, "
            f"{counts[OVER_BUDGET]} {OVER_BUDGET}; {sum(r.seconds for r in rows):.0f} s in the rows")


def parse(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m vision_attn.bench gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-cuda", action="store_true", help="the CPU dry run even where CUDA is present")
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=None,
                   help="fewer steps and repetitions, smaller batches (default: on without CUDA, off with it)")
    p.add_argument("--only", metavar="REGEX", help="only rows whose 'check setting' matches (re.search)")
    p.add_argument("--perf", action="store_true", help=f"only the timing rows of the GPU targets (--only {PERF!r})")
    p.add_argument("--list", action="store_true", help="print the rows that would run, run nothing")
    p.add_argument("--tol-scale", type=float, default=1.0, help="multiply every tolerance (0 makes them fail)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="start no row after this many seconds, a compiled one only with 60 s (pico) or 150 s "
                        "(tiny) of it left: the rest say 'skipped: time budget' (default 420: meant to end within ~8 "
                        "minutes on one H100, not yet measured there)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op CPU threads (default: 1 for the CPU dry run, where a co-running job turns every "
                        "OpenMP region into a stall; torch's default with CUDA; 0 = torch's default)")
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="directory for gpu_check.md")
    return p, p.parse_args(argv)


def select(parser: argparse.ArgumentParser, all_checks: list[Check], only: Optional[str]) -> list[Check]:
    """The checks ``--only`` keeps (all without it); a bad or empty pattern is a usage error."""
    if not only:
        return all_checks
    try:
        pattern = re.compile(only)
    except re.error as e:
        parser.error(f"--only {only!r} is not a regular expression: {e}")
    selected = [c for c in all_checks if pattern.search(f"{c.name} {c.setting}")]
    if not selected:
        parser.error(f"--only {only!r} matches no row; see --list")
    return selected


@contextlib.contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside (0: leave torch's setting), restored after."""
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, args = parse(argv)
    has_cuda = torch.cuda.is_available() and not args.no_cuda
    device = torch.device("cuda") if has_cuda else CPU
    selected = select(parser, checks(device), PERF if args.perf else args.only)
    if args.list:
        print(markdown_table(["check", "setting", "device"],
                             [[c.name, c.setting, c.where(has_cuda)] for c in selected]))
        return 0
    ctx = Ctx(device, quick=not has_cuda if args.quick is None else args.quick, tol_scale=args.tol_scale)
    with intra_op_threads((0 if has_cuda else 1) if args.threads is None else args.threads):
        head = header_lines(device, argv)
        print("\n".join(head), flush=True)
        rows = run_rows(selected, ctx, has_cuda, args.budget_s)
    table = markdown_table(HEADER, [r.cells() for r in rows])
    summary = summary_line(rows)
    print("\n" + table + "\n\n" + summary)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu_check.md"
    path.write_text("\n".join(["# GPU check", "", *[f"- {line}" for line in head], "", table, "", summary, ""]))
    print(f"wrote {path}")
    return 1 if any(r.result == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
