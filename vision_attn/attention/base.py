"""Shared qkv / output projection for attention modules on channels-last maps."""
from __future__ import annotations

import torch
from torch import nn

from .registry import AttnSpec
from .rel_pos import resize_bias_table


class QKVAttention(nn.Module):
    """Base: ``qkv`` and ``proj`` linears (timm names), heads, scale and dropouts."""

    kind = "base"

    def __init__(self, dim: int, num_heads: int, spec: AttnSpec) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_drop = spec.attn_drop
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

    @property
    def dropout_p(self) -> float:
        return self.attn_drop if self.training else 0.0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """Resize a checkpoint's bias table (bicubic) when the window/kernel size differs."""
        key = prefix + "relative_position_bias_table"
        table = getattr(self, "relative_position_bias_table", None)
        if key in state_dict and table is not None and state_dict[key].shape != table.shape:
            state_dict[key] = resize_bias_table(state_dict[key], int(round(table.shape[0] ** 0.5) + 1) // 2)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
