"""Decoding: reduced-scale JPEG decoding, every PIL mode to RGB, EXIF orientation, the pixel limit,
named errors (corrupt, too large, permission, read errors retried), MemoryError propagated."""
from __future__ import annotations

import errno
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from torch.utils.data import Dataset

import data.decode as decode
from data.decode import (
    ALPHA_BACKGROUND,
    DEFAULT_MAX_IMAGE_PIXELS,
    CorruptImageError,
    ImageLoader,
    ImagePermissionError,
    ImageReadError,
    ImageTooLargeError,
    open_image,
    to_rgb,
)
from data.fakes import photo, save, write_truncated
from data.folder import SkipCorrupt
from vision_attn.errors import ConfigError


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory) -> Path:
    return save(photo(0, (2000, 1500), noise=4.0), tmp_path_factory.mktemp("big") / "big.jpg")


@pytest.mark.parametrize(
    "min_size,expected",
    [(256, (500, 375)), (180, (250, 188)), (400, (1000, 750)), (751, (2000, 1500)), (None, (2000, 1500))],
)
def test_draft_decodes_at_the_smallest_scale_keeping_the_shorter_side(big_jpeg, min_size, expected):
    # scale = largest of 8, 4, 2, 1 <= min(2000 // s, 1500 // s); size = ceil(2000 / scale), ceil(1500 / scale)
    img = open_image(big_jpeg, min_size)
    assert img.size == expected and img.mode == "RGB"
    if min_size:
        assert min(img.size) >= min_size


def test_draft_decode_matches_full_decode_then_resize(big_jpeg):
    small = open_image(big_jpeg, 256)
    full = open_image(big_jpeg).resize(small.size, Image.Resampling.BOX)
    a, b = np.asarray(small, np.float32), np.asarray(full, np.float32)
    diff = np.abs(a - b)
    assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 4, (diff.mean(), np.percentile(diff, 99))
    other = np.asarray(photo(1, small.size), np.float32)  # a different photo is far away
    assert np.abs(a - other).mean() > 20


def test_png_is_decoded_at_full_size(tmp_path):
    path = save(photo(2, (640, 480)), tmp_path / "x.png")
    assert open_image(path, 64).size == (640, 480)


def test_loader_is_picklable_and_uses_its_min_size(big_jpeg):
    import pickle

    loader = pickle.loads(pickle.dumps(ImageLoader(256)))
    assert loader(big_jpeg).size == (500, 375)


