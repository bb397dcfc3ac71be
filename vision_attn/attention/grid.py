"""Grid attention (MaxViT's "grid" / dilated global attention).

Semantics, per axis of length ``L`` with grid size ``g`` (``spec.window_size``): the ``g`` tokens
spaced ``L / g`` apart attend to each other, i.e. token ``i`` belongs to group ``i mod (L / g)``
and its grid coordinate is ``i // (L / g)``. When ``g`` divides ``L`` this equals
``dilated(k=g, d=L/g)``. When it does not, the axis is padded at the end to ``L_p = g * ceil(L/g)``
and the padded keys are masked out: groups are ``i mod d`` with ``d = ceil(L / g)``, holding
``ceil((L - r) / d) <= g`` real tokens each. When ``L <= g`` the axis is global. The relative
position bias table is ``(2g-1)**2`` per head, indexed by the key-minus-query offset in grid
coordinates. Runs on the same tiled kernel as neighborhood attention (one tile per group).
"""
from __future__ import annotations

from typing import Optional

import torch

from .registry import AttnSpec, register_attention
from .tiled import AxisPattern, TiledAttentionModule, tiled_attention


def grid_axis(length: int, grid_size: int) -> AxisPattern:
    """One axis of grid attention: ``ceil(L/g)`` interleaved groups, each attended globally."""
    if grid_size < 1:
        raise ValueError(f"grid size must be >= 1, got {grid_size}")
    if length <= grid_size:
        return AxisPattern(length, length, 1, length)
    return AxisPattern(length, grid_size, -(-length // grid_size), grid_size)


def grid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid_size: int,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Grid attention. q, k, v ``(B, heads, H, W, D)``; ``bias`` a ``(heads, 2g-1, 2g-1)`` grid."""
    H, W = q.shape[2], q.shape[3]
    return tiled_attention(q, k, v, grid_axis(H, grid_size), grid_axis(W, grid_size), bias, scale)


@register_attention("grid")
class GridAttention(TiledAttentionModule):
    """MaxViT grid attention with ``g = spec.window_size`` and a learned relative position bias."""

    fixed_route = "tiled"

    def __init__(self, dim: int, num_heads: int, spec: AttnSpec) -> None:
        if spec.window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {spec.window_size}")
        super().__init__(dim, num_heads, spec, spec.window_size)
        self.grid_size = spec.window_size

    def patterns(self, H: int, W: int) -> tuple[AxisPattern, AxisPattern]:
        return grid_axis(H, self.grid_size), grid_axis(W, self.grid_size)

    def reach(self, height: int, width: int) -> tuple[str, Optional[tuple[int, int]]]:
        if self.grid_size >= max(height, width):
            return "global (grid >= map)", None
        return f"grid {self.grid_size} (sparse, whole map)", None

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.num_heads}, grid={self.grid_size}"
