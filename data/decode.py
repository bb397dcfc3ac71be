"""Fast, strict image decoding: reduced-scale JPEG decoding, any mode to RGB, named errors.

``open_image(path, min_size)`` decodes a JPEG at the smallest 1/2, 1/4 or 1/8 DCT scale whose
shorter side is still >= ``min_size`` (PIL ``Image.draft``): a 2000x1500 photo headed for a
256 px resize decodes as 500x375, several times cheaper in IDCT, colour conversion and the
resize that follows. Other formats decode at full size. EXIF orientation is applied, and every
mode (grayscale, palette, CMYK, RGBA/LA, 16-bit, float) comes out as 8-bit RGB.
Any decoding failure raises :class:`CorruptImageError` naming the file.
"""
from __future__ import annotations

import os
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageOps

from vision_attn.errors import ConfigError

from .randaugment import tag_path

# torchvision's IMG_EXTENSIONS (what ImageFolder accepts), compared lower-case.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are composited over white
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")

PathLike = Union[str, os.PathLike]


class CorruptImageError(ConfigError):
    """An image file cannot be decoded. The message names the file and the fix.

    Re-raised from a DataLoader worker, the message is reduced back to its last line, so
    ``train.py`` still prints one clean line.
    """

    def __init__(self, message: str, path: Optional[str] = None, reason: str = "") -> None:
        if message.startswith(f"Caught {type(self).__name__}"):  # torch's ExceptionWrapper.reraise
            last = [line for line in message.splitlines() if line.strip()][-1]
            message = last.split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)
        self.path, self.reason = path, reason


def is_image_file(name: str) -> bool:
    """True for the file names an image folder loads (by extension, case-insensitive)."""
    return name.lower().endswith(IMG_EXTENSIONS)


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer or float grayscale -> 8-bit ``L``, scaled (not clipped).

    ``I;16*`` modes use the full 16-bit range. ``I``/``F`` images are scaled by the range their
    values occupy: <= 1.0 (float), <= 255 (8-bit data), otherwise 16-bit.
    """
    arr = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16"):
        top = 65535.0
    else:
        peak = float(arr.max()) if arr.size else 0.0
        top = 1.0 if (img.mode == "F" and peak <= 1.0) else 255.0 if peak <= 255.0 else 65535.0
    return Image.fromarray(np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Alpha is composited over :data:`ALPHA_BACKGROUND`."""
    if img.mode == "RGB":
        return img
    if img.mode in _HIGH_DEPTH_MODES:
        img = _high_depth_to_l(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, ALPHA_BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def _decode(path: PathLike, min_size: Optional[int]) -> Image.Image:
    with Image.open(path) as img:
        if min_size:
            img.draft("RGB", (min_size, min_size))  # JPEG only; a no-op for other formats
        img.load()
        orientation = img.getexif().get(0x0112, 1)
        if orientation != 1:
            img = ImageOps.exif_transpose(img)
        return to_rgb(img)


def open_image(path: PathLike, min_size: Optional[int] = None) -> Image.Image:
    """Decode ``path`` to RGB, at reduced JPEG scale keeping the shorter side >= ``min_size``."""
    try:
        return _decode(path, min_size)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib/struct errors...
        reason = f"{type(e).__name__}: {e}"
        raise CorruptImageError(
            f"cannot decode image {os.fspath(path)} ({reason}); fix or delete the file, "
            "or set data.skip_corrupt=true to skip unreadable images",
            path=os.fspath(path),
            reason=reason,
        ) from e


class ImageLoader:
    """Picklable ``loader(path) -> RGB image`` for torchvision datasets and workers."""

    def __init__(self, min_size: Optional[int] = None) -> None:
        self.min_size = min_size

    def __call__(self, path: PathLike) -> Image.Image:
        return tag_path(open_image(path, self.min_size), os.fspath(path))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(min_size={self.min_size})"
