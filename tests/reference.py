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


def axis_pairs_reference(allowed_y, offset_y, allowed_x, offset_x, grid=None):
    """Combine per-axis ``(L, L)`` [query][key] tables into ``(HW, HW)`` allowed + pair bias."""
    ay, ax = torch.tensor(allowed_y), torch.tensor(allowed_x)
    H, W = ay.shape[0], ax.shape[0]
    allowed = (ay[:, None, :, None] & ax[None, :, None, :]).reshape(H * W, H * W)
    if grid is None:
        return allowed, None
    cen = (grid.shape[-1] - 1) // 2
    oy = torch.tensor(offset_y)[:, None, :, None] + cen
    ox = torch.tensor(offset_x)[None, :, None, :] + cen
    bias = grid[:, oy, ox].reshape(grid.shape[0], H * W, H * W)
    return allowed, bias


def neighborhood_axis_reference(length: int, kernel: int, dilation: int = 1):
    """Per axis [query][key]: allowed and group-coordinate offset (0 where not allowed).

    DESIGN.md: shrink k to L; if k * d > L use d = max(1, L // k); group ``i mod d``; inside a
    group of n tokens, group index j attends ``start .. start+k-1``, ``start = clamp(j - k//2, 0, n-k)``.
    """
    k = min(kernel, length)
    d = dilation if k * dilation <= length else max(1, length // k)
    allowed = [[False] * length for _ in range(length)]
    offset = [[0] * length for _ in range(length)]
    for i in range(length):
        group, j = i % d, i // d
        n = sum(1 for p in range(length) if p % d == group)
        start = min(max(j - k // 2, 0), n - k)
        for jj in range(start, start + k):
            key = group + jj * d
            allowed[i][key] = True
            offset[i][key] = jj - j
    return allowed, offset


def grid_axis_reference(length: int, grid_size: int):
    """Per axis [query][key] for MaxViT grid attention: pad L to a multiple of g, split the padded
    axis into g strided positions per group (group = i mod (Lp / g)), padded keys never exist."""
    if length <= grid_size:
        d = 1
    else:
        padded = ((length + grid_size - 1) // grid_size) * grid_size
        d = padded // grid_size
    allowed = [[i % d == j % d for j in range(length)] for i in range(length)]
    offset = [[(j // d - i // d) if i % d == j % d else 0 for j in range(length)] for i in range(length)]
    return allowed, offset


def global_axis_reference(length: int, clip: int):
    """Per axis [query][key]: everything allowed; offset clipped to +-(clip - 1) (Shaw et al.)."""
    allowed = [[True] * length for _ in range(length)]
    offset = [[max(-(clip - 1), min(clip - 1, j - i)) for j in range(length)] for i in range(length)]
    return allowed, offset


def neighborhood_reference(q, k, v, kernel: int, dilation: int = 1, grid=None, scale=None) -> torch.Tensor:
    """(Dilated) neighborhood attention by brute force over the full (HW, HW) score matrix."""
    H, W = q.shape[2], q.shape[3]
    allowed, bias = axis_pairs_reference(
        *neighborhood_axis_reference(H, kernel, dilation), *neighborhood_axis_reference(W, kernel, dilation), grid
    )
    return masked_attention(q, k, v, allowed, bias, scale)


def grid_reference(q, k, v, grid_size: int, grid=None, scale=None) -> torch.Tensor:
    """MaxViT grid attention by brute force."""
    H, W = q.shape[2], q.shape[3]
    allowed, bias = axis_pairs_reference(
        *grid_axis_reference(H, grid_size), *grid_axis_reference(W, grid_size), grid
    )
    return masked_attention(q, k, v, allowed, bias, scale)


def global_reference(q, k, v, clip: int, grid=None, scale=None) -> torch.Tensor:
    """Global attention with a clipped relative position bias, by brute force."""
    H, W = q.shape[2], q.shape[3]
    allowed, bias = axis_pairs_reference(*global_axis_reference(H, clip), *global_axis_reference(W, clip), grid)
    return masked_attention(q, k, v, allowed, bias, scale)
