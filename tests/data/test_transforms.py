"""Transforms and augmentation: crop_pct eval semantics, resize-then-RRC training, upscaling,
RandAugment wiring, random erasing and Mixup/CutMix on device, the module's soft-target loss."""
from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import RandAugment
from timm.loss import SoftTargetCrossEntropy
from torchvision import transforms as T

from data.augment import AugmentConfig, BatchAugment
from data.datamodule import ShapesDataModule
from data.fakes import photo
from data.transforms import eval_resize_size, eval_transform, shorter_side_size, train_transform
from vision_attn.errors import ConfigError
from vision_attn.module import ClassificationModule

BICUBIC = Image.Resampling.BICUBIC


def as_array(t: torch.Tensor) -> np.ndarray:
    assert t.dtype == torch.uint8 and t.shape[0] == 3
    return t.permute(1, 2, 0).numpy().astype(np.int32)


@pytest.mark.parametrize(
    "src,image_size,crop_pct,resized,box",
    [
        # floor(32 / 0.875) = 36: 400x300 -> 48x36, center 32x32 at left (48-32)/2 = 8, top (36-32)/2 = 2
        ((400, 300), 32, 0.875, (48, 36), (8, 2)),
        # floor(32 / 0.5) = 64: 300x400 -> 64x85 (int(64*400/300)), left 16, top round(26.5) = 26
        ((300, 400), 32, 0.5, (64, 85), (16, 26)),
        # crop_pct 1: resize to the crop itself
        ((64, 64), 56, 1.0, (56, 56), (0, 0)),
        # smaller than the crop: upscaled, 20x10 -> 72x36, left 20, top 2
        ((20, 10), 32, 0.875, (72, 36), (20, 2)),
    ],
)
def test_eval_transform_resizes_to_size_over_crop_pct_then_center_crops(src, image_size, crop_pct, resized, box):
    img = photo(3, src)
    assert eval_resize_size(image_size, crop_pct) == min(resized)
    out = as_array(eval_transform(image_size, crop_pct, "bicubic")(img))
    left, top = box
    expected = np.asarray(img.resize(resized, BICUBIC).crop((left, top, left + image_size, top + image_size)), np.int32)
    assert out.shape == (image_size, image_size, 3)
    assert (out == expected).all()


def test_crop_pct_must_be_in_0_1():
    with pytest.raises(ConfigError, match="data.crop_pct"):
        eval_transform(32, 1.5)


@pytest.mark.parametrize("size,expected",
                         [((400, 300), (48, 36)), ((300, 400), (36, 48)), ((10, 8), (45, 36)), ((36, 90), (36, 90))])
def test_resize_shorter_preserves_aspect_up_and_down(size, expected):
    assert shorter_side_size(*size, 36) == expected


def test_train_transform_resizes_then_random_resized_crops():
    # resize 400x300 -> 48x36; scale=(1, 1), ratio=(1, 1): RRC cannot fit a 42x42 crop in 48x36 and
    # falls back to the center 36x36 at left 6, i.e. source box (6, 0, 42, 36) * 400/48 = (50, 0, 350, 300)
    augment = AugmentConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)
    img = photo(3, (400, 300))
    out = as_array(train_transform(32, 36, augment, "bicubic")(img))
    fused = np.asarray(img.resize((32, 32), BICUBIC, box=(50, 0, 350, 300), reducing_gap=3.0), np.int32)
    assert np.abs(out - fused).max() <= 1
    two_pass = np.asarray(img.resize((48, 36), BICUBIC).crop((6, 0, 42, 36)).resize((32, 32), BICUBIC), np.int32)
    assert np.abs(out - two_pass).mean() < 4  # the same crop as resize -> crop -> resize, one filter pass
    shifted = np.asarray(img.resize((32, 32), BICUBIC, box=(0, 0, 300, 300)), np.int32)
    assert np.abs(out - shifted).mean() > 3 * np.abs(out - two_pass).mean()  # a wrong crop would show


