"""Window / shifted-window attention against brute force and against timm's Swin block."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import window_pairs_reference, window_reference
from timm.layers import to_2tuple
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.swin_transformer import WindowAttention as TimmWindowAttention

from vision_attn.attention import AttnSpec, WindowAttention, backends, bias_grid, resize_bias_table, window_attention
from vision_attn.attention.rel_pos import window_bias
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
    # Rectangular (h, w) windows with per-axis shifts, as timm's window_size=(h, w).
    (10, 14, (5, 7), (2, 3)),
    (7, 10, (3, 4), (1, 2)),
    (9, 6, (4, 2), (2, 1)),
    (4, 9, (5, 3), (2, 1)),  # H fits in one window: no shift along H
    (6, 8, (2, 4), 0),
]


def qkv(B: int, nh: int, H: int, W: int, D: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, nh, H, W, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]


@pytest.fixture(params=backends.routes("window"))
def bias_training_route(request):
    """Run a test through every window route (forced through :func:`backends.force`)."""
    with backends.force(request.param):
        yield request.param


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("H,W,w,s", CASES)
def test_window_attention_matches_brute_force_forward_and_backward(H, W, w, s, with_bias, bias_training_route):
    q, k, v = qkv(2, 3, H, W, 8)
    wh, ww = to_2tuple(w)
    grid = torch.randn(3, 2 * wh - 1, 2 * ww - 1, dtype=torch.float64, requires_grad=True) if with_bias else None
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


def test_timm_padding_attends_zero_padded_keys():
    """``padding="timm"`` without a shift: window attention on the map zero-padded up to the windows."""
    q, k, v = qkv(1, 2, 5, 7, 4)
    ours = window_attention(q, k, v, (4, 3), padding="timm")
    padded = [F.pad(t, (0, 0, 0, 2, 0, 3)) for t in (q, k, v)]  # 8 x 9
    torch.testing.assert_close(ours, window_reference(*padded, (4, 3))[:, :, :5, :7], rtol=1e-12, atol=1e-12)


def _pair(H: int, W: int, w, s, dim: int = 32, heads: int = 4, padding: str = "mask"):
    torch.manual_seed(0)
    theirs = SwinTransformerBlock(dim, (H, W), heads, window_size=w, shift_size=s).double()
    torch.nn.init.normal_(theirs.attn.relative_position_bias_table, std=0.5)  # make the bias matter
    spec = AttnSpec.of(window_size=w, window_padding=padding)
    ours = Block(dim, heads, "shifted_window" if any(to_2tuple(s)) else "window", spec).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


@pytest.mark.parametrize(
    "H,W,w,s,padding",
    [
        (8, 8, 4, 0, "mask"),
        (8, 8, 4, 2, "mask"),
        (14, 14, 7, 3, "mask"),
        (8, 12, 4, 2, "mask"),
        (12, 8, 4, 2, "mask"),
        (10, 14, (5, 7), (2, 3), "mask"),  # rectangular windows, shift (wh // 2, ww // 2)
        (8, 12, (2, 4), (1, 2), "mask"),
        (8, 12, 4, 2, "timm"),  # divisible: both paddings agree
        # Not multiples of the window: "timm" padding (roll, zero-pad, attend the pads) equals timm.
        (10, 10, 4, 0, "timm"),
        (10, 10, 4, 2, "timm"),
        (9, 13, 4, 2, "timm"),
        (9, 13, (4, 5), (2, 2), "timm"),
        (11, 6, (3, 4), (1, 2), "timm"),
    ],
)
def test_block_equals_timm_swin_block_forward_and_backward(H, W, w, s, padding, bias_training_route):
    ours, theirs = _pair(H, W, w, s, padding=padding)
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


def test_timm_padding_attend_equals_forward():
    """attend() / attend_lse() (global tokens, attention maps) pad k, v with the qkv bias like forward()."""
    ours, _ = _pair(9, 13, (4, 5), (2, 2), padding="timm")
    attn: WindowAttention = ours.attn
    x = torch.randn(2, 9, 13, 32, dtype=torch.float64)
    torch.testing.assert_close(attn.out_proj(attn.attend(*attn.map_qkv(x))), attn(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(attn.out_proj(attn.attend_lse(*attn.map_qkv(x))[0]), attn(x), rtol=1e-10, atol=1e-10)
    grads = [torch.autograd.grad(y.square().sum(), attn.qkv.bias)[0]  # the pads' k, v carry the bias gradient
             for y in (attn(x), attn.out_proj(attn.attend(*attn.map_qkv(x))))]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-9)


def test_attention_maps_under_timm_padding_are_the_weights_on_real_keys():
    """The pads take weight (timm) but are not on the map: the maps show the real keys' weights only."""
    H, W, w = 5, 7, (4, 3)
    torch.manual_seed(0)
    attn = WindowAttention(8, 2, AttnSpec.of(window_size=w, window_padding="timm")).double().eval()
    torch.nn.init.normal_(attn.relative_position_bias_table, std=0.5)
    torch.nn.init.normal_(attn.qkv.bias, std=0.5)
    x = torch.randn(1, H, W, 8, dtype=torch.float64)
    points = [(0, 0), (4, 6), (2, 3)]
    maps = attn.attention_maps(x, points)
    # Brute force on the zero-padded 8 x 9 map, where the pads' q, k are the qkv bias.
    q, k, _ = attn.qkv_heads(F.pad(x, (0, 0, 0, 2, 0, 3)))
    allowed, bias = window_pairs_reference(8, 9, w, 0, attn.bias_grid())
    scores = (q.flatten(2, 3) @ k.flatten(2, 3).transpose(-1, -2)) * attn.scale + bias
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)[0].view(2, 8, 9, 8, 9)
    expected = torch.stack([weights[:, y, x_, :H, :W] for y, x_ in points], 1)
    torch.testing.assert_close(maps, expected, rtol=1e-10, atol=1e-10)
    assert maps[:, 1].sum((-1, -2)).max() < 1  # the bottom-right query gives weight to the pads


