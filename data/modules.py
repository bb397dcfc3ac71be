"""LightningDataModules for photo datasets: folders, ImageNet, Imagenette/Imagewoof, Food-101,
Flowers-102, iNaturalist 2021, CIFAR-10/100.

Every one shares :class:`ImageDataModule`: reduced-scale JPEG decoding (:mod:`data.decode`),
timm train/eval transforms (:mod:`data.transforms`), uint8 batches normalised on device, the
batch-level augmentation of ``BaseDataModule``, and the corrupt-image policy
(``data.skip_corrupt``; skipped files are counted exactly, with any number of workers, and
logged per epoch as ``data/skipped_corrupt`` (train), ``data/skipped_corrupt_val`` and
``data/skipped_corrupt_test``).

Adding a dataset takes one YAML file in ``conf/data/``. A folder of class sub-folders
(``<root>/train/<class>/*``, ``<root>/val/<class>/*``, optional ``<root>/test/``) needs no
code, only ``conf/data/mydata.yaml``::

    defaults:
      - imagefolder           # inherit every key (augmentation recipe, crop_pct, ...)
    root: /data/mydata        # or leave ??? and pass data.root=... on the command line
    image_size: 384
    mean: [0.5, 0.5, 0.5]     # optional: per-dataset normalisation
    std: [0.25, 0.25, 0.25]

then ``python train.py data=mydata``. ``num_classes: null`` (inherited) is counted from the class
folders in ``setup()``; the augmentation recipe (``recipe: auto``) is chosen there too, from the
training images per class (:func:`data.augment.auto_recipe`). A dataset in another on-disk format needs a subclass
of :class:`ImageDataModule` implementing ``check_exists`` and ``build`` (and ``download_data``
if it can be downloaded), and a YAML whose ``_target_`` names it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageNetInfo
from torch.utils.data import Dataset
from torchvision import datasets as tvd

from vision_attn.errors import ConfigError

from .augment import AugmentConfig, auto_recipe
from .datamodule import BaseDataModule, check_positive
from .decode import DEFAULT_MAX_IMAGE_PIXELS, ImageLoader
from .download import Archive, fetch_archive, fetch_file, unfinished
from .folder import FolderSplit, ImageFileDataset, SkipCorrupt, check_splits, scan_split
from .transforms import DeferredTransform, eval_resize_size, eval_transform, train_transform

SPLITS = ("train", "val", "test")
Built = tuple[Dataset, list[str]]  # a split's (image, label) dataset and the class names


class ImageDataModule(BaseDataModule):
    """Shared plumbing of the photo datasets. Subclasses implement:

    - ``sources``: which source split feeds train / val / test (e.g. Food-101's ``test`` for both
      val and test); identical sources share one dataset;
    - ``check_exists()``: raise a ConfigError naming the missing path and how to get the data;
    - ``download_data()``: fetch the data (only if the source offers a download);
    - ``build(source, loader, transform) -> (dataset, classes)``: a dataset yielding
      ``(transform(loader(path)), label)`` and the list of class names.
    """

    default_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN
    default_std: Sequence[float] = IMAGENET_DEFAULT_STD
    sources: Mapping[str, str] = {"train": "train", "val": "val", "test": "val"}

    def __init__(
        self,
        root: Optional[str],
        image_size: int = 224,
        batch_size: int = 128,
        num_workers: int = 8,
        num_classes: Optional[int] = None,
        download: bool = False,
        crop_pct: float = 0.875,
        train_resize: Optional[int] = None,
        interpolation: str = "bicubic",
        skip_corrupt: bool = False,
        max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
        augment: Optional[Mapping[str, Any]] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
    ) -> None:
        super().__init__(image_size, batch_size, num_workers, augment)
        if root is None or str(root) in ("", "???"):
            downloads = type(self).download_data is not ImageDataModule.download_data
            how = " (add data.download=true to fetch it there)" if downloads else ""
            raise ConfigError(f"data.root is not set: pass data.root=/path/to/the/dataset{how}")
        self.root = Path(os.path.expanduser(str(root)))
        self.download, self.skip_corrupt = bool(download), bool(skip_corrupt)
        self.crop_pct, self.interpolation = float(crop_pct), interpolation
        self.eval_resize = eval_resize_size(image_size, self.crop_pct)
        self.train_resize = self.eval_resize if train_resize is None else train_resize
        check_positive(train_resize=self.train_resize)
        if max_image_pixels is not None:
            check_positive(max_image_pixels=max_image_pixels)
        self.max_image_pixels = max_image_pixels
        self.mean = _three(mean if mean is not None else self.default_mean, "mean")
        self.std = _three(std if std is not None else self.default_std, "std")
        if num_classes is not None:
            check_positive(num_classes=num_classes)
        self.num_classes = num_classes
        self._classes: Optional[list[str]] = None
        self.skipped = {split: 0 for split in (*SPLITS, "predict", "unattached")}
        # recipe=auto: the train transform is built in setup(), once the training split's size is known.
        self.train_transform = DeferredTransform() if self.augment.is_auto else self._train_transform()
        self.eval_transform = eval_transform(image_size, self.crop_pct, interpolation)
        if not self.download:
            self.check_exists()

    # --- subclass API -------------------------------------------------------------------
    def check_exists(self) -> None:
        raise NotImplementedError

    def download_data(self) -> None:
        raise ConfigError(f"data.download=true: {type(self).__name__} offers no download")

    def build(self, source: str, loader: Callable[[Any], Image.Image], transform: Callable) -> Built:
        raise NotImplementedError

    # --- Lightning hooks ----------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.download:
            self.download_data()
            self.check_exists()

    def setup(self, stage: Optional[str] = None) -> None:
        """Build every split (scanning and checking the data) and check ``num_classes``."""
        if not self.splits:
            built: dict[str, Built] = {}
            wrapped: dict[str, SkipCorrupt] = {}
            for split in SPLITS:
                source = self.sources[split]
                if source not in built:
                    train = source == self.sources["train"]
                    loader = ImageLoader(self.train_resize if train else self.eval_resize, self.max_image_pixels)
                    built[source] = self.build(source, loader, self.train_transform if train else self.eval_transform)
                    wrapped[source] = SkipCorrupt(built[source][0], self.skip_corrupt)
                self.splits[split] = wrapped[source]
            self._classes = self._check_classes(built)
            if self.augment.is_auto:
                self._choose_recipe(len(built[self.sources["train"]][0]), len(self._classes))
        self._attach_skip_logger()

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Strip the per-sample skipped-file counts from the batch and add them up."""
        if isinstance(batch, (list, tuple)) and len(batch) == 3:
            images, targets, skipped = batch
            self.skipped[self._current_split()] += int(skipped.sum())
            return images, targets
        return batch

    # --- helpers ------------------------------------------------------------------------
    def _train_transform(self) -> Callable:
        return train_transform(self.image_size, self.train_resize, self.augment, self.interpolation, self.mean)

    def _choose_recipe(self, images: int, classes: int) -> None:
        """``recipe=auto``: pick the recipe from the training split's size, say which and why."""
        name, reason = auto_recipe(images, classes)
        self.augment = AugmentConfig.from_mapping({**self.augment_values, "recipe": name})
        self._batch_augment = None
        self.train_transform.transform = self._train_transform()
        rank_zero_info(f"data.augment: recipe {name!r} chosen by recipe=auto: {reason}")

    @property
    def classes(self) -> list[str]:
        """Class names, indexed by label (scans the data on first use)."""
        if self._classes is None:
            self.setup()
        assert self._classes is not None
        return self._classes

    def _check_classes(self, built: Mapping[str, Built]) -> list[str]:
        names = {source: classes for source, (_, classes) in built.items()}
        first, *rest = names
        for other in rest:
            if names[other] != names[first]:
                raise ConfigError(f"{self.root}: the {first!r} and {other!r} splits list different classes")
        classes = list(names[first])
        if self.num_classes is None:
            self.num_classes = len(classes)
        elif self.num_classes != len(classes):
            raise ConfigError(
                f"data.num_classes={self.num_classes} but {self.root} has {len(classes)} classes; "
                f"set data.num_classes={len(classes)}"
            )
        return classes

    def _current_split(self) -> str:
        trainer = self.trainer
        if trainer is None:
            return "unattached"
        if trainer.training:
            return "train"
        if trainer.sanity_checking or trainer.validating:
            return "val"
        return "test" if trainer.testing else "predict"

    def _attach_skip_logger(self) -> None:
        trainer = self.trainer
        if self.skip_corrupt and trainer is not None:
            if not any(isinstance(c, SkippedImagesLogger) for c in trainer.callbacks):
                trainer.callbacks.append(SkippedImagesLogger())

    def _missing(self, path: Path, how: str) -> ConfigError:
        return ConfigError(f"data.root={self.root}: {path} not found; {how}")

    def _check_finished(self, where: Path) -> None:
        """A ConfigError if an extraction into ``where`` was interrupted (its tree is partial)."""
        for record in unfinished(where):
            raise ConfigError(
                f"data.root={self.root}: {record} records an interrupted extraction (partial tree); "
                "set data.download=true to remove it and extract again"
            )


