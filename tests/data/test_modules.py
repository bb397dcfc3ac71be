"""Every dataset config on a tiny fake copy in its real on-disk format (no network):
Imagenette/Imagewoof (+ download from a local archive), Food-101, Flowers-102, iNaturalist 2021,
CIFAR-10/100; labels checked against pixel content, missing roots named with the fix."""
from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import pytest
from conftest import ROOT
from helpers import cfg_with
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torchvision import datasets as tvd
from torchvision.datasets.utils import calculate_md5

from data.decode import CorruptImageError
from data.fakes import (
    make_cifar,
    make_fastai,
    make_flowers102,
    make_food101,
    make_inat2021,
    nearest_photo,
    write_truncated,
)
from data.modules import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    Flowers102DataModule,
    Food101DataModule,
    ImagenetteDataModule,
    ImagewoofDataModule,
    INat2021DataModule,
)
from vision_attn.errors import ConfigError, config_error_in

KW = dict(image_size=32, batch_size=4, num_workers=0)
DATASETS = ["imagefolder", "imagenet", "imagenette", "imagewoof", "food101", "flowers102", "inat2021", "cifar10",
            "cifar100"]
HINTS = {
    "imagefolder": "train/ and val/",
    "imagenet": "image-net.org",
    "imagenette": "data.download=true to fetch https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-320.tgz",
    "imagewoof": "data.download=true to fetch https://s3.amazonaws.com/fast-ai-imageclas/imagewoof2-320.tgz",
    "food101": "data.download=true to fetch https://data.vision.ee.ethz.ch/cvl/food-101.tar.gz",
    "flowers102": "data.download=true",
    "inat2021": "data.download=true to fetch https://ml-inat-competition-datasets.s3.amazonaws.com/2021/train.tar.gz",
    "cifar10": "data.download=true to fetch https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "cifar-100-python.tar.gz",
}


def check_labels_by_content(dm, split: str = "val", classes: int = 3) -> list[int]:
    """Every sample of ``split`` shows the photo of its label (fakes: class k = photo k)."""
    ds = dm.splits[split]
    labels = [ds[i][1] for i in range(len(ds))]
    assert [nearest_photo(ds[i][0].numpy(), classes) for i in range(len(ds))] == labels
    return labels


@pytest.mark.parametrize("name", DATASETS)
def test_every_dataset_config_composes_and_names_a_missing_root_with_the_fix(name, tmp_path):
    cfg = cfg_with(f"data={name}", f"data.root={tmp_path / 'missing'}")
    for key in ("root", "image_size", "batch_size", "num_workers", "augment"):
        assert key in cfg.data, key
    assert ("download" in cfg.data) == (name not in ("imagefolder", "imagenet"))
    with pytest.raises(Exception) as info:
        instantiate(cfg.data)
    error = config_error_in(info.value)
    assert isinstance(error, ConfigError), info.value
    assert str(tmp_path / "missing") in str(error) and HINTS[name] in str(error)


@pytest.mark.parametrize("name", DATASETS)
def test_no_data_root_at_all_is_a_config_error_naming_the_key(name):
    cfg = cfg_with(f"data={name}")
    with pytest.raises(Exception) as info:
        instantiate(cfg.data)
    error = config_error_in(info.value)
    assert isinstance(error, ConfigError), repr(info.value)
    assert "data.root is not set" in str(error)
    assert ("data.download=true" in str(error)) == ("download" in cfg.data)


@pytest.mark.parametrize("size,folder",
                         [("full", "imagenette2"), ("320", "imagenette2-320"), ("160", "imagenette2-160")])
