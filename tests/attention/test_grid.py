"""Grid attention (vision_attn/attention/grid.py) against brute force: dilated per axis, maps
that g does not divide, gradients."""
from __future__ import annotations

import pytest
import torch
from reference import grid_reference, random_bias, random_qkv

from vision_attn.attention import grid_attention, neighborhood_attention

TOL = dict(rtol=1e-10, atol=1e-12)


pytestmark = pytest.mark.usefixtures("one_thread")
qkv, bias = random_qkv, random_bias


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
