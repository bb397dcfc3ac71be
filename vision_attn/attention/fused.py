"""The fused exact CPU kernel for (dilated) neighborhood attention.

``csrc/neighborhood_cpu.cpp`` scores exactly the ``k*k`` keys of each query (no halo), forward
and backward, with the relative position bias and its gradient, in float32 (bfloat16 / float16
inputs are computed in float32) and float64. It keeps the softmax probabilities (``O(H*W*k*k)``,
linear in the map) for backward; dk / dv gather over each key's inverse neighbourhood, so there
is no scatter and no atomics.

Build: plain C ABI, compiled at first use with the system C++ compiler (``$CXX``, else ``g++`` or
``c++``; about 5 s) with ``-march=native -fopenmp`` (it links the libgomp torch has loaded, so it
shares torch's thread pool) and loaded with ``ctypes``. The shared object is cached
under ``$VISION_ATTN_KERNEL_CACHE`` (default ``~/.cache/vision_attn/kernels``) by a key of the
source, the compiler, the flags and the host CPU's model and instruction-set flags, so a build for
an AVX-512 host never runs on an AVX2-only one. One log line says what happened on first use.

Route ``fused`` of :mod:`.backends`, which decides when it runs (CPU only; by default whenever it
builds, else the pure-PyTorch tiled kernel with one logged line).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch
from torch.utils.flop_counter import register_flop_formula

_logger = logging.getLogger(__name__)

CACHE_ENV = "VISION_ATTN_KERNEL_CACHE"
SOURCE = Path(__file__).with_name("csrc") / "neighborhood_cpu.cpp"
CXX_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]


# ----------------------------------------------------------------------------- build and load


def cpu_signature() -> str:
    """The host CPU's model name and instruction-set flags (first processor of /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    fields = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return f"{fields.get('model name', platform.machine())} | {fields.get('flags', fields.get('Features', ''))}"


def isa_summary(signature: str) -> str:
    """The vector extensions that matter here, e.g. ``avx2 fma avx512f avx512_bf16``."""
    flags = set(signature.rpartition("|")[2].split())
    keep = ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
            "amx_tile", "neon", "asimd", "sve"]
    return " ".join(f for f in keep if f in flags) or "no vector extensions listed"


def compiler() -> Optional[str]:
    """``$CXX``, else ``g++`` or ``c++`` on PATH."""
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vision_attn" / "kernels"
    return Path(os.environ.get(CACHE_ENV) or default)


def _build_key(cxx: str) -> str:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), version.encode(), " ".join(CXX_FLAGS).encode(), cpu_signature().encode(),
                 platform.machine().encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _compile(cxx: str, target: Path) -> None:
    """Compile into a temporary file next to ``target``, then rename (concurrent builders are safe)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *CXX_FLAGS, "-o", tmp, str(SOURCE)],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode:
            first = next((ln for ln in proc.stderr.splitlines() if "error" in ln), proc.stderr.strip()[-300:])
            raise RuntimeError(f"{Path(cxx).name} exit {proc.returncode}: {first}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_ARGS = {  # C signatures: T* pointers as void*, then ints, the scale (double) and the thread count
    "forward": [ctypes.c_void_p] * 10 + [ctypes.c_int] * 11 + [ctypes.c_double, ctypes.c_int],
    "backward": [ctypes.c_void_p] * 16 + [ctypes.c_int] * 11 + [ctypes.c_double, ctypes.c_int],
}
BANDED_DIMS = (16, 32, 64)  # head dims with a compiled band path (dot products vectorised over queries)


@lru_cache(maxsize=1)
def library() -> Optional[ctypes.CDLL]:
    """The kernel's shared object for this CPU, built at first use; None where it cannot be built."""
    cxx = compiler()
    if cxx is None:
        _logger.warning("fused neighborhood kernel: no C++ compiler (set $CXX or install g++); "
                        "using the pure-PyTorch tiled kernel")
        return None
    sig = cpu_signature()
    try:
        target = cache_dir() / f"neighborhood_cpu_{_build_key(cxx)}.so"
        if target.exists():
            how = f"loaded {target}"
        else:
            t0 = time.perf_counter()
            _compile(cxx, target)
            how = f"built in {time.perf_counter() - t0:.1f} s -> {target}"
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _logger.warning("fused neighborhood kernel: build failed (%s); using the pure-PyTorch tiled kernel", e)
        return None
    lib.va_na_banded_columns.argtypes, lib.va_na_banded_columns.restype = [ctypes.c_int] * 5, ctypes.c_int
    for suffix in ("f32", "f64"):
        for name, args in _ARGS.items():
            fn = getattr(lib, f"va_na_{name}_{suffix}")
            fn.argtypes, fn.restype = args, None
    _logger.info("fused neighborhood kernel: %s (for %s: %s)", how, sig.partition(" |")[0], isa_summary(sig))
    return lib


