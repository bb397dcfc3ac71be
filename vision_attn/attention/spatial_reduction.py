"""Spatial-reduction attention (PVT, Wang et al. 2021): low-rank keys and values.

Semantics on an ``H x W`` map with ratio ``r = sr_ratio``: queries come from every token; keys
and values come from the map reduced by a stride-``r`` ``r x r`` convolution (after zero padding
at the bottom/right to multiples of ``r``; ``model.sr_pool=conv``, the default) or by the mean of
each cell's tokens (``sr_pool=avg``: an edge cell averages only the tokens it covers), followed by
LayerNorm, i.e. from ``ceil(H/r) x ceil(W/r)`` cells. Every query attends to every cell: cost ``O(N * N / r^2)``.
``r = 1`` is plain global attention (PVT's last stage).

Choices, documented because PVT differs:

* the reduction conv is depthwise (``groups = dim``, as cheap as PVTv2's pooling), not PVT's
  dense ``dim x dim x r x r`` conv, so a variant keeps Swin's parameter count at equal width;
* the projection is the shared ``qkv`` linear (timm names): q from the map, k and v from the
  reduced map;
* relative position bias: the learned ``(2w-1)^2`` table (``w = window_size``), indexed by the
  offset from the query's own cell ``(y // r, x // r)`` to the key cell, clipped to ``±(w-1)``
  per axis (global attention's clipped bias, on the reduced grid).

Global tokens: map queries attend to the reduced map's cells plus the tokens (one softmax); the
tokens attend to the cells and to each other.

``attend(q, k, v)`` cannot express this kind (k and v come from a different map), so
:meth:`SpatialReductionAttention.attention_maps` is its own: the weight of a key cell is
spread evenly over the real tokens the cell covers, so each row still sums to 1 over the map.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .base import QKVAttention
from .cache import tensor_cache
from .options import KindOptions, option
from .registry import AttnSpec, register_attention
from .rel_pos import bias_grid, new_bias_table


def reduced_size(length: int, ratio: int) -> int:
    return -(-length // ratio)


@tensor_cache(maxsize=64)
def _axis_index(length: int, ratio: int, side: int, device: torch.device) -> torch.Tensor:
    """``(L * Lr,)`` grid index of ``clip(cell - i // r, ±c) + c`` for every (token, cell) pair."""
    c = (side - 1) // 2
    cells = torch.arange(reduced_size(length, ratio))
    own = torch.arange(length) // ratio
    return ((cells[None, :] - own[:, None]).clamp(-c, c) + c).flatten().to(device)


def reduced_bias(grid: torch.Tensor, H: int, W: int, ratio: int) -> torch.Tensor:
    """Dense ``(heads, H*W, Hr*Wr)`` bias from a ``(heads, 2w-1, 2w-1)`` grid."""
    nh, side = grid.shape[0], grid.shape[-1]
    Hr, Wr = reduced_size(H, ratio), reduced_size(W, ratio)
    rows = grid.index_select(1, _axis_index(H, ratio, side, grid.device))  # (nh, H*Hr, side)
    pairs = rows.index_select(2, _axis_index(W, ratio, side, grid.device))  # (nh, H*Hr, W*Wr)
    return pairs.view(nh, H, Hr, W, Wr).transpose(2, 3).reshape(nh, H * W, Hr * Wr)


def spatial_reduction_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ratio: int,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """q ``(B, heads, H, W, D)`` over reduced k, v ``(B, heads, ceil(H/r), ceil(W/r), D)``."""
    B, nh, H, W, D = q.shape
    Hr, Wr = k.shape[2], k.shape[3]
    mask = None if bias is None else reduced_bias(bias.to(q.dtype), H, W, ratio)
    out = F.scaled_dot_product_attention(
        q.reshape(B, nh, H * W, D), k.reshape(B, nh, Hr * Wr, D), v.reshape(B, nh, Hr * Wr, -1),
        attn_mask=mask, dropout_p=dropout_p, scale=scale,
    )
    return out.view(B, nh, H, W, -1)


#: ``model.sr_pool``: how each ``r x r`` cell of the map is reduced, before the LayerNorm.
POOLS = {"conv": "PVT: a strided depthwise conv over the zero-padded map",
         "avg": "PVTv2-Li: the mean of the cell's tokens, no weights"}


@dataclass(frozen=True)
class SpatialReductionOptions(KindOptions):
    """Options of the spatial_reduction kind."""

    ratio: int = option("sr_ratio", 1, minimum=1, per_stage=True, doc="keys/values from a map downsampled r x r")
    pool: str = option("sr_pool", "conv", choices=POOLS, doc="how an r x r cell becomes one key/value token")


@register_attention("spatial_reduction", options=SpatialReductionOptions)
class SpatialReductionAttention(QKVAttention):
    """PVT spatial-reduction attention with ratio ``model.sr_ratio`` and a clipped relative bias."""

    def __init__(self, dim: int, num_heads: int, spec: AttnSpec) -> None:
        super().__init__(dim, num_heads, spec)
        opts = SpatialReductionOptions.from_config(spec.options)
        r, pool = opts.ratio, opts.pool
        self.sr_ratio, self.sr_pool = r, pool
        self.window_size = spec.window_size
        if r > 1:
            if pool == "conv":
                self.sr = nn.Conv2d(dim, dim, r, stride=r, groups=dim)
            self.norm = nn.LayerNorm(dim)
        self.relative_position_bias_table = new_bias_table(num_heads, spec.window_size) if spec.rel_pos_bias else None

    def bias_grid(self) -> Optional[torch.Tensor]:
        t = self.relative_position_bias_table
        return None if t is None else bias_grid(t)

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` -> ``(B, ceil(H/r), ceil(W/r), C)``: each cell pooled (``sr_pool``), LayerNorm."""
        r = self.sr_ratio
        if r == 1:
            return x
        if self.sr_pool == "avg":  # ceil_mode: an edge cell averages only the tokens it covers
            return self.norm(F.avg_pool2d(x.permute(0, 3, 1, 2), r, ceil_mode=True).permute(0, 2, 3, 1))
        H, W = x.shape[1:3]
        x = F.pad(x, (0, 0, 0, reduced_size(W, r) * r - W, 0, reduced_size(H, r) * r - H))
        return self.norm(self.sr(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))

    def map_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``(B, heads, H, W, D)`` from ``x``; k, v ``(B, heads, Hr, Wr, D)`` from the reduced map."""
        B, H, W, C = x.shape
        nh, D = self.num_heads, self.head_dim
        w, b = self.qkv.weight, self.qkv.bias
        q = F.linear(x, w[:C], None if b is None else b[:C]).view(B, H, W, nh, D).permute(0, 3, 1, 2, 4)
        xr = self.reduce(x)
        Hr, Wr = xr.shape[1:3]
        kv = F.linear(xr, w[C:], None if b is None else b[C:]).view(B, Hr, Wr, 2, nh, D).permute(3, 0, 4, 1, 2, 5)
        return q, kv[0], kv[1]

    def attend_lse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q ``(B, heads, H, W, D)`` over REDUCED k, v (from :meth:`map_qkv`), with the log-sum-exp."""
        B, nh, H, W, D = q.shape
        scores = q.reshape(B, nh, H * W, D) @ k.reshape(B, nh, -1, D).transpose(-1, -2) * self.scale
        grid = self.bias_grid()
        if grid is not None:
            scores = scores + reduced_bias(grid.to(q.dtype), H, W, self.sr_ratio)
        out = scores.softmax(-1) @ v.reshape(B, nh, -1, v.shape[-1])
        return out.view(B, nh, H, W, -1), scores.logsumexp(-1).view(B, nh, H, W)

    def forward(self, x: torch.Tensor, g: Optional[torch.Tensor] = None) -> Any:
        if g is not None:
            return self.forward_global(x, g)
        q, k, v = self.map_qkv(x)
        return self.out_proj(
            spatial_reduction_attention(q, k, v, self.sr_ratio, self.bias_grid(), self.scale, self.dropout_p)
        )

    @torch.no_grad()
    def attention_maps(
        self, x: torch.Tensor, points: list[tuple[int, int]], pattern_only: bool = False
    ) -> torch.Tensor:
        """``(heads, P, H, W)``: each key cell's weight spread evenly over the real tokens it covers."""
        _, H, W, _ = x.shape
        r = self.sr_ratio
        q, k, _ = self.map_qkv(x)
        Hr, Wr = k.shape[2:4]
        idx = torch.tensor([py * W + px for py, px in points], device=x.device)
        qp = q[0].flatten(1, 2)[:, idx]  # (heads, P, D)
        scores = qp @ k[0].flatten(1, 2).transpose(-1, -2) * self.scale  # (heads, P, Hr*Wr)
        grid = self.bias_grid()
        if pattern_only:
            scores = torch.zeros_like(scores)
        elif grid is not None:
            scores = scores + reduced_bias(grid.to(x.dtype), H, W, r)[:, idx]
        cells = scores.softmax(-1).view(self.num_heads, len(points), Hr, Wr)
        cy, cx = torch.arange(H, device=x.device) // r, torch.arange(W, device=x.device) // r
        count = torch.bincount((cy[:, None] * Wr + cx[None, :]).flatten(), minlength=Hr * Wr).view(Hr, Wr)
        return (cells / count)[:, :, cy][:, :, :, cx]

    def reach(self, height: int, width: int) -> tuple[str, Optional[tuple[int, int]]]:
        return ("global" if self.sr_ratio == 1 else f"global, keys pooled {self.sr_ratio}x{self.sr_ratio}"), None

    def extra_repr(self) -> str:
        pool = ", sr_pool=avg" if self.sr_pool == "avg" else ""
        return f"dim={self.dim}, heads={self.num_heads}, sr_ratio={self.sr_ratio}{pool}, bias_clip={self.window_size}"
