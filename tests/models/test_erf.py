"""Effective receptive field (vision_attn/erf.py): the square-mass function, exact gradient supports of
attention kinds (hand-computed from docs/attention.md) and of tiny models; the bench: tests/bench/test_bench_erf.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vision_attn.attention import AttnSpec, create_attention
from vision_attn.blocks import Block
from vision_attn.erf import StageMap, square_side, square_sides, support_box

pytestmark = pytest.mark.usefixtures("one_thread")

DIM, HEADS = 8, 2


# ----------------------------------------------------------------------------- square mass


def test_square_side_on_a_hand_built_map():
    # 10 x 10 map, centre on the corner between pixels 4 and 5 (even sides): the 2 x 2 core holds 4,
    # pixel (3, 3) 4 more (inside side 4: rows/cols 3..6), pixel (0, 9) the last 2 (needs side 10).
    m = np.zeros((10, 10))
    m[4:6, 4:6] = 1.0
    m[3, 3] = 4.0
    m[0, 9] = 2.0
    sides, share = square_sides(m, (5, 5))
    assert sides.tolist() == [2, 4, 6, 8, 10]
    np.testing.assert_allclose(share, [0.4, 0.8, 0.8, 0.8, 1.0])
    assert [square_side(m, f) for f in (0.2, 0.4, 0.5, 0.8, 0.81, 0.99, 1.0)] == [2, 2, 4, 4, 10, 10, 10]
    assert support_box(m) == (0, 3, 6, 10)


def test_square_side_off_centre_and_on_a_pixel_centre():
    # Centre on pixel (2, 2)'s middle (odd sides): half the mass there, half in the corner (0, 0).
    m = np.zeros((5, 5))
    m[2, 2] = m[0, 0] = 1.0
    assert square_sides(m, (2.5, 2.5))[0].tolist() == [1, 3, 5]
    assert [square_side(m, f) for f in (0.5, 0.51)] == [1, 5]
    # Off the middle: centre (1, 1) on a 6 x 6 map; mass at pixel (5, 5) needs rows [1 - 5, 1 + 5): side 10.
    m = np.zeros((6, 6))
    m[0, 0] = m[5, 5] = 1.0
    assert square_side(m, 0.5, (1, 1)) == 2 and square_side(m, 0.99, (1, 1)) == 10


def test_square_side_rejects_bad_input():
    with pytest.raises(ValueError, match="all zero"):
        square_side(np.zeros((4, 4)), 0.5)
    with pytest.raises(ValueError, match="fraction"):
        square_side(np.ones((4, 4)), 0.0)
    with pytest.raises(ValueError, match="half-integers"):
        square_side(np.ones((4, 5)), 0.5)  # centre (2, 2.5): a square's edges cannot fall on pixel edges


def test_stage_map_centre():
    s = StageMap(7, 14, 32)  # 224 x 448 px at stride 32: token (3, 7), footprint rows 96..127, cols 224..255
    assert s.centre_token == (3, 7) and s.footprint() == (96, 224, 128, 256)


# ----------------------------------------------------------------------------- exact supports


def token_support(fn, H: int, W: int, query: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Which input tokens of an ``(1, H, W, DIM)`` map the output at ``query`` (summed over channels)
    has a non-zero gradient for: bool ``(H, W)``."""
    x = torch.randn(1, H, W, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64,
                    requires_grad=True)
    (g,) = torch.autograd.grad(fn(x)[0, query[0], query[1]].sum(), x)
    return (g[0] != 0).any(-1).numpy()


def box(H: int, W: int, rows: range, cols: range) -> np.ndarray:
    out = np.zeros((H, W), dtype=bool)
    out[rows.start : rows.stop, cols.start : cols.stop] = True
    return out


def lattice(H: int, W: int, rows: list[int], cols: list[int]) -> np.ndarray:
    out = np.zeros((H, W), dtype=bool)
    out[np.ix_(rows, cols)] = True
    return out


def module(kind: str, **spec) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_attention(kind, DIM, HEADS, AttnSpec(**spec)).double().eval()


@pytest.mark.parametrize("H,W,query,rows,cols", [
    (8, 8, (5, 2), range(4, 8), range(0, 4)),  # a multiple of the window
    (10, 7, (9, 6), range(8, 10), range(4, 7)),  # padded to 12 x 8: the last window holds 2 x 3 real tokens
    (10, 7, (0, 3), range(0, 4), range(0, 4)),
    (3, 3, (1, 1), range(0, 3), range(0, 3)),  # a map smaller than the window: one window, the map
])
def test_window_support_is_exactly_the_window(H, W, query, rows, cols):
    att = module("window", window_size=4)
    assert (token_support(att, H, W, query) == box(H, W, rows, cols)).all()


@pytest.mark.parametrize("H,W,query,rows,cols", [
    # Per axis, start = clamp(i - 2, 0, L - 5): L = 9 -> i = 0: 0..4, i = 4: 2..6, i = 8: 4..8.
    (9, 9, (4, 4), range(2, 7), range(2, 7)),
    (9, 9, (0, 8), range(0, 5), range(4, 9)),  # a corner: the window slides inward on both axes
    (9, 7, (1, 6), range(0, 5), range(2, 7)),  # W = 7: start = clamp(4, 0, 2) = 2
    (3, 9, (2, 1), range(0, 3), range(0, 5)),  # kernel > H: shrinks to the map along rows
])
def test_neighborhood_support_is_the_clamped_window(H, W, query, rows, cols, na_route):
    att = module("neighborhood", kernel_size=5)
    assert (token_support(att, H, W, query) == box(H, W, rows, cols)).all()


