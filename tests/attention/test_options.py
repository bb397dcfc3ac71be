"""Each attention kind owns its options (vision_attn/attention/options.py): flat config keys map onto
the kind's dataclass, the backbone passes them through, validation names the key."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import yaml
from conftest import ROOT
from helpers import cfg_with
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

import vision_attn as va
from vision_attn.attention import AttnSpec, KindOptions, attention_class, option, option_keys, registry
from vision_attn.attention.global_attn import GlobalAttention
from vision_attn.attention.lsh import LSHOptions
from vision_attn.backbone import VisionAttnTransformer
from vision_attn.errors import ConfigError
from vision_attn.variants import VARIANTS

# Options each kind has at least, as the config names them, by hand (a kind may add more in its own module).
KIND_KEYS = {
    "window": {"window_padding"},
    "shifted_window": {"window_padding"},
    "lsh": {"lsh_chunk", "lsh_buckets", "lsh_hashes"},
    "spatial_reduction": {"sr_ratio"},
    "routed": {"routed_topk"},
}


def test_each_kind_registers_its_options_and_the_keys_do_not_overlap():
    for kind in ("neighborhood", "dilated", "grid", "global"):
        assert attention_class(kind).options_class.keys() == {}, kind
    for kind, keys in KIND_KEYS.items():
        assert keys <= set(attention_class(kind).options_class.keys()), kind
    assert attention_class("window").options_class is attention_class("shifted_window").options_class
    classes = {attention_class(kind).options_class for kind in KIND_KEYS}
    assert len(option_keys()) == len(set(option_keys())) == sum(len(o.keys()) for o in classes)


def test_flat_keys_reach_each_stages_blocks_per_stage():
    model = va.create_model("swin_lsh", "pico", num_classes=2, img_size=64, lsh_chunk=[8, 16, 32, 64],
                            lsh_hashes=2, lsh_buckets=4)
    for i, stage in enumerate(model.layers):
        for block in stage.blocks:
            assert (block.attn.chunk, block.attn.n_hashes, block.attn.buckets) == ([8, 16, 32, 64][i], 2, 4)
    model = va.create_model("swin_sr", "pico", num_classes=2, img_size=64)  # the variant's default [8, 4, 2, 1]
    assert [st.blocks[0].attn.sr_ratio for st in model.layers] == [8, 4, 2, 1]
    model = va.create_model("swin", "pico", num_classes=2, img_size=64, window_padding="timm")
    assert {b.attn.padding for st in model.layers for b in st.blocks} == {"timm"}


def test_attnspec_of_takes_flat_keys_and_stays_hashable():
    spec = AttnSpec.of(window_size=4, lsh_chunk=16, qkv_bias=False)
    assert (spec.window_size, spec.qkv_bias, dict(spec.options)) == (4, False, {"lsh_chunk": 16})
    assert LSHOptions.from_config(spec.options) == LSHOptions(chunk=16, buckets=0, hashes=1)
    assert hash(spec) == hash(AttnSpec.of(window_size=4, lsh_chunk=32, qkv_bias=False))  # options not hashed
    with pytest.raises(TypeError, match=r"unknown keys \['lsh_chunks'\]"):
        AttnSpec.of(lsh_chunks=16)


def test_the_backbone_rejects_a_key_no_kind_owns():
    with pytest.raises(TypeError, match=r"unknown arguments \['lsh_chunks'\].*lsh_chunk"):
        VisionAttnTransformer(img_size=32, embed_dim=8, depths=[1], num_heads=[1], lsh_chunks=8)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(lsh_chunk=[8, 16]), r"model\.lsh_chunk=\[8, 16\] must be a positive integer or one per stage \(4\)"),
        (dict(lsh_hashes=[1, 1, 1, 1]), r"model\.lsh_hashes=\[1, 1, 1, 1\] must be a positive integer$"),
        (dict(sr_ratio=[8, 4, 0, 1]), r"model\.sr_ratio\[2\]=0 must be a positive integer \(or one per stage\)"),
        (dict(lsh_buckets=-2), r"model\.lsh_buckets=-2 must be 0 \(auto"),
        (dict(window_padding="zeros"), r"model\.window_padding='zeros': choose 'mask' \(.*\) or 'timm'"),
    ],
)
def test_each_kind_validates_its_keys_before_building(overrides, message):
    with pytest.raises(ConfigError, match=message):
        va.create_model("swin", "pico", **overrides)


def test_a_kinds_option_on_a_model_without_that_kind_is_refused():
    """It would do nothing: the error names the key, its kind and the variants that have it."""
    with pytest.raises(ConfigError, match=r"model\.lsh_chunk=8 is an option of the lsh attention, which this "
                                          r"model's block pattern \['window', 'shifted_window'\] does not use.*"
                                          r"\(model=swin_lsh\)"):
        va.create_model("swin", "pico", lsh_chunk=8)
    with pytest.raises(ConfigError, match=r"model\.window_padding=timm .* \['neighborhood'\].*model=swin,"):
        va.create_model("swin_local", "pico", window_padding="timm")
    # None is the config's "not set": every variant's yaml may carry the window kinds' key as null
    assert va.create_model("swin_local", "pico", window_padding=None, sr_ratio=None).layers[0].blocks[0].attn.kind \
        == "neighborhood"


def _yaml_keys(variant: str) -> set[str]:
    return set(yaml.safe_load((ROOT / "conf" / "model" / f"{variant}.yaml").read_text())) - {"defaults"}


def test_a_kinds_keys_live_in_the_yaml_of_the_variant_that_uses_it():
    base = _yaml_keys("swin")
    assert {"window_padding"} <= base and not {"lsh_chunk", "sr_ratio", "routed_topk"} & base
    for variant, kind in (("swin_lsh", "lsh"), ("swin_sr", "spatial_reduction"), ("swin_routed", "routed")):
        assert _yaml_keys(variant) - {"variant"} == set(attention_class(kind).options_class.keys()), variant
        assert VARIANTS[variant]["block_pattern"] == [kind]
    cfg = cfg_with("model=swin_lsh", "model.lsh_chunk=8", "data.image_size=32")
    with pytest.raises(ConfigCompositionException, match="lsh_chunk"):
        cfg_with("model=swin", "model.lsh_chunk=8")
    assert {b.attn.chunk for st in instantiate(cfg.module).model.layers for b in st.blocks} == {8}


@dataclass(frozen=True)
class TemperatureOptions(KindOptions):
    temperature: int = option("test_temperature", 1, minimum=1, per_stage=True)


@pytest.fixture
def tempered_kind(monkeypatch):
    """A kind defined here, with an option of its own; the registry is restored afterwards."""
    monkeypatch.setattr(registry, "_ATTENTION", dict(registry._ATTENTION))  # test seam: no unregister API

    @registry.register_attention("test_tempered", options=TemperatureOptions)
    class TemperedAttention(GlobalAttention):
        def __init__(self, dim, num_heads, spec):
            super().__init__(dim, num_heads, spec)
            self.temperature = TemperatureOptions.from_config(spec.options).temperature
            self.scale = self.scale / self.temperature

    return TemperedAttention


def test_a_new_kind_and_its_option_need_no_change_to_backbone_or_variants(tempered_kind):
    model = va.create_model("swin_global", "pico", num_classes=2, img_size=32, block_pattern=["test_tempered"],
                            test_temperature=[1, 2, 3, 4])
    assert [type(st.blocks[0].attn) for st in model.layers] == [tempered_kind] * 4
    assert [st.blocks[0].attn.temperature for st in model.layers] == [1, 2, 3, 4]
    head_dim = model.layers[1].blocks[0].attn.head_dim
    assert model.layers[1].blocks[0].attn.scale == pytest.approx(head_dim**-0.5 / 2)
    with pytest.raises(ConfigError, match=r"model\.test_temperature=0 must be a positive integer"):
        va.create_model("swin_global", "pico", block_pattern=["test_tempered"], test_temperature=0)

    @dataclass(frozen=True)
    class Clash(KindOptions):
        t: int = option("test_temperature", 1)

    with pytest.raises(ValueError, match=r"option keys \['test_temperature'\] belong to another kind"):
        registry.register_attention("test_clash", options=Clash)(type("Other", (GlobalAttention,), {}))