def test_train_crops_follow_the_resized_image_geometry():
    # random crops: area fraction of the crop box in [scale] and aspect in [ratio], on any source size
    import random

    random.seed(0)
    augment = AugmentConfig(scale=(0.25, 0.5), ratio=(0.5, 2.0), hflip=0.0)
    crop = train_transform(32, 64, augment).transforms[0]
    boxes = []
    original = Image.Image.resize

    def record(self, size, resample=None, box=None, reducing_gap=None):
        boxes.append((self.size, box))
        return original(self, size, resample, box, reducing_gap)

    sources = [photo(0, size) for size in ((400, 300), (90, 160), (20, 10))]
    Image.Image.resize = record
    try:
        for img in sources:
            for _ in range(20):
                assert crop(img).size == (32, 32)
    finally:
        Image.Image.resize = original
    assert len(boxes) == 60
    for (w, h), (x0, y0, x1, y1) in boxes:
        area = (x1 - x0) * (y1 - y0) / (w * h)
        assert 0 <= x0 < x1 <= w + 1e-6 and 0 <= y0 < y1 <= h + 1e-6
        assert 0.2 < area < 0.6  # integer rounding on the 64-px resized image


def test_small_images_are_upscaled_to_the_crop():
    augment = AugmentConfig()
    tiny = photo(1, (12, 9))
    assert train_transform(32, 36, augment)(tiny).shape == (3, 32, 32)
    assert eval_transform(32, 0.875)(tiny).shape == (3, 32, 32)


def test_randaugment_and_color_jitter_are_wired_from_config():
    steps = train_transform(32, 36, AugmentConfig(randaugment="rand-m9-mstd0.5-inc1", color_jitter=0.4)).transforms
    ra = [t for t in steps if isinstance(t, RandAugment)]
    assert len(ra) == 1 and ra[0].num_layers == 2 and all(op.magnitude == 9 for op in ra[0].ops)
    assert not any(isinstance(t, T.ColorJitter) for t in steps)  # timm: jitter off under RandAugment
    plain = train_transform(32, 36, AugmentConfig(color_jitter=0.4)).transforms
    assert any(isinstance(t, T.ColorJitter) for t in plain) and not any(isinstance(t, RandAugment) for t in plain)


def test_unknown_or_bad_augment_keys_name_the_key():
    with pytest.raises(ConfigError, match="data.augment.mixupp"):
        AugmentConfig.from_mapping({"mixupp": 0.8})
    with pytest.raises(ConfigError, match="data.augment.reprob"):
        AugmentConfig.from_mapping({"reprob": 2})
    with pytest.raises(ConfigError, match="data.augment.randaugment"):
        AugmentConfig.from_mapping({"randaugment": "m9"})


