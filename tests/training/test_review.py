"""Review aggregation: mean ± std over seeds, unfinished runs not counted, sorted by accuracy."""
from __future__ import annotations

import pytest

from vision_attn.review import aggregate, table


def run(variant: str, seed: int, acc, ips: float = 100.0) -> dict:
    return dict(variant=variant, size="pico", data="shapes", seed=seed, params=2_280_934, gflops=0.02,
                best_val_acc1=acc, images_per_sec=ips, peak_mem_mb=1000 + seed, wall_time_s=40.0)


def test_aggregate_means_over_finished_seeds_and_sorts_by_accuracy():
    rows = aggregate([run("swin", 0, 0.80, 400), run("swin", 1, 0.90, 420), run("swin", 2, None),
                      run("swin_local", 0, 0.95, 300)])
    assert [r["variant"] for r in rows] == ["swin_local", "swin"]
    swin = rows[1]
    assert swin["seeds"] == 2 and swin["acc"] == pytest.approx(0.85)
    assert swin["acc_sd"] == pytest.approx(0.0707107, rel=1e-5)  # sample std of 0.80, 0.90
    assert swin["ips"] == pytest.approx(410.0) and swin["mem"] == 1001
    lines = table(rows).splitlines()
    assert lines[2].startswith("| swin_local | pico | shapes | 1 | 2.28 | 0.020 | 95.00 |")
    assert "| swin | pico | shapes | 2 | 2.28 | 0.020 | 85.00 ± 7.07 | 410 |" in lines[3]


def test_table_shows_each_stage_reach_when_runs_recorded_it():
    reach = ["48x48 tokens: kernel 5 (20 px) / kernel 5 d2 (36 px)", "24x24 tokens: kernel 5 (40 px)"]
    rows = aggregate([{**run("swin_dilated", 0, 0.5), "reach": reach}, run("swin", 0, 0.4)])
    lines = table(rows).splitlines()
    assert lines[0].endswith("| reach per stage (what one query sees) |")
    assert lines[2].endswith("| kernel 5 (20 px) / kernel 5 d2 (36 px); kernel 5 (40 px) |")
    assert lines[3].endswith("| n/a |")
    assert "reach" not in table(aggregate([run("swin", 0, 0.4)]))


def test_runs_that_differ_in_a_setting_are_not_averaged_as_seeds():
    """A sweep like ``seed=0,1 model.memory_tokens=8,0`` gives one row per setting, named by it; settings
    that every run shares, and the keys that are columns already, stay out of the name."""
    common = ["model=swin_local", "data=shapes_side", "data.image_size=256", "experiment=x"]
    runs = [{**run("swin_local", seed, acc), "overrides": [f"seed={seed}", f"model.memory_tokens={m}", *common]}
            for seed, m, acc in ((0, 8, 0.9), (1, 8, 0.8), (0, 0, 0.5), (1, 0, 0.6))]
    rows = aggregate(runs + [run("swin", 0, 0.7)])  # a record without overrides (W&B) keeps its plain name
    assert [(r["variant"], r["setting"], r["seeds"]) for r in rows] == [
        ("swin_local", "model.memory_tokens=8", 2), ("swin", "", 1), ("swin_local", "model.memory_tokens=0", 2)]
    assert rows[0]["acc"] == pytest.approx(0.85) and rows[2]["acc"] == pytest.approx(0.55)
    lines = table(rows).splitlines()
    assert lines[2].startswith("| swin_local [model.memory_tokens=8] | pico | shapes | 2 |")
    assert lines[3].startswith("| swin | pico |")
