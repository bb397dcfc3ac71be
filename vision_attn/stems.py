"""Stems (image -> tokens) and downsamplers (between stages), all channels-last out.

``patch``/``merge`` are Swin's (timm's own modules, so timm weights load); ``conv``/``conv``
are NAT's overlapping convolutional tokenizer and strided-conv downsampler.
"""
from __future__ import annotations

import torch
from timm.layers import PatchEmbed
from timm.models.swin_transformer import PatchMerging
from torch import nn


class ConvTokenizer(nn.Module):
    """NAT stem: two overlapping 3x3 stride-2 convolutions (4x down), then LayerNorm."""

    def __init__(self, in_chans: int, embed_dim: int, norm_layer: type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, 3, stride=2, padding=1),
            nn.Conv2d(embed_dim // 2, embed_dim, 3, stride=2, padding=1),
        )
        self.norm = norm_layer(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvDownsample(nn.Module):
    """NAT downsampler: 3x3 stride-2 convolution to ``out_dim``, then LayerNorm (NHWC in/out)."""

    def __init__(self, dim: int, out_dim: int, norm_layer: type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.reduction = nn.Conv2d(dim, out_dim, 3, stride=2, padding=1, bias=False)
        self.norm = norm_layer(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


def create_stem(kind: str, img_size, patch_size: int, in_chans: int, embed_dim: int) -> nn.Module:
    """``patch``: Swin's non-overlapping patch embedding; ``conv``: NAT's tokenizer (4x)."""
    if kind == "patch":
        return PatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            norm_layer=nn.LayerNorm,
            output_fmt="NHWC",
            strict_img_size=False,
            dynamic_img_pad=True,
        )
    if kind == "conv":
        return ConvTokenizer(in_chans, embed_dim)
    raise ValueError(f"unknown stem {kind!r}; choose 'patch' or 'conv'")


def create_downsample(kind: str, dim: int, out_dim: int) -> nn.Module:
    """``merge``: Swin's 2x2 patch merging; ``conv``: NAT's strided convolution."""
    if kind == "merge":
        return PatchMerging(dim, out_dim)
    if kind == "conv":
        return ConvDownsample(dim, out_dim)
    raise ValueError(f"unknown downsample {kind!r}; choose 'merge' or 'conv'")
