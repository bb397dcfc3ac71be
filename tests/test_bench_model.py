"""Benchmark helpers: the model bench's attention-skipped case, the attention bench's halo floor."""
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
    assert window_module.windowed_sdpa.__name__ == "windowed_sdpa"  # restored afterwards
    assert not torch.allclose(attn(x), expected)


def test_attention_bench_halo_floor_reports_each_tile_shape_against_window() -> None:
    from vision_attn.bench.attention import halo_floor

    rows = halo_floor(14, ["4x8", "1x1"], reps=1)
    assert [r[1:4] for r in rows] == [
        ["window", "49 x 49", "1.00x"],
        ["tile 4x8", "32 x 140", "2.86x"],  # (4+6) x (8+6) halo keys per query vs 49
        ["tile 1x1", "1 x 49", "1.00x"],
    ]
    assert rows[0][5] == "1.00x" and all(float(r[4]) > 0 for r in rows)