def banded_columns(length: int, kernel: int, dilation: int, dtype: torch.dtype, keys: bool = False,
                   clamped: bool = False) -> int:
    """How many columns of an axis the kernel's vectorised bands cover: interior query bands, key
    bands (backward) or ``clamped`` query bands over the borders. The rest go one at a time."""
    lib = library()
    lanes = 64 // torch.empty(0, dtype=dtype).element_size()
    which = 2 if clamped else int(keys)
    return 0 if lib is None else lib.va_na_banded_columns(length, kernel, dilation, lanes, which)


# ----------------------------------------------------------------------------- operators


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None or t.numel() == 0 else t.data_ptr()


def _has_band(t: torch.Tensor) -> bool:
    """Does the kernel have a band path (dot products vectorised over queries) for ``(BH, H, W, D)`` ``t``?"""
    return t.shape[-1] in BANDED_DIMS and t.shape[-2] >= 64 // t.element_size()


def _transposed(t: torch.Tensor) -> torch.Tensor:
    """The ``(BH, H, D, W)`` copy the band path reads, or an empty tensor where there is none."""
    return t.transpose(-1, -2).contiguous() if _has_band(t) else t.new_empty(0)


def _fn(name: str, dtype: torch.dtype):
    lib = library()
    if lib is None:
        raise RuntimeError("the fused neighborhood kernel is not available")
    return getattr(lib, f"va_na_{name}_{'f64' if dtype == torch.float64 else 'f32'}")


Copies = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@torch.library.custom_op("vision_attn::na2d_cpu_forward", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor], heads: int,
             ky: int, dy: int, kx: int, dx: int, scale: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``(BH, H, W, D)`` contiguous; bias ``(heads, Sy, Sx)`` or None.

    Returns out, the probabilities ``(BH, H, k*k, W)``, the log-sum-exp ``(BH, H, W)`` and the
    ``(BH, H, D, W)`` copies of q, k, v (empty where the kernel has no band path), kept for backward.
    """
    BH, H, W, D = q.shape
    out = torch.empty_like(q)
    probs = q.new_empty(BH, H, ky * kx, W)
    lse = q.new_empty(BH, H, W)
    qt, kt, vt = _transposed(q), _transposed(k), _transposed(v)
    Sy, Sx = (bias.shape[1], bias.shape[2]) if bias is not None else (1, 1)
    _fn("forward", q.dtype)(*map(_ptr, (q, k, v, qt, kt, vt, bias, out, probs, lse)),
                            BH, heads, H, W, D, ky, dy, kx, dx, Sy, Sx, scale, torch.get_num_threads())
    return out, probs, lse, qt, kt, vt


@_forward.register_fake
def _(q, k, v, bias, heads, ky, dy, kx, dx, scale):
    BH, H, W, D = q.shape
    copies = [q.new_empty(BH, H, D, W) if _has_band(q) else q.new_empty(0) for _ in range(3)]
    return (torch.empty_like(q), q.new_empty(BH, H, ky * kx, W), q.new_empty(BH, H, W), *copies)


@torch.library.custom_op("vision_attn::na2d_cpu_backward", mutates_args=())
def _backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qt: torch.Tensor, kt: torch.Tensor,
              vt: torch.Tensor, out: torch.Tensor, grad: torch.Tensor, grad_lse: Optional[torch.Tensor],
              probs: torch.Tensor, bias: Optional[torch.Tensor], heads: int, ky: int, dy: int, kx: int, dx: int,
              scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k, v and the bias (empty without one)."""
    BH, H, W, D = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dbias = torch.empty_like(bias) if bias is not None else q.new_empty(0)
    Sy, Sx = (bias.shape[1], bias.shape[2]) if bias is not None else (1, 1)
    gt = _transposed(grad) if qt.numel() else None
    ds = torch.empty_like(probs)
    _fn("backward", q.dtype)(*map(_ptr, (q, k, v, qt, kt, vt, out, grad, gt, grad_lse, probs, ds, dq, dk, dv, dbias)),
                             BH, heads, H, W, D, ky, dy, kx, dx, Sy, Sx, scale, torch.get_num_threads())
    return dq, dk, dv, dbias


