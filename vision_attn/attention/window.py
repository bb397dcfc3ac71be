"""Window (Swin W-MSA) and shifted-window (SW-MSA) attention.

Semantics (DESIGN.md): pad H, W at the bottom/right to multiples of the window, optionally
roll by ``(-s, -s)``, attend inside each ``w x w`` window; padded keys are never attended and,
after a shift, a query only sees keys of its own contiguous region (Swin's region mask).
Per axis, a map no larger than the window is one window and is not shifted.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .base import QKVAttention
from .registry import AttnSpec, register_attention
from .rel_pos import bias_grid, new_bias_table, window_bias


@dataclass(frozen=True)
class WindowGeometry:
    """Window and shift actually used on an ``H x W`` map (per axis)."""

    H: int
    W: int
    wh: int
    ww: int
    sh: int
    sw: int

    @classmethod
    def of(cls, H: int, W: int, window_size: int, shift_size: int = 0) -> "WindowGeometry":
        wh, ww = min(window_size, H), min(window_size, W)
        sh = shift_size if H > window_size else 0
        sw = shift_size if W > window_size else 0
        return cls(H, W, wh, ww, sh, sw)

    @property
    def Hp(self) -> int:
        return -(-self.H // self.wh) * self.wh

    @property
    def Wp(self) -> int:
        return -(-self.W // self.ww) * self.ww

    @property
    def num_windows(self) -> int:
        return (self.Hp // self.wh) * (self.Wp // self.ww)

    @property
    def needs_mask(self) -> bool:
        return bool(self.sh or self.sw or self.Hp != self.H or self.Wp != self.W)


def partition(x: torch.Tensor, geo: WindowGeometry) -> torch.Tensor:
    """Pad, roll and split ``(B, H, W, C)`` into windows ``(B, nW, wh*ww, C)``."""
    B, H, W, C = x.shape
    if geo.Hp != H or geo.Wp != W:
        x = F.pad(x, (0, 0, 0, geo.Wp - W, 0, geo.Hp - H))
    if geo.sh or geo.sw:
        x = torch.roll(x, shifts=(-geo.sh, -geo.sw), dims=(1, 2))
    x = x.view(B, geo.Hp // geo.wh, geo.wh, geo.Wp // geo.ww, geo.ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, geo.num_windows, geo.wh * geo.ww, C)


def unpartition(x: torch.Tensor, geo: WindowGeometry) -> torch.Tensor:
    """Inverse of :func:`partition`: windows ``(B, nW, N, C)`` -> ``(B, H, W, C)``."""
    B, C = x.shape[0], x.shape[-1]
    x = x.view(B, geo.Hp // geo.wh, geo.Wp // geo.ww, geo.wh, geo.ww, C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, geo.Hp, geo.Wp, C)
    if geo.sh or geo.sw:
        x = torch.roll(x, shifts=(geo.sh, geo.sw), dims=(1, 2))
    return x[:, : geo.H, : geo.W] if (geo.Hp != geo.H or geo.Wp != geo.W) else x


def _region_labels(length: int, window: int, shift: int) -> torch.Tensor:
    """Swin's contiguous-region label of each (rolled) position along one axis."""
    labels = torch.zeros(length, dtype=torch.long)
    if shift:
        labels[length - window : length - shift] = 1
        labels[length - shift :] = 2
    return labels


@lru_cache(maxsize=128)
def _allowed_cpu(geo: WindowGeometry) -> torch.Tensor:
    # Region labels live in rolled coordinates; unroll them so partition() rolls them back.
    label = _region_labels(geo.Hp, geo.wh, geo.sh)[:, None] * 3 + _region_labels(geo.Wp, geo.ww, geo.sw)[None, :]
    label = torch.roll(label, shifts=(geo.sh, geo.sw), dims=(0, 1))
    valid = torch.zeros(geo.Hp, geo.Wp, dtype=torch.long)
    valid[: geo.H, : geo.W] = 1
    both = partition(torch.stack([label, valid], -1)[None], geo)[0]  # (nW, N, 2)
    lab, val = both[..., 0], both[..., 1].bool()
    allowed = (lab[:, :, None] == lab[:, None, :]) & val[:, None, :]
    # Pad queries are cropped away later; letting them see themselves keeps every row finite.
    return allowed | torch.eye(allowed.shape[-1], dtype=torch.bool)


@lru_cache(maxsize=128)
def _allowed_on(geo: WindowGeometry, device: torch.device) -> torch.Tensor:
    return _allowed_cpu(geo).to(device)


def allowed_mask(geo: WindowGeometry, device: torch.device) -> Optional[torch.Tensor]:
    """Boolean ``(nW, N, N)`` key mask (True = may attend), or None when nothing is masked."""
    return _allowed_on(geo, torch.device(device)) if geo.needs_mask else None


