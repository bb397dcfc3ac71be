"""Brute-force references: full (H*W) x (H*W) masked attention built from DESIGN.md semantics.

Deliberately naive (explicit index arithmetic, no partitioning) so that it shares no code with
the kernels under test.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """q, k, v ``(B, heads, H, W, D)``; ``allowed`` ``(HW, HW)`` bool; ``bias`` ``(heads, HW, HW)``."""
    B, nh, H, W, D = q.shape
    scale = D**-0.5 if scale is None else scale
    qf, kf, vf = (t.reshape(B, nh, H * W, D) for t in (q, k, v))
    scores = qf @ kf.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ vf).reshape(B, nh, H, W, D)


def pair_bias(grid: torch.Tensor, H: int, W: int, offset: Callable) -> torch.Tensor:
    """``(heads, HW, HW)`` bias where ``offset(i, j)`` gives the (dy, dx) table index of a pair."""
    nh = grid.shape[0]
    out = torch.zeros(nh, H * W, H * W, dtype=grid.dtype)
    for qi in range(H * W):
        for ki in range(H * W):
            dy, dx = offset(divmod(qi, W), divmod(ki, W))
            if dy is not None:
                out[:, qi, ki] = grid[:, dy, dx]
    return out


def _window_axis(length: int, window: int, shift: int):
    """Per axis: (rolled coordinate, window index, region label) of each original position."""
    w = min(window, length)
    s = shift if length > window else 0
    padded = -(-length // w) * w
    rolled = [(i - s) % padded for i in range(length)]
    label = [0 if r < padded - w else (1 if r < padded - s else 2) for r in rolled] if s else [0] * length
    return rolled, [r // w for r in rolled], label


def window_reference(q, k, v, window: int, shift: int = 0, grid=None, scale=None) -> torch.Tensor:
    """(Shifted) window attention by brute force: same window and same shift region only."""
    B, nh, H, W, D = q.shape
    ry, wy, ly = _window_axis(H, window, shift)
    rx, wx, lx = _window_axis(W, window, shift)
    allowed = torch.zeros(H * W, H * W, dtype=torch.bool)
    for qi in range(H * W):
        a, b = divmod(qi, W)
        for ki in range(H * W):
            c, d = divmod(ki, W)
            allowed[qi, ki] = wy[a] == wy[c] and wx[b] == wx[d] and ly[a] == ly[c] and lx[b] == lx[d]
    bias = None
    if grid is not None:
        cen = (grid.shape[-1] - 1) // 2
        bias = pair_bias(grid, H, W, lambda p, r: (ry[r[0]] - ry[p[0]] + cen, rx[r[1]] - rx[p[1]] + cen)
                         if allowed[p[0] * W + p[1], r[0] * W + r[1]] else (None, None))
    return masked_attention(q, k, v, allowed, bias, scale)
