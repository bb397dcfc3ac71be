"""``python -m vision_attn.bench routes`` (vision_attn/bench/routes.py): ``--attention-share``'s
attention-free case replaces both kernels and names its cases."""
from __future__ import annotations

import torch

from vision_attn.attention.registry import AttnSpec


def test_routes_bench_attention_free_replaces_both_kernels() -> None:
    """``bench routes --attention-share``: inside attention_free() window and neighborhood attention
    are out = v (qkv, proj and the rest kept), and both come back afterwards."""
    from vision_attn.attention import create_attention
    from vision_attn.attention.backends import attention_free
    from vision_attn.bench.routes import cases

    torch.manual_seed(0)
    x = torch.randn(1, 6, 6, 8)
    for kind in ("window", "neighborhood"):
        attn = create_attention(kind, 8, 2, AttnSpec(window_size=3, kernel_size=3))
        with attention_free():
            free = attn(x)
        v = attn.qkv(x).view(1, 6, 6, 3, 8)[..., 2, :]
        torch.testing.assert_close(free, attn.proj(v))
        assert not torch.allclose(attn(x), free)
    names = list(cases(["swin", "swin_local"], "pico", 32, 2, share=True))
    assert names == ["swin", "swin (attention free)", "swin_local [fused]", "swin_local [fused] (attention free)",
                     "swin_local [tiled]", "swin_local [tiled] (attention free)"]