def _checksum(value: Optional[str], key: str, length: int) -> Optional[str]:
    """``data.md5`` / ``data.sha256``: None or a hex digest of ``length`` characters (lower-cased)."""
    if value is None or str(value) == "":
        return None
    text = str(value).strip().lower()
    if len(text) != length or any(c not in "0123456789abcdef" for c in text):
        raise ConfigError(f"data.{key}={value!r} is not a {key} checksum ({length} hex digits)")
    return text


def _three(values: Sequence[float], key: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ConfigError(f"data.{key}={list(values)} needs 3 values (R, G, B)")
    return values  # type: ignore[return-value]


class SkippedImagesLogger(L.Callback):
    """Logs the corrupt images skipped per epoch: ``data/skipped_corrupt`` (train),
    ``data/skipped_corrupt_val``, ``data/skipped_corrupt_test`` (summed over DDP ranks).

    Added by :class:`ImageDataModule` when ``data.skip_corrupt=true``; may also be listed in
    ``conf/callbacks``.
    """

    NAMES = {"train": "data/skipped_corrupt", "val": "data/skipped_corrupt_val", "test": "data/skipped_corrupt_test"}

    def _reset(self, trainer: L.Trainer, split: str) -> None:
        skipped = getattr(trainer.datamodule, "skipped", None)
        if skipped is not None:
            skipped[split] = 0

    def _log(self, trainer: L.Trainer, module: L.LightningModule, split: str) -> None:
        skipped = getattr(trainer.datamodule, "skipped", None)
        if skipped is None or trainer.sanity_checking:
            return
        count = skipped[split]
        module.log(self.NAMES[split], float(count), on_step=False, on_epoch=True, reduce_fx="sum", sync_dist=True)
        if count:
            rank_zero_info(f"epoch {trainer.current_epoch}: skipped {count} unreadable {split} image(s); "
                           "files named above")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset(trainer, "train")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "train")

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset(trainer, "val")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset(trainer, "test")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "test")


