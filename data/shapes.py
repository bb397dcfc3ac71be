"""``shapes``: the embedded dataset. Procedural, deterministic, any resolution, no files.

Each image holds a disk (object A) and a square (object B) far apart (at least 0.4 of the
image side). The label is the compass direction from A to B in 8 sectors (E, NE, N, ...),
so the class depends on the relation between two distant objects: no single local window
sees both. Angles keep a 7.5 degree margin from sector borders, so labels are unambiguous.

``task="side"`` (2 classes): the same disk and square, the label only says whether the square
lies east or west of the disk (within 60 degrees of the horizontal). Two classes carry more signal
per image than eight: it is the task of the high-resolution ablation (``data=shapes_side``).

``task="match"``: two objects as
far apart, each a disk or a square in one of four colours; the label says whether they match in
colour and in shape (4 classes). It needs the two objects side by side somewhere in the network,
yet no geometry: a model that pools what it sees of each object separately and averages (e.g.
independent tiles) cannot tell "same" from "different", since the mixed pair's mean lies
between the two matched pairs' means.

``task="far"`` (2 classes, ``data=shapes_far``: the 448 px ablation's task): two large disks,
each red or blue; do they have the same colour? Their pixels are at least ``FAR_GAP`` (0.52) of
the side apart along x or y (the Chebyshev gap between the disks' bounding boxes), which at 448 px
is more than any pico stage's window or kernel of 7 covers (stage 4: 7 tokens x 32 px = 224 px),
so no single window or neighbourhood of any stage holds evidence of both. The label needs the two
colours side by side: a sum of per-object features (pooling then a linear head) cannot tell
(red, blue) from the mean of (red, red) and (blue, blue). :func:`far_evidence` gives each sample's
centres, radius, centre distance and gap without drawing it (accuracy by distance bins).

``task="far_dense"`` (``data=shapes_far_dense``): the same images with a dense label, one target per
32 x 32 px cell (one token of the last stage: patch 4 and three merges), read by a 1x1 head on the
last stage: a cell that holds pixels of one disk is labelled with the *other* disk's colour (0 red,
1 blue), every other cell -1 (ignored). Each disk's cells must fetch evidence from >= 0.52 of the side
away; no stage's window or kernel holds it.
Image ``i`` of a split is a pure function of ``(seed, split, i)``; splits use disjoint
random streams, so train, val and test never share an image.
"""
from __future__ import annotations

import math
from functools import lru_cache, partial
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

CLASSES = ("east", "north-east", "north", "north-west", "west", "south-west", "south", "south-east")
MATCH_CLASSES = ("same colour, same shape", "same colour, other shape", "other colour, same shape",
                 "other colour, other shape")
SIDE_CLASSES = ("east", "west")
FAR_CLASSES = ("same colour", "other colour")
FAR_DENSE_CLASSES = ("the other disk is red", "the other disk is blue")
FAR_TASKS = ("far", "far_dense")  # the two-disk images (their evidence geometry: far_evidence)
TASKS = {"direction": CLASSES, "match": MATCH_CLASSES, "side": SIDE_CLASSES, "far": FAR_CLASSES,
         "far_dense": FAR_DENSE_CLASSES}
DENSE_STRIDE = 32  # far_dense: pixels per target cell, the last stage's token (patch 4 x 2^3 merges)
SPREAD = {"direction": 15.0, "side": 60.0}  # degrees either side of a sector's centre line
PALETTE = ((220, 60, 40), (40, 90, 220), (60, 190, 70), (230, 200, 50))  # red, blue, green, yellow
FAR_PALETTE = ((235, 45, 35), (35, 105, 245))  # red, blue: high contrast on the dark tinted background
FAR_GAP = 0.52  # min Chebyshev gap between the two disks (bounding boxes), as a share of the side
FAR_RADIUS = (0.075, 0.09)  # disk radius range, as a share of the side
FAR_BINS = (0.65, 0.75, 0.85, 0.95, 1.21)  # centre-distance bin edges (reports), shares of the side; max 1.2
SPLITS = {"train": 0, "val": 1, "test": 2}
MEAN, STD = (0.175, 0.165, 0.175), (0.15, 0.10, 0.15)  # measured over 2000 images
BAND_BYTES = 16 * 2**20  # working memory of one band of rows (its float64 noise draw); the rest is the uint8 image
BANK_CACHE_BYTES = 64 * 2**20  # noise banks up to this size (S <= 1182) are kept; larger ones are streamed
Shape = tuple[int, float, float, float, Sequence[int]]  # kind (0 disk, 1 square), cx, cy, r, base colour


