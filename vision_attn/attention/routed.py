"""Bi-level routing attention (BiFormer, Zhu et al. 2023).

Semantics on an ``H x W`` map with region size ``w = window_size`` and ``topk``:

* regions: the map is padded at the bottom/right to multiples of ``w`` and split into ``w x w``
  regions exactly like window attention (a map smaller than ``w`` is one region); padded
  tokens are never attended;
* routing: region queries and keys are the means of the real tokens' q and k of each region,
  over all heads together (BiFormer routes once per region, shared by the heads); the region
  affinity ``A = q_r k_r^T`` picks, for every region, its ``min(topk, regions)`` most affine
  regions (``torch.topk``; no gradient flows through the choice, as in BiFormer);
* token attention: every query of a region attends to all real keys of its gathered regions;
* relative position bias: the learned ``(2w-1)^2`` table indexed by the key-minus-query offset
  clipped to ``±(w-1)`` per axis (gathered regions can be far away), as in global attention.

BiFormer's local context enhancement (a depthwise conv on v) is left out so the kind stays a
pure attention pattern. Memory is ``O(N * topk * w^2)`` scores.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .base import QKVAttention
from .cache import tensor_cache
from .options import KindOptions, option
from .registry import AttnSpec, register_attention
from .rel_pos import bias_grid, new_bias_table
from .window import WindowGeometry, heads_to_windows, partition, unpartition


@tensor_cache(maxsize=64)
def _region_valid(geo: WindowGeometry, device: torch.device) -> torch.Tensor:
    """``(nR, w*w)``: which slots of each region hold a real token (not padding)."""
    return partition(torch.ones(1, geo.H, geo.W, 1, dtype=torch.bool), geo)[0, ..., 0].to(device)


def route(qw: torch.Tensor, kw: torch.Tensor, valid: torch.Tensor, topk: int) -> torch.Tensor:
    """Top-``topk`` regions per region ``(B, nR, topk)`` from windowed q, k ``(B, nR, heads, n, D)``."""
    w = valid.to(qw.dtype)[None, :, None, :, None]
    count = w.sum(3)
    qr = ((qw * w).sum(3) / count).flatten(2)  # (B, nR, heads * D)
    kr = ((kw * w).sum(3) / count).flatten(2)
    affinity = qr @ kr.transpose(-1, -2)  # (B, nR, nR)
    return affinity.topk(min(topk, affinity.shape[-1]), dim=-1).indices


@tensor_cache(maxsize=64)
def _bias_blocks_index(geo: WindowGeometry, side: int, device: torch.device) -> tuple[torch.Tensor, int, int]:
    """Grid index ``(My, Mx, n, n)`` of every (query slot, key slot) pair per region offset.

    With the offset clipped to ``±c``, regions ``m = ceil((c + w - 1) / w)`` or more apart along an
    axis all see the clipped edge of the table, so region offsets are clamped to ``±m``:
    ``(2m+1)^2`` distinct bias blocks instead of one per gathered region.
    """
    c = (side - 1) // 2
    my = max(1, -(-(c + geo.wh - 1) // geo.wh))
    mx = max(1, -(-(c + geo.ww - 1) // geo.ww))
    ry = torch.arange(-my, my + 1)[:, None, None, None]
    rx = torch.arange(-mx, mx + 1)[None, :, None, None]
    iy, ix = torch.arange(geo.wh).repeat_interleave(geo.ww), torch.arange(geo.ww).repeat(geo.wh)
    dy = (ry * geo.wh + iy[None, :] - iy[:, None]).clamp(-c, c) + c  # [query slot, key slot]
    dx = (rx * geo.ww + ix[None, :] - ix[:, None]).clamp(-c, c) + c
    return (dy * side + dx).to(device), my, mx


def routed_bias(grid: torch.Tensor, geo: WindowGeometry, idx: torch.Tensor) -> torch.Tensor:
    """Bias ``(B, nR, t, heads, n, n)`` of every region and its ``t`` gathered regions ``idx (B, nR, t)``."""
    nh, side = grid.shape[0], grid.shape[-1]
    table, my, mx = _bias_blocks_index(geo, side, grid.device)
    n = table.shape[-1]
    blocks = grid.reshape(nh, -1)[:, table].permute(1, 2, 0, 3, 4).reshape(-1, nh, n, n)  # ((2my+1)(2mx+1), ...)
    nrx = geo.Wp // geo.ww
    own = torch.arange(idx.shape[1], device=idx.device)[None, :, None]
    dy = (torch.div(idx, nrx, rounding_mode="floor") - torch.div(own, nrx, rounding_mode="floor")).clamp(-my, my) + my
    dx = (idx % nrx - own % nrx).clamp(-mx, mx) + mx
    return blocks.index_select(0, (dy * (2 * mx + 1) + dx).flatten()).view(*idx.shape, nh, n, n)


def _gather_regions(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t (B, nR, ...)`` at region indices ``idx (B, nR, k)`` -> ``(B, nR, k, ...)``."""
    B = t.shape[0]
    return t[torch.arange(B, device=t.device)[:, None, None], idx]


