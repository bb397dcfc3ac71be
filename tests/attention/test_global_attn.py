"""Global attention (vision_attn/attention/global_attn.py) against brute force: clipped bias offsets,
gradients."""
from __future__ import annotations

import pytest
import torch
from reference import global_reference, random_bias, random_qkv

from vision_attn.attention import global_attention

TOL = dict(rtol=1e-10, atol=1e-12)


pytestmark = pytest.mark.usefixtures("one_thread")
qkv, bias = random_qkv, random_bias


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