def _png16_rgb(path: Path, arr: np.ndarray) -> Path:
    """A 16-bit-per-channel RGB PNG, written by hand (PIL cannot write 48-bit)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


def _gray(rgb: Image.Image) -> np.ndarray:
    arr = np.asarray(rgb)
    assert rgb.mode == "RGB" and (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    return arr[..., 0]


def test_grayscale_jpeg_and_png_become_rgb_with_equal_channels(tmp_path):
    gray = photo(0, (64, 48)).convert("L")
    for name in ("g.png", "g.jpg"):
        out = open_image(save(gray, tmp_path / name))
        assert Image.open(tmp_path / name).mode == "L"
        assert open_image(tmp_path / name, 16).size == ((32, 24) if name.endswith("jpg") else (64, 48))
        assert np.abs(_gray(out).astype(int) - np.asarray(gray, int)).mean() < (0.01 if name.endswith("png") else 3)


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 64 * 32).reshape(32, 64).astype(np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I;16")
    out = _gray(open_image(path))
    expected = np.rint(values.astype(np.float64) * 255 / 65535)
    assert np.abs(out - expected).max() <= 1 and out.min() == 0 and out.max() == 255  # clipping gives all 255


def test_16bit_rgb_png_keeps_its_colours(tmp_path):
    arr = np.random.default_rng(0).integers(0, 65536, (16, 16, 3)).astype(np.uint16)
    out = np.asarray(open_image(_png16_rgb(tmp_path / "rgb16.png", arr)), int)
    assert np.abs(out - (arr >> 8)).max() <= 1


def test_32bit_int_and_float_images_are_scaled(tmp_path):
    ints = (np.arange(256).reshape(16, 16) * 256).astype(np.int32)  # 16-bit range stored as mode I
    Image.fromarray(ints, "I").save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    assert np.abs(_gray(open_image(tmp_path / "i.tif")) - np.rint(ints * 255 / 65535)).max() <= 1
    floats = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    Image.fromarray(floats, "F").save(tmp_path / "f.tif")
    assert np.abs(_gray(open_image(tmp_path / "f.tif")) - np.rint(floats * 255)).max() <= 1


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = save(photo(1, (64, 48)).convert("CMYK"), tmp_path / "cmyk.jpg")
    assert Image.open(path).mode == "CMYK"
    out = open_image(path)
    assert out.mode == "RGB" and out.size == (64, 48) and open_image(path, 16).size == (32, 24)
    reference = np.asarray(photo(1, (64, 48)), int)
    assert np.abs(np.asarray(out, int) - reference).mean() < 8


def test_rgba_is_composited_over_the_background(tmp_path):
    rgb = np.asarray(photo(0, (60, 20)))
    alpha = np.zeros((20, 60), np.uint8)
    alpha[:, 20:40], alpha[:, 40:] = 128, 255  # transparent | half | opaque
    path = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)
    out = np.asarray(open_image(path), np.float64)
    assert (out[:, :20] == ALPHA_BACKGROUND).all()
    assert (out[:, 40:] == rgb[:, 40:]).all()
    blend = (rgb[:, 20:40].astype(np.float64) * 128 + np.array(ALPHA_BACKGROUND) * 127) / 255
    assert np.abs(out[:, 20:40] - blend).max() <= 1.5


def test_la_palette_and_bilevel_modes_become_rgb(tmp_path):
    base = photo(2, (40, 30))
    la = base.convert("LA")
    la.putalpha(255)
    cases = {
        "la.png": la,
        "p.png": base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
        "one.png": base.convert("1"),
    }
    for name, img in cases.items():
        img.save(tmp_path / name)
        out = open_image(tmp_path / name)
        assert out.mode == "RGB" and out.size == (40, 30)
        expected = np.asarray(img.convert("RGB"), int)
        assert np.abs(np.asarray(out, int) - expected).max() <= 1, name
    transparent = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    transparent.info["transparency"] = 0
    transparent.save(tmp_path / "pt.png", transparency=0)
    out = np.asarray(open_image(tmp_path / "pt.png"))
    mask = np.asarray(Image.open(tmp_path / "pt.png")) == 0
    assert mask.any() and (out[mask] == ALPHA_BACKGROUND).all()


def test_to_rgb_returns_rgb_images_unchanged():
    img = photo(0, (8, 8))
    assert to_rgb(img) is img


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rot.jpg"
    photo(0, (64, 48)).save(path, exif=exif)
    assert open_image(path).size == (48, 64)
    assert open_image(path, 16).size == (48 // 2, 64 // 2)  # drafted, then rotated


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "missing"])
def test_unreadable_files_raise_config_errors_naming_the_file(tmp_path, big_jpeg, kind):
    path = tmp_path / f"{kind}.jpg"
    if kind == "truncated":
        write_truncated(big_jpeg, path, keep=0.5)
    elif kind == "garbage":
        path.write_bytes(b"this is not an image" * 10)
    elif kind == "empty":
        path.write_bytes(b"")
    for min_size in (None, 256):
        with pytest.raises(CorruptImageError) as info:
            open_image(path, min_size)
        assert isinstance(info.value, ConfigError) and info.value.path == str(path)
        assert str(path) in str(info.value) and "data.skip_corrupt=true" in str(info.value)


def test_error_reraised_from_a_worker_keeps_one_clean_line():
    message = (
        "Caught CorruptImageError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n    raise\n'
        "data.decode.CorruptImageError: cannot decode image /d/a.jpg (OSError: truncated); fix or delete the file\n"
    )
    assert str(CorruptImageError(message)) == (
        "cannot decode image /d/a.jpg (OSError: truncated); fix or delete the file")


# --- pixel limit (data.max_image_pixels) ------------------------------------------------


@pytest.fixture(scope="module")
def huge_jpeg(tmp_path_factory) -> Path:
    """18000x10000 (180 MP: over twice PIL's default limit), a cheap grayscale gradient."""
    path = tmp_path_factory.mktemp("huge") / "huge.jpg"
    Image.linear_gradient("L").resize((18000, 10000), Image.Resampling.NEAREST).save(path, quality=5)
    return path


def test_pil_default_limit_is_the_key_default():
    assert DEFAULT_MAX_IMAGE_PIXELS == Image.MAX_IMAGE_PIXELS == 89478485
    assert open_image.__defaults__[-1] == ImageLoader().max_pixels == DEFAULT_MAX_IMAGE_PIXELS


def test_huge_jpeg_decodes_at_reduced_scale_under_the_default_limit(huge_jpeg):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        img = open_image(huge_jpeg, 256)
    assert img.size == (18000 // 8, 10000 // 8) and img.mode == "RGB"  # 2.8 MP decoded, not 180 MP
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_IMAGE_PIXELS  # PIL's own limit is back
    with pytest.raises(ImageTooLargeError) as info:  # full size: never decoded
        open_image(huge_jpeg)
    message = str(info.value)
    assert str(huge_jpeg) in message and "18000x10000 = 180000000 pixels" in message
    assert f"data.max_image_pixels={DEFAULT_MAX_IMAGE_PIXELS}" in message
    assert not isinstance(info.value, CorruptImageError) and isinstance(info.value, ConfigError)


def test_jpeg_limit_applies_to_the_drafted_size(big_jpeg):
    # 2000x1500: min_size 180 -> 1/8 scale 250x188 (47000 px); 400 -> 1/2 scale 1000x750; None -> full size
    assert open_image(big_jpeg, 180, max_pixels=50_000).size == (250, 188)
    with pytest.raises(ImageTooLargeError,
                       match=r"2000x1500 = 3000000 pixels, 1000x750 at the smallest JPEG scale the resize allows"):
        open_image(big_jpeg, 400, max_pixels=50_000)
    with pytest.raises(ImageTooLargeError,
                       match=r"data.max_image_pixels=2999999: raise it \(data.max_image_pixels=3000000"):
        open_image(big_jpeg, None, max_pixels=2_999_999)
    assert open_image(big_jpeg, None, max_pixels=3_000_000).size == (2000, 1500)
    assert open_image(big_jpeg, None, max_pixels=None).size == (2000, 1500)


def test_png_over_the_limit_is_too_large_not_corrupt(tmp_path, monkeypatch):
    path = save(photo(2, (400, 300)), tmp_path / "x.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # PIL's own check would call it a bomb
    for min_size in (None, 16):
        with pytest.raises(ImageTooLargeError) as info:
            open_image(path, min_size, max_pixels=100_000)
        assert info.value.path == str(path) and not isinstance(info.value, CorruptImageError)
        assert "400x300 = 120000 pixels" in str(info.value) and "data.max_image_pixels=100000" in str(info.value)
    assert open_image(path, 16, max_pixels=120_000).size == (400, 300)  # our limit, not PIL's


def test_loader_lets_pil_crop_what_the_key_allows(tmp_path, monkeypatch):
    path = save(photo(2, (50, 50)), tmp_path / "x.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL raises on crops over 2x its limit
    img = ImageLoader(None, 10_000)(path)
    assert img.crop((0, 0, 50, 50)).size == (50, 50) and Image.MAX_IMAGE_PIXELS == 10_000
    ImageLoader(None, 5_000)(path)  # never lowered by the loader
    assert Image.MAX_IMAGE_PIXELS == 10_000


class _Files(Dataset):
    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return ImageLoader(16, 1000)(self.paths[index]), index


def test_too_large_images_are_skipped_as_too_large_with_skip_corrupt(tmp_path, caplog):
    paths = [save(photo(0, (40, 30)), tmp_path / "big.png"), save(photo(1, (20, 15)), tmp_path / "ok.png")]
    with pytest.raises(ImageTooLargeError, match="big.png"):
        SkipCorrupt(_Files(paths), skip=False)[0]
    with caplog.at_level("WARNING"):
        image, target, skipped = SkipCorrupt(_Files(paths), skip=True)[0]
    assert (image.size, target, skipped) == ((20, 15), 1, 1)
    assert (f"skipped too large image {paths[0]}" in caplog.text
            and "1200 pixels > data.max_image_pixels=1000" in caplog.text)


# --- read errors are not corrupt files ------------------------------------------------------


class _FailingOpen:
    """``PIL.Image.open`` that raises ``error`` for its first ``fails`` calls."""

    def __init__(self, error: BaseException, fails: int) -> None:
        self.error, self.fails, self.calls, self.real = error, fails, 0, Image.open

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls <= self.fails:
            raise self.error
        return self.real(*args, **kwargs)


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr(decode.time, "sleep", slept.append)
    return slept


def _os_error(code: int, path: Path) -> OSError:
    return OSError(code, os.strerror(code), str(path))


@pytest.mark.parametrize("code", [errno.EIO, errno.ESTALE])
def test_transient_read_errors_are_retried(tmp_path, monkeypatch, sleeps, code):
    path = save(photo(0, (64, 48)), tmp_path / "x.jpg")
    failing = _FailingOpen(_os_error(code, path), fails=2)
    monkeypatch.setattr(Image, "open", failing)
    assert open_image(path, 16).size == (32, 24)
    assert failing.calls == 3 and sleeps == list(decode.RETRY_DELAYS_S[:2])


def test_read_errors_during_decoding_are_retried(tmp_path, monkeypatch, sleeps):
    path = save(photo(0, (64, 48)), tmp_path / "x.jpg")
    expected = np.asarray(open_image(path))
    real_load, calls = ImageFile.ImageFile.load, []

    def load(self):
        calls.append(1)
        if len(calls) == 1:
            raise _os_error(errno.EIO, path)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    assert (np.asarray(open_image(path)) == expected).all() and len(sleeps) == 1


def test_persistent_read_error_names_the_file_and_is_not_skipped(tmp_path, monkeypatch, sleeps):
    path = save(photo(0, (64, 48)), tmp_path / "x.jpg")
    failing = _FailingOpen(_os_error(errno.EIO, path), fails=10**6)
    monkeypatch.setattr(Image, "open", failing)
    with pytest.raises(ImageReadError) as info:
        open_image(path)
    error = info.value
    assert not isinstance(error, (CorruptImageError, ConfigError)) and isinstance(error, OSError)
    assert error.path == str(path) and error.errno == errno.EIO
    assert (str(path) in str(error) and "EIO" in str(error)
            and f"after {len(decode.RETRY_DELAYS_S) + 1} attempts" in str(error))
    assert failing.calls == len(decode.RETRY_DELAYS_S) + 1 and sleeps == list(decode.RETRY_DELAYS_S)
    with pytest.raises(ImageReadError):
        SkipCorrupt(_Files([path, path]), skip=True)[0]
    assert str(ImageReadError(f"Caught ImageReadError in DataLoader worker process 0.\nOriginal Traceback:\n"
                              f"data.decode.ImageReadError: {error}\n")) == str(error)


def test_permission_denied_names_the_file_and_the_fix_without_retrying(tmp_path, monkeypatch, sleeps):
    path = save(photo(0, (64, 48)), tmp_path / "x.jpg")
    failing = _FailingOpen(PermissionError(errno.EACCES, "Permission denied", str(path)), fails=10**6)
    monkeypatch.setattr(Image, "open", failing)
    with pytest.raises(ImagePermissionError) as info:
        open_image(path)
    assert not isinstance(info.value, CorruptImageError) and isinstance(info.value, ConfigError)
    assert str(path) in str(info.value) and "permission denied" in str(info.value) and "chmod" in str(info.value)
    assert failing.calls == 1 and sleeps == []
    with pytest.raises(ImagePermissionError):
        SkipCorrupt(_Files([path, path]), skip=True)[0]


def test_memory_error_propagates(tmp_path, monkeypatch, sleeps):
    path = save(photo(0, (64, 48)), tmp_path / "x.jpg")
    monkeypatch.setattr(Image, "open", _FailingOpen(MemoryError(), fails=1))
    with pytest.raises(MemoryError):
        open_image(path)
    assert sleeps == []


def test_truncated_jpeg_is_still_corrupt_without_retrying(tmp_path, big_jpeg, sleeps):
    path = write_truncated(big_jpeg, tmp_path / "t.jpg", keep=0.5)
    with pytest.raises(CorruptImageError, match="t.jpg"):
        open_image(path)
    assert sleeps == []