@_backward.register_fake
def _(q, k, v, qt, kt, vt, out, grad, grad_lse, probs, bias, heads, ky, dy, kx, dx, scale):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(bias) if bias is not None else q.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, bias, heads, ky, dy, kx, dx, scale = inputs
    out, probs, _, qt, kt, vt = output
    ctx.save_for_backward(q, k, v, qt, kt, vt, bias, out, probs)
    ctx.args = (heads, ky, dy, kx, dx, scale)


def _autograd_backward(ctx, grad, grad_probs, grad_lse, *grad_copies):
    q, k, v, qt, kt, vt, bias, out, probs = ctx.saved_tensors
    grad = torch.zeros_like(out) if grad is None else grad.contiguous()
    grad_lse = None if grad_lse is None else grad_lse.contiguous()
    dq, dk, dv, dbias = _backward(q, k, v, qt, kt, vt, out, grad, grad_lse, probs, bias, *ctx.args)
    return dq, dk, dv, (dbias if bias is not None else None), None, None, None, None, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


# torch's flop counter (ours, Lightning's summary table) counts custom ops as free without a formula:
# the exact work is q k^T and p v over k*k keys per query (forward), four such products in backward.
@register_flop_formula(torch.ops.vision_attn.na2d_cpu_forward)
def _forward_flops(q, k, v, bias, heads, ky, dy, kx, dx, scale, out_shape=None, **kwargs) -> int:
    BH, H, W, D = q  # flop formulas receive shapes
    return 2 * BH * H * W * ky * kx * (D + v[-1])


@register_flop_formula(torch.ops.vision_attn.na2d_cpu_backward)
def _backward_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    BH, H, W, D = q
    ky, kx = args[9], args[11]
    return 4 * BH * H * W * ky * kx * (D + v[-1])


def fused_neighborhood(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: tuple[int, int],
                       dilation: tuple[int, int], grid: Optional[torch.Tensor], scale: float,
                       return_lse: bool = False):
    """Neighborhood attention on CPU through the fused kernel; q, k, v ``(B, heads, H, W, D)``.

    ``kernel`` / ``dilation`` are per axis as :func:`~vision_attn.attention.neighborhood.neighborhood_patterns`
    resolves them; ``grid`` is the ``(heads, Sy, Sx)`` bias or None. Under autocast (or for
    half-precision inputs) it computes in float32 and returns the autocast (input) dtype.
    """
    B, nh, H, W, D = q.shape
    device = q.device.type
    out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else q.dtype
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    with torch.autocast(device, enabled=False):
        flat = [t.to(work).reshape(B * nh, H, W, D).contiguous() for t in (q, k, v)]
        bias = None if grid is None else grid.to(work).contiguous()
        out, _, lse, *_ = _forward(*flat, bias, nh, kernel[0], dilation[0], kernel[1], dilation[1], float(scale))
    out = out.view(B, nh, H, W, D).to(out_dtype)
    return (out, lse.view(B, nh, H, W)) if return_lse else out