def test_imagenette_sizes_use_fastai_folders_and_imagenet_names(tmp_path, size, folder):
    make_fastai(tmp_path, folder)
    dm = ImagenetteDataModule(str(tmp_path), size=size, num_classes=3, **KW)
    dm.setup()
    assert dm.classes == ["tench, Tinca tinca", "English springer, English springer spaniel", "cassette player"]
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 9, "val": 6, "test": 6}
    assert check_labels_by_content(dm) == [0, 0, 1, 1, 2, 2]
    assert dm.default_url == f"https://s3.amazonaws.com/fast-ai-imageclas/{folder}.tgz"


def test_imagewoof_layout(tmp_path):
    make_fastai(tmp_path, "imagewoof2-160")
    dm = ImagewoofDataModule(str(tmp_path), size="160", num_classes=3, **KW)
    dm.setup()
    assert len(dm.splits["train"]) == 9 and dm.default_url.endswith("/imagewoof2-160.tgz")


@pytest.fixture
def archive(tmp_path) -> Path:
    """A local imagenette2-320.tgz holding a tiny fake copy."""
    make_fastai(tmp_path / "src", "imagenette2-320")
    path = tmp_path / "imagenette2-320.tgz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(tmp_path / "src" / "imagenette2-320", arcname="imagenette2-320")
    return path


@pytest.mark.parametrize("kind", ["file-url", "local-path"])
def test_download_from_a_file_url_or_a_local_archive(tmp_path, archive, kind):
    url = archive.as_uri() if kind == "file-url" else str(archive)
    dm = ImagenetteDataModule(str(tmp_path / "dl"), download=True, url=url, num_classes=3, **KW)
    dm.prepare_data()
    dm.setup()
    assert len(dm.splits["val"]) == 6 and archive.exists()


def test_download_failure_is_a_config_error_naming_the_source(tmp_path):
    dm = ImagenetteDataModule(str(tmp_path / "dl"), download=True, url=(tmp_path / "none.tgz").as_uri(), **KW)
    with pytest.raises(ConfigError, match="none.tgz"):
        dm.prepare_data()


def test_food101_torchvision_layout_with_test_as_val(tmp_path):
    make_food101(tmp_path)
    dm = Food101DataModule(str(tmp_path), num_classes=3, **KW)
    dm.setup()
    assert dm.classes == ["apple_pie", "baby_back_ribs", "sushi"]
    assert len(dm.splits["train"]) == 9 and dm.splits["val"] is dm.splits["test"] and len(dm.splits["val"]) == 6
    check_labels_by_content(dm)


def test_corrupt_image_in_a_torchvision_dataset_is_named_or_skipped(tmp_path):
    base = make_food101(tmp_path)
    bad = base / "images" / "sushi" / "1003.jpg"
    write_truncated(base / "images" / "sushi" / "1000.jpg", bad, keep=0.3)
    dm = Food101DataModule(str(tmp_path), num_classes=3, **KW)
    dm.setup()
    with pytest.raises(CorruptImageError, match=str(bad)):
        [dm.splits["val"][i] for i in range(len(dm.splits["val"]))]
    dm = Food101DataModule(str(tmp_path), num_classes=3, skip_corrupt=True, **KW)
    dm.setup()
    assert sum(dm.splits["val"][i][2] for i in range(len(dm.splits["val"]))) == 1


def test_flowers102_mat_files_and_one_based_labels(tmp_path, monkeypatch):
    make_flowers102(tmp_path)
    # torchvision checks the real files' md5; accept the fakes'
    monkeypatch.setattr(tvd.Flowers102, "_file_dict", {k: (v[0], None) for k, v in tvd.Flowers102._file_dict.items()})
    dm = Flowers102DataModule(str(tmp_path), **KW)
    dm.setup()
    assert dm.num_classes == 102 and dm.classes[:2] == ["pink primrose", "hard-leaved pocket orchid"]
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 6, "val": 6, "test": 6}
    assert check_labels_by_content(dm, "test") == [0, 0, 1, 1, 2, 2]


def test_flowers102_failed_integrity_check_is_a_config_error(tmp_path):
    make_flowers102(tmp_path)
    dm = Flowers102DataModule(str(tmp_path), **KW)
    with pytest.raises(ConfigError, match="data.download=true"):
        dm.setup()


