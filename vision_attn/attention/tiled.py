"""The tiled attention engine: exact attention inside per-axis window patterns, in pure PyTorch.

An axis pattern (:class:`AxisPattern`) splits an axis into ``dilation`` interleaved groups, each
with a clamped window of ``kernel`` positions; neighborhood, dilated (:mod:`.neighborhood`) and grid
(:mod:`.grid`) attention are such patterns.

Kernel: each group's queries are cut into tiles of ``t`` consecutive positions. Because the
window is clamped, all keys of a tile's queries lie in one *halo* of ``t + k - 1`` positions whose
start is clamped to stay inside the group. Query tiles and key halos are gathered (``index_select``)
and all 2-D tiles are attended as batched GEMMs under an additive mask (window membership +
relative bias, -inf outside the window). Tiles with the same relative layout (all interior
tiles, say) share one mask *pattern*, so the mask costs ``O(patterns)``, not ``O(tiles)``, to
build and to differentiate. Dilation costs nothing extra: groups are just more tiles. A custom
autograd function keeps the backward to GEMMs and two passes over the scores, in chunks of at
most ``CHUNK_SCORES`` scores. Memory is ``O(H * W * (t + k - 1)**2)`` at most, bounded by the
chunk size beyond; no ``(H*W) x (H*W)`` score matrix is ever built.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any, Optional

import torch

from . import backends
from .base import QKVAttention
from .cache import tensor_cache
from .registry import AttnSpec
from .rel_pos import bias_grid, new_bias_table

#: Query tile (rows, columns), picked by measurement (``python -m vision_attn.bench attention --tiles``).
DEFAULT_TILE = (4, 8)

#: Up to this many scores (16 MB in float32) the kernel runs in one chunk and keeps it for
#: backward; beyond, it works in chunks of ``CHUNK_SCORES`` and backward recomputes them.
#: Both picked by measurement on CPU (cache- and allocator-friendly sizes).
STASH_SCORES = 1 << 22
CHUNK_SCORES = 1 << 20


# ----------------------------------------------------------------------------- geometry


@lru_cache(maxsize=1024)
def _tile_size(group_len: int, target: int) -> int:
    """Fewest padded slots among sizes in ``[2/3, 3/2] * target`` (or one tile for a short group),
    then the size closest to ``target``."""
    sizes = list(range(max(1, -(-2 * target // 3)), min(3 * target // 2, group_len) + 1))
    if group_len <= 2 * target:
        sizes.append(group_len)
    return min(sizes, key=lambda t: (-(-group_len // t) * t, abs(math.log(t / target))))


@dataclass(frozen=True)
class AxisPattern:
    """One axis: ``dilation`` interleaved groups, a window of ``kernel`` (capped by the group
    length, so ``kernel >= length`` means global per group) and query tiles of ~``tile``."""

    length: int
    kernel: int
    dilation: int
    tile: int

    @property
    def group_len(self) -> int:
        return -(-self.length // self.dilation)

    @property
    def tile_q(self) -> int:
        """Queries per tile, near ``tile`` with as few padding slots as possible."""
        return _tile_size(self.group_len, max(1, self.tile))

    @property
    def num_tiles(self) -> int:
        return -(-self.group_len // self.tile_q)

    @property
    def tile_k(self) -> int:
        return min(self.group_len, self.tile_q + self.kernel - 1)

    @property
    def keys(self) -> int:
        """Keys summed over the axis' queries: each sees ``min(kernel, its group's length)``."""
        lens = [len(range(g, self.length, self.dilation)) for g in range(self.dilation)]
        return sum(n * min(self.kernel, n) for n in lens)


@dataclass(frozen=True)
class AxisTables:
    """Tile tables of one axis; ``R = dilation * num_tiles`` tiles, positions in axis indices."""

    q_index: torch.Tensor  # (R, tq) position of each query slot (pad slots repeat a query)
    k_index: torch.Tensor  # (R, tk) position of each halo slot
    q_valid: torch.Tensor  # (R, tq) slot holds a real query
    allowed: torch.Tensor  # (R, tq, tk) key inside the query's window
    offset: torch.Tensor  # (R, tq, tk) key - query offset in group coordinates


def axis_tables(p: AxisPattern) -> AxisTables:
    """Per-axis gather indices and window tables (CPU, int64 / bool)."""
    d, n, tq, tk = p.dilation, p.num_tiles, p.tile_q, p.tile_k
    lens = torch.tensor([len(range(g, p.length, d)) for g in range(d)])[:, None]  # (d, 1)
    kern = lens.clamp(max=p.kernel)
    jq = (torch.arange(n) * tq)[None, :, None] + torch.arange(tq)  # (1, n, tq) group coords
    q_valid = (jq < lens[..., None]).expand(d, n, tq)
    jq = torch.minimum(jq, lens[..., None] - 1)
    start = torch.minimum((jq - kern[..., None] // 2).clamp(min=0), (lens - kern)[..., None])
    halo = torch.minimum(start[..., 0], lens - tk).clamp(min=0)  # (d, n); keeps the halo in the group
    jk = halo[..., None] + torch.arange(tk)  # (d, n, tk); slots past the group end are never allowed
    rel = jk[..., None, :] - start[..., None]
    allowed = (rel >= 0) & (rel < kern[..., None, None])
    groups = torch.arange(d)[:, None, None]

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(d * n, *t.shape[2:])

    return AxisTables(
        q_index=flat(groups + d * jq),
        k_index=flat(groups + d * torch.minimum(jk, lens[..., None] - 1)),
        q_valid=flat(q_valid),
        allowed=flat(allowed),
        offset=flat(jk[..., None, :] - jq[..., None]),
    )


def _patterns(t: AxisTables) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct (allowed, offset) tables of an axis: ``(allowed_u, offset_u, pattern id per tile)``."""
    key = torch.cat([t.allowed.flatten(1).long(), t.offset.flatten(1)], 1)
    uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
    n = t.allowed[0].numel()
    shape = (uniq.shape[0], *t.allowed.shape[1:])
    return uniq[:, :n].bool().view(shape), uniq[:, n:].view(shape), inverse


