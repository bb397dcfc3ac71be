"""Attention pictures (vision_attn/visualize.py) and the attention maps they draw: maps are distributions
over each kind's allowed keys, the pattern picture shows each kind's exact receptive field, learned
maps of every variant beyond local windows and of a tiled memory model."""
from __future__ import annotations

import pytest
import torch
from helpers import BEYOND_LOCAL_KINDS as NEW_KINDS
from helpers import BEYOND_LOCAL_VARIANTS as NEW_VARIANTS
from helpers import attention_module as module
from reference import lsh_pairs_reference, neighborhood_axis_reference, routed_pairs_reference

import vision_attn as va
from vision_attn.attention import AttnSpec
from vision_attn.visualize import kind_patterns, learned_maps, query_points

TOL = dict(rtol=1e-10, atol=1e-10)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kind", NEW_KINDS)
@pytest.mark.parametrize("pattern_only", [False, True])
def test_attention_maps_are_distributions_over_allowed_keys(kind: str, pattern_only: bool) -> None:
    m = module(kind, sr_ratio=2, lsh_chunk=8, routed_topk=2)
    x = torch.randn(1, 6, 7, 8, dtype=torch.float64)
    points = [(0, 0), (3, 3), (5, 6)]
    maps = m.attention_maps(x, points, pattern_only=pattern_only)  # (heads, P, H, W)
    assert maps.shape == (2, 3, 6, 7) and (maps >= 0).all()
    torch.testing.assert_close(maps.sum((-1, -2)), torch.ones(2, 3, dtype=torch.float64), **TOL)
    idx = [py * 7 + px for py, px in points]
    if kind == "routed":  # exactly the tokens of the routed regions (uniform with pattern_only)
        q, k, _ = m.qkv_heads(x)
        allowed = routed_pairs_reference(q, k, 3, 2)[0, idx].view(3, 6, 7)
        assert (maps[:, ~allowed] == 0).all() and (maps[:, allowed] > 0).all()
    if kind == "lsh":  # exactly the keys of the query's sorted chunk and the previous one
        _, k, _ = m.qkv_heads(x)
        counts = lsh_pairs_reference(k.reshape(1, 2, 42, 4), m.rotations(42, k), 8)[0][:, idx].view(2, 3, 6, 7)
        allowed = counts > 0
        others = allowed.clone()
        others[:, range(3), [p[0] for p in points], [p[1] for p in points]] = False  # self: e^-1e5 ~ 0
        assert (maps[~allowed] == 0).all() and (maps[others] > 0).all()
        if pattern_only:
            expect = torch.where(others, counts.double(), 0.0)
            torch.testing.assert_close(maps, expect / expect.sum((-1, -2), keepdim=True), **TOL)
    if kind == "spatial_reduction" and pattern_only:  # uniform over the 3 x 4 cells, spread inside each
        cells = torch.nn.functional.pad(maps, (0, 1)).view(2, 3, 3, 2, 4, 2).sum((3, 5))
        torch.testing.assert_close(cells, torch.full_like(cells, 1 / 12), **TOL)


def test_visualize_draws_every_new_kind() -> None:
    maps = kind_patterns(16, 2, 8, 8, AttnSpec(window_size=4, kernel_size=5))
    assert set(NEW_KINDS) <= set(maps)
    for kind in NEW_KINDS:
        torch.testing.assert_close(maps[kind].sum((-1, -2)), torch.ones(3), rtol=1e-5, atol=1e-5)


def test_pattern_picture_shows_each_kind_exact_receptive_field() -> None:
    """The picture's support is the reference's allowed keys: dilated at d=2, not a plain neighborhood."""
    H = W = 12
    maps = kind_patterns(16, 2, H, W, AttnSpec(window_size=4, kernel_size=5))
    points = query_points(H, W)
    for kind, (ay, ax) in {
        "neighborhood": (neighborhood_axis_reference(H, 5, 1), neighborhood_axis_reference(W, 5, 1)),
        "dilated": (neighborhood_axis_reference(H, 5, 2), neighborhood_axis_reference(W, 5, 2)),
    }.items():
        for p, (qy, qx) in enumerate(points):
            expected = torch.tensor(ay[0][qy])[:, None] & torch.tensor(ax[0][qx])[None, :]
            assert torch.equal(maps[kind][p] > 0, expected), (kind, qy, qx)
    assert not torch.equal(maps["dilated"] > 0, maps["neighborhood"] > 0)


@pytest.mark.parametrize("variant", NEW_VARIANTS)
def test_learned_attention_maps_for_every_new_variant(variant: str) -> None:
    model = va.create_model(variant, "pico", num_classes=3, img_size=64).eval()
    maps, points = learned_maps(model, torch.randn(2, 3, 64, 64))
    assert len(maps) == 2 and len(points) == 3
    for m in maps.values():
        assert m.shape == (3, 16, 16)
        torch.testing.assert_close(m.sum((-1, -2)), torch.ones(3), rtol=1e-5, atol=1e-5)


def test_learned_attention_maps_of_a_tiled_memory_model_show_the_first_tile() -> None:
    model = va.create_model("swin_local", "pico", num_classes=3, img_size=64, tile_size=32, memory_tokens=2).eval()
    maps, points = learned_maps(model, torch.randn(1, 3, 64, 64))
    assert list(maps) == [f"block {i}: neighborhood (+2 memory tokens, not drawn) [first 32px tile]" for i in (0, 1)]
    for m in maps.values():
        assert m.shape == (3, 8, 8)  # a 32 px tile's stage-1 map, not the image's 16 x 16
        torch.testing.assert_close(m.sum((-1, -2)), torch.ones(3), rtol=1e-5, atol=1e-5)