# --- class-folder datasets ----------------------------------------------------------------


class ImageFolderDataModule(ImageDataModule):
    """``<root>/train/<class>/**`` and ``<root>/val/<class>/**`` (``<root>/test/`` if present,
    else val is also the test split), any image size and format PIL reads. Class names are
    the folder names, labels their sorted order."""

    how_to_get = "point data.root at a folder holding train/ and val/, each with one sub-folder per class"

    def __init__(self, root: Optional[str], **kwargs: Any) -> None:
        self._scanned: Optional[dict[str, FolderSplit]] = None
        super().__init__(root, **kwargs)

    @property
    def folder(self) -> Path:
        """The folder holding ``train/`` and ``val/``."""
        return self.root

    @property
    def sources(self) -> dict[str, str]:  # type: ignore[override]
        return {"train": "train", "val": "val", "test": "test" if (self.folder / "test").is_dir() else "val"}

    def check_exists(self) -> None:
        for sub in ("train", "val"):
            if not (self.folder / sub).is_dir():
                raise self._missing(self.folder / sub, self.how_to_get)

    def class_index(self) -> Optional[dict[str, int]]:
        """Folder name -> label; None: the sorted folder names."""
        return None

    def class_names(self, folders: list[str]) -> list[str]:
        return folders

    def scan(self) -> dict[str, FolderSplit]:
        """Scan every split once and check them together (empty folders, differing classes)."""
        if self._scanned is None:
            index = self.class_index()
            scanned = {s: scan_split(self.folder / s, index) for s in sorted(set(self.sources.values()))}
            check_splits(scanned)
            self._scanned = scanned
        return self._scanned

    def build(self, source: str, loader: Callable[[Any], Image.Image], transform: Callable) -> Built:
        split = self.scan()[source]
        return ImageFileDataset(split, loader, transform), self.class_names(split.classes)


