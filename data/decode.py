"""Fast, strict image decoding: reduced-scale JPEG decoding, any mode to RGB, a pixel limit,
named errors.

``open_image(path, min_size)`` decodes a JPEG at the smallest 1/2, 1/4 or 1/8 DCT scale whose
shorter side is still >= ``min_size`` (PIL ``Image.draft``): a 2000x1500 photo headed for a
256 px resize decodes as 500x375, several times cheaper in IDCT, colour conversion and the
resize that follows. Other formats decode at full size. EXIF orientation is applied, and every
mode (grayscale, palette, CMYK, RGBA/LA, 16-bit, float) comes out as 8-bit RGB.

Pixel limit (``data.max_image_pixels``, default PIL's ~89.5 MP, None = none): it applies to the
size that would be decoded, after the JPEG draft reduction, so a huge JPEG headed for a small
resize still loads; nothing larger is ever decoded (:class:`ImageTooLargeError`).

Errors, each naming the file:

- :class:`CorruptImageError`: undecodable data (or a file gone since the scan);
- :class:`ImageTooLargeError`: over the pixel limit even at the smallest allowed scale;
  both are :class:`BadImageError` (a data problem: skipped with ``data.skip_corrupt=true``);
- :class:`ImagePermissionError`: the file is not readable by this user (not skipped, not retried);
- :class:`ImageReadError`: an OS read error (EIO, ESTALE...); transient ones are retried first
  (:data:`RETRY_DELAYS_S`). An ``OSError``, not a ConfigError: the file may be fine, the
  storage failed, and a restart or ``resume=true`` can succeed. Not skipped.

``MemoryError`` propagates unchanged.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional, Union

import numpy as np
from PIL import Image, ImageOps

from vision_attn.errors import ConfigError

from .randaugment import tag_path

log = logging.getLogger(__name__)

# torchvision's IMG_EXTENSIONS (what ImageFolder accepts), compared lower-case.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are composited over white
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")

DEFAULT_MAX_IMAGE_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)  # PIL's default Image.MAX_IMAGE_PIXELS
RETRY_DELAYS_S = (0.1, 0.5, 2.0)  # sleeps between the attempts at a transient read error
TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("EIO", "ESTALE", "EAGAIN", "EWOULDBLOCK", "ETIMEDOUT", "EINTR", "EBUSY", "ECONNRESET",
                 "ECONNABORTED", "ENETDOWN", "ENETUNREACH", "EHOSTUNREACH", "ENOLINK", "ECOMM", "EREMOTEIO")
    if hasattr(errno, name)
)
_PIL_LIMIT_LOCK = threading.Lock()  # guards PIL's process-wide Image.MAX_IMAGE_PIXELS

PathLike = Union[str, os.PathLike]


def _one_line(cls: type, message: str) -> str:
    """``message`` without torch's worker-reraise wrapper ("Caught X in DataLoader worker...")."""
    if message.startswith(f"Caught {cls.__name__}"):  # torch's ExceptionWrapper.reraise
        last = [line for line in message.splitlines() if line.strip()][-1]
        message = last.split(f"{cls.__name__}: ", 1)[-1]
    return message


class BadImageError(ConfigError):
    """One image file cannot be used (a data problem). The message names the file and the fix.

    Re-raised from a DataLoader worker, the message is reduced back to its last line, so
    ``train.py`` still prints one clean line. ``kind`` says what is wrong, for the skip log.
    """

    kind = "unusable"

    def __init__(self, message: str, path: Optional[str] = None, reason: str = "") -> None:
        super().__init__(_one_line(type(self), message))
        self.path, self.reason = path, reason


class CorruptImageError(BadImageError):
    """An image file cannot be decoded."""

    kind = "corrupt"


class ImageTooLargeError(BadImageError):
    """An image is over ``data.max_image_pixels`` even at the smallest allowed decode scale."""

    kind = "too large"


class ImagePermissionError(ConfigError):
    """An image file is not readable by this user. Not skipped by ``data.skip_corrupt``."""

    def __init__(self, message: str, path: Optional[str] = None) -> None:
        super().__init__(_one_line(type(self), message))
        self.path = path


class ImageReadError(OSError):
    """The OS failed to read an image file (EIO, ESTALE...), after retrying transient errors.

    Not a ConfigError (the data may be fine) and not skipped by ``data.skip_corrupt``.
    """

    def __init__(self, message: str, path: Optional[str] = None, error: Optional[int] = None) -> None:
        super().__init__(_one_line(type(self), message))
        self.path, self.errno = path, error