@pytest.mark.parametrize("H,W,query,rows,cols", [
    # k = 3, d = 2 on L = 12: groups {0, 2, ..., 10} and {1, ..., 11}, 6 each; group coordinate j = i // 2,
    # start = clamp(j - 1, 0, 3): i = 0 -> j 0..2 -> 0, 2, 4; i = 5 -> j 1..3 -> 3, 5, 7; i = 11 -> j 3..5 -> 7, 9, 11.
    (12, 12, (0, 5), [0, 2, 4], [3, 5, 7]),
    (12, 12, (11, 6), [7, 9, 11], [4, 6, 8]),  # i = 6: j = 3 -> j 2..4 -> 4, 6, 8
    # L = 11: group 0 has 6 tokens (0..10), group 1 has 5 (1..9). i = 9: j = 4, start = clamp(3, 0, 2) = 2
    # -> j 2..4 -> 5, 7, 9; i = 10: j = 5, start = clamp(4, 0, 3) = 3 -> 6, 8, 10.
    (11, 11, (9, 10), [5, 7, 9], [6, 8, 10]),
])
def test_dilated_support_is_the_lattice_in_group_coordinates(H, W, query, rows, cols, na_route):
    att = module("dilated", kernel_size=3, dilation=2)
    assert (token_support(att, H, W, query) == lattice(H, W, rows, cols)).all()


@pytest.mark.parametrize("H,W,query", [(6, 9, (0, 0)), (5, 5, (2, 4))])
def test_global_support_is_the_whole_map(H, W, query):
    att = module("global", window_size=3)
    assert token_support(att, H, W, query).all()


def block(kind: str) -> Block:
    torch.manual_seed(0)
    return Block(DIM, HEADS, kind, AttnSpec(window_size=4)).double().eval()


@pytest.mark.parametrize("query,rows,cols", [
    # 12 x 12, window 4, shift 2. Window block: groups [0,4), [4,8), [8,12) per axis. Shifted block
    # (roll by -2, windows, Swin's region mask): groups {0,1}, {2..5}, {6..9}, {10,11} per axis.
    # Output at q depends on the window groups of every token in q's shifted group:
    ((3, 7), range(0, 8), range(4, 12)),  # rows {2..5} -> [0,4) u [4,8); cols {6..9} -> [4,8) u [8,12)
    ((0, 0), range(0, 4), range(0, 4)),  # {0,1} x {0,1}: all inside the first window
    ((11, 5), range(8, 12), range(0, 8)),  # rows {10,11} -> [8,12); cols {2..5} -> [0,4) u [4,8)
])
def test_window_then_shifted_window_support_is_the_union_of_windows(query, rows, cols):
    pair = torch.nn.Sequential(block("window"), block("shifted_window"))
    assert (token_support(pair, 12, 12, query) == box(12, 12, rows, cols)).all()
    # One block alone: its own window (shifted: the group, here 4 x 4 / 2 x 2 / 2 x 4 tokens).
    alone = token_support(block("shifted_window"), 12, 12, query)
    groups = [range(0, 2), range(2, 6), range(6, 10), range(10, 12)]
    g = [next(r for r in groups if i in r) for i in query]
    assert (alone == box(12, 12, *g)).all()


# ----------------------------------------------------------------------------- tiny models, pixels


def pixel_support(variant: str, img: int, stage: int = 0, **overrides) -> np.ndarray:
    """Non-zero pixels of one stage's centre-token gradient in a pico model (1 photo)."""
    from vision_attn.bench.erf import init_model, photo_batch
    from vision_attn.erf import erf_masses

    model = init_model(variant, "pico", img, seed=0, **overrides)
    return erf_masses(model, photo_batch(1, img))[stage].numpy() != 0


def pixels(img: int, rows: list[int], cols: list[int], patch: int = 4) -> np.ndarray:
    """Tokens ``rows x cols`` of a stride-``patch`` map as a pixel mask."""
    out = np.zeros((img // patch, img // patch), dtype=bool)
    out[np.ix_(rows, cols)] = True
    return out.repeat(patch, 0).repeat(patch, 1)


def test_tiny_model_pixel_supports():
    # pico at 48 px: stage 1 is a 12 x 12 map of 4 px patches (non-overlapping), centre token 6, window 4.
    win = list(range(4, 8))  # window [4, 8): pixels 16..31, centred on the image
    assert (pixel_support("swin_window", 48) == pixels(48, win, win)).all()
    # window then shifted window: token 6's shifted group {6..9} -> windows [4, 8) u [8, 12): pixels 16..47.
    pair = list(range(4, 12))
    assert (pixel_support("swin", 48) == pixels(48, pair, pair)).all()
    # two neighborhood blocks, kernel 5: 6 +- 2 +- 2 -> tokens 2..10 (pixels 8..43).
    nat = list(range(2, 11))
    assert (pixel_support("swin_local", 48) == pixels(48, nat, nat)).all()
    # one dilated block (k 5, d 2): token 6 = group 0, j = 3, start = clamp(1, 0, 1) = 1 -> j 1..5 ->
    # tokens 2, 4, 6, 8, 10: a lattice of 4 px patches. (swin_dilated's stage-1 stem is a plain patch embed.)
    lat = [2, 4, 6, 8, 10]
    one = dict(block_pattern=["dilated"], depths=[1, 1, 1, 1], dilations=[[2], [1], [1], [1]])
    assert (pixel_support("swin_dilated", 48, **one) == pixels(48, lat, lat)).all()
    assert pixel_support("swin_global", 48).all()