class ImageNetDataModule(ImageFolderDataModule):
    """ImageNet-1k as ``<root>/train/<wnid>/*.JPEG`` and ``<root>/val/<wnid>/*.JPEG``.

    Labels follow timm's ``ImageNetInfo`` order (the order of pretrained heads), class names
    its descriptions. A subset of the 1000 class folders is allowed (with a warning).
    """

    how_to_get = (
        "ImageNet has no automatic download (licence): get ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and "
        "ILSVRC2012_devkit_t12.tar.gz from https://image-net.org/download-images into data.root, then run "
        "python -c \"import torchvision as tv; [tv.datasets.ImageNet('<root>', split=s) for s in ('train', 'val')]\" "
        "which extracts them as train/<wnid>/ and val/<wnid>/"
    )

    def __init__(self, root: Optional[str], num_classes: Optional[int] = 1000, **kwargs: Any) -> None:
        self.info = ImageNetInfo()
        super().__init__(root, num_classes=num_classes, **kwargs)

    def class_index(self) -> dict[str, int]:
        return {wnid: i for i, wnid in enumerate(self.info.label_names())}

    def scan(self) -> dict[str, FolderSplit]:
        if self._scanned is None:
            index = self.class_index()
            for source in sorted(set(self.sources.values())):
                unknown = [f for f in scan_folders(self.folder / source) if f not in index]
                if unknown:
                    raise ConfigError(
                        f"{self.folder / source}: folders {unknown[:5]} are not ImageNet-1k wnids (n01440764, ...); "
                        "use data=imagefolder for other classes"
                    )
            scanned = super().scan()
            found = len(scanned["train"].classes)
            if found != len(index):
                rank_zero_warn(f"{self.folder}: {found} of the {len(index)} ImageNet-1k class folders present")
        return self._scanned  # type: ignore[return-value]

    def build(self, source: str, loader: Callable[[Any], Image.Image], transform: Callable) -> Built:
        dataset, _ = super().build(source, loader, transform)
        return dataset, list(self.info.label_descriptions())


def scan_folders(path: Path) -> list[str]:
    """Non-hidden sub-folder names of ``path``."""
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


