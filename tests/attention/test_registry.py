"""The attention registry (vision_attn/attention/registry.py): every kind is registered and exported,
and every registered kind honours the module contract (shapes, gradients, bias table, training)."""
from __future__ import annotations

import pytest
import torch
from helpers import BEYOND_LOCAL_KINDS, fit
from reference import global_reference, grid_reference

import vision_attn.attention as attention
from vision_attn.attention import AttnSpec, attention_kinds, create_attention
from vision_attn.attention.rel_pos import bias_grid

TOL = dict(rtol=1e-10, atol=1e-12)
NEW_KINDS = ["neighborhood", "dilated", "grid", "global"]


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- every kind


def test_import_registers_all_kinds() -> None:
    assert set(NEW_KINDS + ["window", "shifted_window"]) <= set(attention.attention_kinds())
    for name in ("neighborhood_attention", "NeighborhoodAttention", "DilatedNeighborhoodAttention",
                 "GridAttention", "GlobalAttention", "grid_attention", "global_attention"):
        assert name in attention.__all__ and hasattr(attention, name)


@pytest.mark.parametrize("kind", NEW_KINDS)
@pytest.mark.parametrize("rel_pos_bias", [True, False])
def test_module_contract(kind: str, rel_pos_bias: bool) -> None:
    spec = AttnSpec(window_size=4, kernel_size=5, dilation=2, rel_pos_bias=rel_pos_bias)
    m = create_attention(kind, 12, 3, spec)
    x = torch.randn(2, 9, 13, 12, requires_grad=True)  # odd, non-square, not divisible
    y = m(x)
    assert y.shape == x.shape
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    table = m.relative_position_bias_table
    if rel_pos_bias:
        side = 2 * (5 if kind in ("neighborhood", "dilated") else 4) - 1
        assert table.shape == (side * side, 3) and table.grad.abs().sum() > 0
    else:
        assert table is None


@pytest.mark.parametrize("kind,ref", [("grid", "grid"), ("global", "global")])
def test_module_equals_reference(kind: str, ref: str) -> None:
    torch.manual_seed(0)
    m = create_attention(kind, 8, 2, AttnSpec(window_size=3)).double()
    x = torch.randn(2, 7, 10, 8, dtype=torch.float64)
    q, k, v = m.qkv(x).view(2, 7, 10, 3, 2, 4).permute(3, 0, 4, 1, 2, 5)
    grid = bias_grid(m.relative_position_bias_table)
    fn = grid_reference if ref == "grid" else global_reference
    expect = fn(q, k, v, 3, grid, scale=m.scale)
    torch.testing.assert_close(m(x), m.proj(expect.permute(0, 2, 3, 1, 4).reshape(2, 7, 10, 8)), **TOL)


@pytest.mark.parametrize("kind", ["neighborhood", "dilated", "grid", "global"])
def test_module_trains(kind: str) -> None:
    """A student fits a teacher of the same kind; the bias table receives gradients."""
    torch.manual_seed(0)
    spec = AttnSpec(window_size=3, kernel_size=3, dilation=2)
    student, teacher = create_attention(kind, 16, 2, spec), create_attention(kind, 16, 2, spec)
    x = torch.randn(2, 10, 12, 16)
    with torch.no_grad():
        target = teacher(x)

    def bias_table_has_gradients() -> None:
        assert student.relative_position_bias_table.grad.abs().sum() > 0

    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = fit(lambda: torch.nn.functional.mse_loss(student(x), target), opt, 15, bias_table_has_gradients)
    assert losses[-1] < 0.5 * losses[0]


def test_new_kinds_are_registered() -> None:
    assert set(BEYOND_LOCAL_KINDS) <= set(attention_kinds())
