"""LightningDataModules."""
from __future__ import annotations

import functools
import gc
import os
from typing import Any, Mapping, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from vision_attn.errors import ConfigError

from . import photos, shapes
from .augment import AugmentConfig, BatchAugment
from .resumable import resumable_train_loader


def check_positive(**values: int) -> None:
    """Raise a ConfigError naming ``data.<key>`` for any value that is not a positive int."""
    for key, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"data.{key}={value!r} must be a positive integer")


def usable_workers(requested: int) -> int:
    """``data.num_workers``, capped at the CPUs this process may use (said once in the log)."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if requested > available:
        rank_zero_info(f"data.num_workers={requested}: this process may use {available} CPUs, "
                       f"so {available} loader workers")
        return available
    return requested


@functools.cache
def leave_inherited_objects_to_the_parent() -> None:
    """Make every child forked from now on (our loader workers; any other fork without exec too)
    never collect the objects it inherits. Registered once per process.

    Each worker starts with a copy of the parent's uncollected garbage. When the worker's cyclic
    GC finalises it, a dead loader iterator's ``__del__`` (one a caught exception's traceback
    kept in a cycle, say) shuts that iterator's workers down from inside the new worker: it
    writes ``None`` by the old index queues' descriptor numbers, which in the worker may be
    closed by then or reused for a batch's shared memory, which then arrives corrupted (seen as a
    skip count of 5621758989533446192). PyTorch's DataLoader has no guard against this;
    ``gc.freeze()`` first thing in the child, as CPython's gc docs advise for fork without exec,
    leaves those objects out of the child's collections (refcounting still frees them, and what
    the child creates is collected as usual). Spawned workers inherit nothing and are unaffected.
    """
    os.register_at_fork(after_in_child=gc.freeze)


class BaseDataModule(L.LightningDataModule):
    """Loader plumbing shared by every dataset: workers, pinning, shuffling.

    Datasets yield uint8 ``(3, H, W)`` images; they are normalised with ``mean``/``std`` on the
    training device, after the transfer (4x less host-to-device traffic). Training batches then
    get the batch-level part of ``data.augment`` (random erasing, Mixup/CutMix: see
    :mod:`data.augment`); with Mixup/CutMix the targets become soft ``(B, num_classes)`` rows.
    A model that runs tiles (``model.tile_size``) gets the uint8 batch itself and normalises each
    tile with :meth:`normalize` (unless batch augmentation is on), so the whole image never
    exists as floats.
    """

    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    num_classes: int
    # Training sample (epoch, i) is drawn with the global RNGs seeded from (seed, epoch, i)
    # (data.resumable.SeededSamples); False for datasets that draw no global randomness.
    seed_samples: bool = True

    def __init__(
        self, image_size: int, batch_size: int, num_workers: int = 0, augment: Optional[Mapping[str, Any]] = None
    ) -> None:
        super().__init__()
        check_positive(image_size=image_size, batch_size=batch_size)
        if num_workers < 0:
            raise ConfigError(f"data.num_workers={num_workers} must be >= 0")
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, usable_workers(num_workers)
        self.augment_values = dict(augment or {})  # as given: recipe=auto is resolved against them later
        self.augment = AugmentConfig.from_mapping(self.augment_values)
        self._batch_augment: Optional[BatchAugment] = None
        self.splits: dict[str, Dataset] = {}

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        """A loader of ``split`` with a generator of its own: creating its iterator draws the
        workers' base seed from it, never from the global torch RNG that training draws from
        (drop path, random erasing); without it each validation would move the training stream,
        differently with 0 workers, persistent workers and after a resume."""
        if self.num_workers > 0:
            leave_inherited_objects_to_the_parent()
        return DataLoader(
            self.splits[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=shuffle and len(self.splits[split]) > self.batch_size,
            generator=torch.Generator(),
        )

    @property
    def batch_augment(self) -> BatchAugment:
        """Random erasing + Mixup/CutMix for training batches (built on first use)."""
        if self._batch_augment is None:
            self._batch_augment = BatchAugment(self.augment, self.num_classes)
        return self._batch_augment

    @property
    def mixup(self):
        """timm ``Mixup`` applied to training batches, or None when Mixup/CutMix is off."""
        return self.batch_augment.mixup

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, 3, H, W)`` -> float, normalised with ``mean``/``std``; floats pass through."""
        if images.dtype != torch.uint8:
            return images
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1) * 255
        return images.float().sub_(mean).div_(std)

    def on_after_batch_transfer(self, batch: tuple[torch.Tensor, torch.Tensor] | torch.Tensor, dataloader_idx: int):
        if torch.is_tensor(batch):  # the module's example_input_array (Lightning's summary table)
            return batch
        images, targets = batch
        training = self.trainer is not None and self.trainer.training
        if not (images.dtype == torch.uint8 and self._model_normalizes(training)):
            images = self.normalize(images)
        if training:
            images, targets = self.batch_augment(images, targets)
        return images, targets

    def _model_normalizes(self, training: bool) -> bool:
        """Whether uint8 batches go to the model as they are, to be normalised there tile by tile
        (``normalizes_tiles``: tile streams, no float copy of the whole image); never where batch
        augmentation (erasing, Mixup/CutMix) needs the float batch."""
        module = getattr(self.trainer, "lightning_module", None)
        if not getattr(module, "normalizes_tiles", False):
            return False
        return not (training and self.batch_augment.active)

    def train_dataloader(self) -> DataLoader:
        # Seeded, rank-aware and stateful: a run resumed mid-epoch continues at the next batch,
        # with the same per-sample augmentation, with any number of workers (data/resumable.py).
        return resumable_train_loader(self._loader("train", shuffle=True), self.trainer, self.seed_samples)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