def routed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    region: int,
    topk: int,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    dropout_p: float = 0.0,
):
    """Bi-level routing attention on ``(B, heads, H, W, D)``; ``bias`` a ``(heads, 2w-1, 2w-1)`` grid.

    Returns the output (and with ``return_lse`` the per-query log-sum-exp ``(B, heads, H, W)``).
    """
    B, nh, H, W, D = q.shape
    geo = WindowGeometry.of(H, W, region)
    valid = _region_valid(geo, q.device)  # (nR, n)
    qw, kw, vw = (heads_to_windows(t, geo) for t in (q, k, v))  # (B, nR, heads, n, D)
    idx = route(qw.detach(), kw.detach(), valid, topk)  # (B, nR, t)
    nR, n, t = valid.shape[0], valid.shape[1], idx.shape[-1]
    kg = _gather_regions(kw, idx).transpose(2, 3).reshape(B, nR, nh, t * n, D)
    vg = _gather_regions(vw, idx).transpose(2, 3).reshape(B, nR, nh, t * n, -1)
    scores = (qw @ kg.transpose(-1, -2)) * (D**-0.5 if scale is None else scale)  # (B, nR, heads, n, t*n)
    if bias is not None:
        b = routed_bias(bias.to(q.dtype), geo, idx)  # (B, nR, t, heads, n, n)
        scores = (scores.view(B, nR, nh, n, t, n) + b.permute(0, 1, 3, 4, 2, 5)).view(B, nR, nh, n, t * n)
    if (geo.Hp, geo.Wp) != (H, W):
        scores = scores.masked_fill(~valid[idx].view(B, nR, 1, 1, t * n), float("-inf"))
    out = F.dropout(scores.softmax(-1), dropout_p) @ vg
    if return_lse:
        out = torch.cat([out, scores.logsumexp(-1, keepdim=True)], -1)  # lse rides along as one more channel
    Dv = out.shape[-1]
    out = unpartition(out.transpose(2, 3).reshape(B, nR, n, nh * Dv), geo).view(B, H, W, nh, Dv).permute(0, 3, 1, 2, 4)
    return (out[..., :-1], out[..., -1]) if return_lse else out


@dataclass(frozen=True)
class RoutedOptions(KindOptions):
    """Options of the routed kind (its region side is the stage's ``window_size``)."""

    topk: int = option("routed_topk", 4, minimum=1, per_stage=True,
                       doc="regions (window_size x window_size tokens) gathered per region")


@register_attention("routed", options=RoutedOptions)
class RoutedAttention(QKVAttention):
    """BiFormer bi-level routing attention: regions of ``window_size``, ``routed_topk`` regions each."""

    fixed_route = "gathered regions"

    def __init__(self, dim: int, num_heads: int, spec: AttnSpec) -> None:
        super().__init__(dim, num_heads, spec)
        if spec.window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {spec.window_size}")
        self.region, self.topk = spec.window_size, RoutedOptions.from_config(spec.options).topk
        self.window_size = spec.window_size  # bias table size (and region side)
        self.relative_position_bias_table = new_bias_table(num_heads, spec.window_size) if spec.rel_pos_bias else None

    def bias_grid(self) -> Optional[torch.Tensor]:
        t = self.relative_position_bias_table
        return None if t is None else bias_grid(t)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v ``(B, heads, H, W, D)`` -> the same shape."""
        return routed_attention(q, k, v, self.region, self.topk, self.bias_grid(), self.scale, dropout_p=self.dropout_p)

    def attend_lse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return routed_attention(q, k, v, self.region, self.topk, self.bias_grid(), self.scale, True, self.dropout_p)

    @torch.no_grad()
    def attention_maps(
        self, x: torch.Tensor, points: list[tuple[int, int]], pattern_only: bool = False
    ) -> torch.Tensor:
        """As the base class; ``pattern_only`` routes on this input's q, k (zero q, k would tie every
        region) and spreads the weights uniformly over the gathered regions' tokens."""
        if not pattern_only:
            return super().attention_maps(x, points)
        _, H, W, _ = x.shape
        q, k, _ = self.qkv_heads(x)
        geo = WindowGeometry.of(H, W, self.region)
        qw, kw = heads_to_windows(q, geo), heads_to_windows(k, geo)
        idx = route(qw, kw, _region_valid(geo, x.device), self.topk)[0]  # (nR, t)
        nrx = geo.Wp // geo.ww
        ys, xs = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
        region_of = (ys // geo.wh)[:, None] * nrx + (xs // geo.ww)[None, :]  # (H, W)
        mask = torch.stack([torch.isin(region_of, idx[int(region_of[py, px])]) for py, px in points]).to(x.dtype)
        return (mask / mask.sum((-1, -2), keepdim=True)).expand(self.num_heads, -1, -1, -1)

    def reach(self, height: int, width: int) -> tuple[str, Optional[tuple[int, int]]]:
        return f"top-{self.topk} routed regions of {self.region}x{self.region} (content)", None

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.num_heads}, region={self.region}, topk={self.topk}"
