"""Global attention: every query attends to all ``H * W`` keys (quadratic, the reference point).

The relative position bias follows Shaw et al.: the key-minus-query offset is clipped to
``±(w-1)`` per axis (``w = spec.window_size``), so one ``(2w-1)**2`` table (timm layout) serves
any map size. The dense ``(heads, HW, HW)`` bias is built per call.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .base import QKVAttention
from .cache import tensor_cache
from .registry import AttnSpec, register_attention
from .rel_pos import bias_grid, new_bias_table


@tensor_cache(maxsize=32)
def _clipped_offsets(length: int, side: int, device: torch.device) -> torch.Tensor:
    """``(L*L,)`` grid index of ``clip(key - query, -c, c) + c`` for every (query, key) pair."""
    c = (side - 1) // 2
    pos = torch.arange(length)
    return ((pos[None, :] - pos[:, None]).clamp(-c, c) + c).flatten().to(device)


def clipped_bias(grid: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Dense ``(heads, HW, HW)`` bias from a ``(heads, 2w-1, 2w-1)`` grid, offsets clipped."""
    nh, side = grid.shape[0], grid.shape[-1]
    rows = grid.index_select(1, _clipped_offsets(H, side, grid.device))  # (nh, H*H, side)
    pairs = rows.index_select(2, _clipped_offsets(W, side, grid.device))  # (nh, H*H, W*W)
    return pairs.view(nh, H, H, W, W).transpose(2, 3).reshape(nh, H * W, H * W)


def global_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Full attention. q, k, v ``(B, heads, H, W, D)``; ``bias`` a ``(heads, 2w-1, 2w-1)`` grid."""
    B, nh, H, W, D = q.shape
    mask = None if bias is None else clipped_bias(bias.to(q.dtype), H, W)
    flat = [t.reshape(B, nh, H * W, D) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*flat, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return out.view(B, nh, H, W, D)


@register_attention("global")
class GlobalAttention(QKVAttention):
    """Global multi-head attention over the whole map, with a clipped relative position bias."""

    def __init__(self, dim: int, num_heads: int, spec: AttnSpec) -> None:
        super().__init__(dim, num_heads, spec)
        if spec.window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {spec.window_size}")
        self.window_size = spec.window_size
        self.relative_position_bias_table = new_bias_table(num_heads, spec.window_size) if spec.rel_pos_bias else None

    def bias_grid(self) -> Optional[torch.Tensor]:
        """``(heads, 2w-1, 2w-1)`` view of the bias table, or None."""
        t = self.relative_position_bias_table
        return None if t is None else bias_grid(t)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v ``(B, heads, H, W, D)`` -> the same shape."""
        return global_attention(q, k, v, self.bias_grid(), self.scale, self.dropout_p)

    def attend_lse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Explicit softmax, with the per-query log-sum-exp (for global tokens)."""
        B, nh, H, W, D = q.shape
        qf, kf, vf = (t.reshape(B, nh, H * W, D) for t in (q, k, v))
        scores = (qf @ kf.transpose(-1, -2)) * self.scale
        grid = self.bias_grid()
        if grid is not None:
            scores = scores + clipped_bias(grid.to(q.dtype), H, W)
        lse = scores.logsumexp(-1, keepdim=True)
        out = torch.exp(scores - lse) @ vf
        return out.view(B, nh, H, W, D), lse.view(B, nh, H, W)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.num_heads}, bias_clip={self.window_size}"