def _bank_bytes(size: int) -> int:
    """Bytes of the float32 noise bank of ``size``."""
    return (2 * size) ** 2 * 3 * 4


@lru_cache(maxsize=8)
def _noise_bank(size: int) -> np.ndarray:
    """A fixed ``(2S, 2S, 3)`` Gaussian noise texture; each image crops it at a random offset."""
    return np.random.default_rng(12345).normal(0, 12, (2 * size, 2 * size, 3)).astype(np.float32)


def _noise_rows(size: int, oy: int, ox: int, band: int) -> Iterator[np.ndarray]:
    """The bank's crop ``[oy : oy + S, ox : ox + S]``, ``band`` rows at a time (float32).

    Small banks come from the cache; large ones are drawn again row by row from the same stream
    (the same values: the generator's normals do not depend on how the draws are split), keeping
    only ``band`` rows in memory instead of the ``48 S^2``-byte bank (and its float64 draw)."""
    if _bank_bytes(size) <= BANK_CACHE_BYTES:
        bank = _noise_bank(size)
        for r0 in range(0, size, band):
            yield bank[oy + r0 : oy + min(r0 + band, size), ox : ox + size]
        return
    rng = np.random.default_rng(12345)
    skip = oy
    while skip:  # rows above the crop: drawn (the stream is sequential) and dropped
        n = min(skip, band)
        rng.normal(0, 12, (n, 2 * size, 3))
        skip -= n
    for r0 in range(0, size, band):
        n = min(band, size - r0)
        yield rng.normal(0, 12, (n, 2 * size, 3))[:, ox : ox + size].astype(np.float32)


