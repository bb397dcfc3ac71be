"""(Dilated) neighborhood attention through FlexAttention: route ``flex`` of :mod:`.backends`.

The semantics are those of :mod:`.neighborhood` (``docs/attention.md``): per axis, dilation ``d``
splits the map into the groups ``i mod d``; inside a group, query ``j`` (group coordinates) sees
keys ``start .. start+k-1`` with ``start = clamp(j - k // 2, 0, L_group - k)``. The relative
position bias is indexed by the key-minus-query offset in group coordinates.

Layout: tokens are reordered group by group, and inside each group in 2-D tiles of
``TILE`` (8 x 16 = 128 tokens, one Flex block), so that a block of queries touches few key blocks
and dilation keeps blocks dense. :class:`FlexPlan` (the order, each token's group coordinates and
window start, and the ``BlockMask``) is built once per (map, kernel, dilation, device) and cached.
``mask_mod`` keeps the window; ``score_mod`` adds the ``(heads, 2k-1, 2k-1)`` bias, read through one
flat index so its gradient flows (Flex refuses a ``score_mod`` that indexes a grad-requiring tensor
twice). The bias gradient is accumulated with atomics on CUDA: not bitwise deterministic.

On CUDA the kernel is ``torch.compile``-d (Flex's eager path builds the full score matrix); each
map size compiles once, and the recompile limit is raised once, with a log line, so that varying
sizes never fall back to eager. On CPU Flex has no backward: :func:`dense_flex_attention` evaluates
the same ``mask_mod`` / ``score_mod`` densely, which is what the CPU tests check against brute force.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable, Optional

import torch

from .cache import tensor_cache

_logger = logging.getLogger(__name__)

#: Query / key tile (rows, columns) in group coordinates: 128 tokens, Flex's default block.
TILE = (8, 16)
RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class FlexPlan:
    """Token order and per-token tables of one (map, kernel, dilation); ``N = H * W`` tokens."""

    perm: torch.Tensor  # (N,) map index ``y * W + x`` of each sequence position
    inverse: torch.Tensor  # (N,) sequence position of each map index
    group: torch.Tensor  # (N,) dilation group of each sequence position
    jy: torch.Tensor  # (N,) row in group coordinates
    jx: torch.Tensor  # (N,) column in group coordinates
    sy: torch.Tensor  # (N,) first key row of the position's window (group coordinates)
    sx: torch.Tensor  # (N,) first key column
    kernel: tuple[int, int]
    block_mask: object  # torch's BlockMask (None until :func:`flex_plan` adds it)


def _axis(length: int, kernel: int, dilation: int) -> tuple[torch.Tensor, ...]:
    """Per position of one axis: its group, group coordinate and window start (clamped)."""
    i = torch.arange(length)
    group, j = i % dilation, i // dilation
    group_len = (length - group + dilation - 1) // dilation
    start = torch.minimum((j - kernel // 2).clamp(min=0), group_len - kernel)
    return group, j, start


def _order(gy: torch.Tensor, jy: torch.Tensor, gx: torch.Tensor, jx: torch.Tensor, dx: int) -> torch.Tensor:
    """Sequence order of the map's tokens: group, then 2-D tile, then row and column in the tile."""
    ty, tx = TILE
    tiles_y, tiles_x = int(jy.max()) // ty + 1, int(jx.max()) // tx + 1
    group = gy[:, None] * dx + gx[None, :]
    key = (((group * tiles_y + (jy // ty)[:, None]) * tiles_x + (jx // tx)[None, :]) * ty + (jy % ty)[:, None]) * tx
    key = key + (jx % tx)[None, :]
    return torch.argsort(key.flatten(), stable=True)


def _tables(H: int, W: int, ky: int, dy: int, kx: int, dx: int) -> FlexPlan:
    gy, jy, sy = _axis(H, ky, dy)
    gx, jx, sx = _axis(W, kx, dx)
    perm = _order(gy, jy, gx, jx, dx)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel())
    rows, cols = perm // W, perm % W
    return FlexPlan(perm, inverse, gy[rows] * dx + gx[cols], jy[rows], jx[cols], sy[rows], sx[cols], (ky, kx), None)


def mask_mod(plan: FlexPlan) -> Callable:
    """Flex ``mask_mod``: the key is in the query's group and inside its clamped window."""
    group, jy, jx, sy, sx = plan.group, plan.jy, plan.jx, plan.sy, plan.sx
    ky, kx = plan.kernel

    def keep(b, h, q_idx, kv_idx):
        ry, rx = jy[kv_idx] - sy[q_idx], jx[kv_idx] - sx[q_idx]
        return (group[q_idx] == group[kv_idx]) & (ry >= 0) & (ry < ky) & (rx >= 0) & (rx < kx)

    return keep


def score_mod(plan: FlexPlan, grid: Optional[torch.Tensor]) -> Optional[Callable]:
    """Flex ``score_mod`` adding the ``(heads, S, S)`` bias at the group-coordinate offset (None: no bias)."""
    if grid is None:
        return None
    side = grid.shape[-1]
    c = (side - 1) // 2
    table = grid.reshape(grid.shape[0], side * side)
    jy, jx = plan.jy, plan.jx

    def add_bias(score, b, h, q_idx, kv_idx):
        oy = (jy[kv_idx] - jy[q_idx]).clamp(-c, c) + c  # masked pairs are clamped in range, then dropped
        ox = (jx[kv_idx] - jx[q_idx]).clamp(-c, c) + c
        return score + table[h, oy * side + ox]

    return add_bias


@tensor_cache(maxsize=64)
def flex_plan(H: int, W: int, ky: int, dy: int, kx: int, dx: int, device: torch.device) -> FlexPlan:
    """The cached :class:`FlexPlan` with its ``BlockMask`` on ``device``."""
    from torch.nn.attention.flex_attention import create_block_mask

    plan = _on(_tables(H, W, ky, dy, kx, dx), device)
    n = H * W
    block = create_block_mask(mask_mod(plan), None, None, n, n, device=device, _compile=device.type == "cuda")
    return replace(plan, block_mask=block)


def _on(plan: FlexPlan, device: torch.device) -> FlexPlan:
    """``plan``'s per-token tables on ``device``."""
    tables = ("perm", "inverse", "group", "jy", "jx", "sy", "sx")
    return replace(plan, **{name: getattr(plan, name).to(device) for name in tables})


@lru_cache(maxsize=1)
def _compiled() -> Callable:
    """``torch.compile(flex_attention)``, with the recompile limit raised once for varying map sizes."""
    import torch._dynamo.config as dynamo_config  # the limit has no public setter
    from torch.nn.attention.flex_attention import flex_attention

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    if getattr(dynamo_config, name) < RECOMPILE_LIMIT:
        setattr(dynamo_config, name, RECOMPILE_LIMIT)
        _logger.info("flex neighborhood attention: torch._dynamo %s raised to %d (one compile per map size)",
                     name, RECOMPILE_LIMIT)
    return torch.compile(flex_attention, dynamic=False)


def _to_sequence(t: torch.Tensor, plan: FlexPlan) -> torch.Tensor:
    """``(B, heads, H, W, D)`` -> ``(B, heads, N, D)`` in the plan's token order."""
    return t.flatten(2, 3).index_select(2, plan.perm)


def _to_map(t: torch.Tensor, plan: FlexPlan, H: int, W: int) -> torch.Tensor:
    return t.index_select(2, plan.inverse).unflatten(2, (H, W))


def flex_neighborhood(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: tuple[int, int],
                      dilation: tuple[int, int], grid: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """Neighborhood attention through FlexAttention; q, k, v ``(B, heads, H, W, D)``.

    ``kernel`` / ``dilation`` per axis as :func:`~vision_attn.attention.neighborhood.neighborhood_patterns`
    resolves them; ``grid`` the ``(heads, 2k-1, 2k-1)`` bias or None.
    """
    from torch.nn.attention.flex_attention import flex_attention

    B, nh, H, W, D = q.shape
    plan = flex_plan(H, W, kernel[0], dilation[0], kernel[1], dilation[1], q.device)
    fn = _compiled() if q.device.type == "cuda" else flex_attention
    out = fn(*(_to_sequence(t, plan) for t in (q, k, v)), score_mod=score_mod(plan, grid),
             block_mask=plan.block_mask, scale=scale)
    return _to_map(out, plan, H, W)


def dense_flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: tuple[int, int],
                         dilation: tuple[int, int], grid: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """What :func:`flex_neighborhood` computes, with its ``mask_mod`` and ``score_mod`` evaluated on
    every (query, key) pair: dense scores, softmax, autograd (tests; ``O(N^2)`` memory)."""
    B, nh, H, W, D = q.shape
    plan = _on(_tables(H, W, kernel[0], dilation[0], kernel[1], dilation[1]), q.device)
    qs, ks, vs = (_to_sequence(t, plan) for t in (q, k, v))
    n = H * W
    q_idx, kv_idx = torch.arange(n, device=q.device)[:, None], torch.arange(n, device=q.device)[None, :]
    heads = torch.arange(nh, device=q.device)[:, None, None]
    scores = (qs @ ks.transpose(-1, -2)) * scale
    mod = score_mod(plan, grid)
    if mod is not None:
        scores = mod(scores, 0, heads, q_idx, kv_idx)
    scores = scores.masked_fill(~mask_mod(plan)(0, heads, q_idx, kv_idx), float("-inf"))
    return _to_map(scores.softmax(-1) @ vs, plan, H, W)