#: Batch sizes (windows) from which one GEMM per head beats SDPA's math path, which copies q, k, v
#: into one (B*nW*heads) batch. Measured on CPU in a module forward+backward (Swin-T shapes, batch
#: 4): 256 windows x 3 heads 1.13x faster, 64 x 6 even, 16 x 12 0.95x.
PER_HEAD_MIN_WINDOWS = 128


def _per_head(t: torch.Tensor, h: int) -> torch.Tensor:
    """Head ``h`` of ``(B, nW, heads, N, D)`` as ``(B*nW, N, D)``: a view for the layouts
    :meth:`QKVAttention.split_qkv` and :func:`_heads_to_windows` produce (no copy)."""
    B, nW, _, N, D = t.shape
    return t[:, :, h].reshape(B * nW, N, D)


def _stack_heads(parts: list[torch.Tensor], B: int) -> torch.Tensor:
    """Per-head ``(B*nW, N, D)`` results -> ``(B, nW, heads, N, D)``, stored ``(B, nW, N, heads, D)``
    so that merging heads back into channels is a free view."""
    out = torch.stack(parts, dim=2)  # (B*nW, N, heads, D)
    return out.view(B, -1, *out.shape[1:]).transpose(2, 3)


class _WindowAttentionFunction(torch.autograd.Function):
    """softmax(q k^T * scale + mask) v per window, with an explicit backward that returns the mask's
    (bias') gradient. Training path for a learned bias.

    One batched GEMM per head over all windows, directly on the strided q, k, v views (no copy into
    a ``(B*nW*heads, N, D)`` batch); ``mask`` ``(1 or nW, heads, N, N)`` broadcasts over the batch and
    its gradient is reduced once per head. torch's math SDPA, the alternative for a mask that needs
    a gradient, copies q, k, v into one batch and runs a NaN-guarding softmax; this kernel is
    1.2-1.6x faster forward+backward from 128 windows on (README, "Attention kernels").
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                scale: float) -> torch.Tensor:
        B, nW, nh, N, D = q.shape
        scaled, probs, outs = [], [], []
        for h in range(nh):
            qh = _per_head(q, h) * scale
            scores = torch.bmm(qh, _per_head(k, h).transpose(1, 2))
            scores.view(B, nW, N, N).add_(mask[:, h])
            p = scores.softmax(-1)
            outs.append(torch.bmm(p, _per_head(v, h)))
            scaled.append(qh)
            probs.append(p)
        out = _stack_heads(outs, B)
        ctx.save_for_backward(k, v, out, *scaled, *probs)
        ctx.scale, ctx.mask_shape = scale, mask.shape
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        k, v, out, *rest = ctx.saved_tensors
        B, nW, nh, N, D = out.shape
        scaled, probs = rest[:nh], rest[nh:]
        need_q, need_k, need_v, need_mask = ctx.needs_input_grad[:4]
        dq, dk, dv, dmask = [], [], [], []
        for h in range(nh):
            g, p = _per_head(grad, h), probs[h]
            dv.append(torch.bmm(p.transpose(1, 2), g))
            delta = (g * _per_head(out, h)).sum(-1, keepdim=True)
            ds = torch.bmm(g, _per_head(v, h).transpose(1, 2)).sub_(delta).mul_(p)  # softmax backward
            if need_mask:  # summed over the batch (and over windows for a per-head mask)
                acc = torch.promote_types(ds.dtype, torch.float32)  # bf16 autocast: sum in fp32
                dmask.append(ds.view(B, nW, N, N).sum(0, dtype=acc) if ctx.mask_shape[0] > 1
                             else ds.sum(0, keepdim=True, dtype=acc))
            dq.append(torch.bmm(ds, _per_head(k, h)).mul_(ctx.scale))
            dk.append(torch.bmm(ds.transpose(1, 2), scaled[h]))
        return (_stack_heads(dq, B) if need_q else None, _stack_heads(dk, B) if need_k else None,
                _stack_heads(dv, B) if need_v else None, torch.stack(dmask, 1).to(grad.dtype) if need_mask else None, None)


def windowed_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    geo: WindowGeometry,
    grid: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """SDPA over windows: q, k, v ``(B, nW, heads, N, D)``; ``grid`` a ``(heads, 2w-1, 2w-1)`` bias."""
    allowed = allowed_mask(geo, q.device)
    mask = None
    if grid is not None:
        mask = window_bias(grid, geo.wh, geo.ww).to(q.dtype)  # (heads, N, N)
        if allowed is not None:
            mask = mask.masked_fill(~allowed[:, None], float("-inf"))  # (nW, heads, N, N)
    elif allowed is not None:
        mask = allowed[:, None]
    if mask is not None and mask.requires_grad and torch.is_grad_enabled():
        if dropout_p == 0.0 and q.shape[0] * q.shape[1] >= PER_HEAD_MIN_WINDOWS:  # training the bias
            mask = mask if mask.dim() == 4 else mask[None]
            return _WindowAttentionFunction.apply(q, k, v, mask, q.shape[-1] ** -0.5 if scale is None else scale)
        # Few windows, or attention dropout: SDPA's math path (5-D: the mask broadcasts over the batch).
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    # Otherwise fold (B, nW) into one batch dim: 4-D inputs reach the fused (flash) CPU/GPU kernels.
    B, nW, nh, N, D = q.shape
    if mask is not None:
        mask = mask.expand(B, nW, *mask.shape[-3:]).reshape(B * nW, -1, N, N)
    out = F.scaled_dot_product_attention(
        q.reshape(B * nW, nh, N, D),
        k.reshape(B * nW, nh, N, D),
        v.reshape(B * nW, nh, N, v.shape[-1]),
        attn_mask=mask,
        dropout_p=dropout_p,
        scale=scale,
    )
    return out.view(B, nW, nh, N, v.shape[-1])


def _heads_to_windows(t: torch.Tensor, geo: WindowGeometry) -> torch.Tensor:
    """``(B, heads, H, W, D)`` -> ``(B, nW, heads, N, D)``."""
    B, nh, H, W, D = t.shape
    t = partition(t.permute(0, 2, 3, 1, 4).reshape(B, H, W, nh * D), geo)
    return t.view(B, geo.num_windows, -1, nh, D).transpose(2, 3)


def _windows_to_heads(t: torch.Tensor, geo: WindowGeometry, H: int, W: int) -> torch.Tensor:
    """``(B, nW, heads, N, D)`` -> ``(B, heads, H, W, D)`` (inverse of :func:`_heads_to_windows`)."""
    B, nW, nh, N, D = t.shape
    t = unpartition(t.transpose(2, 3).reshape(B, nW, N, nh * D), geo)
    return t.view(B, H, W, nh, D).permute(0, 3, 1, 2, 4)


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: int,
    shift: int = 0,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """(Shifted) window attention. q, k, v: ``(B, heads, H, W, D)``; returns the same shape.

    ``bias`` is an optional ``(heads, 2w-1, 2w-1)`` table indexed by key-minus-query offset.
    """
    B, nh, H, W, D = q.shape
    geo = WindowGeometry.of(H, W, window_size, shift)
    qw, kw, vw = (_heads_to_windows(t, geo) for t in (q, k, v))
    return _windows_to_heads(windowed_sdpa(qw, kw, vw, geo, bias, scale), geo, H, W)


def window_attention_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: int,
    shift: int = 0,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`window_attention` (explicit softmax) plus the per-query log-sum-exp ``(B, heads, H, W)``."""
    B, nh, H, W, D = q.shape
    geo = WindowGeometry.of(H, W, window_size, shift)
    qw, kw, vw = (_heads_to_windows(t, geo) for t in (q, k, v))  # (B, nW, heads, N, D)
    scores = (qw @ kw.transpose(-1, -2)) * (D**-0.5 if scale is None else scale)
    if bias is not None:
        scores = scores + window_bias(bias, geo.wh, geo.ww).to(q.dtype)
    allowed = allowed_mask(geo, q.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = torch.cat([scores.softmax(-1) @ vw, scores.logsumexp(-1, keepdim=True)], -1)  # lse: one more channel
    out = _windows_to_heads(out, geo, H, W)
    return out[..., :-1], out[..., -1]


@register_attention("window")
class WindowAttention(QKVAttention):
    """Swin W-MSA on a ``(B, H, W, C)`` map, with a learned relative position bias."""

    shifted = False

    def __init__(self, dim: int, num_heads: int, spec: AttnSpec) -> None:
        super().__init__(dim, num_heads, spec)
        if spec.window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {spec.window_size}")
        self.window_size = spec.window_size
        self.shift_size = spec.window_size // 2 if self.shifted else 0
        self.relative_position_bias_table = new_bias_table(num_heads, spec.window_size) if spec.rel_pos_bias else None

    def bias_grid(self) -> Optional[torch.Tensor]:
        """``(heads, 2w-1, 2w-1)`` view of the bias table, or None."""
        t = self.relative_position_bias_table
        return None if t is None else bias_grid(t)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v ``(B, heads, H, W, D)`` -> the same shape."""
        return window_attention(q, k, v, self.window_size, self.shift_size, self.bias_grid(), self.scale)

    def attend_lse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return window_attention_lse(q, k, v, self.window_size, self.shift_size, self.bias_grid(), self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        geo = WindowGeometry.of(H, W, self.window_size, self.shift_size)
        q, k, v = self.split_qkv(partition(x, geo))  # (B, nW, heads, N, D)
        out = windowed_sdpa(q, k, v, geo, self.bias_grid(), self.scale, self.dropout_p)
        return unpartition(self.merge_heads(out), geo)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.num_heads}, window={self.window_size}, shift={self.shift_size}"


@register_attention("shifted_window")
class ShiftedWindowAttention(WindowAttention):
    """Swin SW-MSA: window attention after a cyclic shift by half a window."""

    shifted = True
