"""The FlexAttention route of (dilated) neighborhood attention (vision_attn/attention/flex.py).

Flex has no backward on CPU, so its ``mask_mod`` and ``score_mod`` are evaluated densely here (every
(query, key) pair, then softmax and autograd) and compared with brute force forward and backward,
bias gradient included; Flex's own forward runs on CPU without grad. CUDA rows: ``make gpu-check``.
"""
from __future__ import annotations

import pytest
import torch
from reference import neighborhood_reference, random_bias, random_qkv

import vision_attn.attention.neighborhood as nb
from vision_attn import create_model
from vision_attn.attention import backends, flex
from vision_attn.errors import ConfigError

SWEEP = [(k, d) for k in (3, 5, 7, 9, 11, 13) for d in (1, 2, 3, 4)]


def _resolved(H: int, W: int, kernel: int, dilation: int) -> tuple[tuple[int, int], tuple[int, int]]:
    py, px = nb.neighborhood_patterns(H, W, kernel, dilation)
    return (py.kernel, px.kernel), (py.dilation, px.dilation)


def _check_dense(H: int, W: int, kernel: int, dilation: int, seed: int) -> None:
    q, k, v = (t.requires_grad_() for t in random_qkv(2, 2, H, W, D=4, seed=seed))
    grid = random_bias(2, kernel).requires_grad_()
    gout = random_qkv(2, 2, H, W, D=4, seed=seed + 1)[0]
    ours = flex.dense_flex_attention(q, k, v, *_resolved(H, W, kernel, dilation), grid, 0.5)
    ref = neighborhood_reference(q, k, v, kernel, dilation, grid, scale=0.5)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad((ours * gout).sum(), (q, k, v, grid))
    want = torch.autograd.grad((ref * gout).sum(), (q, k, v, grid))
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("kernel,dilation", SWEEP)
def test_dense_mask_and_score_functions_match_brute_force_on_an_odd_map(kernel: int, dilation: int) -> None:
    """13 x 21 (odd, not square; kernels past 13 rows shrink, dilations that do not fit drop)."""
    _check_dense(13, 21, kernel, dilation, seed=kernel * 10 + dilation)


@pytest.mark.parametrize("kernel,dilation", SWEEP)
def test_dense_mask_and_score_functions_match_brute_force_on_maps_exactly_k_times_d_wide(kernel: int,
                                                                                          dilation: int) -> None:
    """Width exactly k * d: every group is exactly one window wide, the borders meet."""
    _check_dense(kernel * dilation + 1 if kernel * dilation < 9 else 9, kernel * dilation, kernel, dilation,
                 seed=kernel + dilation)


@pytest.mark.parametrize("H,W,kernel,dilation", [(13, 21, 3, 1), (13, 21, 5, 2), (13, 21, 7, 3), (13, 21, 13, 1),
                                                 (13, 21, 3, 4), (7, 28, 7, 4), (40, 36, 7, 2)])
def test_flex_forward_on_cpu_matches_brute_force(H: int, W: int, kernel: int, dilation: int) -> None:
    q, k, v = random_qkv(2, 2, H, W, D=8, seed=H + kernel)
    grid = random_bias(2, kernel)
    with torch.no_grad():
        ours = flex.flex_neighborhood(q, k, v, *_resolved(H, W, kernel, dilation), grid, 8 ** -0.5)
        plain = flex.flex_neighborhood(q, k, v, *_resolved(H, W, kernel, dilation), None, 8 ** -0.5)
    torch.testing.assert_close(ours, neighborhood_reference(q, k, v, kernel, dilation, grid), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(plain, neighborhood_reference(q, k, v, kernel, dilation), rtol=1e-10, atol=1e-12)


def test_token_order_groups_dilation_and_tiles_the_map() -> None:
    """Groups come one after another (``i mod d`` per axis), each cut into 8 x 16 tiles: the first
    128 positions of a 32 x 32 map, dilation 2, are rows 0, 2, .., 14 and columns 0, 2, .., 30."""
    plan = flex._tables(32, 32, 3, 2, 3, 2)
    first = plan.perm[:128]
    rows, cols = first // 32, first % 32
    assert sorted(set(rows.tolist())) == list(range(0, 16, 2))
    assert sorted(set(cols.tolist())) == list(range(0, 32, 2))
    assert torch.equal(plan.perm[plan.inverse], torch.arange(32 * 32))
    assert plan.group.tolist() == sorted(plan.group.tolist())  # one group after another


def test_the_block_mask_is_cached_per_size_and_sparse() -> None:
    """One BlockMask per (map, kernel, dilation, device); a 64 x 64 map with k = 7 skips most blocks."""
    flex.flex_plan.cache_clear()
    a = flex.flex_plan(64, 64, 7, 1, 7, 1, torch.device("cpu"))
    assert flex.flex_plan(64, 64, 7, 1, 7, 1, torch.device("cpu")) is a
    assert flex.flex_plan(64, 64, 7, 2, 7, 2, torch.device("cpu")) is not a
    assert flex.flex_plan.cache_info().currsize == 2
    assert a.block_mask.sparsity() > 60.0  # percent of (query block, key block) pairs skipped


def test_forced_flex_route_on_cpu_serves_inference_and_refuses_training() -> None:
    torch.manual_seed(0)
    model = create_model("swin_dilated", size="pico", num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        with backends.force("tiled"):
            want = model(x)
        with backends.force("flex"):
            got = model(x)
    assert (got - want).abs().max() < 1e-5
    assert model.stage_routes(64, training=False)[0] == "neighborhood: fused / dilated: fused"
    with backends.force("flex"):
        assert model.stage_routes(64, training=False)[0] == "neighborhood: flex / dilated: flex"
        with pytest.raises(ConfigError, match="'flex' cannot serve .*no backward on CPU"):
            model.train()(x)


def test_auto_takes_flex_on_cuda_for_a_trained_bias() -> None:
    call = backends.Call("neighborhood", "cuda", torch.bfloat16, bias=True, grad=True, bias_grad=True)
    assert backends.choose(call) == "flex"
    assert backends.choose(backends.Call("neighborhood", "cuda", torch.bfloat16, True, True, True, True)) == "tiled"
