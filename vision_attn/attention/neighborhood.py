"""Neighborhood (NAT) and dilated neighborhood (DiNAT) attention: semantics, routes, modules.

Semantics (``docs/attention.md``), per axis of length ``L``: query ``i`` attends keys ``start .. start+k-1``
with ``start = clamp(i - k // 2, 0, L - k)``, so near a border the window slides inward. With
dilation ``d`` the axis is split by ``i mod d`` into ``d`` interleaved groups (lengths differ
when ``d`` does not divide ``L``) and the rule applies inside each group, in group coordinates.
``k > L`` shrinks ``k`` to ``L``; ``k * d > L`` drops ``d`` to ``max(1, L // k)`` (logged once).
The relative position bias is indexed by the key-minus-query offset in group coordinates.

The kernel is the route :mod:`.backends` picks: the fused CPU kernel (:mod:`.fused`), the tiled
engine (:mod:`.tiled`), FlexAttention (:mod:`.flex`) or NATTEN.
"""
from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any, Optional

import torch

from . import backends, flex, fused
from .registry import AttnSpec, register_attention
from .tiled import DEFAULT_TILE, AxisPattern, TiledAttentionModule, skipped_attention, tiled_attention

_logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- geometry


@lru_cache(maxsize=None)
def _warn_dilation(length: int, kernel: int, dilation: int, used: int) -> None:
    _logger.warning(
        "dilated attention: kernel_size %d * dilation %d does not fit an axis of length %d; "
        "using dilation %d on that axis",
        kernel, dilation, length, used,
    )


def axis_kernel_dilation(length: int, kernel: int, dilation: int) -> tuple[int, int]:
    """Kernel and dilation used on an axis of ``length``: shrink ``k`` to ``L``, then drop ``d``."""
    if kernel < 1 or dilation < 1:
        raise ValueError(f"kernel_size and dilation must be >= 1, got {kernel} and {dilation}")
    k = min(kernel, length)
    if k * dilation <= length:
        return k, dilation
    used = max(1, length // k)
    _warn_dilation(length, kernel, dilation, used)
    return k, used


# ----------------------------------------------------------------------------- public API


def neighborhood_patterns(
    H: int, W: int, kernel_size: int, dilation: int = 1, tile: Optional[tuple[int, int]] = None
) -> tuple[AxisPattern, AxisPattern]:
    """Axis patterns of (dilated) neighborhood attention on an ``H x W`` map."""
    ty, tx = tile or DEFAULT_TILE
    ky, dy = axis_kernel_dilation(H, kernel_size, dilation)
    kx, dx = axis_kernel_dilation(W, kernel_size, dilation)
    return AxisPattern(H, ky, dy, ty), AxisPattern(W, kx, dx, tx)


def _natten_na2d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, py: AxisPattern, px: AxisPattern,
                 scale: Optional[float]) -> torch.Tensor:
    """``natten.na2d`` on our layout: it takes ``(B, H, W, heads, D)`` (heads last)."""
    import natten

    args = [t.permute(0, 2, 3, 1, 4).contiguous() for t in (q, k, v)]
    out = natten.na2d(*args, kernel_size=(py.kernel, px.kernel), dilation=(py.dilation, px.dilation), scale=scale)
    return out.permute(0, 3, 1, 2, 4)


def neighborhood_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int,
    dilation: int = 1,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """(Dilated) neighborhood attention. q, k, v ``(B, heads, H, W, D)``; returns the same shape.

    ``bias`` is an optional ``(heads, 2k-1, 2k-1)`` grid indexed by the key-minus-query offset.
    The kernel is the route :mod:`.backends` picks (``backend``: ``model.attn_backend``, None: auto).
    """
    py, px = neighborhood_patterns(q.shape[2], q.shape[3], kernel_size, dilation)
    return neighborhood_kernel(q, k, v, py, px, bias, scale, backend=backend)


def neighborhood_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    py: AxisPattern,
    px: AxisPattern,
    grid: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Any:
    """Neighborhood patterns ``py`` x ``px`` through the route :mod:`.backends` picks: the fused CPU
    kernel, the tiled kernel, FlexAttention or NATTEN."""
    route = backends.choose(backends.call_of("neighborhood", q, grid, dropout_p, lse=return_lse), backend)
    kernel, dilation = (py.kernel, px.kernel), (py.dilation, px.dilation)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if route == "fused":
        return fused.fused_neighborhood(q, k, v, kernel, dilation, grid, scale, return_lse)
    if route == "flex":
        return flex.flex_neighborhood(q, k, v, kernel, dilation, grid, scale)
    if route == "natten":
        return _natten_na2d(q, k, v, py, px, scale)
    if route == backends.SKIP:
        return skipped_attention(q, v, py, px, return_lse)
    return tiled_attention(q, k, v, py, px, grid, scale, dropout_p, return_lse)


# ----------------------------------------------------------------------------- modules


@register_attention("neighborhood")
class NeighborhoodAttention(TiledAttentionModule):
    """NAT neighborhood attention (``spec.kernel_size``) with a learned relative position bias."""

    non_square_window = True  # reads kernel_size (square), never window_size
    route_family = "neighborhood"

    def __init__(self, dim: int, num_heads: int, spec: AttnSpec) -> None:
        if spec.kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {spec.kernel_size}")
        super().__init__(dim, num_heads, spec, spec.kernel_size)
        self.kernel_size = spec.kernel_size
        self.dilation = 1

    def patterns(self, H: int, W: int) -> tuple[AxisPattern, AxisPattern]:
        return neighborhood_patterns(H, W, self.kernel_size, self.dilation)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        patterns = self.patterns(q.shape[2], q.shape[3])
        return neighborhood_kernel(q, k, v, *patterns, self.bias_grid(), self.scale, self.dropout_p,
                                   backend=self.attn_backend)

    def attend_lse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        patterns = self.patterns(q.shape[2], q.shape[3])
        return neighborhood_kernel(q, k, v, *patterns, self.bias_grid(), self.scale, self.dropout_p, return_lse=True,
                                   backend=self.attn_backend)

    def route(self, height: int, width: int, device: str, dtype: torch.dtype, batch: int = 1,
              training: bool = False, lse: bool = False) -> str:
        bias = self.relative_position_bias_table is not None
        call = backends.Call("neighborhood", device, dtype, bias, training, training and bias,
                             training and self.attn_drop > 0, lse)
        return backends.choose(call, self.attn_backend)

    def reach(self, height: int, width: int) -> tuple[str, Optional[tuple[int, int]]]:
        (ky, dy), (kx, dx) = (axis_kernel_dilation(n, self.kernel_size, self.dilation) for n in (height, width))
        extent = ((ky - 1) * dy + 1, (kx - 1) * dx + 1)
        if (ky, kx) == (height, width):
            return "global (kernel >= map)", None
        kernel = str(ky) if ky == kx else f"{ky}x{kx}"
        dil = "" if (dy, dx) == (1, 1) else f" d{dy}" if dy == dx else f" d{dy}x{dx}"
        return f"kernel {kernel}{dil}", extent

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.num_heads}, kernel={self.kernel_size}, dilation={self.dilation}"


@register_attention("dilated")
class DilatedNeighborhoodAttention(NeighborhoodAttention):
    """DiNAT dilated neighborhood attention: ``spec.kernel_size`` with ``spec.dilation``."""

    def __init__(self, dim: int, num_heads: int, spec: AttnSpec) -> None:
        if spec.dilation < 1:
            raise ValueError(f"dilation must be >= 1, got {spec.dilation}")
        super().__init__(dim, num_heads, spec)
        self.dilation = spec.dilation