class ShapesDataModule(BaseDataModule):
    """The embedded procedural dataset (see :mod:`data.shapes`). ``augment``: batch-level keys only."""

    name = "shapes"
    dataset = shapes.ShapesDataset
    seed_samples = False  # an image is a pure function of (seed, split, index), with no augmentation
    classes = shapes.CLASSES
    mean, std = shapes.MEAN, shapes.STD

    def __init__(
        self,
        image_size: int = 64,
        batch_size: int = 128,
        num_workers: int = 0,
        train_size: int = 20000,
        val_size: int = 2000,
        test_size: int = 2000,
        seed: int = 0,
        num_classes: Optional[int] = None,
        augment: Optional[Mapping[str, Any]] = None,
        task: str = "direction",
    ) -> None:
        recipe = (augment or {}).get("recipe")
        if recipe is not None:
            raise ConfigError(
                f"augment={recipe} (data.augment.recipe): {self.name} takes only batch-level augmentation "
                "(data.augment.mixup, cutmix, reprob...), not a per-image recipe: its images are rendered "
                "(and randomised) per index already"
            )
        per_image = sorted(set(augment or {}) & set(AugmentConfig.SAMPLE_KEYS))
        if per_image:
            raise ConfigError(
                f"data.augment.{per_image[0]}: {self.name} takes only batch-level augmentation (mixup, cutmix, "
                "reprob...): its images are rendered (and randomised) per index already"
            )
        super().__init__(image_size, batch_size, num_workers, augment)
        check_positive(train_size=train_size, val_size=val_size, test_size=test_size)
        self.task = task
        if task != "direction":
            if self.name != "shapes" or task not in shapes.TASKS:
                choices = list(shapes.TASKS) if self.name == "shapes" else ["direction"]
                raise ConfigError(f"data.task={task!r}: {self.name} has the tasks {choices}")
            self.classes = shapes.TASKS[task]
        if num_classes not in (None, len(self.classes)):
            what = f"{self.name} (data.task={task})" if self.name == "shapes" else self.name
            hint = f" (data=shapes_{task} sets both)" if task != "direction" else ""
            raise ConfigError(f"data.num_classes={num_classes}: {what} has exactly {len(self.classes)} classes; "
                              f"set data.num_classes={len(self.classes)} or null{hint}")
        self.num_classes = len(self.classes)
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.seed = seed

    def setup(self, stage: Optional[str] = None) -> None:
        for split, length in self.sizes.items():
            self.splits.setdefault(split, self.dataset(split, length, self.image_size, self.seed, task=self.task))


class PhotosDataModule(ShapesDataModule):
    """Offline real-photo crops (see :mod:`data.photos`): scikit-image's photographs, no download."""

    name = "photos"
    dataset = photos.PhotosDataset
    classes = photos.CLASSES
    mean, std = BaseDataModule.mean, BaseDataModule.std
