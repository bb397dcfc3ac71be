"""Tiny fake copies of datasets in their real on-disk formats, from scikit-image's bundled photos.

For tests, the data benchmark and smoke-testing a config without the real data, e.g.::

    python -c "from data.fakes import make_imagefolder; make_imagefolder('/tmp/tiny')"
    python train.py data=imagefolder data.root=/tmp/tiny data.num_workers=0 trainer=debug

Class ``k`` always uses photo ``k`` (mod the number of photos), so labels can be checked
against pixel content. No network: every photo ships inside scikit-image.
"""
from __future__ import annotations

import json
import os
import pickle
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "colorwheel")
IMAGENETTE_WNIDS = (
    "n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
    "n03394916", "n03417042", "n03425413", "n03445777", "n03888257",
)  # fmt: skip
INAT_NAMES = (
    "Animalia_Arthropoda_Insecta_Coleoptera_Cleridae_Trichodes_ornatus",
    "Plantae_Tracheophyta_Magnoliopsida_Asterales_Asteraceae_Bellis_perennis",
    "Fungi_Basidiomycota_Agaricomycetes_Agaricales_Amanitaceae_Amanita_muscaria",
    "Animalia_Chordata_Aves_Passeriformes_Paridae_Parus_major",
)
PathLike = Union[str, os.PathLike]


@lru_cache(maxsize=None)
def _photo_array(name: str) -> np.ndarray:
    import skimage.data  # test/bench dependency only

    return getattr(skimage.data, name)()


def photo(index: int, size: Optional[tuple[int, int]] = None, noise: float = 0.0, seed: int = 0) -> Image.Image:
    """Photo ``index`` (cycling through :data:`PHOTOS`) as RGB, resized to ``size`` (w, h),
    with optional Gaussian grain of std ``noise`` (realistic JPEG bit rates)."""
    img = Image.fromarray(_photo_array(PHOTOS[index % len(PHOTOS)])).convert("RGB")
    if size is not None and img.size != tuple(size):
        img = img.resize(tuple(size), Image.Resampling.BICUBIC)
    if noise > 0:
        arr = np.asarray(img, dtype=np.float32)
        arr = arr + np.random.default_rng(seed).normal(0.0, noise, arr.shape).astype(np.float32)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img


