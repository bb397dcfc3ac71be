"""Tiles with a recurrent memory (vision_attn/tiling.py): references are the untiled backbone on
each crop, a global-tokens model with the same weights, and hand-written tile orders."""
from __future__ import annotations

import pytest
import torch
from helpers import cfg_with
from hydra.utils import instantiate

from vision_attn import create_model
from vision_attn.attention import attention_class, attention_kinds
from vision_attn.errors import ConfigError
from vision_attn.tiling import position_features, run_tiles, tile_boxes

C_LAST = 256  # pico's last-stage width


def _model(variant: str = "swin_local", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    kw.setdefault("drop_path_rate", 0.0)
    return create_model(variant, size="pico", num_classes=5, img_size=64, **kw).eval()


def _copy(dst: torch.nn.Module, src: torch.nn.Module) -> torch.nn.Module:
    """``src``'s weights in ``dst`` (the head too where it has the same shape)."""
    ours = dst.state_dict()
    state = {k: v for k, v in src.state_dict().items() if k in ours and v.shape == ours[k].shape}
    missing, _ = dst.load_state_dict(state, strict=False)
    assert not [k for k in missing if "memory" not in k and "global_tokens" not in k and "head" not in k], missing
    return dst


def test_tile_boxes_raster_order_by_hand() -> None:
    assert tile_boxes(5, 7, 3) == [(0, 0, 3, 3), (0, 3, 3, 6), (0, 6, 3, 7),
                                   (3, 0, 5, 3), (3, 3, 5, 6), (3, 6, 5, 7)]
    assert tile_boxes(64, 64, 64) == [(0, 0, 64, 64)]


def test_position_features_by_hand() -> None:
    import math

    f = position_features((0, 32, 32, 64), 64, 64)  # centre (0.25, 0.75) of the image
    ref = [fn(math.pi * 2**b * c) for c in (0.25, 0.75) for fn in (math.sin, math.cos) for b in range(4)]
    torch.testing.assert_close(f, torch.tensor(ref), rtol=0, atol=1e-6)


def test_one_tile_without_memory_equals_untiled() -> None:
    plain = _model()
    tiled = _copy(_model(tile_size=64), plain)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(tiled(x), plain(x), rtol=0, atol=1e-5)


def test_independent_tiles_are_the_area_weighted_mean_of_crops() -> None:
    plain = _model()
    tiled = _copy(_model(tile_size=32), plain)
    x = torch.randn(2, 3, 64, 96)  # 2 x 3 tiles of 32 x 32
    feats = [plain.forward_features(x[..., t:b, left:r]).mean((1, 2)) for t, left, b, r in tile_boxes(64, 96, 32)]
    ref = plain.forward_head(torch.stack(feats).mean(0)[:, None, None, :])
    torch.testing.assert_close(tiled(x), ref, rtol=0, atol=1e-5)
    # Ragged tiles (80 = 64 + 16 rows): weighted by their area.
    x = torch.randn(1, 3, 80, 64)
    boxes = tile_boxes(80, 64, 32)
    feats = [plain.forward_features(x[..., t:b, left:r]).mean((1, 2)) * (b - t) * (r - left) / (80 * 64)
             for t, left, b, r in boxes]
    torch.testing.assert_close(tiled(x), plain.forward_head(sum(feats)[:, None, None, :]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["swin", "swin_local", "swin_global_tokens"])
def test_one_tile_with_memory_reads_it_like_global_tokens(variant: str) -> None:
    """One tile with M memory tokens = the same weights with M more global tokens per stage, set to
    the initial memory plus its position term (the pooled half of the features)."""
    tiled = _model(variant, tile_size=64, memory_tokens=3)
    extra = 4 if variant == "swin_global_tokens" else 0
    ref = _model(variant, global_tokens=extra + 3)
    state = {k: v for k, v in tiled.state_dict().items() if "memory" not in k and not k.startswith("head")}
    where = position_features((0, 0, 64, 64), 64, 64)
    with torch.no_grad():
        for i, stage in enumerate(tiled.layers):
            memory = stage.memory_tokens + stage.memory_position(where)
            own = [stage.global_tokens] if stage.global_tokens is not None else []
            state[f"layers.{i}.global_tokens"] = torch.cat(own + [memory], 1)
    ref.load_state_dict(state, strict=False)
    x = torch.randn(2, 3, 64, 64)
    pooled = tiled.forward_features(x)[:, 0, 0, :C_LAST]
    torch.testing.assert_close(pooled, ref.forward_features(x).mean((1, 2)), rtol=0, atol=1e-5)
    assert tiled.forward_features(x).shape == (2, 1, 1, 2 * C_LAST)
    assert tiled.head_hidden_size == 2 * C_LAST and tiled(x).shape == (2, 5)


def _memory_grad_on_first_tile(bptt) -> torch.Tensor:
    model = _model(tile_size=32, memory_tokens=2, memory_bptt=bptt).train()
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    memory = model.forward_features(x)[0, 0, 0, C_LAST:]  # the final memory only (normed: its plain sum is constant)
    (memory * torch.linspace(-1, 1, C_LAST)).sum().backward()
    return x.grad


def test_memory_gradients_reach_the_first_tile_and_bptt_cuts_them() -> None:
    full = _memory_grad_on_first_tile(None)
    assert full[..., :32, :32].abs().sum() > 1e-3  # tile 0 -> memory -> tiles 1, 2, 3 -> final memory
    cut = _memory_grad_on_first_tile(2)  # memory detached before tile 2: tiles 0, 1 no longer reach it
    assert cut[..., :32, :].abs().sum() == 0
    assert cut[..., 32:, :].abs().sum() > 1e-3


def test_tile_checkpointing_keeps_gradients_exact() -> None:
    model = _model(tile_size=32, memory_tokens=2)
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        memory = [stage.initial_memory(2) for stage in model.layers]
        pooled, memory = run_tiles(x, 32, model._forward_tile, memory, checkpoint_tiles=ckpt)
        (pooled.square().sum() + memory[-1].square().sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 100
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)
    assert grads[0]["layers.0.memory_tokens"].abs().sum() > 0


def test_tile_order_is_raster_and_deterministic(monkeypatch) -> None:
    model = _model(tile_size=32, memory_tokens=2)
    index = torch.arange(64 * 96, dtype=torch.float32).view(1, 1, 64, 96).expand(1, 3, 64, 96)
    x = index / 1e4  # each pixel tells its raster index
    seen = []
    forward_tile = model._forward_tile
    monkeypatch.setattr(model, "_forward_tile",
                        lambda crop, *a: (seen.append(round(crop[0, 0, 0, 0].item() * 1e4)), forward_tile(crop, *a))[1])
    out = model(x)
    assert seen == [0, 32, 64, 32 * 96, 32 * 96 + 32, 32 * 96 + 64]  # top-left pixels of the tiles, in order
    assert torch.equal(model(x), out)


def _swap_first_two_tiles(x: torch.Tensor) -> torch.Tensor:
    y = x.clone()
    y[..., :32, :32], y[..., :32, 32:64] = x[..., :32, 32:64], x[..., :32, :32]
    return y


def test_memory_makes_the_order_matter_and_independent_tiles_do_not() -> None:
    x = torch.randn(1, 3, 64, 64)
    independent = _model(tile_size=32)
    torch.testing.assert_close(independent(_swap_first_two_tiles(x)), independent(x), rtol=0, atol=1e-5)
    memory = _model(tile_size=32, memory_tokens=2)
    assert (memory(_swap_first_two_tiles(x)) - memory(x)).abs().max() > 1e-4


def test_state_lives_in_the_batch_not_the_module() -> None:
    """No state survives a forward: a resumed run (fresh module, same weights) and another batch
    before it give the same output; each image carries its own memory."""
    model = _model(tile_size=32, memory_tokens=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a, b = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    out_a = model(a)
    model(b)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    resumed = _copy(_model(tile_size=32, memory_tokens=2), model)
    torch.testing.assert_close(resumed(a), out_a, rtol=0, atol=0)
    torch.testing.assert_close(model(torch.cat([a, b]))[:1], out_a, rtol=0, atol=1e-5)


def test_forward_intermediates_refuses_tiles_clearly() -> None:
    with pytest.raises(ConfigError, match=r"model.tile_size=32.*model.memory_tokens=2.*tile_size=null"):
        _model(tile_size=32, memory_tokens=2).forward_intermediates(torch.randn(1, 3, 64, 64))


GLOBAL_KINDS = [k for k in attention_kinds() if attention_class(k).supports_global_tokens()]


@pytest.mark.parametrize("kind", GLOBAL_KINDS)
def test_every_kind_with_global_tokens_carries_memory(kind: str) -> None:
    """Each kind trains through the stream: the memory parameters get gradients and the memory
    changes the features (vs. the same weights as independent tiles)."""
    options = dict(sr_ratio=2, lsh_chunk=8, routed_topk=2)
    kw = dict(block_pattern=[kind], window_size=2, kernel_size=3,
              **{k: v for k, v in options.items() if k in attention_class(kind).options_class.keys()})
    torch.manual_seed(0)
    model = create_model("swin", size="pico", num_classes=3, img_size=64, tile_size=32, memory_tokens=2,
                         drop_path_rate=0.0, **kw)
    x = torch.randn(1, 3, 64, 64)
    model(x).sum().backward()
    assert model.layers[0].memory_tokens.grad.abs().sum() > 0
    assert model.layers[0].memory_position.weight.grad.abs().sum() > 0
    independent = _copy(create_model("swin", size="pico", num_classes=3, img_size=64, tile_size=32,
                                     drop_path_rate=0.0, **kw), model)
    with torch.no_grad():
        assert (model.forward_features(x)[..., :C_LAST] - independent.forward_features(x)).abs().max() > 1e-4


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(tile_size=48), r"model.tile_size=48 must be a multiple of the backbone's total stride 32"),
        (dict(tile_size=16), r"model.tile_size=16 must be null or an integer >= 32"),
        (dict(memory_tokens=-1), r"model.memory_tokens=-1 must be null or an integer >= 0"),
        (dict(memory_bptt=4), r"model.memory_bptt=4 has no effect without memory"),
        (dict(memory_tokens=2, memory_bptt=0), r"model.memory_bptt=0 must be null or an integer >= 1"),
    ],
)
def test_bad_tile_settings_name_the_key(overrides: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        create_model("swin_local", size="pico", **overrides)


def test_what_a_stream_keeps_for_backward_is_the_memory_not_the_tiles() -> None:
    """Outside the per-tile checkpoints, the graph keeps only the image, each tile's memory and a few
    small tensors: not any tile's activations (a sliced memory once kept each tile's last token map)."""
    model = _model(tile_size=64, memory_tokens=8).train()
    x = torch.randn(1, 3, 256, 256)
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    kept.pop(x.untyped_storage().data_ptr())
    memory_bytes = 8 * (32 + 64 + 128 + 256) * 4  # M tokens x the stage widths, float32, per tile
    assert sum(kept.values()) < 16 * 2 * memory_bytes, sum(kept.values())


def test_forward_dense_stitches_each_tiles_own_map_in_place() -> None:
    """Independent tiles: the dense map is every tile's last-stage map, computed alone, at the tile's
    place (96 x 64 px in 32 px tiles: 3 x 2 tiles of 1 x 1 tokens; a 40 px tile edge gives 2 tokens)."""
    torch.manual_seed(0)
    model = create_model("swin", size="pico", num_classes=3, img_size=64, tile_size=32, drop_path_rate=0.0).eval()
    x = torch.randn(2, 3, 96, 72)
    dense = model.forward_dense(x)
    assert dense.shape == (2, 3, 3, model.num_features)  # 72 px: tiles of 32, 32 and 8 px wide
    position = torch.zeros(0)
    for top, left, bottom, right in tile_boxes(96, 72, 32):
        alone, _ = model._tile_map(x[..., top:bottom, left:right], position)
        torch.testing.assert_close(dense[:, top // 32 : -(-bottom // 32), left // 32 : -(-right // 32)], alone)


def test_forward_dense_with_memory_knows_earlier_tiles_never_later_ones() -> None:
    """Tiles run in raster order: changing the last tile's pixels leaves the first tile's tokens as
    they were; changing the first tile's changes the last tile's tokens only through the memory."""
    torch.manual_seed(0)
    kw = dict(size="pico", num_classes=3, img_size=64, tile_size=32, drop_path_rate=0.0)
    memory = create_model("swin", memory_tokens=2, **kw).eval()
    alone = create_model("swin", **kw).eval()
    x = torch.randn(1, 3, 64, 64)
    later, earlier = x.clone(), x.clone()
    later[..., 32:, 32:] += 1.0  # the last of the 2 x 2 tiles
    earlier[..., :32, :32] += 1.0  # the first
    with torch.no_grad():
        base, m_later, m_earlier = (memory.forward_dense(v) for v in (x, later, earlier))
        a_base, a_earlier = alone.forward_dense(x), alone.forward_dense(earlier)
    assert base.shape == (1, 2, 2, memory.head_hidden_size)  # features + the tile's memory, per token
    torch.testing.assert_close(m_later[0, 0, 0], base[0, 0, 0])  # the first tile never sees the last
    assert not torch.allclose(m_later[0, 1, 1], base[0, 1, 1])
    assert (m_earlier[0, 1, 1] - base[0, 1, 1]).abs().max() > 1e-4  # the last tile hears of the first
    torch.testing.assert_close(a_earlier[0, 1, 1], a_base[0, 1, 1])  # independent tiles do not


def test_dense_targets_on_a_tiled_model_read_every_tiles_tokens() -> None:
    """The module's dense step on a tile stream: one logit per last-stage token of the stitched map."""
    cfg = cfg_with("data=shapes_far_dense", "data.image_size=64", "model.tile_size=32", "model.memory_tokens=2")
    module = instantiate(cfg.module).eval()
    images, targets = torch.randn(2, 3, 64, 64), torch.tensor([[[0, -1], [1, 1]], [[-1, 0], [-1, -1]]])
    logits, labels, per_image = module._dense_step(images, targets)
    dense = module.model.head.fc(module.model.forward_dense(images))
    torch.testing.assert_close(logits, torch.stack([dense[0, 0, 0], dense[0, 1, 0], dense[0, 1, 1], dense[1, 0, 1]]))
    assert labels.tolist() == [0, 1, 1, 0] and per_image.shape == (2,)