class FastAIImagesDataModule(ImageFolderDataModule):
    """fast.ai's Imagenette-style archives: ``<root>/<name>[-320|-160]/{train,val}/<wnid>/*.JPEG``.

    ``size``: ``full``, ``320`` or ``160`` (shorter side of the images). ``download=true``
    fetches ``https://s3.amazonaws.com/fast-ai-imageclas/<folder>.tgz`` (``url`` overrides
    it: an https URL, a file:// URL or a local archive path). ``md5`` / ``sha256``: the archive's
    checksum (default: the built-in one of the fast.ai archive; a custom ``url`` without one is
    extracted unverified, with a warning). Class names from timm's ``ImageNetInfo``.
    """

    name = ""
    MD5S: Mapping[str, str] = {}  # size -> md5 of the fast.ai archive
    SIZES = {"full": "", "320": "-320", "160": "-160"}

    def __init__(
        self,
        root: Optional[str],
        size: str = "320",
        url: Optional[str] = None,
        md5: Optional[str] = None,
        sha256: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        size = str(size).removesuffix("px")
        if size not in self.SIZES:
            raise ConfigError(f"data.size={size!r} must be one of {', '.join(self.SIZES)}")
        self.size, self.url = size, url
        self.md5, self.sha256 = _checksum(md5, "md5", 32), _checksum(sha256, "sha256", 64)
        super().__init__(root, **kwargs)

    @property
    def folder(self) -> Path:
        return self.root / f"{self.name}{self.SIZES[self.size]}"

    @property
    def default_url(self) -> str:
        return f"https://s3.amazonaws.com/fast-ai-imageclas/{self.folder.name}.tgz"

    def check_exists(self) -> None:
        how = f"set data.download=true to fetch {self.url or self.default_url} (or extract it into data.root yourself)"
        self._check_finished(self.root)
        for sub in ("train", "val"):
            if not (self.folder / sub).is_dir():
                raise self._missing(self.folder / sub, how)

    @property
    def archive(self) -> Archive:
        """What ``download=true`` fetches: ``url`` or the fast.ai archive, with its checksum."""
        if self.url:
            return Archive(str(self.url), md5=self.md5, sha256=self.sha256)
        md5 = self.md5 or (None if self.sha256 else self.MD5S.get(self.size))
        return Archive(self.default_url, md5=md5, sha256=self.sha256)

    def download_data(self) -> None:
        fetch_archive(self.archive, self.root)

    def class_names(self, folders: list[str]) -> list[str]:
        info = ImageNetInfo()
        return [info.label_name_to_description(f) if f.startswith("n") else f for f in folders]


class ImagenetteDataModule(FastAIImagesDataModule):
    """Imagenette v2 (10 easy ImageNet classes), fast.ai's archives and layout."""

    name = "imagenette2"
    MD5S = {k.removesuffix("px"): v[1] for k, v in tvd.Imagenette._ARCHIVES.items()}


class ImagewoofDataModule(FastAIImagesDataModule):
    """Imagewoof v2 (10 dog breeds from ImageNet), fast.ai's archives and layout."""

    name = "imagewoof2"
    # torchvision 0.29 has no Imagewoof class: these md5s come from public code (three independent
    # repositories agree on full and 320, two on 160; the same sources' Imagenette md5s equal
    # torchvision's). A mismatch stops the download naming both values; data.md5= overrides them.
    MD5S = {
        "full": "9aafe18bcdb1632c4249a76c458465ba",
        "320": "0f46d997ec2264e97609196c95897a44",
        "160": "3d200a7be99704a0d7509be2a9fbfe15",
    }


# --- torchvision on-disk formats ----------------------------------------------------------


def _torchvision(make: Callable[[], Dataset], where: Path, how: str) -> Dataset:
    """Construct a torchvision dataset, turning its "not found or corrupted" into a ConfigError."""
    try:
        return make()
    except (RuntimeError, OSError) as e:
        raise ConfigError(f"{where}: torchvision could not load it ({e}); {how}") from e


class Food101DataModule(ImageDataModule):
    """Food-101 in torchvision's layout: ``<root>/food-101/{images,meta}``; val = test split."""

    sources = {"train": "train", "val": "test", "test": "test"}
    URL = tvd.Food101._URL.replace("http://", "https://", 1)  # torchvision's is plain http; the host serves https
    ARCHIVE = Archive(URL, md5=tvd.Food101._MD5)

    def check_exists(self) -> None:
        self._check_finished(self.root)
        for sub in ("images", "meta"):
            if not (self.root / "food-101" / sub).is_dir():
                raise self._missing(self.root / "food-101" / sub, f"set data.download=true to fetch {self.URL}")

    def download_data(self) -> None:
        fetch_archive(self.ARCHIVE, self.root)

    def build(self, source: str, loader: Callable[[Any], Image.Image], transform: Callable) -> Built:
        how = f"delete {self.root / 'food-101'} and set data.download=true"
        ds = _torchvision(lambda: tvd.Food101(str(self.root), split=source, loader=loader, transform=transform),
                          self.root, how)
        return ds, list(ds.classes)


class Flowers102DataModule(ImageDataModule):
    """Oxford Flowers-102 in torchvision's layout: ``<root>/flowers-102/{jpg/,imagelabels.mat,setid.mat}``."""

    sources = {"train": "train", "val": "val", "test": "test"}
    URL = tvd.Flowers102._download_url_prefix

    def __init__(self, root: Optional[str], num_classes: Optional[int] = 102, **kwargs: Any) -> None:
        super().__init__(root, num_classes=num_classes, **kwargs)

    FILES = {
        key: Archive(tvd.Flowers102._download_url_prefix + name, md5=md5)
        for key, (name, md5) in tvd.Flowers102._file_dict.items()
    }

    def check_exists(self) -> None:
        base = self.root / "flowers-102"
        self._check_finished(base)
        for path in (base / "jpg", base / "imagelabels.mat", base / "setid.mat"):
            if not path.exists():
                raise self._missing(path, f"set data.download=true to fetch it from {self.URL}")

    def download_data(self) -> None:
        base = self.root / "flowers-102"
        fetch_archive(self.FILES["image"], base)
        for key in ("label", "setid"):
            fetch_file(self.FILES[key], base)

    def build(self, source: str, loader: Callable[[Any], Image.Image], transform: Callable) -> Built:
        how = f"delete {self.root / 'flowers-102'} and set data.download=true"
        make = lambda: tvd.Flowers102(str(self.root), split=source, loader=loader, transform=transform)  # noqa: E731
        return _torchvision(make, self.root, how), list(tvd.Flowers102.classes)


class INat2021DataModule(ImageDataModule):
    """iNaturalist 2021 in torchvision's layout: ``<root>/2021_train[_mini]/<id>_<kingdom>_..._<species>/``
    and ``<root>/2021_valid/``; ``mini=true`` trains on the 50-images-per-class subset.
    Class names are "Genus species"."""

    def __init__(self, root: Optional[str], mini: bool = False, **kwargs: Any) -> None:
        self.train_version = "2021_train_mini" if mini else "2021_train"
        super().__init__(root, **kwargs)

    @property
    def sources(self) -> dict[str, str]:  # type: ignore[override]
        return {"train": self.train_version, "val": "2021_valid", "test": "2021_valid"}

    def check_exists(self) -> None:
        self._check_finished(self.root)
        for version in (self.train_version, "2021_valid"):
            path = self.root / version
            if not path.is_dir() or not any(path.iterdir()):
                raise self._missing(path, f"set data.download=true to fetch {tvd.inaturalist.DATASET_URLS[version]}")

    @staticmethod
    def archive(version: str) -> Archive:
        """The archive of ``version`` (e.g. ``2021_valid``: val.tar.gz, whose ``val/`` becomes ``2021_valid/``)."""
        url = tvd.inaturalist.DATASET_URLS[version]
        folder = url.rsplit("/", 1)[1].removesuffix(".tar.gz")
        return Archive(url, md5=tvd.inaturalist.DATASET_MD5[version], filename=f"{version}.tgz",
                       rename=((folder, version),))

    def download_data(self) -> None:
        for version in (self.train_version, "2021_valid"):
            fetch_archive(self.archive(version), self.root)

    def build(self, source: str, loader: Callable[[Any], Image.Image], transform: Callable) -> Built:
        how = f"check {self.root / source} (folders <00000>_<kingdom>_..._<genus>_<species>)"
        make = lambda: tvd.INaturalist(str(self.root), version=source, loader=loader, transform=transform)  # noqa: E731
        ds = _torchvision(make, self.root, how)
        counts = torch.bincount(torch.tensor([c for c, _ in ds.index], dtype=torch.long),
                                minlength=len(ds.all_categories))
        empty = [str(self.root / source / ds.all_categories[i]) for i in torch.nonzero(counts == 0).flatten().tolist()]
        if empty:
            raise ConfigError(f"empty class folders: {', '.join(empty[:10])}; add images or remove the folders")
        return ds, [" ".join(name.split("_")[6:8]) for name in ds.all_categories]


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 in torchvision's python-pickle batches: ``<root>/cifar-10-batches-py/``; val = test."""

    tv_class = tvd.CIFAR10
    default_mean, default_std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    sources = {"train": "train", "val": "test", "test": "test"}

    def __init__(self, root: Optional[str], image_size: int = 32, crop_pct: float = 1.0, **kwargs: Any) -> None:
        super().__init__(root, image_size=image_size, crop_pct=crop_pct, **kwargs)

    def check_exists(self) -> None:
        self._check_finished(self.root)
        path = self.root / self.tv_class.base_folder
        if not path.is_dir():
            raise self._missing(path, f"set data.download=true to fetch {self.tv_class.url}")

    def download_data(self) -> None:
        tv = self.tv_class
        fetch_archive(Archive(tv.url, md5=tv.tgz_md5, filename=tv.filename), self.root)

    def build(self, source: str, loader: Callable[[Any], Image.Image], transform: Callable) -> Built:
        how = f"delete {self.root / self.tv_class.base_folder} and set data.download=true"
        make = lambda: self.tv_class(str(self.root), train=source == "train", transform=transform)  # noqa: E731
        ds = _torchvision(make, self.root, how)
        return ds, list(ds.classes)


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (fine labels) in torchvision's python-pickle format: ``<root>/cifar-100-python/``."""

    tv_class = tvd.CIFAR100
    default_mean, default_std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
