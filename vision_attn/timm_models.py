"""Every variant x size in timm's registry: ``timm.create_model('va_swin_local_tiny', ...)``.

Names are ``va_<variant>_<size>``. ``features_only=True`` gives per-stage NCHW maps through
:meth:`VisionAttnTransformer.forward_intermediates`.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .backbone import VisionAttnTransformer
from .cfgs import variant_cfg
from .variants import SIZES, VARIANTS, backbone_keys, model_kwargs

PREFIX = "va_"


def timm_name(variant: str, size: str) -> str:
    return f"{PREFIX}{variant}_{size}"


def _create(variant: str, size: str, pretrained: bool = False, **kwargs: Any) -> VisionAttnTransformer:
    keys = backbone_keys()
    backbone = {k: kwargs.pop(k) for k in list(kwargs) if k in keys}
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


NAMES = [timm_name(v, s) for v in VARIANTS for s in SIZES]
default_cfgs = generate_default_cfgs({timm_name(v, s): variant_cfg(v, s) for v in VARIANTS for s in SIZES})
_module = sys.modules[__name__]
for _variant in VARIANTS:
    for _size in SIZES:
        _fn = register_model(_entrypoint(_variant, _size))
        setattr(_module, _fn.__name__, _fn)
