"""Neighborhood / dilated attention against brute force (docs/attention.md semantics): the reference tests run
through both CPU routes (``na_route``: the fused kernel and the tiled kernel); tests of the tiled
kernel's own tiles, chunks and dropout pin it (``tiled_route``). More on the fused kernel:
test_fused.py."""
from __future__ import annotations

import logging
import sys
import types

import pytest
import torch
from reference import neighborhood_reference, random_bias, random_qkv

import vision_attn.attention.neighborhood as nb
import vision_attn.attention.tiled as tiled
from vision_attn.attention import AttnSpec, backends, create_attention, neighborhood_attention
from vision_attn.attention.rel_pos import bias_grid
from vision_attn.errors import ConfigError

TOL = dict(rtol=1e-10, atol=1e-12)


pytestmark = pytest.mark.usefixtures("one_thread")
qkv, bias = random_qkv, random_bias


@pytest.mark.parametrize("dilation", [1, 2, 3, 4])
@pytest.mark.parametrize("kernel", [3, 5, 7, 9, 11, 13])
def test_matches_reference_sweep(kernel: int, dilation: int, na_route: str) -> None:
    q, k, v = qkv(2, 2, 13, 21)
    grid = bias(2, kernel)
    out = neighborhood_attention(q, k, v, kernel, dilation, bias=grid)
    torch.testing.assert_close(out, neighborhood_reference(q, k, v, kernel, dilation, grid), **TOL)


@pytest.mark.parametrize("kernel,dilation", [(3, 1), (5, 2), (7, 3), (3, 4)])
def test_matches_reference_without_bias(kernel: int, dilation: int, na_route: str) -> None:
    q, k, v = qkv(2, 3, 13, 21, seed=2)
    out = neighborhood_attention(q, k, v, kernel, dilation)
    torch.testing.assert_close(out, neighborhood_reference(q, k, v, kernel, dilation), **TOL)


@pytest.mark.parametrize(
    "H,W,kernel,dilation",
    [
        (9, 9, 5, 1),  # square
        (12, 12, 3, 4),  # square, d divides L
        (7, 7, 7, 1),  # map exactly k wide: global
        (7, 15, 7, 2),  # exactly k on one axis, k * d <= L on the other
        (14, 9, 7, 2),  # exactly k * d
        (4, 5, 7, 1),  # smaller than k: k shrinks to the map
        (5, 3, 7, 2),  # smaller than k, with dilation
        (1, 6, 3, 1),  # a single row
        (10, 11, 4, 2),  # even kernel follows the same clamp formula
    ],
)
def test_edge_shapes(H: int, W: int, kernel: int, dilation: int, na_route: str) -> None:
    q, k, v = qkv(2, 2, H, W, seed=H * W)
    grid = bias(2, kernel)
    out = neighborhood_attention(q, k, v, kernel, dilation, bias=grid, scale=0.7)
    torch.testing.assert_close(out, neighborhood_reference(q, k, v, kernel, dilation, grid, scale=0.7), **TOL)


@pytest.mark.parametrize("tile", [(1, 1), (2, 3), (5, 4), (64, 64)])
def test_result_does_not_depend_on_tile(tile: tuple[int, int], tiled_route: None) -> None:
    q, k, v = qkv(1, 2, 13, 21, seed=3)
    grid = bias(2, 5)
    py, px = nb.neighborhood_patterns(13, 21, 5, 2, tile=tile)
    out = nb.tiled_attention(q, k, v, py, px, grid)
    torch.testing.assert_close(out, neighborhood_reference(q, k, v, 5, 2, grid), **TOL)


def test_gradients_match_reference(na_route: str) -> None:
    q, k, v = (t.requires_grad_() for t in qkv(2, 2, 11, 13, seed=4))
    grid = bias(2, 5).requires_grad_()
    gout = qkv(2, 2, 11, 13, seed=5)[0]
    ours = torch.autograd.grad(neighborhood_attention(q, k, v, 5, 2, bias=grid), (q, k, v, grid), gout)
    ref = torch.autograd.grad(neighborhood_reference(q, k, v, 5, 2, grid), (q, k, v, grid), gout)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("chunk", [1, 3000])
