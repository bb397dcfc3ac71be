"""Window (Swin W-MSA) and shifted-window (SW-MSA) attention.

Semantics (``docs/attention.md``): pad H, W at the bottom/right to multiples of the ``wh x ww`` window,
optionally roll by ``(-sh, -sw)``, attend inside each window; after a shift a query only sees
keys of its own contiguous region (Swin's region mask). Per axis, a map no larger than the window
is one window and is not shifted. Padding, ``padding=``:

- ``"mask"`` (default): pad, then roll; padded keys are never attended.
- ``"timm"``: timm's ``SwinTransformerBlock``: roll the unpadded map, then zero-pad; padded keys
  are attended (in a module they are the qkv projection of zeros, i.e. its bias) and the region
  mask is laid over the padded map. ``from_timm`` uses it to reproduce timm exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from timm.layers import to_2tuple

from . import backends
from .base import QKVAttention
from .cache import tensor_cache
from .options import KindOptions, option
from .registry import AttnSpec, register_attention
from .rel_pos import Size, bias_grid, new_bias_table, window_bias

#: ``model.window_padding`` for maps not a multiple of the window: what each choice means.
PADDING_CHOICES = {"mask": "padded keys never attended", "timm": "timm's Swin: roll, zero-pad, attend the pads"}
PADDINGS = tuple(PADDING_CHOICES)


@dataclass(frozen=True)
class WindowOptions(KindOptions):
    """Options of the window kinds (window, shifted_window)."""

    padding: str = option("window_padding", "mask", choices=PADDING_CHOICES)


@dataclass(frozen=True)
class WindowGeometry:
    """Window and shift actually used on an ``H x W`` map (per axis), and the padding semantics."""

    H: int
    W: int
    wh: int
    ww: int
    sh: int
    sw: int
    padding: str = "mask"

    @classmethod
    def of(cls, H: int, W: int, window_size: Size, shift_size: Size = 0, padding: str = "mask") -> "WindowGeometry":
        """Shrink the window to the map and drop the shift per axis where the map fits in one window."""
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
        (wh, ww), (sh, sw) = to_2tuple(window_size), to_2tuple(shift_size)
        return cls(H, W, min(wh, H), min(ww, W), sh if H > wh else 0, sw if W > ww else 0, padding)

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
    def padded(self) -> bool:
        return self.Hp != self.H or self.Wp != self.W

    @property
    def needs_mask(self) -> bool:
        return bool(self.sh or self.sw or (self.padded and self.padding == "mask"))


def _pad(x: torch.Tensor, geo: WindowGeometry, fill: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pad ``(B, H, W, C)`` at the bottom/right to ``(B, Hp, Wp, C)`` with zeros, or ``fill`` ``(C,)``."""
    if not geo.padded:
        return x
    x = F.pad(x, (0, 0, 0, geo.Wp - geo.W, 0, geo.Hp - geo.H))
    if fill is not None:
        x[:, geo.H :], x[:, :, geo.W :] = fill, fill
    return x


def _roll(x: torch.Tensor, geo: WindowGeometry, sign: int) -> torch.Tensor:
    return torch.roll(x, shifts=(sign * geo.sh, sign * geo.sw), dims=(1, 2)) if geo.sh or geo.sw else x


