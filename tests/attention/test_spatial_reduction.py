"""Spatial reduction attention (vision_attn/attention/spatial_reduction.py): an explicit strided conv
(or the mean per cell, ``model.sr_pool=avg``) then full attention, with global tokens, gradients."""
from __future__ import annotations

import pytest
import torch
from helpers import attention_module as module
from helpers import cfg_with
from hydra.utils import instantiate
from reference import spatial_reduction_reference

import vision_attn as va
from vision_attn.errors import ConfigError

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


@pytest.mark.parametrize("H,W,r", [(7, 10, 3), (3, 4, 4), (6, 5, 2)])
def test_sr_pool_avg_reduces_each_cell_to_the_mean_of_its_tokens(H: int, W: int, r: int) -> None:
    """model.sr_pool=avg: a cell's key token is the LayerNorm of the mean of the map tokens it covers
    (edge cells: only the tokens inside the map), by hand."""
    m = module("spatial_reduction", sr_ratio=r, sr_pool="avg")
    torch.nn.init.normal_(m.norm.weight)
    torch.nn.init.normal_(m.norm.bias)
    x = torch.randn(2, H, W, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(H))
    Hr, Wr = -(-H // r), -(-W // r)
    want = torch.zeros(2, Hr, Wr, 8, dtype=torch.float64)
    for cy in range(Hr):
        for cx in range(Wr):
            want[:, cy, cx] = x[:, cy * r : (cy + 1) * r, cx * r : (cx + 1) * r].mean((1, 2))
    want = torch.nn.functional.layer_norm(want, (8,), m.norm.weight, m.norm.bias, m.norm.eps)
    torch.testing.assert_close(m.reduce(x), want, **TOL)
    assert not hasattr(m, "sr") and "sr_pool=avg" in repr(m)


@pytest.mark.parametrize("r", [2, 3])
def test_sr_pool_avg_equals_conv_pooling_with_uniform_weights_on_whole_cells(r: int) -> None:
    """On a map of whole cells, averaging is the depthwise conv with weights 1 / r^2 and no bias:
    the same weights otherwise give the same output, bias and global tokens included."""
    avg = module("spatial_reduction", sr_ratio=r, sr_pool="avg")
    conv = module("spatial_reduction", sr_ratio=r)
    conv.load_state_dict(avg.state_dict(), strict=False)
    torch.nn.init.constant_(conv.sr.weight, 1 / r**2)
    torch.nn.init.zeros_(conv.sr.bias)
    gen = torch.Generator().manual_seed(r)
    x = torch.randn(2, 2 * r, 3 * r, 8, dtype=torch.float64, generator=gen)
    g = torch.randn(2, 3, 8, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(avg(x), conv(x), **TOL)
    torch.testing.assert_close(avg(x, g), conv(x, g), **TOL)
    torch.testing.assert_close(avg(x), spatial_reduction_reference(x, conv), **TOL)


def test_sr_pool_from_the_config_reaches_every_block_and_drops_the_conv_weights():
    cfg = cfg_with("model=swin_sr", "model.sr_pool=avg", "data.image_size=64")
    model = instantiate(cfg.module).model
    assert {b.attn.sr_pool for st in model.layers for b in st.blocks} == {"avg"}
    conv = va.create_model("swin_sr", "pico", img_size=64, num_classes=cfg.data.num_classes)
    dropped = sum(p.numel() for n, p in conv.named_parameters() if ".attn.sr." in n)
    # pico: widths 32, 64, 128 at ratios 8, 4, 2 (stage 4 has r = 1, no conv), 2 blocks each: C * r^2 + C
    assert dropped == 2 * sum(c * r * r + c for c, r in ((32, 8), (64, 4), (128, 2)))
    assert sum(p.numel() for p in conv.parameters()) - sum(p.numel() for p in model.parameters()) == dropped
    with pytest.raises(ConfigError, match=r"model\.sr_pool='max': choose 'conv' \(.*\) or 'avg'"):
        va.create_model("swin_sr", "pico", sr_pool="max")