def test_kind_patterns_with_a_rectangular_window():
    """Kinds that take no (h, w) window are drawn with a square one."""
    from vision_attn.visualize import kind_patterns

    maps = kind_patterns(16, 2, 8, 8, AttnSpec(window_size=(2, 4), kernel_size=3))
    corner = maps["window"][0]  # query (0, 0): its 2 x 4 window
    assert torch.equal(corner > 0, torch.zeros(8, 8, dtype=torch.bool).index_fill(0, torch.arange(2), True)
                       & (torch.arange(8) < 4))
    assert "global" in maps and "grid" in maps


@pytest.mark.parametrize("w", [3, (2, 4), (5, 3)])
def test_bias_grid_is_key_minus_query_of_timm_table(w):
    """timm indexes its table by query - key; our grid by key - query (NATTEN's convention)."""
    wh, ww = to_2tuple(w)
    table = torch.arange((2 * wh - 1) * (2 * ww - 1) * 2, dtype=torch.float64).view(-1, 2)
    grid = bias_grid(table, w)
    assert grid.shape == (2, 2 * wh - 1, 2 * ww - 1)
    # timm: index = (dq_y + wh - 1) * (2ww - 1) + (dq_x + ww - 1) with dq = query - key.
    for dy in range(-(wh - 1), wh):
        for dx in range(-(ww - 1), ww):
            timm_row = (-dy + wh - 1) * (2 * ww - 1) + (-dx + ww - 1)
            assert torch.equal(grid[:, dy + wh - 1, dx + ww - 1], table[timm_row])


