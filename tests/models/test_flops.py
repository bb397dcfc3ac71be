"""GFLOPs (multiply-adds) count each kind's exact work, whatever route runs it: hand counts per
kind, on every route of its family; a whole model's figure is the same on every route."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import BEYOND_LOCAL_VARIANTS as NEW_VARIANTS
from torch.utils.flop_counter import FlopCounterMode

import vision_attn as va
from vision_attn import create_model
from vision_attn.attention import AttnSpec, backends, create_attention
from vision_attn.summary import summarize

B, C, HEADS = 2, 16, 2
D = C // HEADS


def counted(kind: str, spec: AttnSpec, H: int, W: int) -> int:
    """Multiply-adds summarize() counts for one forward of ``kind`` on a ``B x H x W x C`` map."""
    module = create_attention(kind, C, HEADS, spec).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter, backends.exact_work() as attention:
        module(torch.randn(B, H, W, C))
    return counter.get_total_flops() // 2 + attention[0]


def linears(tokens: int) -> int:
    """qkv (C -> 3C) and proj (C -> C) over ``tokens`` tokens per image."""
    return B * tokens * (C * 3 * C + C * C)


def attention(queries: int, keys_per_query: float) -> int:
    """q k^T and p v: ``D`` multiply-adds each per (query, key) pair, per head."""
    return int(B * HEADS * queries * keys_per_query * 2 * D)


def axis_keys(length: int, kernel: int, dilation: int = 1) -> int:
    """Keys summed over an axis' queries: each sees min(kernel, its group's length)."""
    return sum(n * min(kernel, n) for n in (len(range(g, length, dilation)) for g in range(dilation)))


ROUTES = {"window": backends.routes("window"), "neighborhood": backends.routes("neighborhood")}


@pytest.mark.parametrize("route", ROUTES["window"])
@pytest.mark.parametrize("kind", ["window", "shifted_window"])
def test_window_kinds_count_every_window_pair(kind: str, route: str) -> None:
    """A 10 x 12 map under 7 x 7 windows pads to 14 x 14 (the module projects the padded map): 4
    windows of 49 queries x 49 keys."""
    with backends.force(route):
        assert counted(kind, AttnSpec(window_size=7), 10, 12) == linears(196) + attention(4 * 49, 49)


@pytest.mark.parametrize("route", ROUTES["neighborhood"])
def test_neighborhood_counts_k_squared_keys_per_query(route: str) -> None:
    """Clamped windows: every query of a 13 x 11 map sees exactly 5 x 5 keys (no halo)."""
    with backends.force(route):
        assert counted("neighborhood", AttnSpec(kernel_size=5), 13, 11) == linears(143) + attention(143, 25)


@pytest.mark.parametrize("route", ROUTES["neighborhood"])
def test_dilated_counts_k_squared_keys_per_query(route: str) -> None:
    with backends.force(route):
        assert counted("dilated", AttnSpec(kernel_size=3, dilation=2), 12, 13) == linears(156) + attention(156, 9)


def test_grid_counts_each_groups_real_tokens() -> None:
    """g = 4 on 10 x 12: rows split into groups of 4, 3, 3 (each query sees its group), columns 4, 4, 4."""
    rows, cols = axis_keys(10, 4, 3), axis_keys(12, 4, 3)
    assert (rows, cols) == (4 * 4 + 3 * 3 + 3 * 3, 3 * 4 * 4)
    assert counted("grid", AttnSpec(window_size=4), 10, 12) == linears(120) + B * HEADS * rows * cols * 2 * D


def test_global_counts_every_pair() -> None:
    assert counted("global", AttnSpec(), 6, 7) == linears(42) + attention(42, 42)


def test_spatial_reduction_counts_the_reduced_keys() -> None:
    """r = 2 on 8 x 8: q over 64 tokens, a depthwise 2 x 2 stride-2 conv and kv over 16, 16 keys a query."""
    n, nr = 64, 16
    want = B * (n * C * C + nr * C * 4 + nr * C * 2 * C + n * C * C) + attention(n, nr)
    assert counted("spatial_reduction", AttnSpec.of(sr_ratio=2), 8, 8) == want


def test_lsh_counts_its_chunk_and_the_previous_one() -> None:
    """chunk 16 on 8 x 8 = 64 tokens: 4 chunks, each query sees 2 x 16 keys; hashing projects
    each key onto buckets / 2 = 4 directions per head (one hash round)."""
    n, chunk, buckets = 64, 16, 2 * math.ceil(64 / 16)
    module = create_attention("lsh", C, HEADS, AttnSpec.of(lsh_chunk=chunk))
    proj = sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear))
    hashing = B * HEADS * n * D * buckets // 2
    assert counted("lsh", AttnSpec.of(lsh_chunk=chunk), 8, 8) == B * n * proj + hashing + attention(n, 2 * chunk)


def test_routed_counts_the_gathered_regions() -> None:
    """Regions of 4 x 4 on 8 x 8 (4 regions), top-2: each query sees 2 x 16 keys; routing compares
    region means (4 x 4 pairs of C channels)."""
    want = linears(64) + B * 4 * 4 * C + attention(64, 2 * 16)
    assert counted("routed", AttnSpec.of(window_size=4, routed_topk=2), 8, 8) == want


@pytest.mark.parametrize("variant", ["swin_local", "swin_dilated", "swin"])
def test_a_models_gflops_are_the_same_on_every_route(variant: str) -> None:
    """swin_local pico at 224²: 0.3324 GMACs outside attention + 2 x tokens x k² x C per block = 0.3512.
    (Routes that cannot train on CPU, flex and natten, are covered per module above: the summary
    names each stage's training route, which for them is an error here.)"""
    model = create_model(variant, size="pico", num_classes=10)
    family = "window" if variant == "swin" else "neighborhood"
    figures = set()
    cpu_training = backends.Call(family, "cpu", torch.float32, True, True, True)
    for route in [None, *(r for r in ROUTES[family] if backends.ROUTES[r].refuses(cpu_training) is None)]:
        with backends.force(route):
            figures.add(round(summarize(model, 224).gflops, 9))
    assert len(figures) == 1, figures
    if variant == "swin_local":
        assert round(figures.pop(), 4) == 0.3512


def test_the_fused_kernel_has_a_flop_formula_for_any_flop_counter() -> None:
    """Lightning's summary table runs its own FlopCounterMode: the fused custom op counts k*k keys."""
    from vision_attn.attention import fused
    from vision_attn.attention.neighborhood import neighborhood_attention

    if fused.library() is None:
        pytest.skip("no C++ compiler: the fused kernel cannot build")
    q, k, v = (torch.randn(1, HEADS, 13, 11, D) for _ in range(3))
    with torch.no_grad(), FlopCounterMode(display=False) as counter, backends.force("fused"):
        neighborhood_attention(q, k, v, 5)
    assert counter.get_total_flops() == 2 * HEADS * 143 * 25 * 2 * D


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("variant", NEW_VARIANTS)
def test_flop_summary_of_every_new_variant(variant: str) -> None:
    """The run summary (torch's flop counter, module hooks under no_grad) works for each variant."""
    summary = summarize(va.create_model(variant, "pico", num_classes=3, img_size=32), 32)
    assert summary.params > 0 and summary.gflops > 0
