"""Augmentation recipes: the ``augment`` config group, ``recipe=auto`` sized from the data (with its
logged reason), explicit keys over the recipe, flips left to the dataset, refusals that name the key."""
from __future__ import annotations

import logging

import pytest
from helpers import cfg_with
from hydra.utils import instantiate
from timm.data.auto_augment import RandAugment
from torchvision.transforms import RandomHorizontalFlip

from data import augment as augment_module
from data.augment import RECIPES, AugmentConfig, auto_recipe
from data.fakes import make_imagefolder
from data.modules import ImageFolderDataModule
from vision_attn.errors import ConfigError, config_error_in


def steps(dm) -> list:
    transform = dm.train_transform
    return list(getattr(transform, "transform", transform).transforms)


@pytest.fixture
def tree(tmp_path):
    return make_imagefolder(tmp_path / "photos")  # 3 classes x 4 training images


def test_auto_rule_and_its_reason():
    assert auto_recipe(150 * 10, 10) == ("light", "1500 training images in 10 classes = 150 per class < 500; "
                                         "choose one with augment=imagenet or augment=light")
    assert auto_recipe(1300 * 1000, 1000)[0] == "imagenet"
    assert auto_recipe(499 * 2, 2)[0] == "light" and auto_recipe(500 * 2, 2)[0] == "imagenet"


def test_imagefolder_default_is_auto_and_picks_light_for_a_small_folder_and_says_why(tree, caplog):
    cfg = cfg_with("data=imagefolder", f"data.root={tree}", "data.num_workers=0", "data.image_size=32")
    dm = instantiate(cfg.data)
    assert dm.augment.recipe == "auto"
    with caplog.at_level(logging.INFO):
        dm.setup()
    assert dm.augment.recipe == "light" and dm.augment.mixup == 0.0 and dm.augment.randaugment is None
    assert dm.augment.scale == RECIPES["light"]["scale"] and dm.mixup is None
    assert not any(isinstance(t, RandAugment) for t in steps(dm))
    assert "recipe 'light' chosen by recipe=auto: 12 training images in 3 classes = 4 per class < 500" in caplog.text
    image, label, _ = dm.splits["train"][0]
    assert image.shape == (3, 32, 32)


def test_auto_picks_imagenet_for_a_large_split(tree, monkeypatch):
    monkeypatch.setattr(augment_module, "AUTO_MIN_IMAGES_PER_CLASS", 4)  # 4 images per class count as large
    dm = ImageFolderDataModule(str(tree), image_size=32, num_workers=0, augment=dict(recipe="auto", hflip=0.5))
    dm.setup()
    assert dm.augment.recipe == "imagenet" and dm.augment.mixup == 0.8 and dm.mixup is not None
    assert any(isinstance(t, RandAugment) for t in steps(dm))


@pytest.mark.parametrize("recipe", ["imagenet", "light"])
def test_augment_group_selects_a_recipe_and_explicit_keys_beat_it(tree, recipe):
    cfg = cfg_with("data=imagefolder", f"data.root={tree}", f"augment={recipe}", "data.augment.reprob=0.5")
    dm = instantiate(cfg.data)
    expected = {**RECIPES[recipe], "reprob": 0.5}
    assert dm.augment.recipe == recipe
    assert {k: getattr(dm.augment, k) for k in expected} == expected
    assert any(isinstance(t, RandAugment) for t in steps(dm)) == (recipe == "imagenet")


def test_flips_are_the_datasets_choice_whatever_the_recipe(tree):
    cfg = cfg_with("data=imagefolder", f"data.root={tree}", "augment=imagenet", "data.augment.hflip=0.0")
    dm = instantiate(cfg.data)
    assert dm.augment.hflip == 0.0 and not any(isinstance(t, RandomHorizontalFlip) for t in steps(dm))
    assert all("hflip" not in recipe for recipe in RECIPES.values())


def test_big_datasets_name_their_recipe():
    for data in ("imagenet", "food101", "inat2021", "cifar10"):
        assert cfg_with(f"data={data}").data.augment.recipe == "imagenet", data
    assert cfg_with("data=flowers102").data.augment.recipe == "light"


def test_unknown_recipe_and_per_image_recipe_on_shapes_name_the_key(tree):
    with pytest.raises(ConfigError, match=r"data.augment.recipe='heavy' is not a recipe; choose augment=imagenet"):
        AugmentConfig.from_mapping({"recipe": "heavy"})
    cfg = cfg_with("data=shapes", "augment=light")
    with pytest.raises(Exception) as info:
        instantiate(cfg.data)
    assert "augment=light" in str(config_error_in(info.value)) and "batch-level" in str(config_error_in(info.value))


def test_randaugment_off_beats_the_recipe(tree):
    cfg = cfg_with("data=imagefolder", f"data.root={tree}", "augment=imagenet", "data.augment.randaugment=off")
    dm = instantiate(cfg.data)
    assert dm.augment.randaugment is None and dm.augment.mixup == 0.8
    assert not any(isinstance(t, RandAugment) for t in steps(dm))


def test_randaugment_off_written_in_yaml_is_off(tmp_path):
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(OmegaConf.create("recipe: imagenet\nrandaugment: off\n"))
    assert values["randaugment"] is False  # what YAML makes of "off"
    assert AugmentConfig.from_mapping(values).randaugment is None