def arrange(x: torch.Tensor, geo: WindowGeometry, fill: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(B, H, W, C)`` -> the padded, rolled ``(B, Hp, Wp, C)`` map the windows tile."""
    if geo.padding == "timm":
        return _pad(_roll(x, geo, -1), geo, fill)
    return _roll(_pad(x, geo, fill), geo, -1)


def _split(x: torch.Tensor, geo: WindowGeometry) -> torch.Tensor:
    """``(B, Hp, Wp, C)`` -> windows ``(B, nW, wh*ww, C)``."""
    B, C = x.shape[0], x.shape[-1]
    x = x.view(B, geo.Hp // geo.wh, geo.wh, geo.Wp // geo.ww, geo.ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, geo.num_windows, geo.wh * geo.ww, C)


def partition(x: torch.Tensor, geo: WindowGeometry, fill: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pad, roll and split ``(B, H, W, C)`` into windows ``(B, nW, wh*ww, C)`` (pads: zeros or ``fill``)."""
    return _split(arrange(x, geo, fill), geo)


def unpartition(x: torch.Tensor, geo: WindowGeometry) -> torch.Tensor:
    """Inverse of :func:`partition`: windows ``(B, nW, N, C)`` -> ``(B, H, W, C)``."""
    B, C = x.shape[0], x.shape[-1]
    x = x.view(B, geo.Hp // geo.wh, geo.Wp // geo.ww, geo.wh, geo.ww, C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, geo.Hp, geo.Wp, C)
    crop = (lambda t: t[:, : geo.H, : geo.W]) if geo.padded else (lambda t: t)
    return _roll(crop(x), geo, 1) if geo.padding == "timm" else crop(_roll(x, geo, 1))


def _region_labels(length: int, window: int, shift: int) -> torch.Tensor:
    """Swin's contiguous-region label of each (rolled) position along one axis."""
    labels = torch.zeros(length, dtype=torch.long)
    if shift:
        labels[length - window : length - shift] = 1
        labels[length - shift :] = 2
    return labels


@tensor_cache(maxsize=128)
def _allowed_cpu(geo: WindowGeometry) -> torch.Tensor:
    # Region labels over the arranged (padded, rolled) map, as the windows see it.
    label = _region_labels(geo.Hp, geo.wh, geo.sh)[:, None] * 3 + _region_labels(geo.Wp, geo.ww, geo.sw)[None, :]
    lab = _split(label[None, :, :, None], geo)[0, ..., 0]  # (nW, N)
    allowed = lab[:, :, None] == lab[:, None, :]
    if geo.padding == "mask":
        valid = partition(torch.ones(1, geo.H, geo.W, 1, dtype=torch.bool), geo)[0, ..., 0]
        # Pad queries are cropped away later; letting them see themselves keeps every row finite.
        allowed = allowed & valid[:, None, :] | torch.eye(allowed.shape[-1], dtype=torch.bool)
    return allowed


@tensor_cache(maxsize=128)
def _allowed_on(geo: WindowGeometry, device: torch.device) -> torch.Tensor:
    return _allowed_cpu(geo).to(device)


def allowed_mask(geo: WindowGeometry, device: torch.device) -> Optional[torch.Tensor]:
    """Boolean ``(nW, N, N)`` key mask (True = may attend), or None when nothing is masked."""
    return _allowed_on(geo, torch.device(device)) if geo.needs_mask else None


def _per_head(t: torch.Tensor, h: int) -> torch.Tensor:
    """Head ``h`` of ``(B, nW, heads, N, D)`` as ``(B*nW, N, D)``: a view for the layouts
    :meth:`QKVAttention.split_qkv` and :func:`heads_to_windows` produce (no copy)."""
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
    1.2-1.6x faster forward+backward from 128 windows on (docs/kernels.md).
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
                _stack_heads(dv, B) if need_v else None, torch.stack(dmask, 1).to(grad.dtype) if need_mask else None,
                None)


def _per_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """:class:`_WindowAttentionFunction` in one dtype, with autocast off inside it.

    Under autocast the kernel's ops would each pick their own dtype (CUDA autocast runs softmax in
    fp32, bmm in bf16), and its hand-written backward, which autocast does not cover, would then
    multiply fp32 by bf16. So everything is cast once to autocast's dtype (else q's) up front.
    """
    dev = q.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else q.dtype
    with torch.autocast(dev, enabled=False):
        return _WindowAttentionFunction.apply(q.to(dtype), k.to(dtype), v.to(dtype), mask.to(dtype), scale)


def window_mask(geo: WindowGeometry, grid: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    """What the windows add to their scores: the ``(1 or nW, heads, N, N)`` bias (``-inf`` outside a
    query's region), the boolean ``(nW, 1, N, N)`` region mask without a bias, or None."""
    allowed = allowed_mask(geo, like.device)
    if grid is None:
        return None if allowed is None else allowed[:, None]
    mask = window_bias(grid, geo.wh, geo.ww).to(like.dtype)[None]  # (1, heads, N, N)
    return mask if allowed is None else mask.masked_fill(~allowed[:, None], float("-inf"))


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as 0 / -inf scores (float masks pass through)."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _sdpa_folded(q, k, v, mask, scale, dropout_p):
    """Route ``sdpa``: ``(B*nW, heads, N, D)``, the mask expanded over the batch (flash / cuDNN / CPU flash)."""
    B, nW, nh, N, D = q.shape
    if mask is not None:
        mask = mask.expand(B, nW, *mask.shape[-3:]).reshape(B * nW, -1, N, N)
    out = F.scaled_dot_product_attention(q.reshape(B * nW, nh, N, D), k.reshape(B * nW, nh, N, D),
                                         v.reshape(B * nW, nh, N, v.shape[-1]), attn_mask=mask,
                                         dropout_p=dropout_p, scale=scale)
    return out.view(B, nW, nh, N, v.shape[-1])


def _sdpa_5d(q, k, v, mask, scale, dropout_p):
    """Route ``sdpa_5d``: 5-D inputs, the mask broadcast over the batch (SDPA's math path)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def _sdpa_heads(q, k, v, mask, scale, dropout_p):
    """Route ``sdpa_heads``: ``(B, nW*heads, N, D)`` with a ``(1, nW*heads, N, N)`` mask (not expanded
    over the batch, so CUDA's memory-efficient kernel can return the bias gradient)."""
    B, nW, nh, N, D = q.shape
    if mask is not None:
        mask = _additive(mask, q.dtype).expand(nW, nh, N, N).reshape(1, nW * nh, N, N)
    out = F.scaled_dot_product_attention(q.reshape(B, nW * nh, N, D), k.reshape(B, nW * nh, N, D),
                                         v.reshape(B, nW * nh, N, v.shape[-1]), attn_mask=mask,
                                         dropout_p=dropout_p, scale=scale)
    return out.view(B, nW, nh, N, v.shape[-1])


def _per_head_route(q, k, v, mask, scale, dropout_p):
    """Route ``per_head``: :class:`_WindowAttentionFunction` (no dropout; the mask per head)."""
    N = q.shape[-2]
    mask = q.new_zeros(1, 1, N, N) if mask is None else _additive(mask, q.dtype)
    mask = mask.expand(-1, q.shape[2], -1, -1)
    return _per_head_attention(q, k, v, mask, q.shape[-1] ** -0.5 if scale is None else scale)


_ROUTES = {"sdpa": _sdpa_folded, "sdpa_5d": _sdpa_5d, "sdpa_heads": _sdpa_heads, "per_head": _per_head_route,
           backends.SKIP: lambda q, k, v, *_: v}


def windowed_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    geo: WindowGeometry,
    grid: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Attention over windows: q, k, v ``(B, nW, heads, N, D)``; ``grid`` a ``(heads, 2wh-1, 2ww-1)``
    bias. The route (:mod:`.backends`) follows ``backend`` (``model.attn_backend``; None: auto)."""
    mask = window_mask(geo, grid, q)
    call = backends.call_of("window", q, mask, dropout_p, windows=q.shape[0] * q.shape[1])
    route = backends.choose(call, backend)
    if route == backends.SKIP:  # every query of a window sees its N keys (the pads' rows included)
        B, nW, nh, N, D = q.shape
        backends.add_work(B * nW * nh * N * N * (D + v.shape[-1]))
    return _ROUTES[route](q, k, v, mask, scale, dropout_p)


def heads_to_windows(t: torch.Tensor, geo: WindowGeometry, fill: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(B, heads, H, W, D)`` -> ``(B, nW, heads, N, D)``; pads are zeros or ``fill`` ``(heads, D)``."""
    B, nh, H, W, D = t.shape
    t = partition(t.permute(0, 2, 3, 1, 4).reshape(B, H, W, nh * D), geo, None if fill is None else fill.reshape(-1))
    return t.view(B, geo.num_windows, -1, nh, D).transpose(2, 3)


def windows_to_heads(t: torch.Tensor, geo: WindowGeometry, H: int, W: int) -> torch.Tensor:
    """``(B, nW, heads, N, D)`` -> ``(B, heads, H, W, D)`` (inverse of :func:`heads_to_windows`)."""
    B, nW, nh, N, D = t.shape
    t = unpartition(t.transpose(2, 3).reshape(B, nW, N, nh * D), geo)
    return t.view(B, H, W, nh, D).permute(0, 3, 1, 2, 4)


PadKV = Optional[tuple[torch.Tensor, torch.Tensor]]


def _to_windows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size: Size, shift: Size, padding: str,
                pad_kv: PadKV) -> tuple[WindowGeometry, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Geometry of the ``(B, heads, H, W, D)`` map and q, k, v as windows ``(B, nW, heads, N, D)``."""
    geo = WindowGeometry.of(q.shape[2], q.shape[3], window_size, shift, padding)
    k_fill, v_fill = pad_kv if pad_kv is not None else (None, None)
    return geo, heads_to_windows(q, geo), heads_to_windows(k, geo, k_fill), heads_to_windows(v, geo, v_fill)


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: Size,
    shift: Size = 0,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    padding: str = "mask",
    pad_kv: PadKV = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """(Shifted) window attention. q, k, v: ``(B, heads, H, W, D)``; returns the same shape.

    ``window_size`` and ``shift`` are an int or per axis ``(h, w)``. ``bias`` is an optional
    ``(heads, 2wh-1, 2ww-1)`` grid indexed by key-minus-query offset. ``padding="timm"`` attends
    padded keys (see the module docstring) whose k and v are zeros, or ``pad_kv`` ``(heads, D)`` each.
    """
    geo, qw, kw, vw = _to_windows(q, k, v, window_size, shift, padding, pad_kv)
    out = windowed_sdpa(qw, kw, vw, geo, bias, scale, backend=backend)
    return windows_to_heads(out, geo, q.shape[2], q.shape[3])


def window_attention_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: Size,
    shift: Size = 0,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    padding: str = "mask",
    pad_kv: PadKV = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`window_attention` (explicit softmax) plus the per-query log-sum-exp ``(B, heads, H, W)``."""
    geo, qw, kw, vw = _to_windows(q, k, v, window_size, shift, padding, pad_kv)  # (B, nW, heads, N, D)
    scores = (qw @ kw.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if bias is not None:
        scores = scores + window_bias(bias, geo.wh, geo.ww).to(q.dtype)
    allowed = allowed_mask(geo, q.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = torch.cat([scores.softmax(-1) @ vw, scores.logsumexp(-1, keepdim=True)], -1)  # lse: one more channel
    out = windows_to_heads(out, geo, q.shape[2], q.shape[3])
    return out[..., :-1], out[..., -1]


def _fmt(size: tuple[int, int]) -> Size:
    return size[0] if size[0] == size[1] else size


@register_attention("window", options=WindowOptions)
class WindowAttention(QKVAttention):
    """Swin W-MSA on a ``(B, H, W, C)`` map, with a learned relative position bias (``wh x ww`` windows)."""

    shifted = False
    non_square_window = True
    route_family = "window"

    def __init__(self, dim: int, num_heads: int, spec: AttnSpec) -> None:
        super().__init__(dim, num_heads, spec)
        self.window_size: tuple[int, int] = to_2tuple(spec.window_size)
        if min(self.window_size) < 1:
            raise ValueError(f"window_size must be >= 1, got {spec.window_size}")
        self.padding = WindowOptions.from_config(spec.options).padding
        self.shift_size = tuple(w // 2 for w in self.window_size) if self.shifted else (0, 0)  # timm's rule
        self.relative_position_bias_table = new_bias_table(num_heads, self.window_size) if spec.rel_pos_bias else None

    def bias_table_window(self) -> tuple[int, int]:
        return self.window_size

    def bias_grid(self) -> Optional[torch.Tensor]:
        """``(heads, 2wh-1, 2ww-1)`` view of the bias table, or None."""
        t = self.relative_position_bias_table
        return None if t is None else bias_grid(t, self.window_size)

    def pad_kv(self) -> PadKV:
        """k and v of a padded token under ``"timm"`` padding: the projection of zeros, i.e. the qkv bias."""
        b = self.qkv.bias
        if self.padding != "timm" or b is None:
            return None
        _, k, v = b.view(3, self.num_heads, self.head_dim)
        return k, v

    def _args(self) -> tuple[Any, ...]:
        return self.window_size, self.shift_size, self.bias_grid(), self.scale, self.padding, self.pad_kv()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v ``(B, heads, H, W, D)`` -> the same shape."""
        return window_attention(q, k, v, *self._args(), backend=self.attn_backend)

    def attend_lse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return window_attention_lse(q, k, v, *self._args())

    def forward(self, x: torch.Tensor, g: Optional[torch.Tensor] = None) -> Any:
        if g is not None:
            return self.forward_global(x, g)
        B, H, W, C = x.shape
        geo = WindowGeometry.of(H, W, self.window_size, self.shift_size, self.padding)
        q, k, v = self.split_qkv(partition(x, geo))  # (B, nW, heads, N, D); pads project to the qkv bias
        out = windowed_sdpa(q, k, v, geo, self.bias_grid(), self.scale, self.dropout_p, self.attn_backend)
        return unpartition(self.merge_heads(out), geo)

    def route(self, height: int, width: int, device: str, dtype: torch.dtype, batch: int = 1,
              training: bool = False, lse: bool = False) -> str:
        if lse:
            return "explicit softmax (log-sum-exp)"
        geo = WindowGeometry.of(height, width, self.window_size, self.shift_size, self.padding)
        bias = self.relative_position_bias_table is not None
        call = backends.Call("window", device, dtype, bias or geo.needs_mask, training, training and bias,
                             training and self.attn_drop > 0, False, batch * geo.num_windows)
        return backends.choose(call, self.attn_backend)

    def reach(self, height: int, width: int) -> tuple[str, Optional[tuple[int, int]]]:
        wh, ww = min(self.window_size[0], height), min(self.window_size[1], width)
        if (wh, ww) == (height, width):
            return "global (window >= map)", None
        return f"{'shifted ' if self.shifted else ''}window {_fmt((wh, ww))}", (wh, ww)

    def extra_repr(self) -> str:
        pad = ", padding=timm" if self.padding == "timm" else ""
        return (f"dim={self.dim}, heads={self.num_heads}, window={_fmt(self.window_size)}, "
                f"shift={_fmt(self.shift_size)}{pad}")


@register_attention("shifted_window", options=WindowOptions)
class ShiftedWindowAttention(WindowAttention):
    """Swin SW-MSA: window attention after a cyclic shift by half a window per axis, ``(wh // 2, ww // 2)``."""

    shifted = True
