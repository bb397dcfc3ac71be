"""Beyond local windows: global tokens, spatial reduction, LSH and routed attention vs brute force."""
from __future__ import annotations

import pytest
import torch
from reference import (
    axis_pairs_reference,
    clipped_offsets_bias,
    global_axis_reference,
    global_reference,
    global_tokens_reference,
    grid_axis_reference,
    lsh_pairs_reference,
    lsh_reference,
    neighborhood_axis_reference,
    random_bias,
    random_qkv,
    routed_pairs_reference,
    routed_reference,
    spatial_reduction_reference,
    window_pairs_reference,
)

import vision_attn as va
from vision_attn.attention import (
    AttnSpec,
    attention_kinds,
    create_attention,
    global_token_attention,
    lsh_attention,
    routed_attention,
)
from vision_attn.attention.lsh import lsh_rotations
from vision_attn.attention.neighborhood import neighborhood_patterns, tiled_attention
from vision_attn.attention.rel_pos import bias_grid
from vision_attn.attention.window import window_attention_lse
from vision_attn.errors import ConfigError
from vision_attn.visualize import kind_patterns, learned_maps, query_points

TOL = dict(rtol=1e-10, atol=1e-10)
NEW_KINDS = ["spatial_reduction", "lsh", "routed"]
NEW_VARIANTS = ["swin_global_tokens", "swin_sr", "swin_lsh", "swin_routed"]


pytestmark = pytest.mark.usefixtures("one_thread")
qkv, bias = random_qkv, random_bias


def tokens(B: int, nh: int, G: int, D: int = 4, seed: int = 9) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, nh, G, D, generator=g, dtype=torch.float64) for _ in range(3)]



def module(kind: str, dim: int = 8, heads: int = 2, seed: int = 0, **spec) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = create_attention(kind, dim, heads, AttnSpec(**{"window_size": 3, "kernel_size": 3, **spec})).double().eval()
    if getattr(m, "relative_position_bias_table", None) is not None:
        torch.nn.init.normal_(m.relative_position_bias_table, std=0.5)  # make the bias matter
    return m


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


# ----------------------------------------------------------------------------- spatial reduction


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


# ----------------------------------------------------------------------------- lsh


@pytest.mark.parametrize("H,W,chunk,hashes,buckets", [(5, 7, 8, 1, 6), (6, 6, 6, 2, 4), (3, 5, 16, 1, 2),
                                                      (4, 6, 12, 3, 8), (5, 5, 5, 2, 10)])
def test_lsh_equals_masked_full_attention(H: int, W: int, chunk: int, hashes: int, buckets: int) -> None:
    q, k, v = qkv(2, 2, H, W, seed=chunk + hashes)
    rot = lsh_rotations(hashes, 2, 4, buckets, seed=3, dtype=torch.float64)
    grid = bias(2, 3)
    expect = lsh_reference(q, k, v, rot, chunk, grid)
    torch.testing.assert_close(lsh_attention(q, k, v, rot, chunk, grid), expect, **TOL)
    torch.testing.assert_close(lsh_attention(q, q, v, rot, chunk), lsh_reference(q, q, v, rot, chunk), **TOL)


def test_lsh_sees_chunk_and_previous_chunk_only() -> None:
    """Each query sees at most 2 * chunk keys per round: the score matrix is never N x N."""
    q, k, _ = qkv(1, 1, 8, 8, seed=2)
    rot = lsh_rotations(1, 1, 4, 8, seed=0, dtype=torch.float64)
    counts = lsh_pairs_reference(k.reshape(1, 1, 64, 4), rot, 8)
    assert int((counts > 0).sum(-1).max()) == 16


def test_lsh_module_equals_reference_and_gradcheck() -> None:
    m = module("lsh", lsh_chunk=6, lsh_hashes=2)
    x = torch.randn(2, 5, 4, 8, dtype=torch.float64)
    qk, _, v = m.qkv_heads(x)
    ref = lsh_reference(qk, qk, v, m.rotations(20, qk), 6, bias_grid(m.relative_position_bias_table), m.scale)
    torch.testing.assert_close(m(x), m.proj(ref.permute(0, 2, 3, 1, 4).reshape(2, 5, 4, 8)), **TOL)
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 3, 4, D=2, seed=5))
    rot = lsh_rotations(2, 2, 2, 4, seed=1, dtype=torch.float64)
    grid = bias(2, 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda q, k, v, b: lsh_attention(q, k, v, rot, 4, b), (q, k, v, grid))


# ----------------------------------------------------------------------------- routed


@pytest.mark.parametrize("H,W,region,topk", [(6, 6, 2, 2), (7, 8, 3, 3), (5, 9, 4, 1), (4, 4, 2, 9), (2, 3, 4, 2)])
def test_routed_equals_masked_full_attention(H: int, W: int, region: int, topk: int) -> None:
    q, k, v = qkv(2, 2, H, W, seed=region * topk)
    grid = bias(2, region)
    expect = routed_reference(q, k, v, region, topk, grid)
    torch.testing.assert_close(routed_attention(q, k, v, region, topk, grid), expect, **TOL)
    torch.testing.assert_close(routed_attention(q, k, v, region, topk), routed_reference(q, k, v, region, topk), **TOL)


def test_routed_with_every_region_is_global_attention() -> None:
    q, k, v = qkv(1, 2, 6, 5, seed=8)
    grid = bias(2, 3)
    torch.testing.assert_close(routed_attention(q, k, v, 3, 100, grid), global_reference(q, k, v, 3, grid), **TOL)


