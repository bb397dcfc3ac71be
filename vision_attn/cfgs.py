"""timm's pretrained cfg of our models (what ``model.pretrained_cfg`` / ``default_cfg`` hold)."""
from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .variants import model_kwargs


def timm_cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head.fc",
        "license": "apache-2.0",
        **kwargs,
    }


def variant_cfg(variant: str, size: str, **kwargs: Any) -> dict[str, Any]:
    """:func:`timm_cfg` with the fields that depend on the architecture: the stem's first conv, the
    final map at the cfg's input size (``pool_size``; 224² by default)."""
    kw = model_kwargs(variant, size)
    stem = kw.get("stem", "patch")
    reduction = (kw.get("patch_size", 4) if stem == "patch" else 4) * 2 ** (len(kw["depths"]) - 1)
    _, h, w = kwargs.get("input_size", (3, 224, 224))
    first = "patch_embed.proj" if stem == "patch" else "patch_embed.proj.0"
    return timm_cfg(**{"first_conv": first, "pool_size": (-(-h // reduction), -(-w // reduction)), **kwargs})


