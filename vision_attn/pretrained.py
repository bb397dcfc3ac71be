"""Weights from elsewhere: timm Swin models, timm names, local checkpoints."""
from __future__ import annotations

import logging
import os

import torch
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


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pth``/``.ckpt``/``.safetensors`` file (Lightning checkpoints too)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    obj = load_checkpoint_file(path)  # weights_only=True, on the CPU; a pickled file is a ConfigError
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    return {k.removeprefix("model."): v for k, v in obj.items()}  # LightningModule -> backbone


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
    layout = ""
    if "layers.0.downsample.reduction.weight" in state:  # timm's own test for the original layout
        layout = ("; it is in the original Microsoft Swin layout (downsample at the end of a stage, head.*): "
                  "convert it first with timm.models.swin_transformer.checkpoint_filter_fn(checkpoint, "
                  "<a timm SwinTransformer of its shape>) and save the result")
    raise ConfigError(
        f"model.pretrained={source}: the checkpoint does not fit this model: {'; '.join(problems)}{layout}; "
        "give a checkpoint of this architecture (the model.size / embed_dim / depths / num_heads it was trained "
        "with) in timm's SwinTransformer key layout, or leave model.pretrained null"
    )


def load_pretrained(model: VisionAttnTransformer, source: str) -> None:
    """Load weights by timm name or path; resize bias tables; keep a fresh head if shapes differ.
    A checkpoint that does not fit otherwise is a ConfigError naming the keys (:func:`check_fits`)."""
    state = _read_state_dict(source) if os.path.exists(source) else _timm_state_dict(source)
    head = {k for k in ("head.fc.weight", "head.fc.bias") if k in state}
    own = model.state_dict()
    if any(k in own and state[k].shape != own[k].shape for k in head):
        for k in head:
            state.pop(k)
        log.info("pretrained %s: classifier shape differs, the head stays freshly initialised", source)
    check_fits(source, own, state)
    model.load_state_dict(state, strict=False)  # only the head may be missing (checked)
