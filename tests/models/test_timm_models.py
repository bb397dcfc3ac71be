"""Our registered models held to what timm's own ``tests/test_models.py`` checks of its models
(default cfgs, forward_intermediates, fx forward / backward, TorchScript), plus ``torch.export`` and
torchvision's feature extractor. timm's test file is not in its wheel: these re-check its assertions.
Three pico models that cover every code path a model can take here (window + shifted window,
neighborhood + dilated, global tokens) run in the fast suite; every other name under ``slow``."""
from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.models import FeatureInfo
from timm.models._features_fx import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import vision_attn.timm_models  # noqa: F401  (registers the va_* names)
from vision_attn.variants import VARIANTS

NAMES = timm.list_models("va_*")
FAST = ("va_swin_pico", "va_swin_dilated_pico", "va_swin_global_tokens_pico")
ALL = [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in NAMES]
FAST_EXPORT = ("swin_dilated",)
FX_SIZE = 128  # timm's TARGET_FWD_FX_SIZE / TARGET_BWD_FX_SIZE
FEAT_SIZE = 96  # timm's TARGET_FFEAT_SIZE
TRACER = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
              param_shapes_constant=True)


def test_every_variant_and_size_is_registered() -> None:
    assert len(NAMES) == len(VARIANTS) * 5 and "va_swin_local_tiny" in NAMES


@pytest.mark.parametrize("name", ALL)
def test_default_cfg(name: str) -> None:
    """timm's test_model_default_cfgs: unpooled features match pool_size and num_features; the
    pooled output after reset_classifier(0) is head_hidden_size wide; without pooling 4-D; the
    classifier and first conv named in the cfg exist."""
    model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    assert model.output_fmt == "NHWC"
    x = torch.randn(1, *cfg["input_size"])
    with torch.no_grad():
        features = model.forward_features(x)
        pre = model.forward_head(features, pre_logits=True)
        assert tuple(features.shape[1:3]) == cfg["pool_size"] and features.shape[3] == model.num_features
        assert pre.shape[1] == model.head_hidden_size
        model.reset_classifier(0)
        pooled = model(x)
        assert pooled.shape == pre.shape == (1, model.head_hidden_size)
        model.reset_classifier(0, "")
        unpooled = model(x)
        assert unpooled.dim() == 4 and tuple(unpooled.shape[1:3]) == cfg["pool_size"]
    state = timm.create_model(name).state_dict()
    assert cfg["classifier"] + ".weight" in state and cfg["first_conv"] + ".weight" in state


@pytest.mark.parametrize("name", ALL)
def test_forward_intermediates(name: str) -> None:
    """timm's test_model_forward_intermediates: one map per feature_info entry, its channels and
    reduction; the final output equals forward_features; grad checkpointing changes nothing."""
    model = timm.create_model(name).eval()
    info = FeatureInfo(model.feature_info, list(range(len(model.feature_info))))
    x = torch.randn(2, 3, FEAT_SIZE, FEAT_SIZE)
    with torch.no_grad():
        out, maps = model.forward_intermediates(x, output_fmt="NHWC")
        assert len(maps) == len(info.channels()) >= 3
        for c, r, m in zip(info.channels(), info.reduction(), maps):
            assert m.shape[3] == c and m.shape[0] == 2
            assert m.shape[1] <= math.ceil(FEAT_SIZE / r) and m.shape[2] <= math.ceil(FEAT_SIZE / r)
            assert not torch.isnan(m).any()
        assert torch.allclose(out, model.forward_features(x))
        model.set_grad_checkpointing()
        again, _ = model.forward_intermediates(x, output_fmt="NHWC")
    assert torch.allclose(out, again, rtol=1e-4, atol=1e-5)


def _fx_model(model: torch.nn.Module, train: bool = False) -> torch.nn.Module:
    """timm's _create_fx_model: trace with its notrace registry, return the last node."""
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=TRACER)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=TRACER)


@pytest.mark.parametrize("name", ALL)
def test_forward_fx(name: str) -> None:
    """timm's test_model_forward_fx: the traced model's output equals the model's, bit for bit."""
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, FX_SIZE, FX_SIZE)
    with torch.no_grad():
        want = model(x)
        got = tuple(_fx_model(model)(x).values())[0]
    assert torch.equal(got, want) and not torch.isnan(want).any()


@pytest.mark.parametrize("name", ALL)
def test_backward_fx(name: str) -> None:
    """timm's test_model_backward_fx: training through the traced model reaches every parameter."""
    model = timm.create_model(name, num_classes=42).train()
    params = sum(p.numel() for p in model.parameters())
    traced = _fx_model(model, train=True)
    out = tuple(traced(torch.randn(2, 3, FX_SIZE, FX_SIZE)).values())[0]
    out.mean().backward()
    missing = [n for n, p in traced.named_parameters() if p.grad is None]
    assert not missing and out.shape[-1] == 42
    assert sum(p.grad.numel() for p in traced.parameters()) == params


@pytest.mark.parametrize("name", [n for n in NAMES if n.endswith("_pico")])
def test_torchscript_is_declared_unsupported_with_the_reason(name: str) -> None:
    """timm's test_model_forward_torchscript: our models declare themselves not scriptable (the
    route choice is Python; the fused CPU kernel is a ctypes custom op) and name what works."""
    model = timm.create_model(name).eval()
    with pytest.raises(RuntimeError, match=r"cannot be compiled with torch\.jit\.script.*torch\.export\.export, "
                                           r"torch\.compile or fx"):
        torch.jit.script(model)


@pytest.mark.parametrize("variant", [pytest.param(v, marks=() if v in FAST_EXPORT else pytest.mark.slow)
                                     for v in sorted(VARIANTS)])
def test_torch_export_at_224_in_eval_mode(variant: str) -> None:
    """torch.export.export of every variant equals eager, on the traced input and a new one; the
    masks cached while exporting are real tensors (eager calls afterwards still work)."""
    model = timm.create_model(f"va_{variant}_pico").eval()
    x, other = torch.randn(1, 3, 224, 224), torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want, want_other = model(x), model(other)
    exported = torch.export.export(model, (x,)).module()
    with torch.no_grad():
        torch.testing.assert_close(exported(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(exported(other), want_other, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(other), want_other, rtol=0, atol=0)


def test_torchvision_feature_extractor_on_a_classifier() -> None:
    """create_feature_extractor on a features_only=False model: stage outputs and logits by node name."""
    model = timm.create_model("va_swin_dilated_pico", num_classes=7).eval()
    nodes = {"layers.1": "stage2", "layers.3": "stage4", "head.fc": "logits"}
    extractor = create_feature_extractor(model, return_nodes=nodes, tracer_kwargs=TRACER)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = extractor(x)
        _, maps = model.forward_intermediates(x, output_fmt="NHWC")
        torch.testing.assert_close(out["logits"], model(x))
    torch.testing.assert_close(out["stage2"], maps[1])
    torch.testing.assert_close(out["stage4"], maps[3])
