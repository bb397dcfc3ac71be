"""Weights from elsewhere: timm Swin models, timm names, local checkpoints."""
from __future__ import annotations

import logging
import os

import torch
from timm.models import load_state_dict
from torch import nn

from .backbone import VisionAttnTransformer
from .errors import ConfigError
from .files import load_checkpoint_file
from .variants import VARIANTS

log = logging.getLogger(__name__)


def _stage_window(block: nn.Module, stage: int) -> tuple[int, int]:
    """A timm block's (possibly shrunk, possibly non-square) window, checked against our shrinking rule."""
    window = tuple(int(w) for w in block.window_size)
    if getattr(block, "always_partition", False) and any(r <= w for r, w in zip(block.input_resolution, window)):
        raise ValueError(
            f"stage {stage}: timm's always_partition=True keeps a {window} window (and its shift) on a "
            f"{tuple(block.input_resolution)} map; from_timm follows timm's default (shrink to the map)"
        )
    return window


def from_timm(model: nn.Module) -> VisionAttnTransformer:
    """Our ``swin`` variant with the weights of a timm ``SwinTransformer`` (v1) and its outputs.

    Per-stage ``(h, w)`` windows are taken from timm's blocks (timm shrinks windows on small
    maps, per axis), and ``window_padding="timm"`` reproduces timm's padding where a feature map
    is not a multiple of the window (roll, zero-pad, attend the padded keys).
    """
    if type(model).__name__ != "SwinTransformer":
        raise TypeError(f"from_timm expects timm's SwinTransformer, got {type(model).__name__}")
    stages = list(model.layers)
    blocks = [stage.blocks[0] for stage in stages]
    embed = model.patch_embed.proj
    ours = VisionAttnTransformer(
        img_size=model.patch_embed.img_size,
        patch_size=embed.kernel_size[0],
        in_chans=embed.in_channels,
        num_classes=model.num_classes,
        embed_dim=embed.out_channels,
        depths=[len(stage.blocks) for stage in stages],
        num_heads=[b.attn.num_heads for b in blocks],
        block_pattern=VARIANTS["swin"]["block_pattern"],
        window_size=[_stage_window(b, i) for i, b in enumerate(blocks)],
        window_padding="timm",
        mlp_ratio=blocks[0].mlp.fc1.out_features / blocks[0].mlp.fc1.in_features,
        qkv_bias=blocks[0].attn.qkv.bias is not None,
        drop_path_rate=0.0,
        global_pool=model.head.global_pool.pool_type if hasattr(model.head.global_pool, "pool_type") else "avg",
    )
    ours.load_state_dict(model.state_dict(), strict=True)
    return ours.train(model.training)


