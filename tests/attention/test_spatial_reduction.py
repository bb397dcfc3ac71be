"""Spatial reduction attention (vision_attn/attention/spatial_reduction.py): an explicit strided conv
then full attention, with global tokens, gradients."""
from __future__ import annotations

import pytest
import torch
from helpers import attention_module as module
from reference import spatial_reduction_reference

TOL = dict(rtol=1e-10, atol=1e-10)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("H,W,r", [(8, 8, 2), (7, 10, 3), (5, 6, 1), (3, 4, 4)])
@pytest.mark.parametrize("rel_pos_bias", [True, False])
def test_spatial_reduction_equals_explicit_conv_then_full_attention(H: int, W: int, r: int, rel_pos_bias: bool) -> None:
    m = module("spatial_reduction", sr_ratio=r, rel_pos_bias=rel_pos_bias)
    if r > 1:
        torch.nn.init.normal_(m.norm.weight)
        torch.nn.init.normal_(m.norm.bias)
    x = torch.randn(2, H, W, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(r))
    torch.testing.assert_close(m(x), spatial_reduction_reference(x, m), **TOL)


@pytest.mark.parametrize("r", [1, 2, 3])
def test_spatial_reduction_with_global_tokens_equals_reference(r: int) -> None:
    m = module("spatial_reduction", sr_ratio=r)
    gen = torch.Generator().manual_seed(r)
    x = torch.randn(2, 7, 5, 8, dtype=torch.float64, generator=gen)
    g = torch.randn(2, 3, 8, dtype=torch.float64, generator=gen)
    out, g_out = m.forward_global(x, g)
    ref, g_ref = spatial_reduction_reference(x, m, g)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(g_out, g_ref, **TOL)


def test_spatial_reduction_gradcheck() -> None:
    m = module("spatial_reduction", dim=4, sr_ratio=2)
    x = torch.randn(1, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))
