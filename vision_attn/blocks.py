"""Transformer block and stage on channels-last ``(B, H, W, C)`` maps."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from timm.layers import DropPath, LayerScale, Mlp, trunc_normal_
from timm.models._manipulate import checkpoint_seq
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import AttnSpec, create_attention
from .stems import create_downsample
from .tiling import POSITION_BANDS


class Block(nn.Module):
    """Pre-norm transformer block: attention of any registered kind, then an MLP."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kind: str,
        spec: AttnSpec,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        layer_scale_init_value: Optional[float] = None,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        ls = (lambda: LayerScale(dim, layer_scale_init_value)) if layer_scale_init_value else nn.Identity
        self.norm1 = norm_layer(dim)
        self.attn = create_attention(kind, dim, num_heads, spec)
        self.ls1 = ls()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=spec.proj_drop)
        self.ls2 = ls()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def forward_global(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same block on a map ``(B, H, W, C)`` plus global tokens ``(B, G, C)``.

        Map and global tokens share norms, attention (``attn.forward_global``), MLP, layer scale
        and one drop-path decision per sample.
        """
        B, H, W, C = x.shape
        a_x, a_g = self.attn(self.norm1(x), self.norm1(g))
        t = torch.cat([x.reshape(B, H * W, C), g], 1)
        t = t + self.drop_path1(self.ls1(torch.cat([a_x.reshape(B, H * W, C), a_g], 1)))
        t = t + self.drop_path2(self.ls2(self.mlp(self.norm2(t))))
        return t[:, : H * W].view(B, H, W, C), t[:, H * W :]


class Stage(nn.Module):
    """Optional 2x downsampling (``merge`` or ``conv``), then ``depth`` blocks cycling over ``pattern``."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        depth: int,
        num_heads: int,
        pattern: Sequence[str],
        specs: Sequence[AttnSpec],
        downsample: str | None,
        mlp_ratio: float = 4.0,
        drop_path: Sequence[float] = (),
        layer_scale_init_value: Optional[float] = None,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        global_tokens: int = 0,
        memory_tokens: int = 0,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.specs = tuple(specs)
        self.downsample = create_downsample(downsample, dim, out_dim) if downsample else nn.Identity()
        # ``global_tokens`` learned tokens every map query also attends to (and that attend to all).
        self.global_tokens = nn.Parameter(torch.zeros(1, global_tokens, out_dim)) if global_tokens else None
        if self.global_tokens is not None:
            trunc_normal_(self.global_tokens, std=0.02)
        # ``memory_tokens``: the learned initial memory of a tile stream (read and written like global
        # tokens, carried from tile to tile by the caller: see vision_attn/tiling.py).
        self.memory_tokens = nn.Parameter(torch.zeros(1, memory_tokens, out_dim)) if memory_tokens else None
        # ... and where each tile lies, told to the memory before the tile reads it.
        self.memory_position = nn.Linear(4 * POSITION_BANDS, out_dim) if memory_tokens else None
        if self.memory_tokens is not None:
            trunc_normal_(self.memory_tokens, std=0.02)
        self.blocks = nn.Sequential(
            *[
                Block(
                    out_dim,
                    num_heads,
                    pattern[i % len(pattern)],
                    specs[i % len(specs)],
                    mlp_ratio,
                    drop_path[i] if drop_path else 0.0,
                    layer_scale_init_value,
                    norm_layer,
                )
                for i in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.global_tokens is not None:
            return self._forward_global(x)[0]
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def extra_tokens(self) -> list[str]:
        """The stage's token sets besides the map, e.g. ``["4 global tokens", "8 memory tokens"]``."""
        return [f"{t.shape[1]} {name} tokens" for name, t in
                (("global", self.global_tokens), ("memory", self.memory_tokens)) if t is not None]

    def initial_memory(self, batch: int) -> torch.Tensor:
        """The learned memory ``(B, M, C)`` a tile stream starts from (one copy per image)."""
        return self.memory_tokens.repeat(batch, 1, 1)

    def forward_memory(
        self, x: torch.Tensor, position: torch.Tensor, memory: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One tile through the stage: the memory ``(B, M, C)`` is told the tile's ``position``
        (:func:`~vision_attn.tiling.position_features`), the map reads it like global tokens (after this
        stage's own global tokens, if any) and the same blocks write its new state."""
        memory = memory + self.memory_position(position)
        return self._forward_global(self.downsample(x), memory)

    def _forward_global(self, x: torch.Tensor,
                        memory: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks on the map plus this stage's global tokens (and a carried memory); the global
        tokens end with the stage, the memory's new state is returned."""
        parts = [] if self.global_tokens is None else [self.global_tokens.repeat(x.shape[0], 1, 1)]
        g = torch.cat(parts + [memory], 1) if memory is not None else parts[0]  # repeat: a copy (no_grad hooks)
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x, g = checkpoint(block.forward_global, x, g, use_reentrant=False)
            else:
                x, g = block.forward_global(x, g)
        if memory is None:
            return x, g[:, :0]
        # A copy: a slice would keep this stage's whole last token tensor (map + tokens) alive for
        # as long as the memory is, i.e. every tile's map until the image's backward.
        return x, g[:, g.shape[1] - memory.shape[1]:].clone()
