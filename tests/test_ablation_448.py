"""experiment=attention_ablation_448 (+ _memory): no stage is global for the local kinds, the evidence lies
beyond every stage's reach, accuracy by distance bins, and the sweep report of ``bench ablation``."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_shapes_far import far_disks, pixel_gap

from data.shapes import far_bin_edges, render
from vision_attn.bench import ablation
from vision_attn.binned import accuracy_by_bins
from vision_attn.errors import ConfigError

LOCAL = ("swin", "swin_window", "swin_local", "swin_dilated")
VARIANTS = {"swin", "swin_window", "swin_local", "swin_dilated", "maxvit_like", "swin_global_tokens", "swin_global"}


def compose_preset(*overrides: str, hydra: bool = False):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def stage_px(stage: str) -> int:
    """The widest reach in pixels a stage's summary line names (``"... window 7 (224 px) / ..."``)."""
    return max(int(px) for px in re.findall(r"\((\d+) px\)", stage))


def test_448_ablation_puts_the_evidence_beyond_every_stage_of_every_local_kind():
    cfg = compose_preset("experiment=attention_ablation_448", hydra=True)
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
        reach = instantiate(compose_preset("experiment=attention_ablation_448", f"model={variant}").module
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
    cfg = compose_preset("experiment=attention_ablation_448_memory", hydra=True)
    params = cfg.hydra.sweeper.params
    assert list(params) == ["seed", "model.memory_tokens"] and params.seed == "0,1,2"
    assert set(params["model.memory_tokens"].split(",")) == {"8", "0"}
    size, tile = cfg.data.image_size, cfg.model.tile_size
    assert (size, tile, cfg.data.task, cfg.model.variant) == (512, 128, "far", "swin_local")
    main = compose_preset("experiment=attention_ablation_448")
    for key in ("data.batch_size", "data.train_size", "trainer.max_epochs", "optim.lr"):  # the 448 preset's budget
        assert OmegaConf.select(cfg, key) == OmegaConf.select(main, key), key
    for i in range(12):
        a, b = far_disks(render(cfg.data.seed, "val", i, size, task="far")[0])
        tiles_a = {(y // tile, x // tile) for y, x in zip(*a["pixels"])}
        tiles_b = {(y // tile, x // tile) for y, x in zip(*b["pixels"])}
        assert not tiles_a & tiles_b, (i, tiles_a, tiles_b)
    with_memory = instantiate(compose_preset("experiment=attention_ablation_448_memory",
                                             "model.memory_tokens=8").module).model
    assert with_memory.streams
    assert with_memory.stage_reach(size)[0] == "32x32 tokens: kernel 7 (28 px) + 8 memory tokens"  # one tile's map


def test_accuracy_by_bins_hand_computed():
    distances = [10, 19.9, 20, 35, 40, 41, 5]
    correct = [1, 0, 1, 1, 0, 1, 1]
    rows = accuracy_by_bins(distances, correct, [10, 20, 40])
    # [10, 20): 10, 19.9 -> 1 of 2; [20, 40] (the last bin includes 40): 20, 35, 40 -> 2 of 3; 41 and 5 outside
    assert rows == [{"lo": 10.0, "hi": 20.0, "n": 2, "acc": 0.5}, {"lo": 20.0, "hi": 40.0, "n": 3, "acc": 2 / 3}]
    assert accuracy_by_bins([1.0], [True], [2, 3, 4]) == [{"lo": 2.0, "hi": 3.0, "n": 0, "acc": None},
                                                          {"lo": 3.0, "hi": 4.0, "n": 0, "acc": None}]
    with pytest.raises(ValueError, match="2 distances but 1 correctness"):
        accuracy_by_bins([1, 2], [True], [0, 3])
    with pytest.raises(ValueError, match="increasing"):
        accuracy_by_bins([1], [True], [3, 3])


def test_module_keeps_the_best_val_epochs_per_sample_correctness():
    module = instantiate(compose_preset("data=shapes_far", "data.image_size=32", "model.embed_dim=16").module)
    epochs = [([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]], [0, 1, 1]),  # right, right, wrong: 2/3
              ([[2.0, 0.0], [1.0, 0.0], [3.0, 1.0]], [0, 1, 1]),  # 1/3: worse, not kept
              ([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0]], [0, 1, 1])]  # 3/3: kept
    kept = []
    for logits, labels in epochs:
        module.on_validation_epoch_start()
        for row, label in zip(logits, labels):  # one sample a batch: concatenated in loader order
            module._record_val_correct(torch.tensor([row]).argmax(1) == torch.tensor([label]))
        module.on_validation_epoch_end()
        kept.append(module.best_val_correct.tolist())
    assert kept == [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]


def test_dense_targets_train_a_1x1_head_on_the_last_stage_tokens():
    """A (B, h, w) target: the loss and top-1 cover only the labelled tokens (target >= 0), read by the
    head's linear layer on each last-stage token; per image, the share of its labelled tokens right."""
    module = instantiate(compose_preset("data=shapes_far_dense", "data.image_size=64", "model.embed_dim=16").module)
    module.eval()  # no drop path: the same logits twice
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    targets = torch.tensor([[[0, -1], [-1, 1]], [[-1, -1], [1, -1]]])  # 64 px: a 2x2 last-stage map
    logits, labels, per_image = module._dense_step(images, targets)
    dense = module.model.head.fc(module.model.forward_features(images))  # (2, 2, 2, classes)
    torch.testing.assert_close(logits, torch.stack([dense[0, 0, 0], dense[0, 1, 1], dense[1, 1, 0]]))
    assert labels.tolist() == [0, 1, 1]
    right = (dense.argmax(-1) == targets.clamp(min=0)).float()
    expected = [(right[0, 0, 0] + right[0, 1, 1]) / 2, right[1, 1, 0]]
    torch.testing.assert_close(per_image, torch.stack(expected))
    loss = module._shared_step((images, targets), "train")
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1))
    with pytest.raises(ConfigError, match=r"targets are a \(3, 3\) map .* last stage is \(2, 2\)"):
        module._dense_step(images, torch.zeros(2, 3, 3, dtype=torch.long))


def write_run(root: Path, name: str, variant: str, seed: int, acc: float, bins: list, size: int = 448,
              overrides: tuple = ()) -> None:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    edges = [(0.0, 100.0), (100.0, 200.0)]
    (run / "results.json").write_text(json.dumps({
        "variant": variant, "size": "pico", "data": "shapes_far", "seed": seed, "image_size": size,
        "overrides": [f"model={variant}", f"seed={seed}", *overrides], "best_val_acc1": acc,
        "images_per_sec": 100.0 * (seed + 1), "wall_time_s": 10.0 * (seed + 1),
        "val_acc_by_distance": [{"lo": lo, "hi": hi, "n": n, "acc": a} for (lo, hi), (n, a) in zip(edges, bins)]}))


def test_report_tabulates_mean_and_std_over_seeds_per_distance_bin(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "0", "swin_global", 0, 0.8, [(40, 0.6), (60, 1.0)])
    write_run(runs, "1", "swin_global", 1, 0.9, [(40, 0.8), (60, 1.0)])
    write_run(runs, "2", "swin_window", 0, 0.5, [(40, 0.5), (60, None)])
    write_run(runs, "3", "swin_local", 0, 0.55, [(40, 0.5), (60, 0.6)], size=512, overrides=("model.memory_tokens=8",))
    write_run(runs, "4", "swin_local", 0, 0.52, [(40, 0.5), (60, 0.5)], size=512, overrides=("model.memory_tokens=0",))
    assert ablation.main([str(runs), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "ablation.md").read_text()
    # stdev([0.8, 0.9]) = 0.0707; bins: stdev([0.6, 0.8]) = 0.1414, stdev([1, 1]) = 0; images/s (100 + 200) / 2
    assert "| swin_global | 2 | 85.0 ± 7.1 | 70.0 ± 14.1 | 100.0 ± 0.0 | 150 | 15 |" in md
    assert "| swin_window | 1 | 50.0 | 50.0 | n/a | 100 | 10 |" in md  # one seed: no ± ; an empty bin: n/a
    assert "0-100 px (n=40) | 100-200 px (n=60)" in md
    # the 512 px runs get their own table, one row per memory setting
    assert md.index("## 448 px") < md.index("| swin_global |") < md.index("## 512 px")
    assert "| swin_local [model.memory_tokens=8] | 1 | 55.0 | 50.0 | 60.0 |" in md
    assert "| swin_local [model.memory_tokens=0] | 1 | 52.0 | 50.0 | 50.0 |" in md
    for png in ("ablation.png", "ablation_512.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_refuses_runs_with_other_bins_and_empty_dirs(tmp_path):
    write_run(tmp_path / "a", "0", "swin", 0, 0.5, [(1, 0.5), (1, 0.5)])
    run = tmp_path / "a" / "1"
    (run / ".hydra").mkdir(parents=True)
    rec = {"variant": "swin", "seed": 1, "image_size": 448, "best_val_acc1": 0.5,
           "val_acc_by_distance": [{"lo": 0.0, "hi": 50.0, "n": 1, "acc": 0.5}]}
    (run / "results.json").write_text(json.dumps(rec))
    with pytest.raises(ValueError, match=r"distance bins \[\(0.0, 50.0\)\] differ"):
        ablation.main([str(tmp_path / "a"), "--out", str(tmp_path / "out")])
    (tmp_path / "empty").mkdir()
    assert ablation.main([str(tmp_path / "empty"), "--out", str(tmp_path / "out2")]) == 1


def test_gpu_ablation_streams_run_both_presets_with_trainer_gpu_and_a_time_cap(tmp_path):
    cmds = ablation.streams(tmp_path, cuda=True, run_max_s=90, workers=3)
    assert len(cmds) == 4  # one stream per seed of the 448 px preset, one for the memory preset
    for seed, cmd in enumerate(cmds[:3]):
        assert cmd[1:3] == [str(ROOT / "train.py"), "-m"]
        assert {"experiment=attention_ablation_448", f"seed={seed}", "trainer=gpu", "logger=csv",
                "data.num_workers=3", "trainer.max_time=00:00:01:30",
                f"hydra.sweep.dir={tmp_path / 'runs' / f'448_seed{seed}'}"} <= set(cmd)
    assert {"experiment=attention_ablation_448_memory", "trainer=gpu"} <= set(cmds[3])
    assert not any(a.startswith("seed=") for a in cmds[3])  # the memory preset sweeps its own 3 seeds
    dry = ablation.streams(tmp_path, cuda=False, run_max_s=600, workers=0)
    assert len(dry) == 2 and "trainer=default" in dry[0] and "trainer=gpu" not in dry[0]
    assert set(ablation.DRY_RUN) <= set(dry[0]) and "model.tile_size=32" in dry[1]
    assert "trainer.max_time=00:00:10:00" in dry[0]


def test_far_bins_at_448_cover_every_val_sample():
    from data.shapes import far_evidence

    dist = [far_evidence(0, "val", i, 448)["distance"] for i in range(1000)]
    rows = accuracy_by_bins(dist, np.ones(1000, bool), far_bin_edges(448))
    assert [(r["lo"], r["hi"]) for r in rows] == [(291.2, 336.0), (336.0, 380.8), (380.8, 425.6), (425.6, 542.1)]
    assert sum(r["n"] for r in rows) == 1000


def test_report_says_when_the_top1_is_over_dense_cells(tmp_path):
    write_run(tmp_path / "runs", "0", "swin_global", 0, 0.99, [(40, 0.98), (60, 1.0)])
    record = json.loads((tmp_path / "runs" / "0" / "results.json").read_text())
    (tmp_path / "runs" / "0" / "results.json").write_text(json.dumps({**record, "data": "shapes_far_dense"}))
    assert ablation.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "ablation.md").read_text()
    assert "- dense label (data=shapes_far_dense): top-1 over the labelled last-stage cells" in md
    assert "| swin_global | 1 | 99.0 | 98.0 | 100.0 | 100 | 10 |" in md
    write_run(tmp_path / "runs", "1", "swin_global", 0, 0.5, [(40, 0.5), (60, 0.5)])  # data=shapes_far: its own row
    assert ablation.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "ablation.md").read_text()
    assert "| swin_global [data=shapes_far_dense] | 1 | 99.0 |" in md
    assert "| swin_global [data=shapes_far] | 1 | 50.0 |" in md