def test_chunked_recompute_matches_reference(chunk: int, monkeypatch: pytest.MonkeyPatch, tiled_route: None) -> None:
    """Several chunks: backward recomputes each chunk's probabilities instead of keeping them."""
    monkeypatch.setattr(tiled, "STASH_SCORES", 0)
    monkeypatch.setattr(tiled, "CHUNK_SCORES", chunk)
    q, k, v = (t.requires_grad_() for t in qkv(2, 2, 9, 13, seed=8))
    grid = bias(2, 3).requires_grad_()
    gout = qkv(2, 2, 9, 13, seed=9)[0]
    out = neighborhood_attention(q, k, v, 3, 2, bias=grid)
    ref = neighborhood_reference(q, k, v, 3, 2, grid)
    torch.testing.assert_close(out, ref, **TOL)
    for a, b in zip(torch.autograd.grad(out, (q, k, v, grid), gout), torch.autograd.grad(ref, (q, k, v, grid), gout)):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("H,W,kernel,dilation", [(5, 6, 3, 1), (5, 7, 3, 2)])
def test_gradcheck(H: int, W: int, kernel: int, dilation: int, na_route: str) -> None:
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, H, W, D=2, seed=6))
    grid = bias(2, kernel).requires_grad_()
    fn = lambda q, k, v, g: neighborhood_attention(q, k, v, kernel, dilation, bias=g)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, grid))


@pytest.mark.parametrize("stash", [1 << 22, 0])
def test_gradcheck_with_dropout(stash: int, monkeypatch: pytest.MonkeyPatch, tiled_route: None) -> None:
    monkeypatch.setattr(tiled, "STASH_SCORES", stash)
    monkeypatch.setattr(tiled, "CHUNK_SCORES", 1)
    q, k, v = (t.requires_grad_() for t in qkv(1, 1, 4, 5, D=2, seed=7))
    grid = bias(1, 3).requires_grad_()
    py, px = nb.neighborhood_patterns(4, 5, 3, tile=(2, 2))  # 6 tiles: several chunks when chunk == 1

    def fn(q, k, v, g):
        torch.manual_seed(0)  # the same dropout mask on every evaluation
        return nb.tiled_attention(q, k, v, py, px, g, dropout_p=0.3)

    assert torch.autograd.gradcheck(fn, (q, k, v, grid))
    assert not torch.allclose(fn(q, k, v, grid), nb.tiled_attention(q, k, v, py, px, grid))


def test_never_builds_a_full_score_matrix() -> None:
    """Scores are (tiles, Q, K) with Q, K bounded by tile and kernel: linear in H*W, not quadratic."""
    ty, tx = nb.DEFAULT_TILE
    for L in (28, 56, 112):
        plan = tiled.tile_plan(*nb.neighborhood_patterns(L, L, 7, 2), torch.device("cpu"))
        Q, K = plan.tile_shape
        assert Q <= 2.25 * ty * tx and K <= (1.5 * ty + 6) * (1.5 * tx + 6)  # tiles are sized in [2t/3, 3t/2]
        assert L * L <= plan.num_tiles * Q <= 1.3 * L * L
        assert plan.allowed.shape[0] <= 36  # mask patterns do not grow with the map


def test_dilation_drop_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    nb._warn_dilation.cache_clear()
    q, k, v = qkv(1, 1, 10, 30)
    with caplog.at_level(logging.WARNING, logger=nb.__name__):
        for _ in range(3):
            neighborhood_attention(q, k, v, 3, 4)
    msgs = [r.getMessage() for r in caplog.records if r.name == nb.__name__]
    assert len(msgs) == 1 and "length 10" in msgs[0] and "using dilation 3" in msgs[0]
    assert nb.axis_kernel_dilation(10, 3, 4) == (3, 3)
    assert nb.axis_kernel_dilation(5, 7, 2) == (5, 1)
    assert nb.axis_kernel_dilation(30, 3, 4) == (3, 4)


# ----------------------------------------------------------------------------- NATTEN route


