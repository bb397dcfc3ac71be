"""The 448 px ablation presets (conf/experiment/attention_ablation_448*.yaml): no stage is global for the
local kinds, the evidence lies beyond every stage's reach, the memory preset keeps the disks in different tiles."""
from __future__ import annotations

import numpy as np
from helpers import cfg_with, far_disks, pixel_gap, stage_px
from hydra.utils import instantiate
from omegaconf import OmegaConf

from data.shapes import far_bin_edges, far_evidence, render
from vision_attn.binned import accuracy_by_bins

LOCAL = ("swin", "swin_window", "swin_local", "swin_dilated")

VARIANTS = {"swin", "swin_window", "swin_local", "swin_dilated", "maxvit_like", "swin_global_tokens", "swin_global"}


def test_448_ablation_puts_the_evidence_beyond_every_stage_of_every_local_kind():
    cfg = cfg_with("experiment=attention_ablation_448", hydra=True)
    params = cfg.hydra.sweeper.params
    assert set(params.model.split(",")) == VARIANTS
    assert params.seed == "0,1,2" and list(params)[0] == "seed"  # seeds slowest: a cut-short sweep stays paired
    size = cfg.data.image_size
    assert size >= 448 and cfg.data.task == "far_dense" and cfg.data.num_classes == 2 and cfg.model.size == "pico"
    assert cfg.optim.lr == 5e-4  # the dense pilot fell back to chance at 2e-3
    assert cfg.model.window_size == 7 and cfg.model.kernel_size == 7 and cfg.test_after_fit is False
    # the gap between the disks' pixels, measured on rendered val images (the run's split and data seed)
    gap = min(pixel_gap(*far_disks(render(cfg.data.seed, "val", i, size, task="far")[0])) for i in range(16))
    assert gap >= 232  # 0.52 x 448 = 233, less a pixel of rounding
    for variant in sorted(VARIANTS):
        reach = instantiate(cfg_with("experiment=attention_ablation_448", f"model={variant}").module
                            ).model.stage_reach(size)
        assert [s.split(" tokens")[0] for s in reach] == ["112x112", "56x56", "28x28", "14x14"], reach
        if variant in LOCAL:
            px = [stage_px(s) for s in reach]
            # hand-computed: 7 tokens x 4, 8, 16, 32 px; dilated stage 1: (7 - 1) x 2 + 1 = 13 tokens x 4 px
            assert px == ([52, 56, 112, 224] if variant == "swin_dilated" else [28, 56, 112, 224]), (variant, px)
            assert not any("global" in s for s in reach), reach  # no stage is global
            assert max(px) < gap, (variant, px, gap)
        if variant == "swin_global":
            assert all(s.endswith("tokens: global") for s in reach), reach
        if variant == "maxvit_like":
            assert all("grid 7 (sparse, whole map)" in s for s in reach), reach
        if variant == "swin_global_tokens":
            assert all(s.endswith("+ 4 global tokens") for s in reach), reach


def test_memory_preset_keeps_the_two_disks_in_different_tiles():
    cfg = cfg_with("experiment=attention_ablation_448_memory", hydra=True)
    params = cfg.hydra.sweeper.params
    assert list(params) == ["seed", "model.memory_tokens"] and params.seed == "0,1,2"
    assert set(params["model.memory_tokens"].split(",")) == {"8", "0"}
    size, tile = cfg.data.image_size, cfg.model.tile_size
    assert (size, tile, cfg.data.task, cfg.model.variant) == (512, 128, "far_dense", "swin_local")
    main = cfg_with("experiment=attention_ablation_448")
    for key in ("data.batch_size", "data.train_size", "trainer.max_epochs", "optim.lr"):  # the 448 preset's budget
        assert OmegaConf.select(cfg, key) == OmegaConf.select(main, key), key
    for i in range(12):
        a, b = far_disks(render(cfg.data.seed, "val", i, size, task="far")[0])
        tiles_a = {(y // tile, x // tile) for y, x in zip(*a["pixels"])}
        tiles_b = {(y // tile, x // tile) for y, x in zip(*b["pixels"])}
        assert not tiles_a & tiles_b, (i, tiles_a, tiles_b)
    memory_cfg = cfg_with("experiment=attention_ablation_448_memory", "model.memory_tokens=8")
    with_memory = instantiate(memory_cfg.module).model
    assert with_memory.streams
    assert with_memory.stage_reach(size)[0] == "32x32 tokens: kernel 7 (28 px) + 8 memory tokens"  # one tile's map


def test_far_bins_at_448_cover_every_val_sample():
    dist = [far_evidence(0, "val", i, 448)["distance"] for i in range(1000)]
    rows = accuracy_by_bins(dist, np.ones(1000, bool), far_bin_edges(448))
    assert [(r["lo"], r["hi"]) for r in rows] == [(291.2, 336.0), (336.0, 380.8), (380.8, 425.6), (425.6, 542.1)]
    assert sum(r["n"] for r in rows) == 1000
