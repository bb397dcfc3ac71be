"""The route chooser (vision_attn/attention/backends.py): every route registered, the config key,
the environment default, forcing, errors naming the key, and each stage's route recorded."""
from __future__ import annotations

import pytest
import torch
from helpers import cfg_with
from hydra.utils import instantiate

from vision_attn import create_model
from vision_attn.attention import backends
from vision_attn.errors import ConfigError
from vision_attn.variants import VARIANTS


def test_every_route_is_registered_with_its_family() -> None:
    assert backends.routes("window") == ["sdpa", "sdpa_5d", "sdpa_heads", "per_head"]
    assert backends.routes("neighborhood") == ["fused", "tiled", "flex", "natten"]
    assert all(r.doc and callable(r.refuses) for r in backends.ROUTES.values())


def test_parse_a_setting_into_one_route_per_family() -> None:
    assert backends.parse(None) == {} and backends.parse("auto") == {} and backends.parse(" AUTO ") == {}
    assert backends.parse("per_head,tiled") == {"window": "per_head", "neighborhood": "tiled"}
    with pytest.raises(ConfigError, match=r"model\.attn_backend='cudnn': unknown route 'cudnn'; choose auto or"):
        backends.parse("cudnn")
    with pytest.raises(ConfigError, match=r"two routes for the window family \(sdpa, per_head\)"):
        backends.parse("sdpa,per_head")


def test_a_model_refuses_a_route_for_attention_it_does_not_have() -> None:
    with pytest.raises(ConfigError, match=r"model\.attn_backend='flex': route 'flex' is for neighborhood attention, "
                                          r"which this model does not use \(its attention: window\)"):
        create_model("swin", size="pico", num_classes=10, attn_backend="flex")
    create_model("maxvit_like", size="pico", num_classes=10, attn_backend="sdpa_heads")  # has window blocks


def test_the_config_key_reaches_every_stage(monkeypatch) -> None:
    """``model.attn_backend`` from the command line forces the route of every stage's kinds."""
    cfg = cfg_with("model=swin_dilated", "model.attn_backend=tiled", "data.image_size=64")
    model = instantiate(cfg.module).model
    assert set(model.stage_routes(64)) == {"neighborhood: tiled / dilated: tiled"}
    assert {b.attn.attn_backend for st in model.layers for b in st.blocks} == {"tiled"}


def test_the_environment_sets_the_default_and_force_wins(monkeypatch) -> None:
    model = create_model("swin", size="pico", num_classes=10)
    monkeypatch.setenv(backends.ENV, "sdpa_heads")
    assert model.stage_routes(64, batch=64)[0] == "window: sdpa_heads / shifted_window: sdpa_heads"
    with backends.force("per_head"):
        assert model.stage_routes(64, batch=64)[0] == "window: per_head / shifted_window: per_head"
    forced = create_model("swin", size="pico", num_classes=10, attn_backend="sdpa_5d")
    assert forced.stage_routes(64, batch=64)[0] == "window: sdpa_5d / shifted_window: sdpa_5d"  # the key over $ENV


def test_a_route_that_cannot_serve_the_call_names_the_key_and_the_reason() -> None:
    model = create_model("swin_local", size="pico", num_classes=10, attn_backend="natten")
    with pytest.raises(ConfigError, match=r"model\.attn_backend=natten: route 'natten' cannot serve this neighborhood "
                                          r"call on cpu .*NATTEN is not installed"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ConfigError, match=r"model\.attn_backend=per_head: .* it has no attention dropout"):
        backends.choose(backends.Call("window", "cpu", torch.float32, True, True, True, dropout=True), "per_head")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_reports_a_route_per_stage(variant: str) -> None:
    """CPU training routes: fused neighborhood kernel, the per-head or SDPA window routes; kinds
    without a choice name their one kernel."""
    model = create_model(variant, size="pico", num_classes=10)
    routes = model.stage_routes(224, batch=64)
    assert len(routes) == len(model.layers) and all(routes)
    for stage in routes:
        for part in stage.split(" / "):
            kind, route = part.split(": ")
            assert route in backends.ROUTES or route in ("sdpa", "tiled", "sorted chunks", "gathered regions",
                                                         "explicit softmax (log-sum-exp)"), (variant, part)
    if variant == "swin":
        assert routes[0] == "window: per_head / shifted_window: per_head"  # 64 x 64 windows >= 128
    if variant == "swin_local" and backends.ROUTES["fused"].refuses(backends.Call("neighborhood", "cpu",
                                                                                torch.float32)) is None:
        assert routes[0] == "neighborhood: fused"