@dataclass(frozen=True)
class TilePlan:
    """2-D gather / scatter indices and mask patterns: ``R`` tiles of ``Q`` queries, ``K`` keys."""

    q_index: torch.Tensor  # (R*Q,) flat map index of each query slot
    k_index: torch.Tensor  # (R*K,) flat map index of each halo slot
    out_index: torch.Tensor  # (R*Q,) output row of each query slot; padding slots -> spare row H*W
    pattern: torch.Tensor  # (R,) mask pattern of each tile
    allowed: torch.Tensor  # (P, Q, K) bool, window membership per pattern
    dy: torch.Tensor  # (P, Q, K) key - query row offset (group coordinates)
    dx: torch.Tensor  # (P, Q, K) column offset
    num_tiles: int

    @property
    def tile_shape(self) -> tuple[int, int]:
        return self.allowed.shape[1], self.allowed.shape[2]

    def to(self, device: torch.device) -> "TilePlan":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return TilePlan(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in moved.items()})


def _combine(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Broadcast per-axis ``(Ny, q, k)`` / ``(Nx, q', k')`` tables to ``(Ny*Nx, q*q', k*k')`` pairs."""
    full = (a.shape[0], b.shape[0], a.shape[1], b.shape[1], a.shape[2], b.shape[2])
    flat = (full[0] * full[1], full[2] * full[3], full[4] * full[5])
    ea = a[:, None, :, None, :, None].expand(full).reshape(flat)
    eb = b[None, :, None, :, None, :].expand(full).reshape(flat)
    return ea, eb


@tensor_cache(maxsize=64)
def _plan_cpu(py: AxisPattern, px: AxisPattern) -> TilePlan:
    ty, tx = axis_tables(py), axis_tables(px)
    W = px.length
    q_index = (ty.q_index[:, None, :, None] * W + tx.q_index[None, :, None, :]).flatten()
    k_index = ty.k_index[:, None, :, None] * W + tx.k_index[None, :, None, :]
    q_valid = (ty.q_valid[:, None, :, None] & tx.q_valid[None, :, None, :]).flatten()
    ay, oy, py_id = _patterns(ty)
    ax, ox, px_id = _patterns(tx)
    pattern = py_id[:, None] * ax.shape[0] + px_id[None, :]
    allowed_y, allowed_x = _combine(ay, ax)
    dy, dx = _combine(oy, ox)
    return TilePlan(
        q_index=q_index,
        k_index=k_index.flatten(),
        out_index=q_index.masked_fill(~q_valid, py.length * W),
        pattern=pattern.flatten(),
        allowed=allowed_y & allowed_x,
        dy=dy,
        dx=dx,
        num_tiles=pattern.numel(),
    )


@tensor_cache(maxsize=64)
def tile_plan(py: AxisPattern, px: AxisPattern, device: torch.device) -> TilePlan:
    """Cached :class:`TilePlan` of two axis patterns on ``device``."""
    return _plan_cpu(py, px).to(device)


@tensor_cache(maxsize=64)
def _bias_index(py: AxisPattern, px: AxisPattern, side: int, device: torch.device) -> torch.Tensor:
    """Flat index into a bias row of ``side**2 + 1`` entries; masked pairs hit the last (-inf) one."""
    plan = _plan_cpu(py, px)
    c = (side - 1) // 2
    reach = torch.maximum(plan.dy.abs(), plan.dx.abs())[plan.allowed]
    if int(reach.max()) > c:
        raise ValueError(f"a {side}x{side} bias grid is too small for this attention pattern")
    idx = (plan.dy + c) * side + (plan.dx + c)
    return idx.masked_fill(~plan.allowed, side * side).flatten().to(device)


def pattern_mask(py: AxisPattern, px: AxisPattern, grid: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Additive mask per pattern, ``(heads or 1, P, Q, K)``: bias inside windows, -inf outside."""
    plan = tile_plan(py, px, like.device)
    if grid is None:
        zeros = torch.zeros(plan.allowed.shape, dtype=like.dtype, device=like.device)
        return zeros.masked_fill_(~plan.allowed, float("-inf"))[None]
    nh, side = grid.shape[0], grid.shape[-1]
    rows = torch.cat([grid.reshape(nh, side * side).to(like.dtype), like.new_full((nh, 1), float("-inf"))], 1)
    return rows.index_select(1, _bias_index(py, px, side, like.device)).view(nh, *plan.allowed.shape)


# ----------------------------------------------------------------------------- kernel


def _chunks(n_tiles: int, tile_scores: int) -> list[tuple[int, int]]:
    """One range if all scores fit ``STASH_SCORES``, else ranges of about ``CHUNK_SCORES`` scores."""
    if n_tiles * tile_scores <= STASH_SCORES:
        return [(0, n_tiles)]
    step = max(1, CHUNK_SCORES // tile_scores)
    return [(i, min(i + step, n_tiles)) for i in range(0, n_tiles, step)]


def _gather_chunk(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, plan: TilePlan,
    tiles: tuple[int, int], scale: float, heads: int, dropout_p: float, seed: int, lse: Optional[list] = None,
) -> tuple[torch.Tensor, ...]:
    """Query tiles (pre-scaled), key/value halos, softmax and dropout keep-mask of a tile range.

    Tiles are flattened to ``(B*heads*n, rows, D)``; ``keep`` is empty without dropout. A list
    passed as ``lse`` receives the scores' log-sum-exp ``(B*heads*n, Q)`` (global tokens).
    """
    BH, N, D = q.shape
    (Q, K), (a, b) = plan.tile_shape, tiles
    n = b - a
    qc = q.index_select(1, plan.q_index[a * Q : b * Q]).view(BH * n, Q, D).mul_(scale)
    kc = k.index_select(1, plan.k_index[a * K : b * K]).view(BH * n, K, D)
    vc = v.index_select(1, plan.k_index[a * K : b * K]).view(BH * n, K, D)
    attn = torch.bmm(qc, kc.transpose(1, 2)).view(BH // heads, heads, n, Q, K)
    attn = attn.add_(mask.index_select(1, plan.pattern[a:b])).view(BH * n, Q, K)
    if lse is not None:
        lse.append(attn.logsumexp(-1))
    attn = attn.softmax(-1)
    keep = attn.new_empty(0, dtype=torch.bool)
    if dropout_p > 0.0:  # the same keep-mask in forward and backward: seeded per chunk
        gen = torch.Generator(q.device).manual_seed(seed)
        keep = torch.rand(attn.shape, generator=gen, device=attn.device, dtype=attn.dtype) >= dropout_p
    return qc, kc, vc, attn, keep


def _dropped(attn: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    return attn if not keep.numel() else attn * keep / (1.0 - p)


class _TiledAttention(torch.autograd.Function):
    """softmax(q k^T * scale + mask) v over gathered tiles; explicit backward.

    q, k, v are ``(B*heads, H*W, D)``. A problem of at most ``STASH_SCORES`` scores runs as one
    chunk whose tiles and probabilities are kept for backward; a larger one runs in chunks of
    ``CHUNK_SCORES`` and backward recomputes each chunk (one extra GEMM): memory ``O(chunk)``.
    Returns ``(out, lse)``; ``lse`` (the scores' log-sum-exp, ``(B*heads, H*W)``) is empty unless
    ``with_lse``. Its gradient ``g`` enters the softmax backward as ``dS = P * (dP - delta + g)``.
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                plan: TilePlan, scale: float, dropout_p: float, heads: int,
                with_lse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        BH, N, D = q.shape
        (Q, K), dst = plan.tile_shape, plan.out_index
        seed = int(torch.randint(1 << 62, ())) if dropout_p > 0.0 else 0
        chunks = _chunks(plan.num_tiles, BH * Q * K)
        out = q.new_empty(BH, N + 1, D)  # the spare last position absorbs padding queries
        lse = q.new_empty(BH, N + 1) if with_lse else q.new_empty(0)
        for i, (a, b) in enumerate(chunks):
            lse_chunk: Optional[list] = [] if with_lse else None
            tiles = _gather_chunk(q, k, v, mask, plan, (a, b), scale, heads, dropout_p, seed + i, lse_chunk)
            _, _, vc, attn, keep = tiles
            out.index_copy_(1, dst[a * Q : b * Q], torch.bmm(_dropped(attn, keep, dropout_p), vc).view(BH, -1, D))
            if lse_chunk:
                lse.index_copy_(1, dst[a * Q : b * Q], lse_chunk[0].view(BH, -1))
        out = out[:, :N]
        lse = lse[:, :N] if with_lse else lse
        stash = tiles if len(chunks) == 1 else (None,) * 5
        ctx.save_for_backward(q, k, v, mask, out, *stash)
        ctx.plan, ctx.scale, ctx.dropout_p, ctx.seed, ctx.heads = plan, scale, dropout_p, seed, heads
        ctx.with_lse = with_lse
        return out, lse

    @staticmethod
    def backward(ctx: Any, grad: Optional[torch.Tensor], grad_lse: Optional[torch.Tensor] = None
                 ) -> tuple[Optional[torch.Tensor], ...]:
        q, k, v, mask, out, *stash = ctx.saved_tensors
        plan: TilePlan = ctx.plan
        BH, N, D = q.shape
        heads, p = ctx.heads, ctx.dropout_p
        (Q, K), dst = plan.tile_shape, plan.out_index
        grad = torch.zeros_like(out) if grad is None else grad
        delta = (grad * out).sum(-1)
        if ctx.with_lse and grad_lse is not None:
            delta = delta - grad_lse
        g_all = torch.cat([grad, grad.new_zeros(BH, 1, D)], 1)  # padding queries: zero gradient ...
        delta_all = torch.cat([delta, grad.new_zeros(BH, 1)], 1)  # ... and zero delta
        grad_q = q.new_empty(BH, N + 1, D)
        grad_k, grad_v = torch.zeros_like(k), torch.zeros_like(v)
        # fp32 accumulation: under bf16 autocast the bias gradient sums batch x tiles x patterns terms
        acc = torch.promote_types(mask.dtype, torch.float32)
        grad_mask = torch.zeros_like(mask, dtype=acc) if ctx.needs_input_grad[3] else None
        for i, (a, b) in enumerate(_chunks(plan.num_tiles, BH * Q * K)):
            if stash[0] is not None:
                qc, kc, vc, attn, keep = stash
            else:
                qc, kc, vc, attn, keep = _gather_chunk(q, k, v, mask, plan, (a, b), ctx.scale, heads, p, ctx.seed + i)
            n, rows, keys = b - a, dst[a * Q : b * Q], plan.k_index[a * K : b * K]
            gc = g_all.index_select(1, rows).view(BH * n, Q, D)
            grad_v.index_add_(1, keys, torch.bmm(_dropped(attn, keep, p).transpose(1, 2), gc).view(BH, n * K, D))
            ds = torch.bmm(gc, vc.transpose(1, 2))
            if keep.numel():  # dropout: d(probs)/d(attn) = keep / (1 - p)
                ds.mul_(keep).div_(1.0 - p)
            ds.sub_(delta_all.index_select(1, rows).view(BH * n, Q, 1)).mul_(attn)  # softmax backward
            if grad_mask is not None:  # a learned mask is per head (the bias); sum batch and tiles
                grad_mask.index_add_(1, plan.pattern[a:b], ds.view(BH // heads, heads, n, Q, K).sum(0, dtype=acc))
            grad_q.index_copy_(1, rows, torch.bmm(ds, kc).view(BH, n * Q, D))
            grad_k.index_add_(1, keys, torch.bmm(ds.transpose(1, 2), qc).view(BH, n * K, D))
        grad_mask = None if grad_mask is None else grad_mask.to(mask.dtype)
        return grad_q[:, :N].mul_(ctx.scale), grad_k, grad_v, grad_mask, None, None, None, None, None


def tiled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    py: AxisPattern,
    px: AxisPattern,
    grid: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
) -> Any:
    """Attention inside the per-axis windows ``py`` x ``px``; q, k, v ``(B, heads, H, W, D)``.

    With ``return_lse`` also the per-query log-sum-exp of the scores, ``(B, heads, H, W)``.
    """
    B, nh, H, W, D = q.shape
    if (H, W) != (py.length, px.length):
        raise ValueError(f"patterns are for a {py.length}x{px.length} map, got {H}x{W}")
    if backends.counting():  # exact work, not the halos': see backends.exact_work
        return skipped_attention(q, v, py, px, return_lse)
    device = q.device.type
    if torch.is_autocast_enabled(device):  # run in the autocast dtype, with autocast off inside
        q, k, v = (t.to(torch.get_autocast_dtype(device)) for t in (q, k, v))
        with torch.autocast(device, enabled=False):
            return tiled_attention(q, k, v, py, px, grid, scale, dropout_p, return_lse)
    plan = tile_plan(py, px, q.device)
    mask = pattern_mask(py, px, grid, q)
    flat = [t.reshape(B * nh, H * W, D) for t in (q, k, v)]
    out, lse = _TiledAttention.apply(*flat, mask, plan, D**-0.5 if scale is None else scale, dropout_p, nh, return_lse)
    if return_lse:
        return out.view(B, nh, H, W, D), lse.view(B, nh, H, W)
    return out.view(B, nh, H, W, D)


def skipped_attention(q: torch.Tensor, v: torch.Tensor, py: AxisPattern, px: AxisPattern, return_lse: bool) -> Any:
    """Route ``skip``: ``out = v`` (and a zero log-sum-exp), the exact work added to any counter."""
    B, nh = q.shape[:2]
    backends.add_work(B * nh * py.keys * px.keys * (q.shape[-1] + v.shape[-1]))
    return (v, v.new_zeros(v.shape[:-1])) if return_lse else v


# ----------------------------------------------------------------------------- modules


class TiledAttentionModule(QKVAttention):
    """Shared body of the tiled kinds: qkv -> attention inside :meth:`patterns` -> proj."""

    def __init__(self, dim: int, num_heads: int, spec: AttnSpec, bias_size: int) -> None:
        super().__init__(dim, num_heads, spec)
        self.relative_position_bias_table = new_bias_table(num_heads, bias_size) if spec.rel_pos_bias else None

    def patterns(self, H: int, W: int) -> tuple[AxisPattern, AxisPattern]:
        """Per-axis attention pattern on an ``H x W`` map."""
        raise NotImplementedError

    def bias_grid(self) -> Optional[torch.Tensor]:
        """``(heads, 2k-1, 2k-1)`` view of the bias table, or None."""
        t = self.relative_position_bias_table
        return None if t is None else bias_grid(t)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v ``(B, heads, H, W, D)`` -> the same shape."""
        py, px = self.patterns(q.shape[2], q.shape[3])
        return tiled_attention(q, k, v, py, px, self.bias_grid(), self.scale, self.dropout_p)

    def attend_lse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`attend` plus the per-query log-sum-exp (global tokens; always the tiled kernel)."""
        py, px = self.patterns(q.shape[2], q.shape[3])
        return tiled_attention(q, k, v, py, px, self.bias_grid(), self.scale, self.dropout_p, return_lse=True)
