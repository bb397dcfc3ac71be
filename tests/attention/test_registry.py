"""Grid and global attention against brute force; every registered kind honours the contract."""
from __future__ import annotations

import pytest
import torch
from reference import global_reference, grid_reference, random_bias, random_qkv

import vision_attn.attention as attention
from vision_attn.attention import AttnSpec, create_attention, global_attention, grid_attention, neighborhood_attention
from vision_attn.attention.rel_pos import bias_grid

TOL = dict(rtol=1e-10, atol=1e-12)
NEW_KINDS = ["neighborhood", "dilated", "grid", "global"]


pytestmark = pytest.mark.usefixtures("one_thread")
qkv, bias = random_qkv, random_bias


# ----------------------------------------------------------------------------- grid


@pytest.mark.parametrize("H,W,g", [(12, 8, 4), (9, 9, 3), (8, 8, 4), (14, 21, 7)])
def test_grid_equals_dilated_when_g_divides(H: int, W: int, g: int) -> None:
    q, k, v = qkv(2, 2, H, W)
    grid = bias(2, g)
    out = grid_attention(q, k, v, g, bias=grid)
    if H // g == W // g:  # one dilation for both axes: compare with the dilated kernel directly
        torch.testing.assert_close(out, neighborhood_attention(q, k, v, g, H // g, bias=grid), **TOL)
    torch.testing.assert_close(out, grid_reference(q, k, v, g, grid), **TOL)


def test_grid_is_dilated_per_axis() -> None:
    """12 x 8 with g = 4 is dilation 3 on rows and 2 on columns: check one query by hand."""
    q, k, v = qkv(1, 1, 12, 8, seed=3)
    out = grid_attention(q, k, v, 4)
    rows, cols = [1, 4, 7, 10], [0, 2, 4, 6]  # query (4, 2): rows 4 mod 3, columns 2 mod 2 -> 0
    keys = torch.stack([k[0, 0, r, c] for r in rows for c in cols])
    vals = torch.stack([v[0, 0, r, c] for r in rows for c in cols])
    p = (keys @ q[0, 0, 4, 2] * 0.5).softmax(0)
    torch.testing.assert_close(out[0, 0, 4, 2], p @ vals, **TOL)


@pytest.mark.parametrize("H,W,g", [(13, 10, 4), (3, 10, 4), (7, 5, 7), (15, 11, 7), (1, 9, 2)])
def test_grid_not_dividing_matches_reference(H: int, W: int, g: int) -> None:
    q, k, v = qkv(2, 3, H, W, seed=H + W)
    grid = bias(3, g)
    torch.testing.assert_close(grid_attention(q, k, v, g, bias=grid), grid_reference(q, k, v, g, grid), **TOL)
    torch.testing.assert_close(grid_attention(q, k, v, g), grid_reference(q, k, v, g), **TOL)


def test_grid_gradcheck() -> None:
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 5, 4, D=2, seed=4))
    grid = bias(2, 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda q, k, v, b: grid_attention(q, k, v, 2, bias=b), (q, k, v, grid))


# ----------------------------------------------------------------------------- global


@pytest.mark.parametrize("H,W,w", [(6, 9, 3), (4, 4, 7), (5, 7, 1)])
def test_global_matches_reference(H: int, W: int, w: int) -> None:
    q, k, v = qkv(2, 3, H, W, seed=5)
    grid = bias(3, w)
    torch.testing.assert_close(global_attention(q, k, v, bias=grid), global_reference(q, k, v, w, grid), **TOL)
    torch.testing.assert_close(global_attention(q, k, v), global_reference(q, k, v, w), **TOL)


def test_global_bias_offsets_are_clipped() -> None:
    """With w = 2 only offsets -1, 0, 1 exist: far keys share the edge entries of the table."""
    q, k, v = qkv(1, 1, 1, 6, seed=6)
    grid = torch.zeros(1, 3, 3, dtype=torch.float64)
    grid[0, 1, 2] = 5.0  # dy = 0, dx = +1 -> every key to the right of the query, however far
    out = global_attention(torch.zeros_like(q), k, v, bias=grid)
    w0 = torch.tensor([0.0, 5.0, 5.0, 5.0, 5.0, 5.0], dtype=torch.float64).softmax(0)  # query 0
    torch.testing.assert_close(out[0, 0, 0, 0], w0 @ v[0, 0, 0], **TOL)


def test_global_gradcheck() -> None:
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 3, 4, D=2, seed=7))
    grid = bias(2, 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda q, k, v, b: global_attention(q, k, v, bias=b), (q, k, v, grid))


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
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(student(x), target)
        loss.backward()
        if not losses:
            assert student.relative_position_bias_table.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