def to_timm(model: VisionAttnTransformer) -> nn.Module:
    """timm's ``SwinTransformer`` with ``model``'s weights and outputs: the inverse of :func:`from_timm`,
    for a model fine-tuned here and deployed with timm. ``model`` must be a Swin: window / shifted
    window blocks with a bias, the patch stem and merges, one window size (timm shrinks it per stage
    as we do), and ``window_padding="timm"`` wherever a map is not a multiple of the window."""
    from timm.models.swin_transformer import SwinTransformer

    blocks = [stage.blocks for stage in model.layers]
    attn = [b.attn for stage in blocks for b in stage]
    kinds = [a.kind for a in attn]
    if any(k != ("window" if i % 2 == 0 else "shifted_window") for stage in blocks for i, k in
           enumerate(b.attn.kind for b in stage)) or any(a.relative_position_bias_table is None for a in attn):
        raise ValueError(f"to_timm needs a Swin (window / shifted_window blocks with a bias), got {sorted(set(kinds))}")
    img = model.patch_embed.img_size
    window = max(a.window_size for a in attn)
    maps = [(-(-img[0] // info["reduction"]), -(-img[1] // info["reduction"])) for info in model.feature_info]
    shrunk = [tuple(min(w, r) for w, r in zip(window, m)) for m in maps]  # timm's rule: the window shrinks to the map
    if any(tuple(min(w, r) for w, r in zip(b[0].attn.window_size, m)) != s for b, m, s in zip(blocks, maps, shrunk)):
        raise ValueError(f"to_timm needs one window size (timm has one per model, shrunk to small maps), got "
                         f"{[b[0].attn.window_size for b in blocks]} on maps {maps}")
    embed = model.patch_embed.proj
    theirs = SwinTransformer(
        img_size=img, patch_size=embed.kernel_size[0], in_chans=embed.in_channels, num_classes=model.num_classes,
        embed_dim=embed.out_channels, depths=[len(b) for b in blocks], num_heads=[b[0].attn.num_heads for b in blocks],
        window_size=window, mlp_ratio=blocks[0][0].mlp.fc1.out_features / blocks[0][0].mlp.fc1.in_features,
        qkv_bias=attn[0].qkv.bias is not None, drop_path_rate=0.0, global_pool=model.head.global_pool.pool_type,
    )
    padded = [i for i, (st, b) in enumerate(zip(theirs.layers, blocks)) if
              any(r % w for r, w in zip(st.blocks[0].input_resolution, st.blocks[0].window_size))]
    if padded and any(a.padding != "timm" for a in attn):
        raise ValueError(f"stages {padded} pad their maps to the window: timm attends the padded keys, this model "
                         "masks them (model.window_padding=mask); build it with window_padding='timm' to match timm")
    theirs.load_state_dict(model.state_dict(), strict=False)  # timm's index / mask buffers are its own
    return theirs.train(model.training)


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pth``/``.ckpt``/``.safetensors`` file through timm's reader
    (``state_dict_ema`` / ``model_ema`` / ``state_dict`` / ``model`` entries, ``module.`` and
    ``_orig_mod.`` prefixes), always ``weights_only``; a Lightning checkpoint's ``model.`` prefix goes."""
    if path.endswith(".safetensors"):
        return load_state_dict(path)
    load_checkpoint_file(path, mmap=True)  # our weights-only errors (pickled objects, corrupt) name the file
    state = load_state_dict(path, weights_only=True)
    return {k.removeprefix("model."): v for k, v in state.items()}  # LightningModule -> backbone


def microsoft_layout(state: dict[str, torch.Tensor]) -> bool:
    """Is ``state`` in the original Microsoft Swin layout (downsample at the end of a stage)? timm's own test."""
    return "layers.0.downsample.reduction.weight" in state


def _from_microsoft_layout(model: VisionAttnTransformer, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's conversion (``swin_transformer.checkpoint_filter_fn``): downsample moved to the next
    stage's start, ``head.*`` to ``head.fc.*``, the index / mask buffers dropped, bias tables resized
    with timm's ``resize_rel_pos_bias_table``. Our state-dict names are timm's, so it reads our model."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    return checkpoint_filter_fn(state, model)


def _timm_state_dict(name: str) -> dict[str, torch.Tensor]:
    import timm

    try:
        return timm.create_model(name, pretrained=True).state_dict()
    except Exception as e:  # unknown name, no network, ...
        raise ConfigError(
            f"model.pretrained={name!r}: not a file and timm could not load it ({type(e).__name__}: {e}). "
            "Pass a timm Swin name (e.g. swin_tiny_patch4_window7_224, needs network) or a local checkpoint path."
        ) from e


RESIZED = "relative_position_bias_table"  # resized on load (attention.base), any shape fits
SHOWN = 4  # keys listed per kind of misfit


def _shape(value: object) -> str:
    return "x".join(map(str, getattr(value, "shape", ()))) or "scalar"


def _listed(entries: list[str]) -> str:
    more = f", ... ({len(entries) - SHOWN} more)" if len(entries) > SHOWN else ""
    return ", ".join(entries[:SHOWN]) + more


def misfits(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> list[str]:
    """What keeps ``state`` from loading into a model whose state dict is ``own``: shape mismatches
    (bias tables excepted), missing keys (the head excepted: it may stay fresh) and unexpected ones."""
    mismatched = [f"{k} {_shape(v)} (model {_shape(own[k])})" for k, v in state.items()
                  if k in own and getattr(v, "shape", None) != own[k].shape and not k.endswith(RESIZED)]
    missing = [f"{k} {_shape(v)}" for k, v in own.items() if k not in state and not k.startswith("head.")]
    unexpected = [f"{k} {_shape(v)}" for k, v in state.items() if k not in own]
    found = [(mismatched, "with another shape"), (missing, "missing"), (unexpected, "unexpected")]
    return [f"{len(keys)} {what}: {_listed(keys)}" for keys, what in found if keys]


def check_fits(source: str, own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """A ConfigError naming ``source`` and the keys that do not fit (see :func:`misfits`)."""
    problems = misfits(own, state)
    if not problems:
        return
    raise ConfigError(
        f"model.pretrained={source}: the checkpoint does not fit this model: {'; '.join(problems)}; "
        "give a checkpoint of this architecture (the model.size / embed_dim / depths / num_heads it was trained "
        "with) in timm's SwinTransformer key layout, or leave model.pretrained null"
    )


def load_pretrained(model: VisionAttnTransformer, source: str) -> None:
    """Load weights by timm name or path; resize bias tables; keep a fresh head if shapes differ.
    A checkpoint that does not fit otherwise is a ConfigError naming the keys (:func:`check_fits`)."""
    state = _read_state_dict(source) if os.path.exists(source) else _timm_state_dict(source)
    if microsoft_layout(state):
        state = _from_microsoft_layout(model, state)
        log.info("pretrained %s: the original Microsoft Swin layout, converted by timm's checkpoint_filter_fn", source)
    head = {k for k in ("head.fc.weight", "head.fc.bias") if k in state}
    own = model.state_dict()
    if any(k in own and state[k].shape != own[k].shape for k in head):
        for k in head:
            state.pop(k)
        log.info("pretrained %s: classifier shape differs, the head stays freshly initialised", source)
    check_fits(source, own, state)
    model.load_state_dict(state, strict=False)  # only the head may be missing (checked)
