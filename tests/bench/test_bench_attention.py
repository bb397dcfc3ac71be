"""``python -m vision_attn.bench attention`` (vision_attn/bench/attention.py): every kind is timed, the
halo floor per tile shape, route suffixes pick the kernel, the targets table."""
from __future__ import annotations

import pytest
import torch

from vision_attn.attention import window as window_module


@pytest.mark.usefixtures("one_thread")
def test_bench_times_every_new_kind() -> None:
    from vision_attn.bench.attention import KINDS, Inputs, kernel_for, skipped

    new = ["spatial_reduction", "lsh", "routed", "window+global_tokens"]
    assert set(new) <= set(KINDS)
    inputs = Inputs.make(14)
    for kind in new:
        inputs.step(kernel_for(kind))
    assert skipped("spatial_reduction", 224, 4.0) and not skipped("spatial_reduction", 112, 4.0)
    assert not any(skipped(kind, 224, 4.0) for kind in ("lsh", "routed", "window+global_tokens"))


def test_attention_bench_halo_floor_reports_each_tile_shape_against_window() -> None:
    from vision_attn.bench.attention import halo_floor

    rows = halo_floor(14, ["4x8", "1x1"], reps=1)
    assert [r[1:4] for r in rows] == [
        ["window", "49 x 49", "1.00x"],
        ["tile 4x8", "32 x 140", "2.86x"],  # (4+6) x (8+6) halo keys per query vs 49
        ["tile 1x1", "1 x 49", "1.00x"],
    ]
    assert rows[0][5] == "1.00x" and all(float(r[4]) > 0 for r in rows)


def test_attention_bench_route_suffixes_pick_the_kernel(monkeypatch) -> None:
    """``neighborhood[torch]`` runs the tiled kernel, no suffix the fused one (where it builds),
    ``window[sdpa]`` trains the bias through SDPA's math path; all give the same numbers."""
    from unittest import mock

    from vision_attn.attention import backends, fused
    from vision_attn.attention import neighborhood as nb
    from vision_attn.attention.rel_pos import bias_grid
    from vision_attn.bench.attention import Inputs, kernel_for

    monkeypatch.delenv(backends.LEGACY_NA_ENV, raising=False)
    inp = Inputs.make(16)
    g = inp.table.detach()
    grid = g.view(13, 13, 3).permute(2, 0, 1).flip(1, 2)
    with mock.patch.object(nb, "tiled_attention", wraps=nb.tiled_attention) as tiled:
        a = kernel_for("dilated_2")(inp.q, inp.k, inp.v, grid)
        assert tiled.call_count == (0 if fused.library() is not None else 1)
        b = kernel_for("dilated_2[torch]")(inp.q, inp.k, inp.v, grid)
        assert tiled.call_count == (1 if fused.library() is not None else 2)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert backends.requested("neighborhood") == ("auto", "auto")  # the suffix's route is restored
    big = Inputs.make(56)  # 2 x 64 windows: training the bias takes our per-head kernel by default
    grid = bias_grid(big.table)
    fn = window_module._WindowAttentionFunction
    with mock.patch.object(fn, "apply", wraps=fn.apply) as per_head:
        kernel_for("window")(big.q, big.k, big.v, grid)
        assert per_head.call_count == 1
        big.step(kernel_for("window[sdpa]"))
        assert per_head.call_count == 1
    torch.testing.assert_close(kernel_for("window[sdpa]")(big.q, big.k, big.v, grid),
                               kernel_for("window")(big.q, big.k, big.v, grid))


def test_attention_bench_targets_use_the_faster_window_and_both_routes() -> None:
    from vision_attn.bench.attention import targets

    rows = [{"size": 56, "kind": k, "ms": ms, "peak_mb": mb} for k, ms, mb in [
        ("window", 20.0, 40.0), ("window[sdpa]", 16.0, 40.0), ("neighborhood", 15.0, 30.0),
        ("neighborhood[torch]", 48.0, 80.0), ("dilated_2", 15.0, 30.0), ("dilated_3", 16.5, 30.0),
        ("dilated_4", 15.5, 30.0)]]
    text = targets(rows)
    assert "| fused: neighborhood / window time, 56² (<= 1.0x) | 0.94x | met |" in text  # 15 / min(20, 16)
    assert "| tiled: neighborhood / window time, 56² (<= 1.0x) | 3.00x | MISSED |" in text
    assert "| fused: worst dilated (d=2..4) / neighborhood time, 56² (<= 1.05x) | 1.10x | MISSED |" in text
    assert "| tiled: worst dilated (d=2..4) / neighborhood time, 56² (<= 1.05x) | not measured | - |" in text
