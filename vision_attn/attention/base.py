"""Shared qkv / output projection for attention modules on channels-last maps."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..errors import ConfigError
from .global_tokens import global_token_attention
from .registry import AttnSpec
from .rel_pos import resize_bias_table, table_window


class QKVAttention(nn.Module):
    """Base: ``qkv`` and ``proj`` linears (timm names), heads, scale and dropouts."""

    kind = "base"
    #: Whether ``spec.window_size`` may be a non-square ``(wh, ww)`` pair (kinds that ignore it say True too).
    non_square_window = False
    #: The :mod:`.backends` family whose routes this kind takes (None: it always runs ``fixed_route``).
    route_family: Optional[str] = None
    fixed_route = "sdpa"

    def __init__(self, dim: int, num_heads: int, spec: AttnSpec) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_drop = spec.attn_drop
        self.attn_backend = spec.attn_backend
        self.qkv = nn.Linear(dim, dim * 3, bias=spec.qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(spec.proj_drop)

    def split_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(..., N, C)`` -> q, k, v each ``(..., heads, N, head_dim)``."""
        *lead, n, _ = x.shape
        qkv = self.qkv(x).reshape(*lead, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.movedim(-3, 0).transpose(-3, -2).unbind(0)
        return q, k, v

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., heads, N, head_dim)`` -> projected ``(..., N, C)``."""
        x = x.transpose(-3, -2).flatten(-2)
        return self.proj_drop(self.proj(x))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """This kind's attention on ``(B, heads, H, W, D)`` q, k, v (bias included)."""
        raise TypeError(f"{type(self).__name__} does not expose attend()")

    def forward(self, x: torch.Tensor, g: Optional[torch.Tensor] = None) -> Any:
        """``(B, H, W, C)`` -> ``(B, H, W, C)`` through :meth:`attend` (kinds may override); with global
        tokens ``g`` ``(B, G, C)``, both updated (:meth:`forward_global`). Blocks call the module
        (never ``forward_global`` directly), so that fx tracing keeps each kind one leaf call."""
        if g is not None:
            return self.forward_global(x, g)
        return self.out_proj(self.attend(*self.map_qkv(x)))

    def attend_lse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`attend` plus each query's log-sum-exp of scores ``(B, heads, H, W)`` (global tokens)."""
        raise TypeError(f"{type(self).__name__} does not support global tokens (no attend_lse())")

    @classmethod
    def supports_global_tokens(cls) -> bool:
        return cls.attend_lse is not QKVAttention.attend_lse

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, *S, C)`` tokens -> q, k, v each ``(B, heads, *S, head_dim)``."""
        B, *S, C = x.shape
        qkv = self.qkv(x).view(B, -1, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = (t.reshape(B, self.num_heads, *S, self.head_dim) for t in qkv.unbind(0))
        return q, k, v

    def forward_global(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map ``(B, H, W, C)`` and global tokens ``(B, G, C)`` -> both updated (see global_tokens.py)."""
        gq, gk, gv = self.qkv_heads(g)
        out, g_out = global_token_attention(self.attend_lse, *self.map_qkv(x), gq, gk, gv, self.scale)
        return self.out_proj(out), self.merge_heads(g_out)

    def map_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v ``(B, heads, H, W, D)`` of a ``(B, H, W, C)`` map (kinds that reduce keys override)."""
        return self.qkv_heads(x)

    def out_proj(self, out: torch.Tensor) -> torch.Tensor:
        """``(B, heads, H, W, D)`` attention output -> projected ``(B, H, W, C)``."""
        B, nh, H, W, D = out.shape
        return self.proj_drop(self.proj(out.permute(0, 2, 3, 1, 4).reshape(B, H, W, nh * D)))

    def reach(self, height: int, width: int) -> tuple[str, Optional[tuple[int, int]]]:
        """What one query sees on a ``height x width`` map: a label and its extent in tokens
        ``(rows, cols)``, or None when it spans the whole map (each kind says; default: global)."""
        return "global", None

    def route(self, height: int, width: int, device: str, dtype: torch.dtype, batch: int = 1,
              training: bool = False, lse: bool = False) -> str:
        """The kernel route a call on a ``height x width`` map takes (model summary, run records)."""
        return self.fixed_route

    @property
    def exposes_attend(self) -> bool:
        return type(self).attend is not QKVAttention.attend

    @property
    def exposes_maps(self) -> bool:
        """Whether :meth:`attention_maps` works: through attend() or a kind's own override."""
        return self.exposes_attend or type(self).attention_maps is not QKVAttention.attention_maps

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor, points: list[tuple[int, int]],
                       pattern_only: bool = False) -> torch.Tensor:
        """Weights of the query ``points`` over the map: ``(heads, P, H, W)`` for one ``(1, H, W, C)`` map.

        Values are one-hot position codes, so the output at a query is its row of attention
        weights; this works for every kind through :meth:`attend`. ``pattern_only`` zeroes q and
        k (and ignores the bias), leaving uniform weights over each query's allowed keys.
        """
        _, H, W, C = x.shape
        D, N = self.head_dim, H * W
        q, k, _ = self.qkv_heads(x)
        # One-hot values, fed head_dim columns at a time (kernels may require dim(v) == dim(q)).
        eye = torch.eye(N, -(-N // D) * D, dtype=x.dtype, device=x.device).view(1, 1, H, W, -1)
        if pattern_only:
            q, k = torch.zeros_like(q), torch.zeros_like(k)
            table = getattr(self, "relative_position_bias_table", None)
            saved = None if table is None else table.detach().clone()
            if table is not None:
                table.zero_()
        try:
            # Minus what keys off the map contribute (the pads of timm-padded windows; zero elsewhere).
            off_map = self.attend(q, k, torch.zeros_like(q))
            chunks = [self.attend(q, k, c.expand_as(q)) - off_map for c in eye.split(D, dim=-1)]
            out = torch.cat(chunks, dim=-1)[..., :N]  # (1, heads, H, W, H*W)
        finally:
            if pattern_only and saved is not None:
                table.copy_(saved)
        ys = torch.tensor([p[0] for p in points], device=x.device)
        xs = torch.tensor([p[1] for p in points], device=x.device)
        return out[0][:, ys, xs].view(self.num_heads, len(points), H, W)

    @property
    def dropout_p(self) -> float:
        return self.attn_drop if self.training else 0.0

    def bias_table_window(self) -> tuple[int, int]:
        """The ``(wh, ww)`` window this module's bias table spans (square unless a kind overrides)."""
        return table_window(self.relative_position_bias_table)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """Resize a checkpoint's bias table (bicubic) when the window/kernel size differs."""
        key = prefix + "relative_position_bias_table"
        table = getattr(self, "relative_position_bias_table", None)
        if key in state_dict and table is not None and state_dict[key].shape != table.shape:
            try:
                state_dict[key] = resize_bias_table(state_dict[key], self.bias_table_window())
            except ValueError as e:  # a rectangular source window cannot be told from its row count
                raise ConfigError(
                    f"{key}: the checkpoint's bias table {tuple(state_dict[key].shape)} does not fit this model's "
                    f"{tuple(table.shape)} ({e}); load it into a model with the checkpoint's model.window_size"
                ) from e
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