def is_image_file(name: str) -> bool:
    """True for the file names an image folder loads (by extension, case-insensitive)."""
    return name.lower().endswith(IMG_EXTENSIONS)


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer or float grayscale -> 8-bit ``L``, scaled (not clipped).

    ``I;16*`` modes use the full 16-bit range. ``I``/``F`` images are scaled by the range their
    values occupy: <= 1.0 (float), <= 255 (8-bit data), otherwise 16-bit.
    """
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        top = 65535.0
    else:
        peak = float(arr.max()) if arr.size else 0.0
        top = 1.0 if (img.mode == "F" and peak <= 1.0) else 255.0 if peak <= 255.0 else 65535.0
    out = np.empty(arr.shape, np.uint8)
    rows = max(1, 2**20 // max(1, arr.shape[1] if arr.ndim > 1 else 1))  # ~8 MB of float64 at a time
    for r0 in range(0, len(arr), rows):  # in bands of rows: no float64 copy of the whole image
        band = arr[r0 : r0 + rows].astype(np.float64)
        out[r0 : r0 + rows] = np.clip(np.rint(band * (255.0 / top)), 0, 255)
    return Image.fromarray(out, "L")


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


@contextmanager
def _pil_limit_off() -> Iterator[None]:
    """PIL checks its own limit in ``Image.open`` from the header size, before any draft: turn
    it off while the header is read (the decode size is checked by :func:`_check_pixels`)."""
    with _PIL_LIMIT_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def allow_in_pil(max_pixels: Optional[int]) -> None:
    """Raise PIL's process-wide limit to ``max_pixels`` (None: off) if it is lower, so that crops
    of an image this module decoded (PIL checks crop boxes too) do not fail on PIL's default."""
    with _PIL_LIMIT_LOCK:
        current = Image.MAX_IMAGE_PIXELS
        if current is not None and (max_pixels is None or max_pixels > current):
            Image.MAX_IMAGE_PIXELS = max_pixels


def _check_pixels(path: str, img: Image.Image, full: tuple[int, int], max_pixels: Optional[int]) -> None:
    """Raise :class:`ImageTooLargeError` if ``img`` (maybe drafted) would decode over the limit."""
    w, h = img.size
    if max_pixels is None or w * h <= max_pixels:
        return
    drafted = f", {w}x{h} at the smallest JPEG scale the resize allows" if (w, h) != full else ""
    raise ImageTooLargeError(
        f"image {path} is {full[0]}x{full[1]} = {full[0] * full[1]} pixels{drafted}, over the limit "
        f"data.max_image_pixels={max_pixels}: raise it (data.max_image_pixels={w * h}, or null for no limit; "
        "each loader worker holds about 3 bytes per pixel), shrink the file, or remove it",
        path=path,
        reason=f"{w * h} pixels > data.max_image_pixels={max_pixels}",
    )


def _decode(path: PathLike, min_size: Optional[int], max_pixels: Optional[int]) -> Image.Image:
    with _pil_limit_off():
        opened = Image.open(path)
    with opened as img:
        full = img.size
        if min_size:
            img.draft("RGB", (min_size, min_size))  # JPEG only; a no-op for other formats
        _check_pixels(os.fspath(path), img, full, max_pixels)
        img.load()
        orientation = img.getexif().get(0x0112, 1)
        if orientation != 1:
            img = ImageOps.exif_transpose(img)
        return to_rgb(img)


def _corrupt(path: str, e: BaseException) -> CorruptImageError:
    reason = f"{type(e).__name__}: {e}"
    return CorruptImageError(
        f"cannot decode image {path} ({reason}); fix or delete the file, "
        "or set data.skip_corrupt=true to skip unreadable images",
        path=path,
        reason=reason,
    )


def _os_error(path: str, e: OSError, attempts: int) -> Exception:
    """The error for an OS-level failure to read ``path``, by its errno."""
    if isinstance(e, PermissionError) or e.errno in (errno.EACCES, errno.EPERM):
        return ImagePermissionError(
            f"permission denied reading image {path} ({e}): make it readable by this user "
            "(e.g. chmod a+r on the files and a+rx on their folders) or run as a user who can read it",
            path=path,
        )
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    return ImageReadError(
        f"cannot read image {path}{tries} ({errno.errorcode.get(e.errno, e.errno)}: {e.strerror or e}): "
        "the storage failed, not the file's data; check the filesystem, then restart (resume=true)",
        path=path,
        error=e.errno,
    )


def open_image(
    path: PathLike, min_size: Optional[int] = None, max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS
) -> Image.Image:
    """Decode ``path`` to RGB, at reduced JPEG scale keeping the shorter side >= ``min_size``, at
    most ``max_pixels`` decoded (None: no limit). Transient read errors are retried."""
    name, attempt = os.fspath(path), 1
    while True:
        try:
            return _decode(path, min_size, max_pixels)
        except (BadImageError, MemoryError):
            raise
        except Image.DecompressionBombError as e:  # a plugin's own check (e.g. TIFF tiles)
            raise ImageTooLargeError(
                f"image {name} is too large for PIL ({e}); raise data.max_image_pixels (null: no limit), "
                "shrink the file, or remove it",
                path=name,
                reason=str(e),
            ) from e
        except OSError as e:
            if e.errno is None or e.errno == errno.ENOENT:  # PIL's decoding errors carry no errno
                raise _corrupt(name, e) from e
            if e.errno not in TRANSIENT_ERRNOS or attempt > len(RETRY_DELAYS_S):
                raise _os_error(name, e, attempt) from e
            delay = RETRY_DELAYS_S[attempt - 1]
            log.warning(f"reading image {name} failed ({e}); retry {attempt} of {len(RETRY_DELAYS_S)} in {delay} s")
            time.sleep(delay)
            attempt += 1
        except Exception as e:  # PIL raises SyntaxError, ValueError, zlib/struct errors...
            raise _corrupt(name, e) from e


class ImageLoader:
    """Picklable ``loader(path) -> RGB image`` for torchvision datasets and workers."""

    def __init__(self, min_size: Optional[int] = None, max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.min_size, self.max_pixels = min_size, max_pixels

    def __call__(self, path: PathLike) -> Image.Image:
        allow_in_pil(self.max_pixels)  # in this (worker) process, for the transforms' crops
        return tag_path(open_image(path, self.min_size, self.max_pixels), os.fspath(path))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(min_size={self.min_size}, max_pixels={self.max_pixels})"
