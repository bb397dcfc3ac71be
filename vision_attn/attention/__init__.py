"""Attention kinds. Importing this package registers every kind."""
from .registry import AttnSpec, attention_kinds, create_attention, register_attention
from .rel_pos import bias_grid, resize_bias_table
from .window import ShiftedWindowAttention, WindowAttention, window_attention
from .neighborhood import DilatedNeighborhoodAttention, NeighborhoodAttention, neighborhood_attention
from .grid import GridAttention, grid_attention
from .global_attn import GlobalAttention, global_attention

__all__ = [
    "AttnSpec",
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
]
