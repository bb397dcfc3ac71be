"""vision_attn: hierarchical vision transformers built from local attention."""
from . import attention
from .backbone import VisionAttnTransformer
from .errors import ConfigError
from .variants import SIZES, VARIANTS, create_model

__all__ = ["attention", "create_model", "ConfigError", "VisionAttnTransformer", "SIZES", "VARIANTS"]