def test_routed_gradcheck() -> None:
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 4, 5, D=2, seed=6))
    grid = bias(2, 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda q, k, v, b: routed_attention(q, k, v, 2, 2, b), (q, k, v, grid))


# ----------------------------------------------------------------------------- modules, maps, variants


def test_new_kinds_are_registered() -> None:
    assert set(NEW_KINDS) <= set(attention_kinds())


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
@pytest.mark.parametrize("img", [32, 48])
def test_variant_trains_in_the_backbone(variant: str, img: int) -> None:
    """pico: gradients are finite, the loss goes down; at 48 px every gradient is also nonzero.

    At 32 px the last map is 1 x 1 (swin_sr's first stage is one reduced cell): a query with a
    single key gets no bias-table gradient by construction, as in every kind.
    """
    torch.manual_seed(0)
    model = va.create_model(variant, "pico", num_classes=4, img_size=img, drop_path_rate=0.0)
    x, y = torch.randn(8, 3, img, img), torch.arange(8) % 4
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for step in range(6):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if step == 0:
            for name, p in model.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
                assert img == 32 or p.grad.abs().sum() > 0, name
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("kind", ["neighborhood", "grid", "routed", "lsh", "spatial_reduction"])
def test_global_tokens_train_with_other_kinds(kind: str) -> None:
    torch.manual_seed(0)
    model = va.create_model("swin", "pico", num_classes=3, img_size=48, block_pattern=[kind], global_tokens=2,
                            drop_path_rate=0.0)
    model(torch.randn(2, 3, 48, 48)).square().sum().backward()
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "overrides,key",
    [
        (dict(global_tokens=-1), "model.global_tokens"),
        (dict(global_tokens=[1, 2]), "model.global_tokens"),
        (dict(sr_ratio=0), "model.sr_ratio"),
        (dict(lsh_buckets=3), "model.lsh_buckets"),
        (dict(lsh_chunk=0), "model.lsh_chunk"),
        (dict(lsh_hashes=0), "model.lsh_hashes"),
        (dict(routed_topk=0), "model.routed_topk"),
        (dict(block_pattern=["window", "global"], global_tokens=[0, 0, 0, -1]), "model.global_tokens"),
    ],
)
def test_bad_values_raise_config_error_naming_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        va.create_model("swin", "pico", **overrides)


@pytest.mark.parametrize("variant", NEW_VARIANTS)
def test_learned_attention_maps_for_every_new_variant(variant: str) -> None:
    model = va.create_model(variant, "pico", num_classes=3, img_size=64).eval()
    maps, points = learned_maps(model, torch.randn(2, 3, 64, 64))
    assert len(maps) == 2 and len(points) == 3
    for m in maps.values():
        assert m.shape == (3, 16, 16)
        torch.testing.assert_close(m.sum((-1, -2)), torch.ones(3), rtol=1e-5, atol=1e-5)


def test_tiled_log_sum_exp_gradcheck_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunked (recomputing) backward of the tiled kernel carries the log-sum-exp gradient too."""
    import vision_attn.attention.tiled as tiled

    monkeypatch.setattr(tiled, "STASH_SCORES", 64)
    monkeypatch.setattr(tiled, "CHUNK_SCORES", 32)
    q, k, v = (t.requires_grad_() for t in qkv(1, 1, 5, 6, D=2, seed=12))
    grid = bias(1, 3).requires_grad_()
    py, px = neighborhood_patterns(5, 6, 3, 2)
    fn = lambda q, k, v, b: tiled.tiled_attention(q, k, v, py, px, b, return_lse=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, grid))


def test_bench_times_every_new_kind() -> None:
    from vision_attn.bench.attention import KINDS, Inputs, kernel_for, skipped

    new = ["spatial_reduction", "lsh", "routed", "window+global_tokens"]
    assert set(new) <= set(KINDS)
    inputs = Inputs.make(14)
    for kind in new:
        inputs.step(kernel_for(kind))
    assert skipped("spatial_reduction", 224, 4.0) and not skipped("spatial_reduction", 112, 4.0)
    assert not any(skipped(kind, 224, 4.0) for kind in ("lsh", "routed", "window+global_tokens"))


@pytest.mark.parametrize("variant", NEW_VARIANTS)
def test_flop_summary_of_every_new_variant(variant: str) -> None:
    """The run summary (torch's flop counter, module hooks under no_grad) works for each variant."""
    from vision_attn.summary import summarize

    summary = summarize(va.create_model(variant, "pico", num_classes=3, img_size=32), 32)
    assert summary.params > 0 and summary.gflops > 0


def test_learned_attention_maps_of_a_tiled_memory_model_show_the_first_tile() -> None:
    model = va.create_model("swin_local", "pico", num_classes=3, img_size=64, tile_size=32, memory_tokens=2).eval()
    maps, points = learned_maps(model, torch.randn(1, 3, 64, 64))
    assert list(maps) == [f"block {i}: neighborhood (+2 memory tokens, not drawn) [first 32px tile]" for i in (0, 1)]
    for m in maps.values():
        assert m.shape == (3, 8, 8)  # a 32 px tile's stage-1 map, not the image's 16 x 16
        torch.testing.assert_close(m.sum((-1, -2)), torch.ones(3), rtol=1e-5, atol=1e-5)
