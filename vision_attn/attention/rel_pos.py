"""Learned relative position bias shared by every attention kind.

Tables are stored in timm's Swin layout, ``((2w-1)**2, heads)``, so timm weights load
unchanged. Kernels consume the *grid* view ``(heads, 2w-1, 2w-1)`` indexed by the
key-minus-query offset ``(dy + w - 1, dx + w - 1)`` (NATTEN's convention).
"""
from __future__ import annotations

import torch
from torch import nn
from timm.layers import trunc_normal_


def new_bias_table(num_heads: int, size: int) -> nn.Parameter:
    """A fresh ``((2*size-1)**2, heads)`` table, truncated-normal(std=.02) like timm."""
    table = nn.Parameter(torch.zeros((2 * size - 1) ** 2, num_heads))
    trunc_normal_(table, std=0.02)
    return table


def bias_grid(table: torch.Tensor) -> torch.Tensor:
    """timm table ``((2w-1)**2, heads)`` -> grid ``(heads, 2w-1, 2w-1)`` indexed by key - query.

    timm indexes by query - key, so the grid is the table flipped on both offset axes.
    """
    side = int(round(table.shape[0] ** 0.5))
    return table.view(side, side, -1).permute(2, 0, 1).flip(1, 2)


def window_bias(grid: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """Dense ``(heads, N, N)`` bias for a ``wh x ww`` window (N = wh*ww) from a bias grid."""
    c = (grid.shape[-1] - 1) // 2
    ys, xs = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[None, :] - ys[:, None] + c  # [query, key] -> key - query offset
    dx = xs[None, :] - xs[:, None] + c
    return grid[:, dy.to(grid.device), dx.to(grid.device)]


def resize_bias_table(table: torch.Tensor, new_size: int) -> torch.Tensor:
    """Bicubic resize of a timm-layout table to a new window/kernel size (fine-tuning)."""
    old = int(round(table.shape[0] ** 0.5))
    new = 2 * new_size - 1
    if old == new:
        return table
    heads = table.shape[1]
    grid = table.T.reshape(1, heads, old, old).float()
    grid = nn.functional.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return grid.reshape(heads, new * new).T.to(table.dtype)


def clipped_pair_index(q_pos: torch.Tensor, k_pos: torch.Tensor, width: int, side: int) -> torch.Tensor:
    """Flat bias-grid index of ``clip(key - query, ±c) + c`` per axis for flat positions ``y * width + x``.

    ``q_pos (..., Q, 1)`` and ``k_pos (..., 1, K)`` broadcast; ``side = 2c + 1`` is the grid side.
    The broadcast arithmetic runs in float32 (exact below 2**24; vectorised clamps), in place.
    """
    c = (side - 1) // 2

    def yx(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.div(pos, width, rounding_mode="floor")
        return y.float(), (pos - y * width).float()

    (qy, qx), (ky, kx) = yx(q_pos), yx(k_pos)
    dy = (ky - qy).clamp_(-c, c)
    dx = (kx - qx).clamp_(-c, c)
    return dy.mul_(side).add_(dx).add_(c * side + c).long()
