"""Decoding: reduced-scale JPEG decoding, every PIL mode to RGB, EXIF orientation, named errors."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.decode import ALPHA_BACKGROUND, CorruptImageError, ImageLoader, open_image, to_rgb
from data.fakes import photo, save, write_truncated
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
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
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
    assert str(CorruptImageError(message)) == "cannot decode image /d/a.jpg (OSError: truncated); fix or delete the file"
