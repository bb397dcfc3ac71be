"""Backbone family: timm interoperability, any resolution, timm-style surface, checkpoints."""
from __future__ import annotations

import re

import pytest
import timm
import torch
from helpers import cfg_with
from hydra.utils import instantiate
from timm.models.swin_transformer import SwinTransformer

import vision_attn as va
from vision_attn.errors import ConfigError
from vision_attn.summary import summarize
from vision_attn.timm_models import NAMES, timm_name


def tiny_timm_swin(img: int | tuple[int, int] = 64, window: int | tuple[int, int] = 4, classes: int = 7
                   ) -> SwinTransformer:
    torch.manual_seed(0)
    model = SwinTransformer(
        img_size=img, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=window, num_classes=classes
    )
    for name, p in model.named_parameters():  # make the bias tables and the head matter
        if "relative_position_bias_table" in name:
            torch.nn.init.normal_(p, std=0.5)
    return model.eval()


@pytest.mark.parametrize(
    "build,img",
    [
        (lambda: tiny_timm_swin(64, 4), (64, 64)),
        (lambda: tiny_timm_swin(128, 8), (128, 128)),  # stage maps 32,16,8,4: last stage shrinks to 4
        (lambda: tiny_timm_swin(96, 6), (96, 96)),
        (lambda: timm.create_model("swin_tiny_patch4_window7_224", num_classes=10), (224, 224)),
        (lambda: timm.create_model("swin_tiny_patch4_window7_224", img_size=112, num_classes=3), (112, 112)),
        # Non-square image and window: maps 40x56 .. 5x7, all multiples of the 5 x 7 window.
        (lambda: tiny_timm_swin((160, 224), (5, 7), classes=10), (160, 224)),
        # 5 x 5 windows on 40x56 .. 5x7 maps: padded (timm's padding semantics), last stage (5, 5).
        (lambda: tiny_timm_swin((160, 224), 5, classes=10), (160, 224)),
        # timm shrinks 7 x 7 to the 5-row map of the last stage: a (5, 7) window there.
        (lambda: timm.create_model("swin_tiny_patch4_window7_224", img_size=(160, 224), embed_dim=16,
                                   depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4), num_classes=10), (160, 224)),
    ],
)
def test_from_timm_gives_identical_outputs(build, img):
    theirs = build().eval()
    ours = va.from_timm(theirs).eval()
    x = torch.randn(2, 3, *img)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() <= 1e-4
        torch.testing.assert_close(ours.forward_features(x), theirs.forward_features(x), atol=1e-4, rtol=0)
    gx = [torch.autograd.grad(m(x).square().sum(), m.patch_embed.proj.weight)[0] for m in (ours, theirs)]
    torch.testing.assert_close(gx[0], gx[1], atol=1e-4, rtol=1e-4)


def test_from_timm_pads_like_timm_and_masked_padding_differs():
    """5 x 5 windows on maps that are not multiples of 5: timm attends its zero-padded keys."""
    theirs = tiny_timm_swin((160, 224), 5, classes=10)
    ours = va.from_timm(theirs).eval()
    assert {b.attn.padding for stage in ours.layers for b in stage.blocks} == {"timm"}
    masked = va.from_timm(theirs).eval()
    for stage in masked.layers:
        for block in stage.blocks:
            block.attn.padding = "mask"  # our default semantics, same weights
    x = torch.randn(2, 3, 160, 224)
    with torch.no_grad():
        assert (ours.forward_features(x) - theirs.forward_features(x)).abs().max() <= 1e-4
        assert (masked.forward_features(x) - theirs.forward_features(x)).abs().max() > 1e-2


def test_from_timm_refuses_always_partition_on_maps_no_larger_than_the_window():
    theirs = SwinTransformer(img_size=64, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4,
                             always_partition=True)
    with pytest.raises(ValueError, match="stage 2: timm's always_partition=True"):
        va.from_timm(theirs)


def test_every_variant_and_size_is_in_timm_registry():
    names = set(timm.list_models(f"{va.timm_models.PREFIX}*"))
    assert names == set(NAMES) and len(NAMES) == len(va.VARIANTS) * len(va.SIZES)
    model = timm.create_model(timm_name("swin", "pico"), num_classes=5, img_size=64)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    cfg = timm.data.resolve_model_data_config(model)
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.9 and cfg["interpolation"] == "bicubic"


