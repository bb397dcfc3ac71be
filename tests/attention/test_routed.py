"""Routed (top-k region) attention (vision_attn/attention/routed.py) against masked full attention;
every region routed is global attention; gradients."""
from __future__ import annotations

import pytest
import torch
from reference import global_reference, random_bias, random_qkv, routed_reference

from vision_attn.attention import routed_attention

TOL = dict(rtol=1e-10, atol=1e-10)


pytestmark = pytest.mark.usefixtures("one_thread")
qkv, bias = random_qkv, random_bias


@pytest.mark.parametrize("H,W,region,topk", [(6, 6, 2, 2), (7, 8, 3, 3), (5, 9, 4, 1), (4, 4, 2, 9), (2, 3, 4, 2)])
def test_routed_equals_masked_full_attention(H: int, W: int, region: int, topk: int) -> None:
    q, k, v = qkv(2, 2, H, W, seed=region * topk)
    grid = bias(2, region)
    expect = routed_reference(q, k, v, region, topk, grid)
    torch.testing.assert_close(routed_attention(q, k, v, region, topk, grid), expect, **TOL)
    torch.testing.assert_close(routed_attention(q, k, v, region, topk), routed_reference(q, k, v, region, topk), **TOL)


def test_routed_with_every_region_is_global_attention() -> None:
    q, k, v = qkv(1, 2, 6, 5, seed=8)
    grid = bias(2, 3)
    torch.testing.assert_close(routed_attention(q, k, v, 3, 100, grid), global_reference(q, k, v, 3, grid), **TOL)


def test_routed_gradcheck() -> None:
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 4, 5, D=2, seed=6))
    grid = bias(2, 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda q, k, v, b: routed_attention(q, k, v, 2, 2, b), (q, k, v, grid))
