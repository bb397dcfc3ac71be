"""Learned relative position bias shared by every attention kind.

Tables are stored in timm's Swin layout, ``((2wh-1)*(2ww-1), heads)`` for a ``wh x ww`` window
(``(2w-1)**2`` when square), so timm weights load unchanged. Kernels consume the *grid* view
``(heads, 2wh-1, 2ww-1)`` indexed by the key-minus-query offset ``(dy + wh - 1, dx + ww - 1)``
(NATTEN's convention).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from timm.layers import resize_rel_pos_bias_table, to_2tuple, trunc_normal_
from torch import nn

Size = Union[int, tuple[int, int]]


def new_bias_table(num_heads: int, size: Size) -> nn.Parameter:
    """A fresh ``((2*wh-1)*(2*ww-1), heads)`` table for a ``size`` window, truncated-normal(std=.02) like timm."""
    wh, ww = to_2tuple(size)
    table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
    trunc_normal_(table, std=0.02)
    return table


def _square_side(rows: int) -> Optional[int]:
    """``2w-1`` when ``rows`` is ``(2w-1)**2``, else None."""
    side = int(round(rows**0.5))
    return side if side * side == rows and side % 2 else None


def table_window(table: torch.Tensor, size: Optional[Size] = None) -> tuple[int, int]:
    """The ``(wh, ww)`` window a timm-layout table spans: ``size`` (checked), or square when not given."""
    rows = table.shape[0]
    if size is None:
        side = _square_side(rows)
        if side is None:
            raise ValueError(f"a bias table of {rows} rows is not square: pass its (wh, ww) window")
        return (side + 1) // 2, (side + 1) // 2
    wh, ww = to_2tuple(size)
    if (2 * wh - 1) * (2 * ww - 1) != rows:
        raise ValueError(f"a bias table of {rows} rows does not fit a {wh} x {ww} window")
    return wh, ww


def bias_grid(table: torch.Tensor, size: Optional[Size] = None) -> torch.Tensor:
    """timm table ``((2wh-1)*(2ww-1), heads)`` -> grid ``(heads, 2wh-1, 2ww-1)`` indexed by key - query.

    ``size`` is the table's ``(wh, ww)`` window; without it the table must be square.
    timm indexes by query - key, so the grid is the table flipped on both offset axes.
    """
    wh, ww = table_window(table, size)
    return table.view(2 * wh - 1, 2 * ww - 1, -1).permute(2, 0, 1).flip(1, 2)


def window_bias(grid: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """Dense ``(heads, N, N)`` bias for a ``wh x ww`` window (N = wh*ww) from a bias grid."""
    cy, cx = (grid.shape[-2] - 1) // 2, (grid.shape[-1] - 1) // 2
    ys, xs = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[None, :] - ys[:, None] + cy  # [query, key] -> key - query offset
    dx = xs[None, :] - xs[:, None] + cx
    return grid[:, dy.to(grid.device), dx.to(grid.device)]


def resize_bias_table(table: torch.Tensor, new_size: Size, old_size: Optional[Size] = None) -> torch.Tensor:
    """Resize a timm-layout ``((2h-1)*(2w-1), heads)`` table to a new ``new_size`` window/kernel
    (fine-tuning) with timm's ``resize_rel_pos_bias_table``, as timm's own Swin loading does: a model
    fine-tuned here at a new window starts from the same weights as in timm.

    Without ``old_size`` the source is taken as square, or, when its rows cannot be square, as
    already fitting ``new_size``; otherwise a ValueError asks for ``old_size``.
    """
    new = to_2tuple(new_size)
    shape = ((2 * new[0] - 1) * (2 * new[1] - 1), table.shape[1])
    if old_size is not None and tuple(to_2tuple(old_size)) == tuple(new):
        return table
    return resize_rel_pos_bias_table(table, new_window_size=new, new_bias_shape=shape,
                                     old_window_size=None if old_size is None else to_2tuple(old_size))


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
