"""vision_attn: hierarchical vision transformers built from local attention."""
from . import attention, timm_models  # noqa: F401  (registers attention kinds and timm names)
from .backbone import VisionAttnTransformer
from .errors import ConfigError
from .pretrained import from_timm, load_pretrained, to_timm
from .variants import SIZES, VARIANTS, create_model

__all__ = [
    "attention",
    "create_model",
    "from_timm",
    "to_timm",
    "load_pretrained",
    "ConfigError",
    "VisionAttnTransformer",
    "SIZES",
    "VARIANTS",
]
