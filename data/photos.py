"""``photos``: an offline real-photo dataset, built from the photographs scikit-image ships.

Class ``k`` is photograph ``PHOTOS[k]`` (portraits, a cat, coffee, a rocket launch, deep-sky,
microscopy, a retina, and brick / grass / gravel textures); an image is a random square crop
of it (side 8-15% of the photo's height, horizontal flip at random), resized to
``image_size``. Splits crop from disjoint horizontal bands of each photo (train: top 70%,
val: next 15%, test: bottom 15%), so no pixel is shared between splits. Image ``i`` of a split
is a pure function of ``(seed, split, i)``. It needs no network, so the ablation can run a
real-photo dataset on a machine without one; Imagenette (``data=imagenette``) is the real
benchmark for users who can download it.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from .shapes import SPLITS, ShapesDataset

PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
    "immunohistochemistry", "retina", "brick", "grass", "gravel",
)  # fmt: skip
CLASSES = PHOTOS
BANDS = {"train": (0.0, 0.70), "val": (0.70, 0.85), "test": (0.85, 1.0)}
SIDE = (0.08, 0.15)  # crop side as a fraction of the photo's height (fits the 15% bands)


@lru_cache(maxsize=len(PHOTOS))
def photo(name: str) -> Image.Image:
    """One scikit-image photograph as an RGB PIL image (grey ones are replicated)."""
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def render(seed: int, split: str, index: int, size: int) -> tuple[np.ndarray, int]:
    """Crop ``index`` of ``split``: uint8 ``(size, size, 3)`` and its class."""
    label = index % len(PHOTOS)
    rng = np.random.default_rng([seed, SPLITS[split], index])
    img = photo(PHOTOS[label])
    W, H = img.size
    top, bottom = (int(f * H) for f in BANDS[split])
    side = int(rng.uniform(*SIDE) * H)
    y = int(rng.integers(top, bottom - side + 1))
    x = int(rng.integers(0, W - side + 1))
    crop = img.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.array(crop, dtype=np.uint8), label


class PhotosDataset(ShapesDataset):
    """``length`` photo crops of one split, uint8 ``(3, S, S)`` tensors, cached in memory."""

    classes = CLASSES
    render = staticmethod(render)