def test_natten_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto takes NATTEN on CUDA without a bias when it is installed; forcing it where it cannot
    serve is a ConfigError naming the key (and, with a bias, the key that removes it)."""
    def call(device: str, bias: bool, **kw) -> backends.Call:
        return backends.Call("neighborhood", device, torch.bfloat16, bias, True, bias, **kw)

    monkeypatch.setattr(backends, "natten_installed", lambda: True)
    assert backends.choose(call("cuda", False)) == "natten"
    assert backends.choose(call("cuda", True)) == "flex"  # NATTEN has no relative position bias
    assert backends.choose(call("cuda", False, dropout=True)) == "tiled"
    assert backends.choose(call("cpu", False)) in ("fused", "tiled")  # its CPU path is forward-only
    with pytest.raises(ConfigError, match=r"model\.attn_backend=natten.*model\.rel_pos_bias=false"):
        backends.choose(call("cuda", True), "natten")
    with pytest.raises(ConfigError, match="CUDA only"):
        backends.choose(call("cpu", False), "natten")
    monkeypatch.setattr(backends, "natten_installed", lambda: False)
    assert backends.choose(call("cuda", False)) == "flex"
    with pytest.raises(ConfigError, match="not installed"):
        backends.choose(call("cuda", False), "natten")


def test_natten_call_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def na2d(q, k, v, kernel_size, dilation, scale):
        seen.update(shape=tuple(q.shape), kernel_size=kernel_size, dilation=dilation, scale=scale)
        return q * 2

    monkeypatch.setitem(sys.modules, "natten", types.SimpleNamespace(na2d=na2d))
    q, k, v = qkv(2, 3, 9, 10, D=4)
    out = nb._natten_na2d(q, k, v, *nb.neighborhood_patterns(9, 10, 5, 2), scale=0.5)
    assert seen == dict(shape=(2, 9, 10, 3, 4), kernel_size=(5, 5), dilation=(1, 2), scale=0.5)
    torch.testing.assert_close(out, q * 2)


# ----------------------------------------------------------------------------- modules


def test_module_equals_functional(na_route: str) -> None:
    torch.manual_seed(0)
    m = create_attention("dilated", 12, 3, AttnSpec(kernel_size=5, dilation=2)).double()
    x = torch.randn(2, 11, 13, 12, dtype=torch.float64)
    q, k, v = m.qkv(x).view(2, 11, 13, 3, 3, 4).permute(3, 0, 4, 1, 2, 5)
    ref = neighborhood_reference(q, k, v, 5, 2, bias_grid(m.relative_position_bias_table), scale=m.scale)
    torch.testing.assert_close(m(x), m.proj(ref.permute(0, 2, 3, 1, 4).reshape(2, 11, 13, 12)), **TOL)
    assert m.relative_position_bias_table.shape == (81, 3)  # timm layout ((2k-1)**2, heads)
    assert create_attention("neighborhood", 12, 3, AttnSpec(rel_pos_bias=False)).relative_position_bias_table is None


@pytest.mark.parametrize(
    "kind,dilation,query,inside,outside",
    [
        ("neighborhood", 1, (4, 5), (5, 6), (4, 7)),
        ("neighborhood", 1, (0, 0), (2, 2), (3, 0)),  # border: the window slides inward
        ("neighborhood", 1, (8, 10), (6, 8), (8, 7)),
        ("dilated", 2, (4, 5), (6, 7), (5, 5)),  # same window span, other group
        ("dilated", 2, (0, 1), (4, 5), (1, 1)),
    ],
)
def test_module_locality(kind: str, dilation: int, query, inside, outside, na_route: str) -> None:
    torch.manual_seed(0)
    m = create_attention(kind, 8, 2, AttnSpec(kernel_size=3, dilation=dilation)).double().eval()
    x = torch.randn(1, 9, 11, 8, dtype=torch.float64)
    base = m(x)[0, query[0], query[1]]
    for pos, should_change in ((inside, True), (outside, False)):
        x2 = x.clone()
        x2[0, pos[0], pos[1]] += 1.0
        changed = not torch.equal(m(x2)[0, query[0], query[1]], base)
        assert changed == should_change, f"key {pos} for query {query}"


def test_attention_dropout_in_module(tiled_route: None) -> None:
    torch.manual_seed(0)
    m = create_attention("neighborhood", 8, 2, AttnSpec(kernel_size=3, attn_drop=0.5))
    x = torch.randn(1, 6, 7, 8, requires_grad=True)
    m.train()
    m(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    m.eval()
    ref = create_attention("neighborhood", 8, 2, AttnSpec(kernel_size=3))
    ref.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x), ref.eval()(x))


def test_module_under_autocast(na_route: str) -> None:
    torch.manual_seed(0)
    m = create_attention("dilated", 8, 2, AttnSpec(kernel_size=3, dilation=2))
    x = torch.randn(2, 6, 7, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    y.float().sum().backward()
    torch.testing.assert_close(y.float(), m(x), atol=0.05, rtol=0.05)
    assert m.relative_position_bias_table.grad is not None

