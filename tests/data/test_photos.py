"""The offline real-photo dataset: deterministic crops of the right photo, disjoint splits."""
from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch

from data import photos
from data.datamodule import PhotosDataModule
from vision_attn.errors import ConfigError


def test_crops_are_deterministic_and_labelled_by_photo_index():
    a, b = photos.PhotosDataset("val", 30, 32, seed=3), photos.PhotosDataset("val", 30, 32, seed=3, cache=False)
    for i in range(30):
        (xa, ya), (xb, yb) = a[i], b[i]
        assert torch.equal(xa, xb) and ya == yb == i % len(photos.PHOTOS)
        assert xa.shape == (3, 32, 32) and xa.dtype == torch.uint8


def test_a_crop_is_nearest_to_its_own_photo_band():
    """Mean colour of many crops of class k is closest to photo k's band mean (computed from skimage)."""
    data = photos.PhotosDataset("test", 400, 24, seed=0)
    means = np.stack([np.stack([data[i][0].float().mean((1, 2)).numpy() for i in range(k, 400, 10)]).mean(0)
                      for k in range(10)])
    refs = []
    for name in photos.PHOTOS:
        arr = np.asarray(photos.photo(name), dtype=np.float64)
        top = int(photos.BANDS["test"][0] * arr.shape[0])
        refs.append(arr[top:].reshape(-1, 3).mean(0))
    dist = np.linalg.norm(means[:, None] - np.stack(refs)[None], axis=-1)
    assert (dist.argmin(1) == np.arange(10)).sum() >= 8, dist.round(1)  # brick/gravel share a grey level
    assert np.asarray(photos.photo("brick")).shape[:2] == skimage.data.brick().shape


def test_splits_come_from_disjoint_bands():
    for split, (lo, hi) in photos.BANDS.items():
        for i in range(50):
            rng = np.random.default_rng([0, photos.SPLITS[split], i])
            H = photos.photo(photos.PHOTOS[i % 10]).size[1]
            side = int(rng.uniform(*photos.SIDE) * H)
            y = int(rng.integers(int(lo * H), int(hi * H) - side + 1))
            assert int(lo * H) <= y and y + side <= int(hi * H)
    train = {photos.PhotosDataset("train", 100, 16)[i][0].numpy().tobytes() for i in range(100)}
    assert not train & {photos.PhotosDataset("val", 100, 16)[i][0].numpy().tobytes() for i in range(100)}


def test_datamodule_checks_num_classes():
    with pytest.raises(ConfigError, match="photos has exactly 10 classes"):
        PhotosDataModule(num_classes=8)
    dm = PhotosDataModule(image_size=16, batch_size=4, train_size=8, val_size=4, test_size=4)
    dm.setup()
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (4, 3, 16, 16) and labels.tolist() == [0, 1, 2, 3]
