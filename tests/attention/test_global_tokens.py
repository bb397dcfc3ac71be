"""Global tokens (vision_attn/attention/global_tokens.py) against masked full attention, with every
local kind and routed attention; gradients; per-stage tokens in the backbone, training with other kinds."""
from __future__ import annotations

import pytest
import torch
from helpers import attention_module as module
from reference import (
    axis_pairs_reference,
    clipped_offsets_bias,
    global_axis_reference,
    global_tokens_reference,
    grid_axis_reference,
    neighborhood_axis_reference,
    random_bias,
    random_qkv,
    routed_pairs_reference,
    window_pairs_reference,
)

import vision_attn as va
from vision_attn.attention import global_token_attention, routed_attention
from vision_attn.attention.neighborhood import neighborhood_patterns, tiled_attention
from vision_attn.attention.rel_pos import bias_grid
from vision_attn.attention.window import window_attention_lse

TOL = dict(rtol=1e-10, atol=1e-10)


pytestmark = pytest.mark.usefixtures("one_thread")
qkv, bias = random_qkv, random_bias


def tokens(B: int, nh: int, G: int, D: int = 4, seed: int = 9) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, nh, G, D, generator=g, dtype=torch.float64) for _ in range(3)]


# ----------------------------------------------------------------------------- global tokens


def local_pairs(kind: str, H: int, W: int, grid: torch.Tensor):
    """(allowed, bias) of a local kind with window 3 / kernel 3 / dilation 2 from the references."""
    if kind in ("window", "shifted_window"):
        return window_pairs_reference(H, W, 3, 1 if kind == "shifted_window" else 0, grid)
    if kind in ("neighborhood", "dilated"):
        d = 2 if kind == "dilated" else 1
        return axis_pairs_reference(*neighborhood_axis_reference(H, 3, d), *neighborhood_axis_reference(W, 3, d), grid)
    if kind == "grid":
        return axis_pairs_reference(*grid_axis_reference(H, 3), *grid_axis_reference(W, 3), grid)
    return axis_pairs_reference(*global_axis_reference(H, 3), *global_axis_reference(W, 3), grid)


@pytest.mark.parametrize("kind", ["window", "shifted_window", "neighborhood", "dilated", "grid", "global"])
@pytest.mark.parametrize("H,W,G", [(7, 8, 2), (6, 6, 1)])
def test_global_tokens_module_equals_masked_full_attention(kind: str, H: int, W: int, G: int) -> None:
    m = module(kind, dilation=2)
    gen = torch.Generator().manual_seed(H * W + G)
    x = torch.randn(2, H, W, 8, generator=gen, dtype=torch.float64)
    g = torch.randn(2, G, 8, generator=gen, dtype=torch.float64)
    out, g_out = m.forward_global(x, g)
    q, k, v = m.qkv_heads(x)
    gq, gk, gv = m.qkv_heads(g)
    allowed, b = local_pairs(kind, H, W, bias_grid(m.relative_position_bias_table))
    ref, g_ref = global_tokens_reference(q, k, v, gq, gk, gv, allowed, b, m.scale)
    torch.testing.assert_close(out, m.proj(ref.permute(0, 2, 3, 1, 4).reshape(2, H, W, 8)), **TOL)
    torch.testing.assert_close(g_out, m.merge_heads(g_ref), **TOL)


def test_global_tokens_with_routed_equal_masked_full_attention() -> None:
    q, k, v = qkv(2, 2, 7, 5, seed=11)
    gq, gk, gv = tokens(2, 2, 3)
    grid = bias(2, 3)
    local = lambda q, k, v: routed_attention(q, k, v, 3, 2, grid, return_lse=True)  # noqa: E731
    out, g_out = global_token_attention(local, q, k, v, gq, gk, gv)
    allowed = routed_pairs_reference(q, k, 3, 2)[:, None]  # (B, 1, N, N)
    yx = [divmod(i, 5) for i in range(35)]
    b = clipped_offsets_bias(grid, yx, yx)
    for i in range(2):  # the routed mask differs per image
        ref, g_ref = global_tokens_reference(q[i : i + 1], k[i : i + 1], v[i : i + 1], gq[i : i + 1], gk[i : i + 1],
                                             gv[i : i + 1], allowed[i, 0], b)
        torch.testing.assert_close(out[i : i + 1], ref, **TOL)
        torch.testing.assert_close(g_out[i : i + 1], g_ref, **TOL)


def test_global_tokens_gradcheck_window_and_tiled() -> None:
    """Gradients through the merged softmax, including the tiled kernel's log-sum-exp backward."""
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 5, 4, D=2, seed=4))
    gq, gk, gv = (t.requires_grad_() for t in tokens(1, 2, 2, D=2))
    grid = bias(2, 3).requires_grad_()
    py, px = neighborhood_patterns(5, 4, 3, 1)

    def window(q, k, v, gq, gk, gv, b):
        return global_token_attention(lambda *t: window_attention_lse(*t, 3, 1, b), q, k, v, gq, gk, gv)

    def tiled(q, k, v, gq, gk, gv, b):
        return global_token_attention(lambda *t: tiled_attention(*t, py, px, b, return_lse=True), q, k, v, gq, gk, gv)

    assert torch.autograd.gradcheck(window, (q, k, v, gq, gk, gv, grid))
    assert torch.autograd.gradcheck(tiled, (q, k, v, gq, gk, gv, grid))


def test_global_tokens_in_the_backbone() -> None:
    """Per-stage tokens exist only when asked; checkpointing gives the same output; zero keeps swin as is."""
    torch.manual_seed(0)
    plain = va.create_model("swin", "pico", num_classes=3, img_size=32).eval()
    torch.manual_seed(0)
    zero = va.create_model("swin", "pico", num_classes=3, img_size=32, global_tokens=0).eval()
    x = torch.randn(2, 3, 40, 36)
    assert not [n for n, _ in zero.named_parameters() if "global_tokens" in n]
    with torch.no_grad():
        torch.testing.assert_close(plain(x), zero(x), rtol=0, atol=0)
    model = va.create_model("swin_global_tokens", "pico", num_classes=3, img_size=32, global_tokens=[2, 2, 3, 1]).eval()
    assert [s.global_tokens.shape for s in model.layers] == [(1, 2, 32), (1, 2, 64), (1, 3, 128), (1, 1, 256)]
    no_decay = {n for n in model.no_weight_decay() if "global_tokens" in n}
    assert no_decay == {f"layers.{i}.global_tokens" for i in range(4)}
    with torch.no_grad():
        ref = model(x)
        model.set_grad_checkpointing(True)
        torch.testing.assert_close(model(x), ref)


@pytest.mark.parametrize("kind", ["neighborhood", "grid", "routed", "lsh", "spatial_reduction"])
def test_global_tokens_train_with_other_kinds(kind: str) -> None:
    torch.manual_seed(0)
    model = va.create_model("swin", "pico", num_classes=3, img_size=48, block_pattern=[kind], global_tokens=2,
                            drop_path_rate=0.0)
    model(torch.randn(2, 3, 48, 48)).square().sum().backward()
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
