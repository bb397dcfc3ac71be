"""timm's RandAugment on real photographs: every op of every recipe we ship, at every magnitude,
on RGB, grayscale, tiny and huge photos; the 0-bit posterize; failures that name op, magnitude and file."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image, ImageOps
from timm.data.auto_augment import RandAugment

from data.augment import RECIPES, AugmentConfig
from data.decode import ImageLoader
from data.fakes import make_imagefolder, photo, save
from data.modules import ImageFolderDataModule
from data.randaugment import AugmentationError, GuardedOp, posterize, randaugment_ops
from data.transforms import train_transform

SIZE, RESIZE = 64, 73  # crop and shorter side, as image_size=64 with crop_pct 0.875
MAGNITUDES = [*range(11), -3.0, 13.0]  # 0..10, then values past both ends (mstd noise), which timm clips


def shipped_randaugment_strings() -> list[str]:
    """Every RandAugment string a recipe or a dataset config of ours can switch on."""
    found = {r["randaugment"] for r in RECIPES.values() if r.get("randaugment")}
    for path in (ROOT / "conf").rglob("*.yaml"):
        text = path.read_text()
        if "randaugment" in text:
            for line in text.splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "randaugment" and value.split("#")[0].strip() not in ("", "null"):
                    found.add(value.split("#")[0].strip())
    return sorted(found)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Image.Image]:
    """Real photographs as the loader delivers them: RGB, grayscale file, tiny (below the crop), huge JPEG."""
    folder = tmp_path_factory.mktemp("photos")
    files = {
        "rgb": save(photo(0), folder / "astronaut.png"),
        "gray": save(photo(2).convert("L"), folder / "chelsea_gray.png"),
        "tiny": save(photo(1).resize((21, 14)), folder / "coffee_tiny.png"),
        "huge": save(photo(3, size=(4200, 2800)), folder / "rocket_huge.jpg"),
    }
    load = ImageLoader(RESIZE)
    return {name: load(path) for name, path in files.items()}


def test_our_configs_use_the_swin_recipe_string():
    assert shipped_randaugment_strings() == ["rand-m9-mstd0.5-inc1"]


@pytest.mark.parametrize("policy", shipped_randaugment_strings())
def test_every_op_at_every_magnitude_on_real_photos_gives_an_image_of_the_crop_size(photos, policy):
    transform = train_transform(SIZE, RESIZE, AugmentConfig(randaugment=policy, hflip=0.0))
    randaugment = next(t for t in transform.transforms if isinstance(t, RandAugment))
    ops = list(randaugment.ops)
    assert len(ops) == 15 and all(isinstance(op, GuardedOp) for op in ops)
    randaugment.num_layers = 1
    for op in ops:
        randaugment.ops = [op]
        op.prob, op.magnitude_std = 1.0, 0.0
        for magnitude in MAGNITUDES:
            op.magnitude = magnitude
            for name, img in photos.items():
                out = transform(img.copy())
                assert out.dtype == torch.uint8 and out.shape == (3, SIZE, SIZE), (op.name, magnitude, name)
                if op.name == "PosterizeIncreasing" and magnitude >= 10:
                    assert int(out.max()) == 0, f"0 bits kept must be black ({name})"  # Pillow <= 12 semantics


def test_mstd_noise_draws_are_clipped_into_0_10(photos):
    """Noisy magnitude draws (5 +- 3: past both ends) are clipped into timm's range before an op runs."""
    random.seed(0)
    transform = train_transform(SIZE, RESIZE, AugmentConfig(randaugment="rand-m5-mstd3-inc1"))
    drawn = []
    for op in randaugment_ops(transform):
        op.prob, level = 1.0, op.level_fn
        if level is None:  # AutoContrast, Equalize, Invert take no magnitude
            continue
        for _ in range(20):
            op(photos["rgb"].resize((SIZE, SIZE)))
            drawn.append(level.magnitude)
    assert min(drawn) == 0.0 and max(drawn) == 10.0  # both clips hit at mstd 3


def test_posterize_keeps_pillow_12_semantics():
    img = photo(0, size=(32, 24))
    assert posterize(img, 0).getextrema() == ((0, 0),) * 3  # what ImageOps.posterize(img, 0) gave before Pillow 13
    assert posterize(img, -1).getextrema() == ((0, 0),) * 3
    gray = img.convert("L")
    assert posterize(gray, 0).mode == "L" and posterize(gray, 0).getextrema() == (0, 0)
    for bits in range(1, 8):
        assert np.array_equal(np.asarray(posterize(img, bits)), np.asarray(ImageOps.posterize(img, bits)))
    assert posterize(img, 8) is img


def _break(transform, name: str) -> None:
    """Make op ``name`` raise, as a library bug on some image would."""

    def boom(img, *args, **kwargs):
        raise ValueError("simulated library bug")

    randaugment = next(t for t in transform.transforms if isinstance(t, RandAugment))
    op = next(op for op in randaugment.ops if op.name == name)
    op.op.aug_fn, op.prob, op.magnitude_std, op.magnitude = boom, 1.0, 0.0, 7
    randaugment.ops, randaugment.num_layers = [op], 1


@pytest.mark.parametrize("workers", [0, 1])
def test_augmentation_failure_names_op_magnitude_and_file_and_is_never_skipped(tmp_path, workers):
    root = make_imagefolder(tmp_path / "photos")
    dm = ImageFolderDataModule(str(root), image_size=32, batch_size=4, num_workers=workers, skip_corrupt=True,
                               augment=dict(recipe="imagenet"))
    dm.setup()
    _break(dm.train_transform, "SharpnessIncreasing")
    batches = iter(torch.utils.data.DataLoader(dm.splits["train"], batch_size=2, num_workers=workers))
    try:
        with pytest.raises(AugmentationError) as info:
            next(batches)
    finally:  # the traceback keeps the iterator alive: stop its worker now, not at some later GC
        getattr(batches, "_shutdown_workers", lambda: None)()
    message = str(info.value)
    first = root / "train" / "apple" / "apple_0.jpg"
    assert "SharpnessIncreasing" in message and "magnitude 7" in message and str(first) in message, message
    assert "not a bad file" in message and "simulated library bug" in message
    assert sum(dm.skipped.values()) == 0  # skip_corrupt=true did not hide it


def test_augmentation_failure_is_not_a_config_error_in_train(tmp_path):
    """train.py maps ConfigErrors (corrupt files included) to exit 2; an augmentation bug is not one."""
    from vision_attn.errors import config_error_in

    error = AugmentationError("RandAugment op X failed")
    assert config_error_in(error) is None


def test_out_of_memory_inside_an_op_is_not_reported_as_an_augmentation_bug(photos):
    transform = train_transform(SIZE, RESIZE, AugmentConfig(randaugment="rand-m9-mstd0.5-inc1"))

    def oom(img, *args, **kwargs):
        raise MemoryError

    randaugment = next(t for t in transform.transforms if isinstance(t, RandAugment))
    op = randaugment.ops[0]
    op.op.aug_fn, op.prob = oom, 1.0
    randaugment.ops, randaugment.num_layers = [op], 1
    with pytest.raises(MemoryError):
        transform(photos["rgb"])
