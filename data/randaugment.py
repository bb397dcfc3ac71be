"""timm's RandAugment made safe for real photos, and augmentation failures that name their cause.

* **0-bit posterize.** ``PosterizeIncreasing`` maps magnitude 10 to 0 bits kept (timm's range is
  4..0 bits). Pillow <= 12 turned that into an all-black image; Pillow 13 raises ``ValueError:
  bits must be between or equal to 1 and 8``. With the Swin/DeiT recipe (``rand-m9-mstd0.5``)
  magnitude 10 is drawn about 2 % of the time, so an epoch on real photos crashed.
  :func:`posterize` keeps the old semantics (0 bits = black) on any Pillow.
* **Named failures.** :func:`guard_randaugment` wraps every op of a timm ``RandAugment`` so an
  exception names the op, the magnitude it drew and the argument it passed;
  :class:`GuardedCompose` adds the image file. The result is an :class:`AugmentationError`: a
  bug in the recipe, never counted as a corrupt file, never skipped by ``data.skip_corrupt``.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from PIL import Image, ImageOps
from timm.data import auto_augment
from torchvision import transforms

PATH_KEY = "vision_attn.path"  # ``Image.info`` key under which the loaders record the source file


class AugmentationError(RuntimeError):
    """A train/eval transform raised on an image: a bug to report, not a bad file."""


def posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize with Pillow <= 12 semantics on every Pillow: 0 bits gives a black image."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


class _RecordingLevel:
    """Wraps an op's ``level_fn``: remembers the magnitude drawn and the arguments it gave."""

    def __init__(self, level_fn: Callable) -> None:
        self.level_fn = level_fn
        self.magnitude: Optional[float] = None
        self.args: tuple = ()

    def __call__(self, magnitude: float, hparams: dict) -> tuple:
        self.magnitude, self.args = magnitude, ()
        self.args = self.level_fn(magnitude, hparams)
        return self.args


class GuardedOp:
    """A timm ``AugmentOp`` whose failure raises :class:`AugmentationError` naming op and magnitude."""

    def __init__(self, op: auto_augment.AugmentOp) -> None:
        if op.aug_fn is auto_augment.posterize:
            op.aug_fn = posterize
        if op.level_fn is not None and not isinstance(op.level_fn, _RecordingLevel):
            op.level_fn = _RecordingLevel(op.level_fn)
        self.op = op

    def __getattr__(self, name: str) -> Any:  # reads and writes go to the wrapped op: magnitude, prob...
        if name == "op":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.op, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "op":
            object.__setattr__(self, name, value)
        else:
            setattr(self.op, name, value)

    def __call__(self, img: Image.Image) -> Image.Image:
        level = self.op.level_fn if isinstance(self.op.level_fn, _RecordingLevel) else None
        if level is not None:
            level.magnitude, level.args = None, ()
        try:
            return self.op(img)
        except MemoryError:
            raise
        except Exception as e:
            drawn = (f"magnitude {level.magnitude:.3g} (argument {level.args})"
                     if level and level.magnitude is not None else "no magnitude")
            raise AugmentationError(
                f"RandAugment op {self.op.name} at {drawn} failed on a {img.mode} {img.size[0]}x{img.size[1]} image: "
                f"{type(e).__name__}: {e}"
            ) from e

    def __repr__(self) -> str:
        return f"Guarded{self.op!r}"


def guard_randaugment(transform: Callable) -> Callable:
    """Wrap the ops of every timm ``RandAugment`` inside ``transform`` (a Compose) with :class:`GuardedOp`."""
    for t in getattr(transform, "transforms", [transform]):
        if isinstance(t, auto_augment.RandAugment):
            t.ops = [op if isinstance(op, GuardedOp) else GuardedOp(op) for op in t.ops]
    return transform


def randaugment_ops(transform: Callable) -> list[GuardedOp]:
    """The (guarded) RandAugment ops inside ``transform``, in timm's order."""
    return [op for t in getattr(transform, "transforms", []) if isinstance(t, auto_augment.RandAugment) for op in t.ops]


def tag_path(img: Image.Image, path: str) -> Image.Image:
    """Record the file ``img`` was decoded from (read back by :class:`GuardedCompose`)."""
    img.info[PATH_KEY] = path
    return img


class GuardedCompose(transforms.Compose):
    """``Compose`` that turns any exception of a step into an :class:`AugmentationError`
    naming the step and the image file (recorded by :func:`tag_path`)."""

    def __init__(self, steps: Sequence[Callable]) -> None:
        super().__init__(list(steps))

    def __call__(self, img: Any) -> Any:
        source = img.info.get(PATH_KEY) if isinstance(img, Image.Image) else None
        where = f"image {source}" if source else "an image with no file (in-memory dataset)"
        for step in self.transforms:
            try:
                img = step(img)
            except AugmentationError as e:
                raise AugmentationError(f"{e} [{where}]; this is a bug in the augmentation, not a bad file") from e
            except MemoryError:
                raise
            except Exception as e:
                raise AugmentationError(
                    f"transform {type(step).__name__} failed on {where}: {type(e).__name__}: {e}; "
                    "this is a bug in the augmentation, not a bad file"
                ) from e
        return img
