"""Brute-force references: full (H*W) x (H*W) masked attention built from docs/attention.md semantics.

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


def window_reference(q, k, v, window, shift=0, grid=None, scale=None) -> torch.Tensor:
    """(Shifted) window attention by brute force: same window and same shift region only (int or (h, w))."""
    allowed, bias = window_pairs_reference(q.shape[2], q.shape[3], window, shift, grid)
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

    docs/attention.md: shrink k to L; if k * d > L use d = max(1, L // k); group ``i mod d``; inside a
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


# ----------------------------------------------------------------------------- beyond local windows


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def window_pairs_reference(H: int, W: int, window, shift=0, grid=None):
    """(Shifted) window attention as ``(HW, HW)`` allowed + ``(heads, HW, HW)`` bias (or None).

    ``window`` and ``shift`` are an int or per axis ``(h, w)``; ``grid`` is ``(heads, 2wh-1, 2ww-1)``.
    """
    (wh, ww), (sh, sw) = _pair(window), _pair(shift)
    ry, wy, ly = _window_axis(H, wh, sh)
    rx, wx, lx = _window_axis(W, ww, sw)
    allowed = torch.zeros(H * W, H * W, dtype=torch.bool)
    for qi in range(H * W):
        a, b = divmod(qi, W)
        for ki in range(H * W):
            c, d = divmod(ki, W)
            allowed[qi, ki] = wy[a] == wy[c] and wx[b] == wx[d] and ly[a] == ly[c] and lx[b] == lx[d]
    if grid is None:
        return allowed, None
    cy, cx = (grid.shape[-2] - 1) // 2, (grid.shape[-1] - 1) // 2
    bias = pair_bias(grid, H, W, lambda p, r: (ry[r[0]] - ry[p[0]] + cy, rx[r[1]] - rx[p[1]] + cx)
                     if allowed[p[0] * W + p[1], r[0] * W + r[1]] else (None, None))
    return allowed, bias


def full_attention(q, k, v, allowed, bias=None, scale=None):
    """Flat ``(B, heads, N, D)`` q, k, v; ``allowed`` / ``bias`` broadcast to ``(B, heads, Nq, Nk)``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def global_tokens_reference(q, k, v, gq, gk, gv, allowed, bias=None, scale=None):
    """Map tokens + G global tokens as ONE masked full attention over N + G tokens.

    Map rows: the local kind's ``allowed`` (and ``bias``) plus every global column; global rows:
    every column. Returns the map output ``(B, heads, H, W, D)`` and the global ``(B, heads, G, D)``.
    """
    B, nh, H, W, D = q.shape
    N, G = H * W, gq.shape[2]
    full = torch.ones(N + G, N + G, dtype=torch.bool)
    full[:N, :N] = allowed
    b = None
    if bias is not None:
        b = torch.zeros(nh, N + G, N + G, dtype=bias.dtype)
        b[:, :N, :N] = bias
    cat = lambda m, g: torch.cat([m.reshape(B, nh, N, -1), g], 2)  # noqa: E731
    out = full_attention(cat(q, gq), cat(k, gk), cat(v, gv), full, b, scale)
    return out[:, :, :N].reshape(B, nh, H, W, -1), out[:, :, N:]


def clipped_offsets_bias(grid, q_yx, k_yx):
    """``(heads, Nq, Nk)`` bias of key-minus-query offsets clipped to the grid's reach (loops)."""
    c = (grid.shape[-1] - 1) // 2
    out = torch.zeros(grid.shape[0], len(q_yx), len(k_yx), dtype=grid.dtype)
    for i, (qy, qx) in enumerate(q_yx):
        for j, (ky, kx) in enumerate(k_yx):
            out[:, i, j] = grid[:, max(-c, min(c, ky - qy)) + c, max(-c, min(c, kx - qx)) + c]
    return out


