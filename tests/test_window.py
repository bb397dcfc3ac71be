"""Window / shifted-window attention against brute force and against timm's Swin block."""
from __future__ import annotations

import pytest
import torch
from timm.models.swin_transformer import SwinTransformerBlock

from reference import window_reference
from vision_attn.attention import AttnSpec, WindowAttention, bias_grid, window_attention
from vision_attn.blocks import Block

# (H, W, window, shift): divisible, padded, non-square, map smaller than / equal to the window.
CASES = [
    (8, 8, 4, 0),
    (8, 8, 4, 2),
    (7, 10, 4, 2),
    (5, 9, 3, 1),
    (13, 6, 7, 3),
    (3, 3, 7, 3),
    (7, 7, 7, 3),
    (9, 4, 4, 2),
]


def qkv(B: int, nh: int, H: int, W: int, D: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, nh, H, W, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]


@pytest.fixture(params=["per_head_kernel", "math_sdpa"])
def bias_training_route(request, monkeypatch):
    """Run a test through both training routes for a learned bias (see PER_HEAD_MIN_WINDOWS)."""
    from vision_attn.attention import window as window_module

    monkeypatch.setattr(window_module, "PER_HEAD_MIN_WINDOWS", 0 if request.param == "per_head_kernel" else 10**9)
    return request.param


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("H,W,w,s", CASES)
def test_window_attention_matches_brute_force_forward_and_backward(H, W, w, s, with_bias, bias_training_route):
    q, k, v = qkv(2, 3, H, W, 8)
    grid = torch.randn(3, 2 * w - 1, 2 * w - 1, dtype=torch.float64, requires_grad=True) if with_bias else None
    ours = window_attention(q, k, v, w, s, grid)
    ref = window_reference(q, k, v, w, s, grid)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)

    leaves = [q, k, v] + ([grid] if with_bias else [])
    upstream = torch.randn_like(ours)
    g_ours = torch.autograd.grad(ours, leaves, upstream)
    g_ref = torch.autograd.grad(ref, leaves, upstream)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_pad_keys_are_masked_not_attended():
    """A 5x5 map with window 4 pads to 8x8; masking the pads differs from attending zeros."""
    q, k, v = qkv(1, 1, 5, 5, 4)
    masked = window_attention(q, k, v, 4)
    keys_zero_padded = window_reference(q, k, v, 4)  # exact masked semantics
    torch.testing.assert_close(masked, keys_zero_padded)
    # Attending zero keys would put weight exp(0) on each pad: the bottom-right window has 1 real key.
    last = masked[0, 0, 4, 4]
    torch.testing.assert_close(last, v[0, 0, 4, 4], rtol=1e-12, atol=1e-12)


def _pair(H: int, W: int, w: int, s: int, dim: int = 32, heads: int = 4):
    torch.manual_seed(0)
    theirs = SwinTransformerBlock(dim, (H, W), heads, window_size=w, shift_size=s).double()
    torch.nn.init.normal_(theirs.attn.relative_position_bias_table, std=0.5)  # make the bias matter
    ours = Block(dim, heads, "shifted_window" if s else "window", AttnSpec(window_size=w)).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


@pytest.mark.parametrize("H,W,w,s", [(8, 8, 4, 0), (8, 8, 4, 2), (14, 14, 7, 3), (8, 12, 4, 2), (12, 8, 4, 2)])
def test_block_equals_timm_swin_block_forward_and_backward(H, W, w, s, bias_training_route):
    ours, theirs = _pair(H, W, w, s)
    x = torch.randn(2, H, W, 32, dtype=torch.float64, requires_grad=True)
    y_ours, y_theirs = ours(x), theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # inference takes the 4-D fused-kernel route
        torch.testing.assert_close(ours(x), y_theirs, rtol=1e-10, atol=1e-10)

    upstream = torch.randn_like(y_ours)
    gx_ours, *gp_ours = torch.autograd.grad(y_ours, [x, *ours.parameters()], upstream)
    gx_theirs, *gp_theirs = torch.autograd.grad(y_theirs, [x, *theirs.parameters()], upstream)
    torch.testing.assert_close(gx_ours, gx_theirs, rtol=1e-9, atol=1e-9)
    names = [n for n, _ in ours.named_parameters()]
    assert names == [n for n, _ in theirs.named_parameters()]
    for name, a, b in zip(names, gp_ours, gp_theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


# (10, 10, 2) is left out on purpose: there the pad rows form their own shift region in timm too.
@pytest.mark.parametrize("H,W,s", [(10, 10, 0), (9, 9, 2), (9, 13, 2)])
def test_module_on_non_divisible_sizes_matches_brute_force_not_timm(H, W, s):
    """timm attends zero-padded keys, we mask them: equal to the reference, different from timm."""
    w = 4
    ours, theirs = _pair(H, W, w, s)
    attn: WindowAttention = ours.attn
    x = torch.randn(2, H, W, 32, dtype=torch.float64)
    qkv_ = attn.qkv(x).view(2, H, W, 3, attn.num_heads, attn.head_dim).permute(3, 0, 4, 1, 2, 5)
    ref = window_reference(*qkv_, w, s, bias_grid(attn.relative_position_bias_table))
    ref = attn.proj(ref.permute(0, 2, 3, 1, 4).reshape(2, H, W, 32))
    torch.testing.assert_close(attn(x), ref, rtol=1e-10, atol=1e-10)
    assert (ours(x) - theirs(x)).abs().max() > 1e-3


def test_bias_grid_is_key_minus_query_of_timm_table():
    """timm indexes its table by query - key; our grid by key - query (NATTEN's convention)."""
    w = 3
    table = torch.arange((2 * w - 1) ** 2 * 2, dtype=torch.float64).view(-1, 2)
    grid = bias_grid(table)
    # timm: index = (dq_y + w - 1) * (2w - 1) + (dq_x + w - 1) with dq = query - key.
    for dy in range(-(w - 1), w):
        for dx in range(-(w - 1), w):
            timm_row = (-dy + w - 1) * (2 * w - 1) + (-dx + w - 1)
            assert torch.equal(grid[:, dy + w - 1, dx + w - 1], table[timm_row])



def test_training_with_a_bias_takes_the_per_head_kernel_from_enough_windows(monkeypatch):
    """From PER_HEAD_MIN_WINDOWS windows, training a bias runs our explicit kernel; gradients equal brute force."""
    from unittest import mock

    from vision_attn.attention import window as window_module

    monkeypatch.setattr(window_module, "PER_HEAD_MIN_WINDOWS", 2 * 4)  # B=2 x 4 windows: just enough
    q, k, v = qkv(2, 3, 8, 8, 8)
    grid = torch.randn(3, 7, 7, dtype=torch.float64, requires_grad=True)
    kernel = window_module._WindowAttentionFunction
    with mock.patch.object(kernel, "apply", wraps=kernel.apply) as spy:
        ours = window_attention(q, k, v, 4, 2, grid)
        with torch.no_grad():
            window_attention(q, k, v, 4, 2, grid)  # inference: the fused SDPA route
        monkeypatch.setattr(window_module, "PER_HEAD_MIN_WINDOWS", 2 * 4 + 1)
        window_attention(q, k, v, 4, 2, grid)  # one window short: SDPA's math path
    assert spy.call_count == 1
    ref = window_reference(q, k, v, 4, 2, grid)
    upstream = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v, grid), upstream),
                    torch.autograd.grad(ref, (q, k, v, grid), upstream)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
