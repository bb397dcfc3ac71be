"""Attention registry: one name -> one module class. The backbone only looks names up here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

from timm.layers import register_notrace_module
from torch import nn

_ATTENTION: dict[str, type[nn.Module]] = {}


@dataclass(frozen=True)
class AttnSpec:
    """Everything a stage knows about its attention; each kind reads the fields it needs."""

    window_size: Union[int, tuple[int, int]] = 7  # window kinds take (wh, ww); the others a square int
    kernel_size: int = 7
    dilation: int = 1
    qkv_bias: bool = True
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    rel_pos_bias: bool = True
    sr_ratio: int = 1  # spatial_reduction: keys/values from a map downsampled r x r
    lsh_chunk: int = 64  # lsh: tokens per sorted chunk (each query sees its chunk and the previous one)
    lsh_buckets: int = 0  # lsh: hash buckets (even); 0 = 2 * ceil(N / chunk) on an N-token map
    lsh_hashes: int = 1  # lsh: hash rounds, combined by log-sum-exp
    routed_topk: int = 4  # routed: regions (window_size x window_size tokens) gathered per region
    window_padding: str = "mask"  # window kinds: "mask" never attends padded keys; "timm" as timm's Swin
    attn_backend: str = "auto"  # the kernel route (attention/backends.py): auto, or route names per family


def register_attention(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator adding an attention kind under ``name``."""

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _ATTENTION:
            raise ValueError(f"attention kind {name!r} is registered twice")
        _ATTENTION[name] = cls
        cls.kind = name
        # fx (timm's feature extraction, torchvision's create_feature_extractor): a kind is one leaf
        # call. Its route choice and geometry read concrete map sizes, which symbolic tracing cannot.
        register_notrace_module(cls)
        return cls

    return add


def attention_class(kind: str) -> type[nn.Module]:
    """The class registered as ``kind``."""
    try:
        return _ATTENTION[kind]
    except KeyError:
        raise KeyError(f"unknown attention kind {kind!r}; registered: {', '.join(attention_kinds())}") from None


def attention_kinds() -> list[str]:
    """Names of every registered attention kind."""
    return sorted(_ATTENTION)


def create_attention(kind: str, dim: int, num_heads: int, spec: AttnSpec) -> nn.Module:
    """Instantiate the attention module registered as ``kind``."""
    return attention_class(kind)(dim=dim, num_heads=num_heads, spec=spec)
