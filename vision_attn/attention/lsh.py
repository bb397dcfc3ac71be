"""LSH attention (Reformer, Kitaev et al. 2020): hash, sort, attend within chunks.

Semantics on an ``N = H * W`` token map (raster order), per batch element and head:

* shared query-key: the module projects one vector ``qk`` per token (``qkv`` is ``2C`` wide:
  ``qk`` and ``v``); queries are ``qk``, keys are ``qk / |qk|`` (Reformer). The functional
  :func:`lsh_attention` takes ``q`` and ``k`` separately and hashes the keys (the module passes
  ``q = k = qk``);
* hashing: ``n_hashes`` rounds of random rotations ``R (D, b/2)``;
  ``bucket(i) = argmax([k_i R, -k_i R])``. ``b = lsh_buckets``, or by default Reformer's
  ``2 * ceil(N / chunk)`` capped at ``2 * chunk`` (beyond ``chunk^2`` tokens buckets hold more
  than a chunk; the cap keeps hashing at ``O(N * chunk)`` time and memory). Rotations are a
  fixed function of the module's ``hash_seed`` (a buffer), the map size and the head dim, so a
  module hashes the same way in training, eval and the reference tests;
* per round: sort tokens by ``(bucket, position)``, cut the sorted order into chunks of
  ``chunk`` tokens (the last one padded; padding is never attended), and every query attends to
  the keys of its own chunk and of the previous chunk (the first chunk looks back to the last;
  no look-back when there is a single chunk). Attending to itself costs ``-1e5`` on the score
  (Reformer: only used when nothing else is there);
* rounds are merged by log-sum-exp, i.e. one softmax over the multiset of keys seen in all rounds
  (a key seen in two rounds counts twice);
* relative position bias: the learned ``(2w-1)^2`` table (``w = window_size``) indexed by the
  key-minus-query offset clipped to ``±(w-1)`` per axis, as in global attention.

With global tokens (``model.global_tokens``) the map queries' LSH part is merged exactly with
the global keys (see global_tokens.py); the global tokens themselves attend to the raw ``qk``
vectors of all map tokens (no hashing, no key normalisation on that ``O(N * G)`` path).

Memory is ``O(N * 2 * chunk * n_hashes)`` scores: no ``N x N`` matrix is built.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import QKVAttention
from .cache import tensor_cache, tracing
from .options import KindOptions, option
from .registry import AttnSpec, register_attention
from .rel_pos import bias_grid, clipped_pair_index, new_bias_table

#: Score added to a query's own key (Reformer's self-attention mask value).
SELF_PENALTY = -1e5


def lsh_num_buckets(n: int, chunk: int, buckets: int = 0) -> int:
    """Buckets used on ``n`` tokens: ``buckets`` if set, else ``2 * ceil(n / chunk)`` (Reformer's rule)
    capped at ``2 * chunk``, so hashing costs ``O(N * chunk)`` like the attention itself."""
    return buckets if buckets > 0 else 2 * max(1, min(-(-n // chunk), chunk))


def lsh_rotations(n_hashes: int, heads: int, dim: int, buckets: int, seed: int,
                  device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random rotations ``(n_hashes, heads, dim, buckets // 2)``, a fixed function of ``seed``."""
    if buckets < 2 or buckets % 2:
        raise ValueError(f"lsh buckets must be even and >= 2, got {buckets}")
    gen = torch.Generator().manual_seed(seed)
    rot = torch.randn(n_hashes, heads, dim, buckets // 2, generator=gen, dtype=torch.float64)
    return rot.to(device=device, dtype=dtype)


@tensor_cache(maxsize=64)
def _cached_rotations(n_hashes: int, heads: int, dim: int, buckets: int, seed: int, device: torch.device,
                      dtype: torch.dtype) -> torch.Tensor:
    """:func:`lsh_rotations` drawn once per (layer seed, shape, device, dtype), not every step."""
    return lsh_rotations(n_hashes, heads, dim, buckets, seed, device, dtype)


def lsh_hash(k: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Bucket of every key: ``k (B, heads, N, D)`` -> ``(B, heads, n_hashes, N)`` in ``[0, buckets)``.

    ``argmax([p, -p])`` without building it: the max of ``p`` wins ties against the max of ``-p``.
    """
    proj = torch.einsum("bhnd,rhdk->bhrnk", k, rotations.to(k.dtype))
    top, top_i = proj.max(-1)
    low, low_i = proj.min(-1)
    return torch.where(top >= -low, top_i, low_i + proj.shape[-1])


def _sorted(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather ``t (B, heads, N, D)`` at ``index (B, heads, R, M)`` -> ``(B, heads, R, M, D)``."""
    B, nh, R, M = index.shape
    flat = index.reshape(B, nh, R * M, 1).expand(-1, -1, -1, t.shape[-1])
    return t.gather(2, flat).view(B, nh, R, M, t.shape[-1])


def _look_back(t: torch.Tensor) -> torch.Tensor:
    """Chunks ``(..., nC, c, X)`` -> keys of the chunk and the previous one ``(..., nC, 2c, X)``."""
    if t.shape[-3] == 1:
        return t
    return torch.cat([t, t.roll(1, dims=-3)], -2)


def lsh_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rotations: torch.Tensor,
    chunk: int,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    dropout_p: float = 0.0,
):
    """LSH attention on ``(B, heads, H, W, D)`` q, k, v (see the module docstring).

    ``rotations`` ``(n_hashes, heads, D, buckets // 2)``; ``bias`` a ``(heads, 2w-1, 2w-1)`` grid.
    Returns the output (and with ``return_lse`` the per-query log-sum-exp ``(B, heads, H, W)``).
    """
    B, nh, H, W, D = q.shape
    N, R = H * W, rotations.shape[0]
    scale = D**-0.5 if scale is None else scale
    qf, kf, vf = (t.reshape(B, nh, N, t.shape[-1]) for t in (q, k, v))
    order = (lsh_hash(kf, rotations) * N + torch.arange(N, device=q.device)).argsort(-1)  # (B, nh, R, N)
    nC = -(-N // chunk)
    pos = F.pad(order, (0, nC * chunk - N), value=N)  # padding slots: position N, masked as keys
    at = pos.clamp(max=N - 1)  # ... and they gather the last token (their outputs are dropped)
    qs = _sorted(qf, at).view(B, nh, R, nC, chunk, D)
    ks = _look_back(_sorted(F.normalize(kf, dim=-1), at).view(B, nh, R, nC, chunk, D))
    vs = _look_back(_sorted(vf, at).view(B, nh, R, nC, chunk, -1))
    kpos = _look_back(pos.view(B, nh, R, nC, chunk, 1)).transpose(-1, -2)  # (B, nh, R, nC, 1, K)
    scores = (qs @ ks.transpose(-1, -2)) * scale  # (B, nh, R, nC, chunk, K)
    # One gather adds the bias, the self penalty (offset 0 is the token itself) and -inf on padding.
    table = _score_table(bias, nh, q)  # (nh, side**2 + 1)
    side = int(round((table.shape[1] - 1) ** 0.5))
    idx = clipped_pair_index(at.view(B, nh, R, nC, chunk, 1), kpos.clamp(max=N - 1), W, side)
    idx = idx.masked_fill(kpos >= N, side * side)
    scores = scores + table[None].expand(B, -1, -1).gather(2, idx.reshape(B, nh, -1)).view(scores.shape)
    out = F.dropout(scores.softmax(-1), dropout_p) @ vs
    if R > 1 or return_lse:
        out = torch.cat([out, scores.logsumexp(-1, keepdim=True)], -1)  # lse rides along as one more channel
    out = out.view(B, nh, R, nC * chunk, -1)
    undo = order.argsort(-1)  # sorted slot of every token, per round
    out = out.gather(3, undo[..., None].expand(-1, -1, -1, -1, out.shape[-1]))  # (B, nh, R, N, Dv[+1])
    if R == 1:
        out = out[:, :, 0].reshape(B, nh, H, W, -1)
        return (out[..., :-1], out[..., -1]) if return_lse else out
    out, lse = out[..., :-1], out[..., -1]
    total = lse.logsumexp(2, keepdim=True)  # one softmax over all rounds
    out = (torch.exp(lse - total)[..., None] * out).sum(2).reshape(B, nh, H, W, -1)
    return (out, total.reshape(B, nh, H, W)) if return_lse else out


def _score_table(bias: Optional[torch.Tensor], heads: int, like: torch.Tensor) -> torch.Tensor:
    """Per head: the bias grid flattened, ``SELF_PENALTY`` added at offset 0, then one ``-inf`` entry."""
    if bias is None:  # a 3 x 3 zero grid: offset (0, 0) still singles out the token itself
        flat = like.new_zeros(heads, 9)
    else:
        flat = bias.reshape(heads, -1).to(like.dtype)
    centre = like.new_zeros(flat.shape[1])
    centre[flat.shape[1] // 2] = SELF_PENALTY
    return torch.cat([flat + centre, like.new_full((heads, 1), float("-inf"))], 1)


@dataclass(frozen=True)
class LSHOptions(KindOptions):
    """Options of the lsh kind."""

    chunk: int = option("lsh_chunk", 64, minimum=1, per_stage=True,
                        doc="tokens per sorted chunk; each query sees its chunk and the previous one")
    buckets: int = option("lsh_buckets", 0, doc="hash buckets (even); 0 = 2 * ceil(N / chunk) on an N-token map")
    hashes: int = option("lsh_hashes", 1, minimum=1, doc="hash rounds, combined by log-sum-exp")

    def check(self) -> None:
        b = self.buckets
        if isinstance(b, bool) or not isinstance(b, int) or b < 0 or b % 2:
            raise ConfigError(
                f"model.lsh_buckets={b} must be 0 (auto: 2 * ceil(tokens / lsh_chunk)) or an even integer >= 2"
            )


@register_attention("lsh", options=LSHOptions)
class LSHAttention(QKVAttention):
    """Reformer LSH attention, shared query-key (``qkv`` projects ``qk`` and ``v``), clipped bias."""

    fixed_route = "sorted chunks"

    def __init__(self, dim: int, num_heads: int, spec: AttnSpec) -> None:
        super().__init__(dim, num_heads, spec)
        opts = LSHOptions.from_config(spec.options)
        self.qkv = nn.Linear(dim, dim * 2, bias=spec.qkv_bias)  # shared qk, v
        self.chunk, self.n_hashes, self.buckets = opts.chunk, opts.hashes, opts.buckets
        self.window_size = spec.window_size
        self.register_buffer("hash_seed", torch.randint(1 << 31, ()), persistent=True)
        self._seed = int(self.hash_seed)  # read without a data-dependent int() while torch.export traces
        self.relative_position_bias_table = new_bias_table(num_heads, spec.window_size) if spec.rel_pos_bias else None

    def bias_grid(self) -> Optional[torch.Tensor]:
        t = self.relative_position_bias_table
        return None if t is None else bias_grid(t)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._seed = int(self.hash_seed)

    def rotations(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """This module's rotations for an ``n``-token map."""
        b = lsh_num_buckets(n, self.chunk, self.buckets)
        seed = self._seed if tracing() else int(self.hash_seed)
        return _cached_rotations(self.n_hashes, self.num_heads, self.head_dim, b, seed, like.device, like.dtype)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, *S, C)`` -> ``(qk, qk, v)``, each ``(B, heads, *S, head_dim)``."""
        B, *S, C = x.shape
        qkv = self.qkv(x).view(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        qk, v = (t.reshape(B, self.num_heads, *S, self.head_dim) for t in qkv.unbind(0))
        return qk, qk, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v ``(B, heads, H, W, D)`` (the module passes q = k) -> the same shape."""
        return self.attend_lse(q, k, v)[0]

    def attend_lse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rot = self.rotations(q.shape[2] * q.shape[3], q)
        return lsh_attention(q, k, v, rot, self.chunk, self.bias_grid(), self.scale, True, self.dropout_p)

    @torch.no_grad()
    def attention_maps(
        self, x: torch.Tensor, points: list[tuple[int, int]], pattern_only: bool = False
    ) -> torch.Tensor:
        """As the base class; ``pattern_only`` hashes this input's keys (zero keys would share one
        bucket) and weighs each key by the rounds it is seen in, the query itself left out."""
        if not pattern_only:
            return super().attention_maps(x, points)
        _, H, W, _ = x.shape
        N = H * W
        _, k, _ = self.qkv_heads(x)
        k = k.reshape(1, self.num_heads, N, self.head_dim)
        order = (lsh_hash(k, self.rotations(N, k)) * N + torch.arange(N, device=x.device)).argsort(-1)[0]
        chunk_of = order.argsort(-1) // self.chunk  # (heads, R, N)
        n_chunks = -(-N // self.chunk)
        idx = torch.tensor([py * W + px for py, px in points], device=x.device)
        own = chunk_of[..., idx, None]  # (heads, R, P, 1)
        seen = chunk_of[..., None, :] == own
        if n_chunks > 1:
            seen |= chunk_of[..., None, :] == (own - 1) % n_chunks
        counts = seen.to(x.dtype).sum(1)  # (heads, P, N)
        others = counts.clone()
        others[:, torch.arange(len(points)), idx] = 0
        counts = torch.where(others.sum(-1, keepdim=True) > 0, others, counts)
        return (counts / counts.sum(-1, keepdim=True)).view(self.num_heads, len(points), H, W)

    def reach(self, height: int, width: int) -> tuple[str, Optional[tuple[int, int]]]:
        if 2 * self.chunk >= height * width:
            return "global (chunks >= map)", None
        return f"hashed chunks of {self.chunk} (content)", None

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.num_heads}, chunk={self.chunk}, hashes={self.n_hashes}, "
                f"buckets={self.buckets or 'auto'}, bias_clip={self.window_size}")
