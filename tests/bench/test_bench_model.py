"""``python -m vision_attn.bench model`` (vision_attn/bench/model.py): the attention-skipped case replaces
only the kernel and restores it."""
from __future__ import annotations

import torch

from vision_attn.attention import window as window_module
from vision_attn.attention.registry import AttnSpec
from vision_attn.bench.model import _attention_skipped


def test_attention_skipped_step_replaces_only_the_kernel_and_restores_it() -> None:
    torch.manual_seed(0)
    attn = window_module.WindowAttention(8, 2, AttnSpec(window_size=2))
    x = torch.randn(1, 4, 4, 8)
    outs = []
    _attention_skipped(lambda: outs.append(attn(x)))()
    geo = window_module.WindowGeometry.of(4, 4, 2)
    _, _, v = attn.split_qkv(window_module.partition(x, geo))
    expected = window_module.unpartition(attn.merge_heads(v), geo)  # qkv -> out = v -> proj
    torch.testing.assert_close(outs[0], expected)
    assert not torch.allclose(attn(x), expected)  # attention is back afterwards
