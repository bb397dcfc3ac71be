"""Hierarchical backbone: stem -> 4 stages of attention blocks -> norm -> pooled head."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from timm.layers import ClassifierHead, trunc_normal_
from timm.models._features import feature_take_indices
from torch import nn

from .attention import AttnSpec, backends, option_keys, stage_options
from .blocks import Stage
from .errors import ConfigError
from .stems import create_stem
from .tiling import Prepare, TileFn, run_tiles

IntOrSeq = Union[int, Sequence[int]]
WindowArg = Union[int, Sequence[Union[int, Sequence[int]]]]


def per_stage(value: Any, num_stages: int) -> list:
    """Broadcast a scalar (or a per-stage list) to one entry per stage."""
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value] * num_stages


def _window(entry: Any) -> Optional[Union[int, tuple[int, int]]]:
    """An int or ``[h, w]`` entry -> int (square) or ``(h, w)``; None if it is neither."""
    ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1  # noqa: E731
    if ok(entry):
        return entry
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and all(ok(v) for v in entry):
        return entry[0] if entry[0] == entry[1] else (entry[0], entry[1])
    return None


def stage_windows(window_size: WindowArg, num_stages: int) -> list[Union[int, tuple[int, int]]]:
    """One window per stage from ``model.window_size``: int = square ``w x w``, ``(h, w)`` = non-square.

    ``window_size`` is an int (every stage) or a list with one entry per stage (a single entry
    serves every stage), each entry an int or an ``[h, w]`` pair. A bare ``[h, w]`` is read as
    a per-stage list, never as one window (unlike timm): write ``[[h, w]]``.
    """
    entries = list(window_size) if isinstance(window_size, (list, tuple)) else [window_size]
    windows = [_window(e) for e in entries]
    if len(windows) == 1:
        windows *= num_stages
    if None in windows or len(windows) != num_stages:
        shown = list(window_size) if isinstance(window_size, (list, tuple)) else window_size
        raise ConfigError(
            f"model.window_size={shown} must be a positive integer, or a list with one entry per stage "
            f"({num_stages}) or a single entry for all, each an integer or an [h, w] pair: e.g. 7, [7,7,14,7], "
            f"[[5,7]] (a 5 x 7 window in every stage) or [[5,7],[5,7],7,7]"
        )
    return windows


class VisionAttnTransformer(nn.Module):
    """Swin-style hierarchical transformer whose blocks use any registered attention kind.

    State-dict names follow timm's ``SwinTransformer`` (``patch_embed``, ``layers.i.blocks.j``,
    ``norm``, ``head.fc``), so timm Swin weights load directly. ``window_size``: see
    :func:`stage_windows`. ``attn_options``: each attention kind's own options by their flat config
    keys (e.g. ``lsh_chunk=32``, ``window_padding="timm"``; :func:`vision_attn.attention.option_keys`),
    passed to every block, which reads its kind's keys (per-stage lists are indexed per stage).
    """

    #: timm's name for the layout of ``forward_features`` (and of an unpooled head): channels last.
    output_fmt = "NHWC"

    def __init__(
        self,
        img_size: IntOrSeq = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        block_pattern: Sequence[str] = ("window", "shifted_window"),
        window_size: WindowArg = 7,
        kernel_size: IntOrSeq = 7,
        dilations: Optional[Sequence[Sequence[int]]] = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        rel_pos_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        layer_scale_init_value: Optional[float] = None,
        stem: str = "patch",
        downsample: str = "merge",
        global_pool: str = "avg",
        global_tokens: IntOrSeq = 0,
        attn_backend: str = "auto",
        tile_size: Optional[int] = None,
        memory_tokens: int = 0,
        memory_bptt: Optional[int] = None,
        **attn_options: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(attn_options) - set(option_keys()))
        if unknown:
            raise TypeError(f"VisionAttnTransformer got unknown arguments {unknown}; the attention kinds' options "
                            f"are {option_keys()}")
        n = len(depths)
        self.num_classes = num_classes
        self.tile_size, self.memory_tokens, self.memory_bptt = tile_size, memory_tokens, memory_bptt
        self.num_features = int(embed_dim * 2 ** (n - 1))
        # With memory tokens the head reads the pooled features and the final memory side by side.
        self.head_hidden_size = self.num_features * (2 if memory_tokens else 1)
        self.patch_embed = create_stem(stem, img_size, patch_size, in_chans, embed_dim)
        windows, kernels = stage_windows(window_size, n), per_stage(kernel_size, n)
        tokens = per_stage(global_tokens, n)
        dilations = dilations or [[1]] * n
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        dims = [int(embed_dim * 2**i) for i in range(n)]
        stages, in_dim, reduction = [], embed_dim, patch_size if stem == "patch" else 4
        self.feature_info = []
        for i in range(n):
            specs = [
                AttnSpec(windows[i], kernels[i], d, qkv_bias, attn_drop_rate, proj_drop_rate, rel_pos_bias,
                         attn_backend, stage_options(attn_options, i))
                for d in per_stage(dilations[i], 1)
            ]
            stages.append(
                Stage(
                    in_dim,
                    dims[i],
                    depths[i],
                    num_heads[i],
                    block_pattern,
                    specs,
                    downsample=downsample if i > 0 else None,
                    mlp_ratio=mlp_ratio,
                    drop_path=dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                    layer_scale_init_value=layer_scale_init_value,
                    global_tokens=tokens[i],
                    memory_tokens=memory_tokens,
                )
            )
            reduction *= 2 if i > 0 else 1
            in_dim = dims[i]
            self.feature_info.append(dict(num_chs=dims[i], reduction=reduction, module=f"layers.{i}"))
        self.layers = nn.Sequential(*stages)
        backends.validate(attn_backend, {b.attn.route_family for st in stages for b in st.blocks} - {None})
        self.norm = nn.LayerNorm(self.num_features)
        self.head = ClassifierHead(self.head_hidden_size, num_classes, global_pool, drop_rate, input_fmt="NHWC")
        self.apply(_init_weights)

    def __prepare_scriptable__(self) -> "VisionAttnTransformer":
        """``torch.jit.script`` calls this first: these models are not TorchScript-able (see README, timm)."""
        raise RuntimeError(
            "vision_attn models cannot be compiled with torch.jit.script: the attention kinds choose their "
            "kernel route per call in Python (vision_attn/attention/backends.py), and the fused CPU kernel is a "
            "ctypes-loaded custom op. Use torch.export.export, torch.compile or fx (timm's feature extraction), "
            "which all work on every variant"
        )

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Relative position bias tables, global and memory tokens get no weight decay (timm convention)."""
        skip = ("relative_position_bias_table", "global_tokens", "memory_tokens")
        return {n for n, _ in self.named_parameters() if any(s in n for s in skip)}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, list[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[list[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]:
        """Per-stage feature maps for dense tasks (timm API). ``NCHW`` or ``NHWC``."""
        if self.streams:
            raise ConfigError(
                "forward_intermediates needs one feature map per stage, but this model runs tiles with a "
                f"recurrent memory (model.tile_size={self.tile_size}, model.memory_tokens={self.memory_tokens}): "
                "build the model with model.tile_size=null and model.memory_tokens=0 for dense features"
            )
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.layers), indices)
        stages = self.layers[: max_index + 1] if stop_early else self.layers
        intermediates = []
        x = self.patch_embed(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                y = self.norm(x) if norm and i == len(self.layers) - 1 else x
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def stage_reach(self, img_size: IntOrSeq) -> list[str]:
        """Per stage, what one query sees on an ``img_size`` image: the token map, then each kind's
        reach with its extent in pixels, e.g. ``"48x48 tokens: window 4 (16 px) / shifted window 4 (16 px)"``."""
        out = []
        for stage, info, (h, w) in zip(self.layers, self.feature_info, self._stage_maps(img_size)):
            s = info["reduction"]
            labels: list[str] = []
            for block in stage.blocks:
                label, extent = block.attn.reach(h, w)
                if extent is not None:
                    px = extent[0] * s if extent[0] == extent[1] else f"{extent[0] * s}x{extent[1] * s}"
                    label += f" ({px} px)"
                if label not in labels:
                    labels.append(label)
            out.append(f"{h}x{w} tokens: " + " / ".join(labels) + "".join(f" + {e}" for e in stage.extra_tokens()))
        return out

    def stage_routes(self, img_size: IntOrSeq, device: str = "cpu", dtype: torch.dtype = torch.float32,
                     batch: int = 1, training: bool = True) -> list[str]:
        """Per stage, the kernel route each of its kinds takes (:mod:`.attention.backends`) for a step
        on ``device`` in ``dtype`` at ``batch``, e.g. ``"window: per_head / shifted_window: per_head"``."""
        out = []
        for stage, (h, w) in zip(self.layers, self._stage_maps(img_size)):
            lse = stage.global_tokens is not None or stage.memory_tokens is not None
            labels = []
            for block in stage.blocks:
                label = f"{block.attn.kind}: {block.attn.route(h, w, device, dtype, batch, training, lse)}"
                if label not in labels:
                    labels.append(label)
            out.append(" / ".join(labels))
        return out

    def _stage_maps(self, img_size: IntOrSeq) -> list[tuple[int, int]]:
        """Each stage's token map for an ``img_size`` image (one tile's, when the model runs tiles)."""
        H, W = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if self.tile_size:
            H, W = min(H, self.tile_size), min(W, self.tile_size)
        return [(-(-H // info["reduction"]), -(-W // info["reduction"])) for info in self.feature_info]

    @property
    def streams(self) -> bool:
        """Whether images run as a tile stream (``tile_size`` or ``memory_tokens`` set)."""
        return bool(self.tile_size or self.memory_tokens)

    def forward_features(self, x: torch.Tensor, prepare: Optional[Prepare] = None) -> torch.Tensor:
        """``(B, C, H, W)`` image -> normed ``(B, h, w, C)`` final feature map.

        Tile streams (:mod:`vision_attn.tiling`) have no single map: they return the pooled
        features (and final memory) as a ``(B, 1, 1, head_hidden_size)`` map. ``prepare``: applied
        to the input first (e.g. uint8 -> normalised float); tile streams apply it per tile.
        """
        if self.streams:
            return self._forward_stream(x, prepare)
        return self.norm(self.layers(self.patch_embed(x if prepare is None else prepare(x))))

    def _forward_stream(self, x: torch.Tensor, prepare: Optional[Prepare] = None) -> torch.Tensor:
        """Tiles in raster order, each reading and writing every stage's memory (see tiling.py)."""
        pooled, memory = self._run_tiles(x, self._forward_tile, prepare)
        if self.memory_tokens:
            pooled = torch.cat([pooled, self.norm(memory[-1]).mean(1)], -1)
        return pooled[:, None, None, :]

    def forward_dense(self, x: torch.Tensor, prepare: Optional[Prepare] = None) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, h, w, head_hidden_size)`` per-token features for a dense head (a 1x1
        head on the last stage): :meth:`forward_features`' map, or for tile streams every tile's map
        stitched in place. With memory each token also carries the last stage's memory as its tile
        wrote it (mean over memory tokens), so it knows the tiles up to its own, never later ones."""
        if not self.streams:
            return self.forward_features(x, prepare)
        return self._run_tiles(x, self._tile_map, prepare, stitch=True)[0]

    def _run_tiles(self, x: torch.Tensor, tile_fn: TileFn, prepare: Optional[Prepare], stitch: bool = False
                   ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """:func:`vision_attn.tiling.run_tiles` over this model's tiles, from every stage's initial memory."""
        B, _, H, W = x.shape
        memory = [stage.initial_memory(B) for stage in self.layers] if self.memory_tokens else []
        return run_tiles(x, self.tile_size or max(H, W), tile_fn, memory, self.memory_bptt, prepare=prepare,
                         stitch=stitch)

    def _tile_map(
        self, x: torch.Tensor, position: torch.Tensor, *memory: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """One tile -> its normed last-stage map ``(B, h, w, head_hidden_size)`` and every stage's memory."""
        x, written = self._tile_stages(x, position, *memory)
        x = self.norm(x)
        if written:
            m = self.norm(written[-1]).mean(1)[:, None, None, :]
            x = torch.cat([x, m.expand(*x.shape[:3], m.shape[-1])], -1)
        return x, written

    def _forward_tile(
        self, x: torch.Tensor, position: torch.Tensor, *memory: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """One tile -> its pooled normed features ``(B, C)`` and every stage's updated memory."""
        x, written = self._tile_stages(x, position, *memory)
        return self.norm(x).mean((1, 2)), written

    def _tile_stages(
        self, x: torch.Tensor, position: torch.Tensor, *memory: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """One tile through the stem and stages (reading and writing each stage's memory)."""
        x = self.patch_embed(x)
        if not memory:
            return self.layers(x), ()
        written = []
        for stage, m in zip(self.layers, memory):
            x, m = stage.forward_memory(x, position, m)
            written.append(m)
        return x, tuple(written)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_prepared(self, x: torch.Tensor, prepare: Prepare) -> torch.Tensor:
        """:meth:`forward` with ``prepare`` applied to the input first (uint8 -> normalised float;
        tile streams apply it per tile). Not an argument of ``forward``: fx tracing (timm's feature
        extraction) would take it for an input and call it."""
        return self.forward_head(self.forward_features(x, prepare))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