@pytest.mark.parametrize("mini", [False, True])
def test_inat2021_folders_and_species_names(tmp_path, mini):
    make_inat2021(tmp_path, mini=mini)
    dm = INat2021DataModule(str(tmp_path), mini=mini, num_classes=3, **KW)
    dm.setup()
    assert dm.classes == ["Trichodes ornatus", "Bellis perennis", "Amanita muscaria"]
    assert len(dm.splits["train"]) == 9 and len(dm.splits["val"]) == 6
    assert sorted(check_labels_by_content(dm)) == [0, 0, 1, 1, 2, 2]


def test_inat2021_empty_category_folder_is_reported(tmp_path):
    make_inat2021(tmp_path)
    empty = tmp_path / "2021_valid" / "00003_Animalia_Chordata_Aves_Passeriformes_Paridae_Parus_major"
    empty.mkdir()
    (tmp_path / "2021_train" / empty.name).mkdir()
    (tmp_path / "2021_train" / empty.name / "a.jpg").write_bytes(b"")
    with pytest.raises(ConfigError, match=f"empty class folders: {empty}"):
        INat2021DataModule(str(tmp_path), num_classes=4, **KW).setup()


@pytest.mark.parametrize("module,cifar100", [(CIFAR10DataModule, False), (CIFAR100DataModule, True)])
def test_cifar_python_pickle_batches(tmp_path, monkeypatch, module, cifar100):
    base = make_cifar(tmp_path, cifar100=cifar100)
    tv = module.tv_class
    md5 = lambda name: calculate_md5(base / name)  # noqa: E731  torchvision checks every batch file
    monkeypatch.setattr(tv, "train_list", [[n, md5(n)] for n, _ in tv.train_list])
    monkeypatch.setattr(tv, "test_list", [[n, md5(n)] for n, _ in tv.test_list])
    monkeypatch.setattr(tv, "meta", dict(tv.meta, md5=md5(tv.meta["filename"])))
    dm = module(str(tmp_path), batch_size=4, num_workers=0)
    dm.setup()
    assert dm.num_classes == (100 if cifar100 else 10) and dm.classes[:2] == ["class_0", "class_1"]
    assert dm.image_size == 32 and dm.mean == module.default_mean
    assert len(dm.splits["train"]) == 20 and len(dm.splits["val"]) == 10
    images, labels, _ = next(iter(dm.val_dataloader()))
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == [1, 2, 3, 0]
    labels = [dm.splits["val"][i][1] for i in range(10)]
    assert [nearest_photo(dm.splits["val"][i][0].numpy(), 4, (32, 32), 1.0) for i in range(10)] == labels


def test_a_new_dataset_is_one_yaml_file(tmp_path):
    """The recipe in data/modules.py's docstring: a YAML inheriting imagefolder."""
    from data.fakes import make_imagefolder

    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    (conf / "data" / "mydata.yaml").write_text(
        "defaults:\n  - imagefolder\nroot: ???\nimage_size: 40\nmean: [0.5, 0.5, 0.5]\nstd: [0.25, 0.25, 0.25]\n"
    )
    root = make_imagefolder(tmp_path / "mine", classes=("a", "b", "c", "d"), train=1, val=1)
    with initialize_config_dir(str(conf), version_base="1.3"):
        cfg = compose("config", overrides=["data=mydata", f"data.root={root}", "data.num_workers=0"])
    dm = instantiate(cfg.data)
    assert cfg.module.img_size == 40
    assert dm.classes == ["a", "b", "c", "d"] and dm.num_classes == 4 and dm.mean == (0.5, 0.5, 0.5)
    assert dm.augment.recipe == "light"  # inherited recipe=auto, 1 image per class
    assert next(iter(dm.val_dataloader()))[0].shape[-2:] == (40, 40)