def test_random_erasing_fills_one_rectangle_per_image_with_noise():
    torch.manual_seed(0)
    images = torch.zeros(4, 3, 32, 32)
    out, targets = BatchAugment(AugmentConfig(reprob=1.0), num_classes=5)(images, torch.arange(4))
    assert targets.ndim == 1
    for img in out:
        rows, cols = torch.nonzero(img.abs().sum(0)).unbind(1)
        assert len(rows) > 0
        box = img[:, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert (box != 0).all() and len(rows) == box.shape[1] * box.shape[2]  # a filled rectangle


def test_mixup_makes_soft_targets_matching_the_image_mix():
    np.random.seed(0)
    x = torch.randn(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    aug = BatchAugment(AugmentConfig(mixup=0.8, label_smoothing=0.0), num_classes=6)
    out, soft = aug(x.clone(), y)
    assert soft.shape == (4, 6) and torch.allclose(soft.sum(1), torch.ones(4))
    lam = float(soft[0, 0])
    assert 0 < lam < 1 and soft[0, 3] == pytest.approx(1 - lam)
    assert torch.allclose(out, lam * x + (1 - lam) * x.flip(0), atol=1e-6)


def test_label_smoothing_is_folded_into_mixup_targets():
    np.random.seed(1)
    _, soft = BatchAugment(AugmentConfig(mixup=0.8, label_smoothing=0.1), num_classes=10)(
        torch.randn(4, 3, 8, 8), torch.arange(4))
    assert soft.min() == pytest.approx(0.01) and torch.allclose(soft.sum(1), torch.ones(4))


def test_cutmix_pastes_a_box_and_weights_targets_by_its_area():
    np.random.seed(2)
    x = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand(5, 3, 16, 16).clone()  # image i is all i
    out, soft = BatchAugment(AugmentConfig(cutmix=1.0, label_smoothing=0.0), num_classes=5)(x.clone(), torch.arange(5))
    pasted = (out[0] == 4).float().mean()  # odd batch: image 0 takes its box from image 4
    assert 0 < pasted < 1
    assert (soft[0, 4] == pytest.approx(float(pasted), abs=1e-6)
            and soft[0, 0] == pytest.approx(1 - float(pasted), abs=1e-6))


def test_datamodule_mixes_training_batches_only():
    dm = ShapesDataModule(image_size=16, batch_size=4, train_size=8, val_size=4, test_size=4, augment={"mixup": 0.8})
    assert dm.mixup is not None and dm.mixup.num_classes == 8
    batch = (torch.randint(0, 255, (4, 3, 16, 16), dtype=torch.uint8), torch.tensor([0, 1, 2, 3]))
    dm.trainer = SimpleNamespace(training=False)
    images, targets = dm.on_after_batch_transfer(batch, 0)
    assert images.dtype == torch.float32 and targets.ndim == 1
    dm.trainer = SimpleNamespace(training=True)
    images, targets = dm.on_after_batch_transfer(batch, 0)
    assert targets.shape == (4, 8)


def test_shapes_rejects_per_image_augmentation():
    with pytest.raises(ConfigError, match="data.augment.randaugment"):
        ShapesDataModule(augment={"randaugment": "rand-m9"})


MODEL = dict(variant="swin", size="pico", embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=2)
OPTIM = dict(lr=1e-2, weight_decay=0.05, warmup_epochs=0.0, warmup_lr=1e-4, min_lr=1e-5, label_smoothing=0.1)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_module_loss_uses_soft_targets_and_accuracy_their_argmax():
    torch.manual_seed(0)
    module = ClassificationModule(MODEL, num_classes=8, img_size=16, optim=OPTIM).eval()
    module.model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 8))  # confident logits
    torch.nn.init.normal_(module.model[1].weight, std=0.1)
    images = torch.randn(6, 3, 16, 16)
    soft = torch.softmax(torch.randn(6, 8) * 3, dim=1)
    with torch.no_grad():
        logits = module(images)
        loss = module._shared_step((images, soft), "train")
    assert float(loss) == pytest.approx(float(SoftTargetCrossEntropy()(logits, soft)), rel=1e-6)
    hard = torch.nn.functional.cross_entropy(logits, soft.argmax(1), label_smoothing=0.1)
    assert float(loss) != pytest.approx(float(hard), rel=1e-3)
    expected_acc = (logits.argmax(1) == soft.argmax(1)).float().mean()
    assert float(module.metrics["train_acc1"].compute()) == pytest.approx(float(expected_acc))


class RecordTargets(L.Callback):
    def __init__(self) -> None:
        self.train: list[torch.Tensor] = []
        self.val: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.train.append(batch[1])

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.val.append(batch[1])


def test_training_with_mixup_feeds_soft_targets_to_training_and_hard_to_validation():
    module = ClassificationModule(MODEL, num_classes=8, img_size=16, optim=OPTIM)
    dm = ShapesDataModule(image_size=16, batch_size=8, train_size=16, val_size=8, test_size=8,
                          augment={"mixup": 0.8, "cutmix": 1.0, "reprob": 0.25})
    record = RecordTargets()
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[record], num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(module, datamodule=dm)
    assert len(record.train) == 2 and all(t.shape == (8, 8) and t.dtype.is_floating_point for t in record.train)
    assert record.val and all(t.ndim == 1 for t in record.val)
    assert np.isfinite(float(trainer.callback_metrics["train/loss_epoch"]))
