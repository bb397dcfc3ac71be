"""Build models: variant + size + overrides (:mod:`.variants`) -> a :class:`VisionAttnTransformer`.

Imports run one way: variants (data, validation) <- factory -> pretrained (weight loading), cfgs;
the timm registration (:mod:`.timm_models`) and the timm converters (:mod:`.timm_convert`) import
this module, never the reverse.
"""
from __future__ import annotations

from typing import Any

from .backbone import VisionAttnTransformer
from .cfgs import variant_cfg
from .pretrained import load_pretrained
from .variants import model_kwargs


def create_model(
    variant: str = "swin",
    size: str = "tiny",
    num_classes: int = 1000,
    img_size: int | tuple[int, int] = 224,
    pretrained: str | None = None,
    grad_checkpointing: bool = False,
    **overrides: Any,
) -> VisionAttnTransformer:
    """Build a backbone by variant and size; any backbone argument can be overridden.

    ``pretrained`` is a timm model name (weights download through timm) or a local
    checkpoint / state-dict path; bias tables are resized and a mismatched head is left fresh.
    """
    kwargs = model_kwargs(variant, size, **overrides)
    model = VisionAttnTransformer(img_size=img_size, num_classes=num_classes, **kwargs)
    size_hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    cfg = variant_cfg(variant, size, num_classes=num_classes, input_size=(3, *size_hw))
    model.pretrained_cfg = model.default_cfg = cfg
    if pretrained:
        load_pretrained(model, pretrained)
    model.set_grad_checkpointing(grad_checkpointing)
    return model