def test_rectangular_bias_table_has_timm_shape_and_gives_timms_bias():
    ours = WindowAttention(32, 4, AttnSpec(window_size=(5, 7)))
    assert ours.relative_position_bias_table.shape == ((2 * 5 - 1) * (2 * 7 - 1), 4)
    theirs = TimmWindowAttention(32, 4, window_size=(5, 7))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    torch.testing.assert_close(window_bias(ours.bias_grid(), 5, 7), theirs._get_rel_pos_bias()[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="not square"):
        bias_grid(ours.relative_position_bias_table)  # a rectangle's side cannot be inferred


def test_resize_bias_table_to_and_from_rectangles():
    """timm's resize_rel_pos_bias_table underneath: shapes to and from rectangles, the zero offset
    kept exactly (its interpolation grid holds it), a table that already fits returned as it is."""
    square = torch.randn(13 * 13, 2)  # 7 x 7 window
    small = resize_bias_table(square, (5, 7))
    assert small.shape == (9 * 13, 2)
    torch.testing.assert_close(small.view(9, 13, 2)[4, 6], square.view(13, 13, 2)[6, 6])
    rect = torch.randn(9 * 13, 2)  # 5 x 7 window
    assert resize_bias_table(rect, (5, 7)) is rect  # rows that cannot be square: taken as fitting already
    wide = resize_bias_table(rect, (3, 9), old_size=(5, 7))
    assert wide.shape == (5 * 17, 2)
    torch.testing.assert_close(wide.view(5, 17, 2)[2, 8], rect.view(9, 13, 2)[4, 6])
    assert resize_bias_table(rect, 7, old_size=(5, 7)).shape == (13 * 13, 2)
    with pytest.raises(ValueError, match="pass old_window_size"):
        resize_bias_table(rect, 7)



def test_auto_route_for_training_a_bias_on_cpu_is_per_head_from_enough_windows():
    """On CPU, training a bias takes the per-head kernel from PER_HEAD_MIN_WINDOWS windows, SDPA's math
    path below (and with attention dropout); inference takes the fused SDPA route; CUDA sdpa_heads."""
    n = backends.PER_HEAD_MIN_WINDOWS
    train = dict(bias=True, grad=True, bias_grad=True)
    assert backends.choose(backends.Call("window", "cpu", torch.float32, windows=n, **train)) == "per_head"
    assert backends.choose(backends.Call("window", "cpu", torch.float32, windows=n - 1, **train)) == "sdpa_5d"
    assert backends.choose(backends.Call("window", "cpu", torch.float32, windows=n, dropout=True, **train)) == "sdpa_5d"
    assert backends.choose(backends.Call("window", "cpu", torch.float32, bias=True, windows=n)) == "sdpa"
    assert backends.choose(backends.Call("window", "cuda", torch.bfloat16, windows=n, **train)) == "sdpa_heads"


def test_forced_per_head_route_runs_the_per_head_kernel_with_brute_force_gradients():
    """``backends.force("per_head")`` runs our explicit kernel (once: inference stays on SDPA's fused
    route only when not forced); gradients equal brute force."""
    from unittest import mock

    from vision_attn.attention import window as window_module

    q, k, v = qkv(2, 3, 8, 8, 8)
    grid = torch.randn(3, 7, 7, dtype=torch.float64, requires_grad=True)
    kernel = window_module._WindowAttentionFunction
    with mock.patch.object(kernel, "apply", wraps=kernel.apply) as spy:
        with backends.force("per_head"):
            ours = window_attention(q, k, v, 4, 2, grid)
        with backends.force("sdpa_5d"):
            window_attention(q, k, v, 4, 2, grid)
    assert spy.call_count == 1
    ref = window_reference(q, k, v, 4, 2, grid)
    upstream = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v, grid), upstream),
                    torch.autograd.grad(ref, (q, k, v, grid), upstream)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_per_head_kernel_under_bf16_autocast_with_mixed_input_dtypes(input_dtype):
    """Under autocast the per-head kernel's inputs and intermediates can differ in dtype (CUDA's
    autocast runs softmax in fp32): its explicit backward once failed with "expected scalar type
    Float but found BFloat16" on a GPU (``make gpu-check``). fp32 inputs under CPU autocast hit the
    same backward; the result must also be right, to bf16 accuracy, against float64 brute force."""
    q64, k64, v64 = qkv(2, 3, 8, 8, 8)
    grid64 = torch.randn(3, 7, 7, dtype=torch.float64, requires_grad=True)
    leaves = [t.detach().to(input_dtype).requires_grad_() for t in (q64, k64, v64)]
    grid = grid64.detach().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16), backends.force("per_head"):
        ours = window_attention(*leaves, 4, 2, grid)
    assert ours.dtype == torch.bfloat16
    ref = window_reference(q64, k64, v64, 4, 2, grid64)
    upstream = torch.randn_like(ref)
    got = torch.autograd.grad(ours, leaves + [grid], upstream.to(ours.dtype))
    want = torch.autograd.grad(ref, (q64, k64, v64, grid64), upstream)
    for name, a, b in zip("out q k v bias".split(), (ours,) + got, (ref,) + want):
        assert a.dtype == (torch.bfloat16 if name == "out" else torch.float32 if name == "bias" else input_dtype)
        err = (a.double() - b).abs().max() / b.abs().max()
        assert err < 5e-2, f"{name}: relative error {err:.3g}"


def test_loading_a_rectangular_windows_bias_table_into_another_window_names_both_shapes():
    from vision_attn.errors import ConfigError

    rectangular = WindowAttention(8, 2, AttnSpec(window_size=(5, 7))).state_dict()  # 9 x 13 = 117 rows
    square = WindowAttention(8, 2, AttnSpec(window_size=7))
    with pytest.raises(ConfigError, match=r"relative_position_bias_table: the checkpoint's bias table \(117, 2\) "
                                          r"does not fit this model's \(169, 2\)"):
        square.load_state_dict(rectangular)
