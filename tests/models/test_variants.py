"""The variants beyond local windows (vision_attn/variants.py: global tokens, spatial reduction, LSH,
routed) train in the backbone; their keys' bad values are config errors naming the key."""
from __future__ import annotations

import pytest
import torch
from helpers import BEYOND_LOCAL_VARIANTS as NEW_VARIANTS
from helpers import fit

import vision_attn as va
from vision_attn.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


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

    def gradients_are_finite_and_nonzero_at_48() -> None:
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert img == 32 or p.grad.abs().sum() > 0, name

    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = fit(lambda: torch.nn.functional.cross_entropy(model(x), y), opt, 6, gradients_are_finite_and_nonzero_at_48)
    assert losses[-1] < losses[0], losses


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
