"""vision_attn: hierarchical vision transformers built from local attention."""
from . import attention, timm_models  # noqa: F401  (registers attention kinds and timm names)
from .backbone import VisionAttnTransformer
from .errors import ConfigError
from .factory import create_model
from .pretrained import load_pretrained
from .timm_convert import from_timm, to_timm
from .variants import SIZES, VARIANTS

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
