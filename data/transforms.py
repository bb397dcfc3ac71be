"""Per-image train and eval transforms: PIL RGB in, uint8 ``(3, S, S)`` tensor out.

Both are :class:`~data.randaugment.GuardedCompose`: a failing step raises an
``AugmentationError`` naming the step (the RandAugment op and magnitude) and the file.

Train: aspect-preserving resize of the shorter side to ``resize`` (the decoder already got
within 2x of it by reduced-scale JPEG decoding), then random-resized-crop to ``image_size``
(timm's crop sampling), flip, RandAugment or colour jitter (timm's ``transforms_imagenet_train``).
The resize and the crop's resize are fused into one resampling of the crop box
(:class:`ResizedRandomResizedCrop`): the same crop geometry, one filter pass instead of two.
Eval (timm semantics): resize the shorter side to ``floor(image_size / crop_pct)``, then
center-crop ``image_size``. Images smaller than the target are upscaled. No normalisation
here: uint8 tensors go to the device and are normalised there.
"""
from __future__ import annotations

import math
import random
from typing import Callable, Optional, Sequence

import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from timm.data.transforms_factory import transforms_imagenet_eval, transforms_imagenet_train
from torchvision.transforms.functional import pil_modes_mapping

from vision_attn.errors import ConfigError

from .augment import AugmentConfig
from .randaugment import GuardedCompose, guard_randaugment

INTERPOLATIONS = ("bilinear", "bicubic", "lanczos", "nearest", "random")


def check_interpolation(interpolation: str) -> None:
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"data.interpolation={interpolation!r} must be one of {', '.join(INTERPOLATIONS)}")


def eval_resize_size(image_size: int, crop_pct: float) -> int:
    """Shorter side before the eval center crop: ``floor(image_size / crop_pct)`` (timm)."""
    if not 0.0 < crop_pct <= 1.0:
        raise ConfigError(f"data.crop_pct={crop_pct} must be in (0, 1] (eval crop = crop_pct x resized side)")
    return math.floor(image_size / crop_pct)


def shorter_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """``(w, h)`` after resizing the shorter side to ``size`` (torchvision's rounding)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


class ResizedRandomResizedCrop(RandomResizedCropAndInterpolation):
    """Resize the shorter side to ``resize``, then timm's random-resized-crop, in one resampling.

    The crop box is drawn (timm/torchvision sampling) on the image as resized, mapped back to the
    source pixels, and that box is resampled straight to the output size: the crop geometry of
    "resize, then crop, then resize" with one filter pass (faster, no double blur).
    """

    def __init__(self, size: int, resize: int, **kwargs) -> None:
        super().__init__(size, **kwargs)
        self.resize = resize

    def __call__(self, img: Image.Image) -> Image.Image:
        width, height = img.size
        sw, sh = shorter_side_size(width, height, self.resize)
        i, j, h, w = self.get_params(torch.zeros(1).expand(sh, sw), self.scale, self.ratio)  # a size, no pixels
        fx, fy = width / sw, height / sh
        box = (j * fx, i * fy, (j + w) * fx, (i + h) * fy)
        mode = (random.choice(self.interpolation) if isinstance(self.interpolation, (tuple, list))
                else self.interpolation)
        return img.resize((self.size[1], self.size[0]), pil_modes_mapping[mode], box=box, reducing_gap=3.0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, resize={self.resize}, scale={self.scale}, ratio={self.ratio})"


def train_transform(
    image_size: int,
    resize: int,
    augment: AugmentConfig,
    interpolation: str = "bicubic",
    mean: Sequence[float] = (0.485, 0.456, 0.406),
) -> Callable[[Image.Image], torch.Tensor]:
    """(Resize shorter side + random-resized-crop) -> flip -> RandAugment/jitter -> uint8 tensor."""
    check_interpolation(interpolation)
    timm_train = transforms_imagenet_train(
        img_size=image_size,
        scale=augment.scale,
        ratio=augment.ratio,
        hflip=augment.hflip,
        color_jitter=augment.color_jitter or None,
        auto_augment=augment.randaugment,
        interpolation=interpolation,
        mean=tuple(mean),
        use_prefetcher=True,  # uint8 tensor out, normalised on device
    )
    crop = ResizedRandomResizedCrop(image_size, resize, scale=augment.scale, ratio=augment.ratio,
                                    interpolation=interpolation)
    assert isinstance(timm_train.transforms[0], RandomResizedCropAndInterpolation)
    return guard_randaugment(GuardedCompose([crop, *timm_train.transforms[1:]]))


class DeferredTransform:
    """A transform chosen later (``recipe=auto`` waits for the data scan): set ``.transform``
    before the first image; DataLoader workers start after that and carry it."""

    def __init__(self) -> None:
        self.transform: Optional[Callable] = None

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if self.transform is None:
            raise RuntimeError("the train transform is not chosen yet: call the DataModule's setup() first")
        return self.transform(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"


def eval_transform(image_size: int, crop_pct: float,
                   interpolation: str = "bicubic") -> Callable[[Image.Image], torch.Tensor]:
    """Resize shorter side to ``floor(image_size / crop_pct)`` -> center crop -> uint8 tensor."""
    check_interpolation(interpolation)
    eval_resize_size(image_size, crop_pct)
    timm_eval = transforms_imagenet_eval(
        img_size=image_size,
        crop_pct=crop_pct,
        interpolation="bicubic" if interpolation == "random" else interpolation,
        use_prefetcher=True,
    )
    return GuardedCompose(timm_eval.transforms)