def _band_mask(kind: int, cx: float, cy: float, r: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Pixels of a disk (``kind`` 0) or a square (1) centred at ``(cx, cy)``; ``yy`` a column and
    ``xx`` a row of float32 pixel centres (broadcast: the same float32 arithmetic as a full grid)."""
    if kind == 0:
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
    return np.maximum(np.abs(xx - cx), np.abs(yy - cy)) <= r * 0.9


def _paint(rng: np.random.Generator, size: int, shapes: Sequence[Shape]) -> np.ndarray:
    """Background (tinted noise) and the ``shapes`` ``(kind, cx, cy, r, base colour)``, drawn into a
    uint8 image one band of rows at a time: memory is the image plus one band. The image is stored
    channel-first (what the dataset yields, without a copy) and returned as its ``(S, S, 3)`` view."""
    oy, ox = (int(v) for v in rng.integers(0, size, 2))
    tint = rng.uniform(0, 80, 3).astype(np.float32)
    colours = [base + rng.uniform(-25, 25, 3) for *_, base in shapes]
    out = np.empty((3, size, size), np.uint8)
    band = max(1, BAND_BYTES // (2 * size * 3 * 8))  # the float64 draw of a streamed band is the largest
    xx = np.arange(size, dtype=np.float32) + 0.5
    for r0, noise in zip(range(0, size, band), _noise_rows(size, oy, ox, band)):
        img = tint + noise
        yy = (np.arange(r0, r0 + len(img), dtype=np.float32) + 0.5)[:, None]
        for (kind, cx, cy, r, _), colour in zip(shapes, colours):
            img[_band_mask(kind, cx, cy, r, yy, xx)] = colour
        np.clip(img, 0, 255, out=img)
        out[:, r0 : r0 + len(img)] = img.transpose(2, 0, 1)  # float32 -> uint8, as astype
    return out.transpose(1, 2, 0)


def _layout(rng: np.random.Generator, label: int, size: int, sectors: int = 8,
            spread: float = 15.0) -> tuple[float, float, float, float, float]:
    """Centers of A and B (pixels) and object radius, B lying in sector ``label`` of ``sectors`` from A
    (sector 0 is east, counter-clockwise), at most ``spread`` degrees off the sector's centre line."""
    radius = size * rng.uniform(0.07, 0.11)
    while True:
        angle = math.radians(360.0 / sectors * label + rng.uniform(-spread, spread))
        dist = size * rng.uniform(0.4, 0.75)
        ax, ay = rng.uniform(radius, size - radius, 2)
        bx, by = ax + dist * math.cos(angle), ay - dist * math.sin(angle)  # image y points down
        if radius <= bx <= size - radius and radius <= by <= size - radius:
            return ax, ay, bx, by, radius


def render(seed: int, split: str, index: int, size: int, task: str = "direction") -> tuple[np.ndarray, int]:
    """Render image ``index`` of ``split`` as uint8 ``(size, size, 3)`` and its label (``task``: see above)."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    if task in FAR_TASKS:
        ev = _far_layout(rng, size)
        img = _paint(rng, size, [(0, ev["ax"], ev["ay"], ev["r"], FAR_PALETTE[ev["colour_a"]]),
                                 (0, ev["bx"], ev["by"], ev["r"], FAR_PALETTE[ev["colour_b"]])])
        return img, (far_dense_target(ev, size) if task == "far_dense" else ev["label"])
    if task == "match":
        return _render_match(rng, size)
    classes = TASKS[task]
    label = int(rng.integers(len(classes)))
    ax, ay, bx, by, r = _layout(rng, label, size, len(classes), SPREAD[task])
    return _paint(rng, size, [(0, ax, ay, r, (220, 60, 40)), (1, bx, by, r, (40, 90, 220))]), label


def _render_match(rng: np.random.Generator, size: int) -> tuple[np.ndarray, int]:
    """Two far-apart objects; label = 2 * (colours differ) + (shapes differ)."""
    label = int(rng.integers(len(MATCH_CLASSES)))
    other_colour, other_shape = divmod(label, 2)
    colour_a = int(rng.integers(len(PALETTE)))
    colour_b = (colour_a + int(rng.integers(1, len(PALETTE)))) % len(PALETTE) if other_colour else colour_a
    shape_a = int(rng.integers(2))
    shape_b = 1 - shape_a if other_shape else shape_a
    ax, ay, bx, by, r = _layout(rng, int(rng.integers(len(CLASSES))), size)
    return _paint(rng, size, [(shape_a, ax, ay, r, PALETTE[colour_a]), (shape_b, bx, by, r, PALETTE[colour_b])]), label


def _far_layout(rng: np.random.Generator, size: int) -> dict:
    """``task="far"``'s draws before painting: label (0 same colour, 1 other), colours, one radius,
    and two centres whose disks' bounding boxes are at least ``FAR_GAP * size`` apart along x or y."""
    label = int(rng.integers(2))
    colour_a = int(rng.integers(2))
    colour_b = colour_a if label == 0 else 1 - colour_a
    r = size * rng.uniform(*FAR_RADIUS)
    while True:
        ax, ay, bx, by = rng.uniform(r, size - r, 4)
        gap = max(abs(bx - ax), abs(by - ay)) - 2 * r
        if gap >= FAR_GAP * size:
            break
    return {"label": label, "colour_a": colour_a, "colour_b": colour_b, "r": float(r), "ax": float(ax),
            "ay": float(ay), "bx": float(bx), "by": float(by), "distance": float(math.hypot(bx - ax, by - ay)),
            "gap": float(gap)}


def far_evidence(seed: int, split: str, index: int, size: int) -> dict:
    """Sample ``index``'s geometry for ``task="far"`` (the same draws as :func:`render`, nothing
    painted): ``label``, ``colour_a``/``colour_b``, radius ``r``, centres ``ax, ay, bx, by``,
    ``distance`` (centre to centre, px) and ``gap`` (the Chebyshev gap between the disks' boxes, px)."""
    return _far_layout(np.random.default_rng([seed, SPLITS[split], index]), size)


def far_dense_target(ev: dict, size: int, stride: int = DENSE_STRIDE) -> np.ndarray:
    """``task="far_dense"``'s int64 ``(ceil(S / stride),) * 2`` target: cells whose square comes within
    ``r - 1`` px of a disk's centre (at least a pixel deep into the disk) get the other disk's colour,
    the rest -1. The two disks never share a cell (they are >= 0.52 S > ``stride`` apart)."""
    n = -(-size // stride)
    lo = np.arange(n, dtype=float) * stride
    hi = np.minimum(lo + stride, size)
    target = np.full((n, n), -1, np.int64)
    for cx, cy, other in ((ev["ax"], ev["ay"], ev["colour_b"]), (ev["bx"], ev["by"], ev["colour_a"])):
        dx = np.maximum(np.maximum(lo - cx, cx - hi), 0)  # per column: centre to the cell's x range
        dy = np.maximum(np.maximum(lo - cy, cy - hi), 0)
        target[np.hypot(dy[:, None], dx[None, :]) <= ev["r"] - 1] = other
    return target


def far_bin_edges(size: int) -> list[float]:
    """``FAR_BINS`` in pixels at ``size``."""
    return [round(f * size, 1) for f in FAR_BINS]


class ShapesDataset(Dataset):
    """``length`` procedurally rendered images of one split, uint8 ``(3, S, S)`` tensors.

    Rendered images are kept in memory (``cache=True``): they are a pure function of the
    index, so later epochs cost nothing. Images over ``CACHE_MAX_IMAGE_BYTES`` (larger than
    about 2364²) are drawn again each time instead, so memory stays one image, not the split.
    """

    CACHE_MAX_IMAGE_BYTES = 16 * 2**20
    classes = CLASSES
    render = staticmethod(render)  # (seed, split, index, size) -> (uint8 HWC image, label)

    def __init__(self, split: str, length: int, image_size: int = 64, seed: int = 0, cache: bool = True,
                 task: str = "direction") -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if task != "direction":  # the class's own render and classes otherwise (subclasses: photos)
            if task not in TASKS:
                raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
            self.classes, self.render = TASKS[task], partial(render, task=task)
        self.split, self.length, self.image_size, self.seed, self.task = split, length, image_size, seed, task
        cache = cache and 3 * image_size**2 <= self.CACHE_MAX_IMAGE_BYTES
        self.cache: dict[int, tuple[torch.Tensor, int]] | None = {} if cache else None

    def __len__(self) -> int:
        return self.length

    def evidence_distances(self) -> np.ndarray | None:
        """Per sample, the distance between the evidence (px; ``task="far"``: centre to centre), in
        index order, or None for tasks that do not record it."""
        if self.task not in FAR_TASKS:
            return None
        return np.array([far_evidence(self.seed, self.split, i, self.image_size)["distance"]
                         for i in range(self.length)])

    def evidence_bin_edges(self) -> list[float]:
        """Bin edges (px) for reports by :meth:`evidence_distances`."""
        return far_bin_edges(self.image_size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        img, label = self.render(self.seed, self.split, index, self.image_size)
        if isinstance(label, np.ndarray):  # a dense target (task="far_dense")
            label = torch.from_numpy(label)
        item = torch.from_numpy(img).permute(2, 0, 1).contiguous(), label
        if self.cache is not None:
            self.cache[index] = item
        return item
