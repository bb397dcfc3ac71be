"""``data=shapes_far`` (task="far"): two large far-apart disks, same colour or not; distances per sample."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import far_disks, pixel_gap

from data.datamodule import ShapesDataModule
from data.shapes import FAR_BINS, FAR_CLASSES, FAR_GAP, ShapesDataset, far_bin_edges, far_evidence, render
from vision_attn.binned import accuracy_by_bins
from vision_attn.errors import ConfigError


@pytest.mark.parametrize("size", [448, 512])
def test_far_label_is_whether_two_far_apart_disks_share_a_colour(size):
    for i in range(12):
        img, label = render(4, "val", i, size, task="far")
        ev = far_evidence(4, "val", i, size)
        disks = far_disks(img)
        assert len(disks) == 2, (i, len(disks))
        a, b = disks
        assert label == ev["label"] == int(a["colour"] != b["colour"]), (i, label, a["colour"], b["colour"])
        # every pixel of one disk is >= 0.52 of the side from every pixel of the other along x or y
        assert pixel_gap(a, b) >= FAR_GAP * size - 1, (i, pixel_gap(a, b))
        # the recorded geometry is the drawn one: centre distance within a pixel, gap within two
        assert math.hypot(a["cx"] - b["cx"], a["cy"] - b["cy"]) == pytest.approx(ev["distance"], abs=1.0)
        assert pixel_gap(a, b) == pytest.approx(ev["gap"], abs=2.0)
        assert min(a["x1"] - a["x0"], b["x1"] - b["x0"]) + 1 >= 2 * 0.075 * size - 2  # large: >= 0.15 of the side


def test_far_geometry_and_balance_over_many_samples():
    evs = [far_evidence(0, "train", i, 448) for i in range(3000)]
    gaps = np.array([e["gap"] for e in evs])
    dist = np.array([e["distance"] for e in evs])
    assert gaps.min() >= 0.52 * 448 == pytest.approx(232.96)
    assert dist.min() >= gaps.min() + 2 * 0.075 * 448  # centre distance >= gap + two radii
    labels = np.array([e["label"] for e in evs])
    assert abs(labels.mean() - 0.5) < 0.03  # binomial sd at n=3000: 0.009
    combos = {(e["colour_a"], e["colour_b"]) for e in evs}
    assert combos == {(0, 0), (1, 1), (0, 1), (1, 0)}
    same = [e for e in evs if e["label"] == 0]
    assert all(e["colour_a"] == e["colour_b"] for e in same)
    # the distance itself carries no label: same / other have the same distance distribution (+-3 %)
    d_same, d_other = dist[labels == 0].mean(), dist[labels == 1].mean()
    assert abs(d_same - d_other) / dist.mean() < 0.03
    # every report bin is used, and none is left out (0.65 .. 1.21 of the side holds every sample)
    counts = [r["n"] for r in accuracy_by_bins(dist, np.ones(len(dist), bool), far_bin_edges(448))]
    assert sum(counts) == len(evs) and min(counts) > 0


def test_far_dataset_records_distances_in_index_order():
    ds = ShapesDataset("val", 6, 96, seed=3, task="far")
    np.testing.assert_allclose(ds.evidence_distances(), [far_evidence(3, "val", i, 96)["distance"] for i in range(6)])
    assert ds.evidence_bin_edges() == [round(f * 96, 1) for f in FAR_BINS] == [62.4, 72.0, 81.6, 91.2, 116.2]
    img, label = ds[2]
    ref, ref_label = render(3, "val", 2, 96, task="far")
    assert torch.equal(img, torch.from_numpy(ref).permute(2, 0, 1)) and label == ref_label
    assert ShapesDataset("val", 6, 96, task="side").evidence_distances() is None  # other tasks record none


def test_far_task_through_the_datamodule_and_bad_values_name_the_key():
    dm = ShapesDataModule(image_size=64, task="far", train_size=4, val_size=4, test_size=4)
    dm.setup()
    assert dm.num_classes == 2 and dm.classes == FAR_CLASSES == ("same colour", "other colour")
    with pytest.raises(ConfigError, match=r"data.num_classes=8: shapes \(data.task=far\) has exactly 2 classes; "
                                          r"set data.num_classes=2 or null \(data=shapes_far sets both\)"):
        ShapesDataModule(task="far", num_classes=8)
    with pytest.raises(ConfigError, match=r"data.task='farther': shapes has the tasks \[.*'far', 'far_dense'\]"):
        ShapesDataModule(task="farther")


def test_existing_tasks_draw_the_same_pixels():
    """Adding the task moved no other task's random draws: SHA-1 of five 40 px images of each task,
    computed with data/shapes.py as it was before task="far" existed (commit c9c82f0)."""
    import hashlib

    digests = {t: hashlib.sha1(b"".join(render(1, "train", i, 40, task=t)[0].tobytes() for i in range(5))).hexdigest()
               for t in ("direction", "side", "match")}
    assert digests == {"direction": "215fb84ce22e82dba5c1b769af2b516d018c5b6e",
                       "side": "aa0b9eb0f93798ceb80981d40a4e2a6234aebf25",
                       "match": "a4796b39e763a28ea72ab69994843a9dbff5c75b"}


@pytest.mark.parametrize("size", [448, 160])
def test_far_dense_target_labels_each_disks_cells_with_the_other_disks_colour(size):
    from data.shapes import DENSE_STRIDE

    for i in range(8):
        img, target = render(5, "val", i, size, task="far_dense")
        ref, label = render(5, "val", i, size, task="far")
        assert np.array_equal(img, ref)  # the same images as task="far"
        n = -(-size // DENSE_STRIDE)
        assert target.shape == (n, n) and target.dtype == np.int64
        a, b = far_disks(img)
        for disk, other in ((a, b), (b, a)):
            inside = np.zeros((n, n), int)  # pixels of this disk per 32 px cell
            np.add.at(inside, (disk["pixels"][0] // DENSE_STRIDE, disk["pixels"][1] // DENSE_STRIDE), 1)
            cells = target[inside > 0]
            # every cell holding >= a pixel-wide sliver of the disk is labelled with the other's colour
            assert set(target[inside >= DENSE_STRIDE].tolist()) == {other["colour"]}, (i, target, inside)
            assert set(cells.tolist()) <= {other["colour"], -1}
        assert (target >= 0).sum() >= 2 and label == int(a["colour"] != b["colour"])
        union = np.zeros((n, n), bool)
        for disk in (a, b):
            union[disk["pixels"][0] // DENSE_STRIDE, disk["pixels"][1] // DENSE_STRIDE] = True
        assert (target[~union] == -1).all()  # cells without a disk pixel are ignored


def test_far_dense_through_the_dataset_and_datamodule():
    dm = ShapesDataModule(image_size=96, task="far_dense", train_size=4, val_size=4, test_size=4)
    dm.setup()
    img, target = dm.splits["val"][1]
    assert dm.num_classes == 2 and target.dtype == torch.int64 and target.shape == (3, 3)
    assert torch.equal(target, torch.from_numpy(render(0, "val", 1, 96, task="far_dense")[1]))
    assert dm.splits["val"].evidence_distances() is not None  # the same geometry records its distances
