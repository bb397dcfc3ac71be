"""Augmentation settings (``data.augment.*``) and the batch-level part applied on device.

Per-image augmentation (random-resized-crop range, flips, RandAugment, colour jitter) runs in
the DataLoader on uint8 PIL images (:mod:`data.transforms`). Random erasing and Mixup/CutMix
run on the training device, after normalisation, on whole training batches
(:class:`BatchAugment`, called from ``BaseDataModule.on_after_batch_transfer``), as in timm's
training script. With Mixup/CutMix on, targets become soft ``(B, num_classes)`` rows (label
smoothing included) and the module's loss switches to ``SoftTargetCrossEntropy``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional

import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.data.random_erasing import RandomErasing

from vision_attn.errors import ConfigError

#: Named recipes (``augment=<name>`` on the command line, ``data.augment.recipe``). Each sets every
#: per-image and batch key except ``hflip`` (a per-dataset choice: text and digits must not be
#: mirrored) and ``label_smoothing`` (``optim.label_smoothing``). Keys given next to the recipe win.
RECIPES: dict[str, dict[str, Any]] = {
    # Swin/DeiT on ImageNet: large data trained long. 8 % crops, RandAugment m9, Mixup/CutMix, erasing.
    "imagenet": dict(
        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), color_jitter=0.4, randaugment="rand-m9-mstd0.5-inc1",
        reprob=0.25, remode="pixel", recount=1, mixup=0.8, cutmix=1.0, cutmix_minmax=None,
        mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode="batch",
    ),
    # Small or fine-tuning data: mild crops only; no RandAugment, colour jitter, erasing or mixing.
    "light": dict(
        scale=(0.6, 1.0), ratio=(3 / 4, 4 / 3), color_jitter=0.0, randaugment=None,
        reprob=0.0, remode="pixel", recount=1, mixup=0.0, cutmix=0.0, cutmix_minmax=None,
        mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode="batch",
    ),
}
AUTO = "auto"
#: ``recipe=auto`` picks ``imagenet`` from this many training images per class, else ``light``
#: (ImageNet has ~1,300 per class, Imagenette ~950, Food-101 750; small folders have far fewer).
AUTO_MIN_IMAGES_PER_CLASS = 500


def auto_recipe(images: int, classes: int) -> tuple[str, str]:
    """The recipe ``recipe=auto`` picks for a training split, and the reason in words."""
    per_class = images / max(classes, 1)
    name = "imagenet" if per_class >= AUTO_MIN_IMAGES_PER_CLASS else "light"
    relation = ">=" if name == "imagenet" else "<"
    return name, (
        f"{images} training images in {classes} classes = {per_class:.0f} per class "
        f"{relation} {AUTO_MIN_IMAGES_PER_CLASS}; choose one with augment=imagenet or augment=light"
    )


@dataclass
class AugmentConfig:
    """``data.augment``: every key off / neutral by default (the ``shapes`` setting).

    ``recipe`` names a preset of :data:`RECIPES` that fills the keys not given (null) explicitly
    (``randaugment: off`` turns RandAugment off whatever the recipe);
    ``auto`` defers the choice to the DataModule, which picks one from the training split's size
    (:func:`auto_recipe`) once it has scanned the data.
    """

    scale: tuple[float, float] = (0.08, 1.0)  # random-resized-crop area range
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # random-resized-crop aspect range
    hflip: float = 0.5
    color_jitter: float = 0.0  # ignored when randaugment is set (timm semantics)
    randaugment: Optional[str] = None  # timm string, e.g. rand-m9-mstd0.5-inc1
    reprob: float = 0.0  # random erasing probability (per image, on device)
    remode: str = "pixel"
    recount: int = 1
    mixup: float = 0.0  # Mixup alpha (0 = off)
    cutmix: float = 0.0  # CutMix alpha (0 = off)
    cutmix_minmax: Optional[tuple[float, float]] = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"  # batch | pair | elem
    label_smoothing: float = 0.1  # smoothing folded into Mixup's soft targets
    recipe: Optional[str] = None  # imagenet | light | auto | None (only the keys given)

    SAMPLE_KEYS = ("scale", "ratio", "hflip", "color_jitter", "randaugment")

    @classmethod
    def from_mapping(cls, values: Optional[Mapping[str, Any]]) -> "AugmentConfig":
        """Build and validate from ``data.augment``; unknown keys are named with the valid ones."""
        values = dict(values or {})
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ConfigError(f"data.augment.{unknown[0]} is not an augmentation key; valid keys: {', '.join(names)}")
        recipe = values.get("recipe")
        if recipe is not None and recipe != AUTO and recipe not in RECIPES:
            raise ConfigError(
                f"data.augment.recipe={recipe!r} is not a recipe; choose augment={' | augment='.join([*RECIPES, AUTO])}"
            )
        given = {k: v for k, v in values.items() if v is not None}  # null = the recipe's (or the default)
        if given.get("randaugment") is False or str(given.get("randaugment", "")).lower() == "off":  # YAML: off = False
            given["randaugment"] = None
        values = {**RECIPES.get(recipe, {}), **given}
        for key in ("scale", "ratio", "cutmix_minmax"):
            if values.get(key) is not None:
                values[key] = tuple(float(v) for v in values[key])
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise a ConfigError naming ``data.augment.<key>`` for an out-of-range value."""
        for key in ("hflip", "reprob", "mixup_prob", "mixup_switch_prob", "label_smoothing"):
            if not 0.0 <= float(getattr(self, key)) <= 1.0:
                raise ConfigError(f"data.augment.{key}={getattr(self, key)} must be in [0, 1]")
        for key in ("mixup", "cutmix", "color_jitter"):
            if float(getattr(self, key)) < 0:
                raise ConfigError(f"data.augment.{key}={getattr(self, key)} must be >= 0")
        lo, hi = self.scale
        if len(self.scale) != 2 or not 0 < lo <= hi <= 1:
            raise ConfigError(f"data.augment.scale={list(self.scale)} must be [min, max] with 0 < min <= max <= 1")
        if len(self.ratio) != 2 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ConfigError(f"data.augment.ratio={list(self.ratio)} must be [min, max] with 0 < min <= max")
        if self.mixup_mode not in ("batch", "pair", "elem"):
            raise ConfigError(f"data.augment.mixup_mode={self.mixup_mode!r} must be batch, pair or elem")
        if self.remode not in ("pixel", "rand", "const"):
            raise ConfigError(f"data.augment.remode={self.remode!r} must be pixel, rand or const")
        if self.randaugment is not None and not str(self.randaugment).startswith("rand"):
            raise ConfigError(
                f"data.augment.randaugment={self.randaugment!r}: expected a timm RandAugment string like "
                "rand-m9-mstd0.5-inc1, or off"
            )

    @property
    def is_auto(self) -> bool:
        """True while the recipe is still to be chosen from the data (``recipe=auto``)."""
        return self.recipe == AUTO

    @property
    def mixes(self) -> bool:
        """True when Mixup or CutMix is on (targets become soft)."""
        return self.mixup_prob > 0 and (self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None)

    def sample_level_changes(self) -> list[str]:
        """Per-image keys set away from their defaults (for datasets that cannot use them)."""
        default = AugmentConfig()
        return [k for k in self.SAMPLE_KEYS if getattr(self, k) != getattr(default, k)]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class AnyBatchMixup(Mixup):
    """timm's Mixup without the even-batch assertion: odd batches (a last partial batch) mix too.

    ``batch`` and ``elem`` modes pair image i with image B-1-i, which works for any B (the middle
    image of an odd batch mixes with itself); ``pair`` falls back to ``elem`` for odd batches.
    """

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mode = "elem" if (self.mode == "pair" and len(x) % 2) else self.mode
        if mode == "elem":
            lam = self._mix_elem(x)
        elif mode == "pair":
            lam = self._mix_pair(x)
        else:
            lam = self._mix_batch(x)
        return x, mixup_target(target, self.num_classes, lam, self.label_smoothing)


@dataclass
class BatchAugment:
    """Random erasing then Mixup/CutMix on a normalised float training batch (on its device)."""

    config: AugmentConfig
    num_classes: int
    erasing: Optional[RandomErasing] = field(init=False, default=None)
    mixup: Optional[Mixup] = field(init=False, default=None)

    def __post_init__(self) -> None:
        c = self.config
        if c.reprob > 0:
            self.erasing = RandomErasing(c.reprob, mode=c.remode, max_count=c.recount, num_splits=0, device="cpu")
        if c.mixes:
            self.mixup = AnyBatchMixup(
                mixup_alpha=c.mixup,
                cutmix_alpha=c.cutmix,
                cutmix_minmax=list(c.cutmix_minmax) if c.cutmix_minmax else None,
                prob=c.mixup_prob,
                switch_prob=c.mixup_switch_prob,
                mode=c.mixup_mode,
                label_smoothing=c.label_smoothing,
                num_classes=self.num_classes,
            )

    @property
    def active(self) -> bool:
        """Whether it changes batches at all (random erasing or Mixup/CutMix on)."""
        return self.erasing is not None or self.mixup is not None

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.erasing is not None:
            self.erasing.device = images.device
            images = self.erasing(images)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        return images, targets
