"""Attention kinds. Importing this package registers every kind."""
from . import backends
from .global_attn import GlobalAttention, global_attention
from .global_tokens import global_token_attention
from .grid import GridAttention, grid_attention
from .lsh import LSHAttention, lsh_attention
from .neighborhood import DilatedNeighborhoodAttention, NeighborhoodAttention, neighborhood_attention
from .options import KindOptions, option
from .registry import (
    AttnSpec,
    attention_class,
    attention_kinds,
    create_attention,
    option_keys,
    register_attention,
    stage_options,
    validate_options,
)
from .rel_pos import bias_grid, resize_bias_table
from .routed import RoutedAttention, routed_attention
from .spatial_reduction import SpatialReductionAttention, spatial_reduction_attention
from .window import ShiftedWindowAttention, WindowAttention, window_attention

__all__ = [
    "AttnSpec",
    "KindOptions",
    "option",
    "option_keys",
    "stage_options",
    "validate_options",
    "backends",
    "attention_kinds",
    "create_attention",
    "register_attention",
    "bias_grid",
    "resize_bias_table",
    "window_attention",
    "WindowAttention",
    "ShiftedWindowAttention",
    "neighborhood_attention",
    "NeighborhoodAttention",
    "DilatedNeighborhoodAttention",
    "grid_attention",
    "GridAttention",
    "global_attention",
    "GlobalAttention",
    "attention_class",
    "global_token_attention",
    "spatial_reduction_attention",
    "SpatialReductionAttention",
    "lsh_attention",
    "LSHAttention",
    "routed_attention",
    "RoutedAttention",
]
