"""Every variant x size in timm's registry: ``timm.create_model('va_swin_local_tiny', ...)``.

Names are ``va_<variant>_<size>``. ``features_only=True`` gives per-stage NCHW maps through
:meth:`VisionAttnTransformer.forward_intermediates`.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .backbone import VisionAttnTransformer
from .variants import SIZES, VARIANTS, _BACKBONE_KEYS, model_kwargs

PREFIX = "va_"


def timm_name(variant: str, size: str) -> str:
    return f"{PREFIX}{variant}_{size}"


def _cfg(**kwargs: Any) -> dict[str, Any]:
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


def _create(variant: str, size: str, pretrained: bool = False, **kwargs: Any) -> VisionAttnTransformer:
    backbone = {k: kwargs.pop(k) for k in list(kwargs) if k in _BACKBONE_KEYS}
    return build_model_with_cfg(
        VisionAttnTransformer,
        timm_name(variant, size),
        pretrained,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
        **model_kwargs(variant, size, **backbone),
        **kwargs,
    )


def _entrypoint(variant: str, size: str) -> Callable[..., VisionAttnTransformer]:
    def fn(pretrained: bool = False, **kwargs: Any) -> VisionAttnTransformer:
        return _create(variant, size, pretrained, **kwargs)

    fn.__name__ = fn.__qualname__ = timm_name(variant, size)
    fn.__module__ = __name__
    fn.__doc__ = f"vision_attn {variant} ({'/'.join(VARIANTS[variant]['block_pattern'])}), size {size}."
    return fn


def _variant_cfg(variant: str, size: str) -> dict[str, Any]:
    """The pretrained cfg fields that depend on the architecture: the stem's first conv, the final
    map at the default 224² input (``pool_size``)."""
    kw = model_kwargs(variant, size)
    stem = kw.get("stem", "patch")
    reduction = (kw.get("patch_size", 4) if stem == "patch" else 4) * 2 ** (len(kw["depths"]) - 1)
    side = -(-224 // reduction)
    return _cfg(first_conv="patch_embed.proj" if stem == "patch" else "patch_embed.proj.0", pool_size=(side, side))


NAMES = [timm_name(v, s) for v in VARIANTS for s in SIZES]
default_cfgs = generate_default_cfgs({timm_name(v, s): _variant_cfg(v, s) for v in VARIANTS for s in SIZES})
_module = sys.modules[__name__]
for _variant in VARIANTS:
    for _size in SIZES:
        _fn = register_model(_entrypoint(_variant, _size))
        setattr(_module, _fn.__name__, _fn)
