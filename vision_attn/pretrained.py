"""Weights from elsewhere into a built model: timm names, local checkpoints (any layout timm reads)."""
from __future__ import annotations

import logging
import os

import torch
from timm.models import load_state_dict

from .backbone import VisionAttnTransformer
from .errors import ConfigError
from .files import load_checkpoint_file

log = logging.getLogger(__name__)


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