def save(img: Image.Image, path: PathLike, quality: int = 90) -> Path:
    """Save by extension (JPEG at ``quality``), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.save(path, quality=quality)
    else:
        img.save(path)
    return path


def _size(i: int, size: tuple[int, int]) -> tuple[int, int]:
    """Vary the aspect a little per image: odd images are portrait."""
    w, h = size
    return (h, w) if i % 2 else (w, h)


def make_class_tree(
    split_dir: PathLike, classes: Sequence[str], per_class: int, size: tuple[int, int] = (96, 72), ext: str = ".jpg"
) -> list[Path]:
    """``split_dir/<class>/<class>_<i><ext>``: ``per_class`` images of photo k for class k."""
    paths = []
    for k, name in enumerate(classes):
        for i in range(per_class):
            paths.append(save(photo(k, _size(i, size)), Path(split_dir) / name / f"{name}_{i}{ext}"))
    return paths


def make_imagefolder(
    root: PathLike,
    classes: Sequence[str] = ("apple", "bird", "cat"),
    train: int = 4,
    val: int = 2,
    size: tuple[int, int] = (96, 72),
) -> Path:
    """``root/{train,val}/<class>/*.jpg`` (ImageNet layout)."""
    root = Path(root)
    make_class_tree(root / "train", classes, train, size)
    make_class_tree(root / "val", classes, val, size)
    return root


def make_photo_crops(root: PathLike, train: int = 1000, val: int = 200, seed: int = 0) -> Path:
    """An image folder of real-photo crops as users' folders hold them: class ``k`` crops photo
    ``k`` of :data:`data.photos.PHOTOS` (10 classes), at random places, sizes (24-480 px, some
    smaller than any crop) and aspects, some grayscale, as JPEG (quality 60-95) or PNG."""
    from .photos import PHOTOS
    from .photos import photo as named_photo

    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, count in (("train", train), ("val", val)):
        for i in range(count):
            label = i % len(PHOTOS)
            img = named_photo(PHOTOS[label])
            W, H = img.size
            side = int(rng.uniform(0.05, 0.9) * min(W, H))
            w = max(2, min(W, int(side * rng.uniform(0.6, 1.6))))
            x, y = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - side + 1))
            crop = img.crop((x, y, x + w, y + side))
            crop = crop.resize((max(2, int(w * rng.uniform(0.1, 1.0))), max(2, int(side * rng.uniform(0.1, 1.0)))))
            if rng.random() < 0.15:
                crop = crop.convert("L")
            ext = ".png" if rng.random() < 0.2 else ".jpg"
            save(crop, root / split / PHOTOS[label] / f"{i:05d}{ext}", quality=int(rng.integers(60, 96)))
    return root


def make_digits(root: PathLike, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """scikit-learn's handwritten digits (1,797 real 8x8 scans, 10 classes; UCI) as an image folder:
    ``root/{train,val}/<digit>/<i>.png``, 8-bit grayscale at the native 8x8, a stratified split.

    A small real dataset nobody here made, for checking recipes on small data::

        python -c "from data.fakes import make_digits; make_digits('/tmp/digits')"
        python train.py data=imagefolder data.root=/tmp/digits data.image_size=64 model.size=pico
    """
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    digits = load_digits()
    rng = np.random.default_rng(seed)
    root = Path(root)
    for label in range(10):
        index = np.flatnonzero(digits.target == label)
        rng.shuffle(index)
        cut = int(round(len(index) * val_fraction))
        for split, part in (("val", index[:cut]), ("train", index[cut:])):
            for i in part:
                pixels = np.rint(digits.images[i] * (255 / 16)).astype(np.uint8)
                save(Image.fromarray(pixels, "L"), root / split / str(label) / f"{i:04d}.png")
    return root


def make_fastai(
    root: PathLike, folder: str = "imagenette2-320", classes: int = 3, train: int = 3, val: int = 2, size=(96, 72)
) -> Path:
    """fast.ai Imagenette/Imagewoof layout: ``root/<folder>/{train,val}/n01440764/*.JPEG``."""
    base = Path(root) / folder
    make_class_tree(base / "train", IMAGENETTE_WNIDS[:classes], train, size, ".JPEG")
    make_class_tree(base / "val", IMAGENETTE_WNIDS[:classes], val, size, ".JPEG")
    return base


def make_food101(root: PathLike, classes=("apple_pie", "baby_back_ribs", "sushi"), train: int = 3, test: int = 2,
                 size=(96, 72)) -> Path:
    """torchvision Food101: ``root/food-101/images/<class>/<id>.jpg`` + ``meta/{train,test}.json``."""
    base = Path(root) / "food-101"
    meta: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for k, name in enumerate(classes):
        for i in range(train + test):
            split = "train" if i < train else "test"
            image_id = f"{1000 + i}"
            save(photo(k, _size(i, size)), base / "images" / name / f"{image_id}.jpg")
            meta[split].setdefault(name, []).append(f"{name}/{image_id}")
    (base / "meta").mkdir(parents=True, exist_ok=True)
    for split, content in meta.items():
        (base / "meta" / f"{split}.json").write_text(json.dumps(content))
    return base


def make_flowers102(root: PathLike, classes: int = 3, per_split: int = 2, size=(96, 72)) -> Path:
    """torchvision Flowers102: ``root/flowers-102/jpg/image_00001.jpg``, ``imagelabels.mat``
    (1-based labels) and ``setid.mat`` (``trnid``/``valid``/``tstid``, 1-based image ids).
    Image ``j`` of label ``k`` (0-based) uses photo ``k``."""
    from scipy.io import savemat

    base = Path(root) / "flowers-102"
    labels, ids = [], {"trnid": [], "valid": [], "tstid": []}
    image_id = 0
    for k in range(classes):
        for split in ids:
            for i in range(per_split):
                image_id += 1
                save(photo(k, _size(i, size)), base / "jpg" / f"image_{image_id:05d}.jpg")
                labels.append(k + 1)
                ids[split].append(image_id)
    savemat(base / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    savemat(base / "setid.mat", {k: np.array([v], dtype=np.uint16) for k, v in ids.items()})
    return base


def make_inat2021(root: PathLike, classes: int = 3, train: int = 3, val: int = 2, mini: bool = False,
                  size=(96, 72)) -> Path:
    """torchvision INaturalist 2021: ``root/2021_train[_mini]/<00000_Kingdom_..._Genus_species>/*.jpg``
    and ``root/2021_valid/``."""
    root = Path(root)
    names = [f"{k:05d}_{INAT_NAMES[k % len(INAT_NAMES)]}" for k in range(classes)]
    make_class_tree(root / ("2021_train_mini" if mini else "2021_train"), names, train, size)
    make_class_tree(root / "2021_valid", names, val, size)
    return root


def make_cifar(root: PathLike, cifar100: bool = False, train: int = 20, test: int = 10, classes: int = 4) -> Path:
    """torchvision CIFAR python-pickle batches (``cifar-10-batches-py/data_batch_1..5``,
    ``test_batch``, ``batches.meta``, or ``cifar-100-python/{train,test,meta}``), 32x32
    thumbnails of photo ``label % len(PHOTOS)``. Returns the batches folder."""
    base = Path(root) / ("cifar-100-python" if cifar100 else "cifar-10-batches-py")
    base.mkdir(parents=True, exist_ok=True)
    n_classes = 100 if cifar100 else 10
    label_key = "fine_labels" if cifar100 else "labels"

    def batch(count: int, offset: int) -> dict:
        labels = [(offset + i) % classes for i in range(count)]
        data = np.stack([np.asarray(photo(k, (32, 32))).transpose(2, 0, 1).reshape(-1) for k in labels])
        return {"data": data.astype(np.uint8), label_key: labels}

    def dump(name: str, obj: dict) -> None:
        with open(base / name, "wb") as f:
            pickle.dump(obj, f)

    names = [f"class_{i}" for i in range(n_classes)]
    if cifar100:
        dump("train", batch(train, 0))
        dump("test", batch(test, 1))
        dump("meta", {"fine_label_names": names, "coarse_label_names": names[:20]})
    else:
        per = -(-train // 5)
        for b in range(5):
            dump(f"data_batch_{b + 1}", batch(per, b * per))
        dump("test_batch", batch(test, 1))
        dump("batches.meta", {"label_names": names})
    return base


def make_large_jpegs(folder: PathLike, count: int = 64, size=(2000, 1500), noise: float = 0.0,
                     classes: int = 4) -> list[Path]:
    """``count`` large JPEGs (upscaled photos, optional grain) as ``folder/<class>/<i>.jpg``."""
    paths = []
    for i in range(count):
        img = photo(i, _size(i, size) if i % 4 == 3 else size, noise=noise, seed=i)
        paths.append(save(img, Path(folder) / f"class{i % classes}" / f"{i:04d}.jpg"))
    return paths


def write_truncated(src: PathLike, dst: PathLike, keep: float = 0.5) -> Path:
    """Copy the first ``keep`` fraction of ``src``'s bytes to ``dst`` (a truncated image)."""
    data = Path(src).read_bytes()
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    Path(dst).write_bytes(data[: int(len(data) * keep)])
    return Path(dst)


def _thumbnail(img: Image.Image, crop_pct: float) -> np.ndarray:
    w, h = img.size
    side = int(min(w, h) * crop_pct)
    left, top = (w - side) // 2, (h - side) // 2
    return np.asarray(img.crop((left, top, left + side, top + side)).resize((8, 8), Image.Resampling.BOX), np.float32)


def nearest_photo(image: np.ndarray, classes: int, size: tuple[int, int] = (96, 72), crop_pct: float = 0.875) -> int:
    """The class ``k < classes`` whose fake images (photo k at ``size``, either orientation) look
    most like ``image``, an eval-transformed uint8 ``(3, H, W)`` array: checks labels by content."""
    thumb = np.asarray(
        Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))).resize((8, 8), Image.Resampling.BOX), np.float32
    )
    distance = [
        min(np.abs(thumb - _thumbnail(photo(k, s), crop_pct)).mean() for s in (size, size[::-1]))
        for k in range(classes)
    ]
    return int(np.argmin(distance))