def test_features_only_gives_multiscale_maps():
    model = timm.create_model(timm_name("swin", "pico"), features_only=True, img_size=64)
    maps = model(torch.randn(2, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(2, 32, 16, 16), (2, 64, 8, 8), (2, 128, 4, 4), (2, 256, 2, 2)]
    assert model.feature_info.reduction() == [4, 8, 16, 32]


@pytest.mark.parametrize("variant", sorted(va.VARIANTS))
@pytest.mark.parametrize("hw", [(50, 70), (65, 47), (32, 32)])
def test_any_input_resolution(variant, hw):
    model = va.create_model(variant, "pico", num_classes=3, img_size=64).eval()
    x = torch.randn(2, 3, *hw)
    assert model(x).shape == (2, 3)
    h, w = -(-hw[0] // 4), -(-hw[1] // 4)
    shapes = []
    for _ in range(4):
        shapes.append((h, w))
        h, w = -(-h // 2), -(-w // 2)
    maps = model.forward_intermediates(x, intermediates_only=True)
    assert [tuple(m.shape[-2:]) for m in maps] == shapes


def test_bias_tables_resize_with_timms_helper_when_loading_a_different_window():
    from timm.layers import resize_rel_pos_bias_table

    small = va.create_model("swin", "pico", num_classes=4, img_size=64, window_size=4)
    table = small.layers[0].blocks[1].attn.relative_position_bias_table.detach()  # (49, 1)
    large = va.create_model("swin", "pico", num_classes=4, img_size=64, window_size=6)
    large.load_state_dict(small.state_dict(), strict=True)
    got = large.layers[0].blocks[1].attn.relative_position_bias_table.detach()
    torch.testing.assert_close(got, resize_rel_pos_bias_table(table, (6, 6), (121, 1)), rtol=0, atol=0)
    assert large(torch.randn(1, 3, 64, 64)).shape == (1, 4)


def test_bias_tables_resize_to_rectangular_windows_when_loading():
    square = va.create_model("swin", "pico", num_classes=4, img_size=(40, 56), window_size=7)
    rect = va.create_model("swin", "pico", num_classes=4, img_size=(40, 56), window_size=[[5, 7]])
    rect.load_state_dict(square.state_dict(), strict=True)
    table = square.layers[0].blocks[1].attn.relative_position_bias_table.detach()
    got = rect.layers[0].blocks[1].attn.relative_position_bias_table.detach()
    assert got.shape == (9 * 13, 1)
    torch.testing.assert_close(got, va.attention.resize_bias_table(table, (5, 7)))
    assert rect(torch.randn(1, 3, 40, 56)).shape == (1, 4)


@pytest.mark.parametrize(
    "window,windows",
    [
        (5, [5, 5, 5, 5]),
        ([[5, 7]], [(5, 7)] * 4),  # one entry serves every stage
        ([[5, 7], [5, 7], 7, [3, 3]], [(5, 7), (5, 7), 7, 3]),  # per stage; square pairs are ints
        ((6, 6, 6, (2, 4)), [6, 6, 6, (2, 4)]),
    ],
)
def test_window_size_int_pair_or_one_per_stage(window, windows):
    model = va.create_model("swin", "pico", num_classes=2, img_size=(40, 56), window_size=window, drop_path_rate=0.0)
    got = [stage.blocks[1].attn.window_size for stage in model.layers]
    assert got == [w if isinstance(w, tuple) else (w, w) for w in windows]
    shifts = [stage.blocks[1].attn.shift_size for stage in model.layers]
    assert shifts == [(h // 2, w // 2) for h, w in got]  # timm's rule, per axis
    assert model(torch.randn(1, 3, 40, 56)).shape == (1, 2)


@pytest.mark.parametrize(
    "variant,overrides,match",
    [
        ("swin", dict(window_size=[5, 7]), r"model\.window_size=\[5, 7\].*\[\[5,7\]\]"),  # bare pair: 2 of 4 stages
        ("swin", dict(window_size=[[5, 7, 1]]), r"model\.window_size"),
        ("swin", dict(window_size=[[0, 7]]), r"model\.window_size"),
        ("swin", dict(window_size=[[5, 7]] * 3), r"model\.window_size.*one entry per stage \(4\)"),
        ("swin", dict(window_size=True), r"model\.window_size"),
        ("maxvit_like", dict(window_size=[[5, 7]]), r"model\.window_size=.*\['grid'\]"),
        ("swin_global", dict(window_size=[7, 7, (5, 7), 7]), r"model\.window_size=.*\['global'\]"),
        ("swin", dict(window_padding="zeros"), r"model\.window_padding='zeros'.*'mask'.*'timm'"),
    ],
)
def test_bad_window_configs_are_config_errors_naming_the_key(variant, overrides, match):
    with pytest.raises(ConfigError, match=match):
        va.create_model(variant, "pico", num_classes=2, img_size=32, **overrides)


def test_a_bare_pair_is_per_stage_on_a_two_stage_model():
    model = va.create_model("swin", "pico", num_classes=2, img_size=64, depths=[2, 2], num_heads=[1, 2],
                            window_size=[4, 2])
    assert [stage.blocks[0].attn.window_size for stage in model.layers] == [(4, 4), (2, 2)]


def test_pretrained_from_a_local_state_dict(tmp_path):
    theirs = tiny_timm_swin(64, 4, classes=7)
    path = tmp_path / "swin.pth"
    torch.save(theirs.state_dict(), path)
    # timm shrank the last stage's window to its 2x2 map: give ours the same per-stage windows.
    kw = dict(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=[4, 4, 4, 2])
    same = va.create_model("swin", "pico", num_classes=7, img_size=64, pretrained=str(path), **kw).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (same(x) - theirs(x)).abs().max() <= 1e-5
    # Fine-tuning: another class count keeps a fresh head, a bigger window resizes the tables.
    ft = va.create_model("swin", "pico", num_classes=3, img_size=64, pretrained=str(path), **{**kw, "window_size": 8})
    torch.testing.assert_close(ft.patch_embed.proj.weight, theirs.patch_embed.proj.weight)
    assert ft.layers[0].blocks[0].attn.relative_position_bias_table.shape == (15 * 15, 1)
    assert ft.head.fc.out_features == 3


def microsoft_layout(model: SwinTransformer) -> dict:
    """``model``'s weights as the original Microsoft Swin repository saves them: downsample at the
    end of a stage, ``head.*`` (not ``head.fc.*``), the index and mask buffers, under "model"."""
    state = {}
    for key, value in model.state_dict().items():
        stage = re.match(r"layers\.(\d+)\.downsample\.(.*)", key)
        key = f"layers.{int(stage[1]) - 1}.downsample.{stage[2]}" if stage else key.replace("head.fc.", "head.")
        state[key] = value
    for name, module in model.named_modules():
        for buffer in ("relative_position_index", "attn_mask"):
            if getattr(module, buffer, None) is not None:
                state[f"{name}.{buffer}"] = getattr(module, buffer)
    return {"model": state}


PICO_64 = dict(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=[4, 4, 4, 2])


def test_a_checkpoint_in_the_microsoft_layout_loads_and_gives_timms_outputs(tmp_path):
    """The original repository's layout (downsample at a stage's end, head.*, index / mask buffers,
    under "model") loads through timm's checkpoint_filter_fn, by create_model and by model.pretrained."""
    theirs = tiny_timm_swin(64, 4, classes=7).eval()
    path = tmp_path / "swin_ms.pth"
    torch.save(microsoft_layout(theirs), path)
    ours = va.create_model("swin", "pico", num_classes=7, img_size=64, pretrained=str(path), **PICO_64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() <= 1e-4
    cfg = cfg_with("model.pretrained=" + str(path), "model.embed_dim=16", "model.depths=[2,2,2,2]",
                   "model.num_heads=[1,2,2,4]", "model.window_size=[4,4,4,2]", "data.image_size=64")
    module = instantiate(cfg.module)  # 8 classes: the checkpoint's 7-class head is left out, the rest loads
    with torch.no_grad():
        assert (module.model.eval().forward_features(x) - theirs.forward_features(x)).abs().max() <= 1e-4


def test_a_microsoft_layout_checkpoint_of_another_width_is_a_config_error_naming_the_keys(tmp_path):
    path = tmp_path / "swin_ms.pth"
    torch.save(microsoft_layout(tiny_timm_swin(64, 4, classes=7)), path)
    with pytest.raises(ConfigError) as info:
        va.create_model("swin", "pico", num_classes=7, img_size=64, pretrained=str(path),
                        **{**PICO_64, "embed_dim": 32})
    message = str(info.value)
    assert message.startswith(f"model.pretrained={path}: the checkpoint does not fit this model: ")
    assert "with another shape: patch_embed.proj.weight 16x3x4x4 (model 32x3x4x4)" in message


def test_bias_tables_resize_as_timms_own_loading_does(tmp_path):
    """A checkpoint trained at window 4, fine-tuned at window 8: timm's loading of the file
    (checkpoint_filter_fn -> resize_rel_pos_bias_table) and ours give the same tables and outputs."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    path = tmp_path / "w4.pth"
    torch.save(tiny_timm_swin(64, 4, classes=7).state_dict(), path)
    theirs = tiny_timm_swin(64, 8, classes=7).eval()
    theirs.load_state_dict(checkpoint_filter_fn(torch.load(path), theirs), strict=False)
    kw = {**PICO_64, "window_size": [8, 8, 4, 2]}  # timm shrinks the window to each stage's map
    ours = va.create_model("swin", "pico", num_classes=7, img_size=64, pretrained=str(path), **kw).eval()
    for i in range(4):
        a = ours.layers[i].blocks[0].attn.relative_position_bias_table
        b = theirs.layers[i].blocks[0].attn.relative_position_bias_table
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() <= 1e-5


def test_to_timm_is_the_inverse_of_from_timm():
    theirs = tiny_timm_swin(64, 4, classes=7).eval()
    ours = va.from_timm(theirs)
    back = va.to_timm(ours).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(back(x), theirs(x), rtol=0, atol=0)
    assert back.state_dict().keys() == theirs.state_dict().keys()
    native = va.create_model("swin", "pico", num_classes=5, img_size=224, window_padding="timm").eval()  # ours, to timm
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (va.to_timm(native).eval()(x) - native(x)).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="to_timm needs a Swin"):
        va.to_timm(va.create_model("swin_local", "pico", num_classes=5))
    with pytest.raises(ValueError, match=r"pad their maps to the window.*window_padding='timm'"):
        va.to_timm(va.create_model("swin", "pico", num_classes=5, img_size=224))  # masked padding differs from timm


def test_a_checkpoint_of_another_width_is_a_config_error_listing_shapes(tmp_path):
    path = tmp_path / "narrow.pth"
    torch.save(va.create_model("swin", "pico", num_classes=7, img_size=64, **PICO_64).state_dict(), path)
    with pytest.raises(ConfigError) as info:
        va.create_model("swin", "pico", num_classes=7, img_size=64, pretrained=str(path),
                        **{**PICO_64, "embed_dim": 32})
    message = str(info.value)
    assert f"model.pretrained={path}: the checkpoint does not fit this model: " in message
    assert "with another shape: patch_embed.proj.weight 16x3x4x4 (model 32x3x4x4)" in message
    assert "missing" not in message and "unexpected" not in message and "Microsoft" not in message
    assert "more)" in message  # a few listed, the rest counted


def test_pretrained_unknown_name_is_a_config_error():
    with pytest.raises(ConfigError, match="model.pretrained='no_such_model'"):
        va.create_model("swin", "pico", num_classes=3, img_size=32, pretrained="no_such_model")


def test_timm_surface_no_weight_decay_and_grad_checkpointing():
    model = va.create_model("swin", "pico", num_classes=3, img_size=32, drop_path_rate=0.0)
    tables = {n for n, _ in model.named_parameters() if n.endswith("relative_position_bias_table")}
    assert tables and model.no_weight_decay() == tables
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    g_ref = torch.autograd.grad(ref.sum(), model.patch_embed.proj.weight)[0]
    model.set_grad_checkpointing(True)
    assert all(stage.grad_checkpointing for stage in model.layers)
    out = model(x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), model.patch_embed.proj.weight)[0], g_ref)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, model.num_features)
    assert model.pretrained_cfg["classifier"] == "head.fc" and model.pretrained_cfg["input_size"] == (3, 32, 32)
    assert timm.data.resolve_model_data_config(model)["input_size"] == (3, 32, 32)


def test_swin_tiny_matches_the_paper_shapes():
    ours = va.create_model("swin", "tiny", num_classes=1000)
    theirs = timm.create_model("swin_tiny_patch4_window7_224")
    s = summarize(ours, 224)
    assert s.params == sum(p.numel() for p in theirs.parameters()) == 28_288_354
    assert s.gflops == pytest.approx(4.49, abs=0.01)  # the paper's 4.5G



@pytest.mark.parametrize("with_mask", [False, True])
def test_flop_counter_counts_the_cpu_fused_sdpa_like_its_math_path(with_mask: bool):
    """vision_attn.summary registers the CPU fused SDPA op with torch's flop counter (forward and backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v = (torch.randn(2, 3, 16, 8, requires_grad=True) for _ in range(3))
    mask = torch.randn(1, 3, 16, 16) if with_mask else None

    def count(backend: SDPBackend) -> dict:
        with sdpa_kernel(backend), FlopCounterMode(display=False) as counter:
            torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
        return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}

    gemm = 2 * 2 * 3 * 16 * 16 * 8  # one (B, heads, 16x8 @ 8x16) batched matmul
    fused, math = count(SDPBackend.FLASH_ATTENTION), count(SDPBackend.MATH)
    assert fused["aten._scaled_dot_product_flash_attention_for_cpu"] == 2 * gemm  # q k^T, p v
    # backward: dv, dp, dq, dk and the recomputed q k^T (the fused kernel keeps no score matrix)
    assert fused["aten._scaled_dot_product_flash_attention_for_cpu_backward"] == 5 * gemm
    assert sum(math.values()) == 6 * gemm  # the math path keeps its scores: 2 + 4

def test_layer_scale_and_conv_stem_options():
    model = va.create_model("swin", "pico", num_classes=3, img_size=32, layer_scale_init_value=1e-5, stem="conv",
                            downsample="conv")
    block = model.layers[1].blocks[0]
    assert torch.all(block.ls1.gamma == 1e-5)
    assert type(model.patch_embed).__name__ == "ConvTokenizer"
    assert type(model.layers[1].downsample).__name__ == "ConvDownsample"
    assert model(torch.randn(1, 3, 37, 45)).shape == (1, 3)


def test_pretrained_file_with_pickled_objects_is_refused_naming_it(tmp_path):
    """``model.pretrained=<file>`` loads like every checkpoint: weights_only=True, a clear error."""
    import argparse

    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(ConfigError, match=f"checkpoint {path} cannot be loaded with weights_only=True"):
        va.create_model("swin", "pico", num_classes=3, img_size=32, pretrained=str(path))


@pytest.mark.parametrize(
    "variant, kw, expected",
    [
        ("swin", {}, ["48x48 tokens: window 4 (16 px) / shifted window 4 (16 px)",
                      "24x24 tokens: window 4 (32 px) / shifted window 4 (32 px)",
                      "12x12 tokens: window 4 (64 px) / shifted window 4 (64 px)",
                      "6x6 tokens: window 4 (128 px) / shifted window 4 (128 px)"]),
        # swin_dilated cycles neighborhood (dilation ignored) and dilated blocks; 5 * 2 <= 24 fits.
        ("swin_dilated", dict(dilations=[[1, 2], [2], [1], [1]]),
         ["48x48 tokens: kernel 5 (20 px) / kernel 5 d2 (36 px)",
          "24x24 tokens: kernel 5 (40 px) / kernel 5 d2 (72 px)",
          "12x12 tokens: kernel 5 (80 px)", "6x6 tokens: kernel 5 (160 px)"]),
        ("maxvit_like", dict(global_tokens=2),
         ["48x48 tokens: window 4 (16 px) / grid 4 (sparse, whole map) + 2 global tokens"]),
        ("swin_global", {}, ["48x48 tokens: global"]),
        ("swin_sr", {}, ["48x48 tokens: global, keys pooled 8x8"]),
    ],
)
def test_stage_reach_by_hand(variant, kw, expected):
    model = va.create_model(variant, size="pico", img_size=192, **kw)
    assert model.stage_reach(192)[: len(expected)] == expected


def test_stage_reach_shrinks_to_the_map():
    model = va.create_model("swin_local", size="pico", img_size=32)
    assert model.stage_reach(32) == ["8x8 tokens: kernel 5 (20 px)", "4x4 tokens: global (kernel >= map)",
                                     "2x2 tokens: global (kernel >= map)", "1x1 tokens: global (kernel >= map)"]
    assert va.create_model("swin", size="pico", img_size=16).stage_reach(16)[0] == "4x4 tokens: global (window >= map)"