def spatial_reduction_reference(x, module, g=None):
    """PVT spatial reduction by hand: zero pad, explicit depthwise strided conv, LayerNorm, full attention.

    With global tokens ``g (B, G, C)``: one masked full attention over [map queries, tokens] x
    [reduced cells, tokens] (every pair allowed); returns (map output, token output).
    """
    B, H, W, C = x.shape
    r, nh, D = module.sr_ratio, module.num_heads, module.head_dim
    Hr, Wr = -(-H // r), -(-W // r)
    if r > 1:
        pad = torch.zeros(B, Hr * r, Wr * r, C, dtype=x.dtype)
        pad[:, :H, :W] = x
        w, b = module.sr.weight[:, 0], module.sr.bias  # (C, r, r), (C,)
        red = torch.zeros(B, Hr, Wr, C, dtype=x.dtype)
        for cy in range(Hr):
            for cx in range(Wr):
                patch = pad[:, cy * r : (cy + 1) * r, cx * r : (cx + 1) * r]  # (B, r, r, C)
                red[:, cy, cx] = (patch * w.permute(1, 2, 0)).sum((1, 2)) + b
        red = torch.nn.functional.layer_norm(red, (C,), module.norm.weight, module.norm.bias, module.norm.eps)
    else:
        red = x
    wq, bq = module.qkv.weight, module.qkv.bias
    q = (x.reshape(B, H * W, C) @ wq[:C].T + bq[:C]).view(B, H * W, nh, D).transpose(1, 2)
    kv = (red.reshape(B, Hr * Wr, C) @ wq[C:].T + bq[C:]).view(B, Hr * Wr, 2, nh, D)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    bias = None
    table = module.relative_position_bias_table
    if table is not None:
        from vision_attn.attention.rel_pos import bias_grid

        grid = bias_grid(table)
        q_cells = [(y // r, xx // r) for y in range(H) for xx in range(W)]
        bias = clipped_offsets_bias(grid, q_cells, [(cy, cx) for cy in range(Hr) for cx in range(Wr)])
    if g is not None:
        G = g.shape[1]
        gqkv = (g @ wq.T + bq).view(B, G, 3, nh, D).permute(2, 0, 3, 1, 4)
        q, k, v = (torch.cat([t, gt], 2) for t, gt in zip((q, k, v), gqkv))
        if bias is not None:
            bias = torch.nn.functional.pad(bias, (0, G, 0, G))
        allowed = torch.ones(H * W + G, Hr * Wr + G, dtype=torch.bool)
        out = full_attention(q, k, v, allowed, bias, module.scale)
        merge = lambda t: module.proj(t.transpose(1, 2).reshape(B, -1, C))  # noqa: E731
        return merge(out[:, :, : H * W]).view(B, H, W, C), merge(out[:, :, H * W :])
    allowed = torch.ones(H * W, Hr * Wr, dtype=torch.bool)
    out = full_attention(q, k, v, allowed, bias, module.scale)  # (B, nh, N, D)
    return module.proj(out.transpose(1, 2).reshape(B, H, W, C))


def lsh_pairs_reference(k, rotations, chunk: int):
    """Which keys each query sees, counted over hash rounds: ``(B, heads, N, N)`` integer counts.

    Per round, bucket = argmax([k R, -k R]); tokens sorted by (bucket, position); chunk of the
    sorted slot; a query sees keys of its own chunk and of the previous one (cyclic, none when
    there is a single chunk).
    """
    B, nh, N, D = k.shape
    counts = torch.zeros(B, nh, N, N, dtype=torch.long)
    for b in range(B):
        for h in range(nh):
            for r in range(rotations.shape[0]):
                proj = k[b, h] @ rotations[r, h]
                buckets = torch.cat([proj, -proj], -1).argmax(-1).tolist()
                order = sorted(range(N), key=lambda i: (buckets[i], i))
                chunk_of = {tok: slot // chunk for slot, tok in enumerate(order)}
                n_chunks = -(-N // chunk)
                for i in range(N):
                    seen = {chunk_of[i]} | ({(chunk_of[i] - 1) % n_chunks} if n_chunks > 1 else set())
                    for j in range(N):
                        counts[b, h, i, j] += chunk_of[j] in seen
    return counts


def lsh_reference(q, k, v, rotations, chunk: int, grid=None, scale=None, self_penalty: float = -1e5):
    """LSH attention by brute force: one softmax over the multiset of keys seen in all rounds."""
    B, nh, H, W, D = q.shape
    N = H * W
    qf, kf, vf = (t.reshape(B, nh, N, -1) for t in (q, k, v))
    counts = lsh_pairs_reference(kf, rotations, chunk)
    bias = torch.eye(N, dtype=q.dtype) * self_penalty + counts.clamp(min=1).to(q.dtype).log()
    if grid is not None:
        yx = [divmod(i, W) for i in range(N)]
        bias = bias + clipped_offsets_bias(grid, yx, yx)
    kn = kf / kf.norm(dim=-1, keepdim=True)
    return full_attention(qf, kn, vf, counts > 0, bias, scale).reshape(B, nh, H, W, -1)


def routed_pairs_reference(q, k, region: int, topk: int):
    """``(B, N, N)`` allowed: region affinity (means over real tokens, all heads) -> top-k regions."""
    B, nh, H, W, D = q.shape
    wy, wx = min(region, H), min(region, W)
    nry, nrx = -(-H // wy), -(-W // wx)
    region_of = [(y // wy) * nrx + x // wx for y in range(H) for x in range(W)]
    nR = nry * nrx
    qf = q.permute(0, 2, 3, 1, 4).reshape(B, H * W, nh * D)
    kf = k.permute(0, 2, 3, 1, 4).reshape(B, H * W, nh * D)
    qr = torch.stack([torch.stack([qf[:, i] for i in range(H * W) if region_of[i] == r]).mean(0) for r in range(nR)], 1)
    kr = torch.stack([torch.stack([kf[:, i] for i in range(H * W) if region_of[i] == r]).mean(0) for r in range(nR)], 1)
    chosen = (qr @ kr.transpose(-1, -2)).topk(min(topk, nR), -1).indices  # (B, nR, t)
    allowed = torch.zeros(B, H * W, H * W, dtype=torch.bool)
    for b in range(B):
        for i in range(H * W):
            picked = set(chosen[b, region_of[i]].tolist())
            for j in range(H * W):
                allowed[b, i, j] = region_of[j] in picked
    return allowed


def routed_reference(q, k, v, region: int, topk: int, grid=None, scale=None):
    """BiFormer bi-level routing attention by brute force (clipped relative bias)."""
    B, nh, H, W, D = q.shape
    allowed = routed_pairs_reference(q, k, region, topk)[:, None]
    bias = None
    if grid is not None:
        yx = [divmod(i, W) for i in range(H * W)]
        bias = clipped_offsets_bias(grid, yx, yx)
    flat = [t.reshape(B, nh, H * W, -1) for t in (q, k, v)]
    return full_attention(*flat, allowed, bias, scale).reshape(B, nh, H, W, -1)


def random_qkv(B: int, nh: int, H: int, W: int, D: int = 4, seed: int = 0) -> list[torch.Tensor]:
    """Seeded float64 q, k, v of shape ``(B, heads, H, W, D)``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, nh, H, W, D, generator=g, dtype=torch.float64) for _ in range(3)]


def random_bias(nh: int, size: int, seed: int = 1) -> torch.Tensor:
    """Seeded float64 ``(heads, 2*size-1, 2*size-1)`` relative position bias grid."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(nh, 2 * size - 1, 2 * size - 1, generator=g, dtype=torch.float64)
