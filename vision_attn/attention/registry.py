"""Attention registry: one name -> one module class. The backbone only looks names up here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

_ATTENTION: dict[str, type[nn.Module]] = {}


@dataclass(frozen=True)
class AttnSpec:
    """Everything a stage knows about its attention; each kind reads the fields it needs."""

    window_size: int = 7
    kernel_size: int = 7
    dilation: int = 1
    qkv_bias: bool = True
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    rel_pos_bias: bool = True


def register_attention(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator adding an attention kind under ``name``."""

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _ATTENTION:
            raise ValueError(f"attention kind {name!r} is registered twice")
        _ATTENTION[name] = cls
        cls.kind = name
        return cls

    return add


def attention_kinds() -> list[str]:
    """Names of every registered attention kind."""
    return sorted(_ATTENTION)


def create_attention(kind: str, dim: int, num_heads: int, spec: AttnSpec) -> nn.Module:
    """Instantiate the attention module registered as ``kind``."""
    try:
        cls = _ATTENTION[kind]
    except KeyError:
        raise KeyError(f"unknown attention kind {kind!r}; registered: {', '.join(attention_kinds())}") from None
    return cls(dim=dim, num_heads=num_heads, spec=spec)
