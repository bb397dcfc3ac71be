"""Image folders and bad input: missing roots, empty or mismatched class folders, ignored files,
symlink loops, unreadable folders, corrupt or too-large images (named, or skipped and counted
exactly with workers), any mode, any size."""
from __future__ import annotations

import errno
import gc
import logging
import os
import shutil
import traceback
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cfg_with
from hydra.utils import instantiate
from PIL import Image
from torch.utils.data import Dataset

from data.decode import CorruptImageError, ImageTooLargeError
from data.fakes import IMAGENETTE_WNIDS, make_class_tree, make_imagefolder, nearest_photo, photo, save, write_truncated
from data.modules import ImageFolderDataModule, ImageNetDataModule
from vision_attn.errors import ConfigError, config_error_in

KW = dict(image_size=32, batch_size=4, num_workers=0)


@pytest.fixture
def tree(tmp_path) -> Path:
    """3 classes (apple, bird, cat = photos 0, 1, 2) x (4 train, 2 val) JPEGs of 96x72 / 72x96."""
    return make_imagefolder(tmp_path / "photos")


def compose_data(*overrides: str):
    return cfg_with("data=imagefolder", *overrides)


def test_missing_root_is_a_config_error_naming_the_path_and_the_layout(tmp_path):
    missing = tmp_path / "nope"
    cfg = compose_data(f"data.root={missing}")
    with pytest.raises(Exception) as info:
        instantiate(cfg.data)
    error = config_error_in(info.value)
    assert isinstance(error, ConfigError)
    assert str(missing / "train") in str(error) and "train/ and val/" in str(error)
    with pytest.raises(ConfigError, match="nope"):
        ImageFolderDataModule(str(missing), **KW)


def test_missing_val_folder_is_named(tree):
    shutil.rmtree(tree / "val")
    with pytest.raises(ConfigError, match=str(tree / "val")):
        ImageFolderDataModule(str(tree), **KW)


def test_num_classes_is_counted_from_the_class_folders(tree):
    cfg = compose_data(f"data.root={tree}")
    assert cfg.data.num_classes is None  # counted by the DataModule, not by a config resolver
    dm = instantiate(cfg.data, num_workers=0)
    assert dm.num_classes is None
    dm.setup()
    assert dm.num_classes == 3 and dm.classes == ["apple", "bird", "cat"]
    assert dm.augment.recipe == "light" and dm.augment.mixup == 0.0  # 4 images per class: recipe=auto picks light


def test_num_classes_that_disagree_with_the_folders_name_the_key(tree):
    with pytest.raises(ConfigError, match=r"data.num_classes=5 .* set data.num_classes=3"):
        ImageFolderDataModule(str(tree), num_classes=5, **KW).setup()


@pytest.mark.parametrize("content", ["nothing", "only a text file"])
def test_empty_class_folders_are_reported_before_training(tree, content):
    make_class_tree(tree / "train", ["dog"], 2)
    (tree / "val" / "dog").mkdir()
    if content != "nothing":
        (tree / "val" / "dog" / "readme.txt").write_text("no images here")
    dm = ImageFolderDataModule(str(tree), **KW)
    with pytest.raises(ConfigError) as info:
        dm.setup()
    assert "empty class folders" in str(info.value) and str(tree / "val" / "dog") in str(info.value)
    assert str(tree / "train" / "dog") not in str(info.value)


def test_class_sets_that_differ_between_train_and_val_name_the_folders(tree):
    make_class_tree(tree / "train", ["dog"], 1)
    make_class_tree(tree / "val", ["emu"], 1)
    with pytest.raises(ConfigError) as info:
        ImageFolderDataModule(str(tree), **KW).setup()
    message = str(info.value)
    assert str(tree / "train") in message and str(tree / "val") in message
    assert "['dog']" in message and "['emu']" in message


def test_files_that_are_not_loaded_are_reported(tree, caplog):
    (tree / "train" / "apple" / "notes.txt").write_text("x")
    (tree / "train" / ".ipynb_checkpoints").mkdir()
    (tree / "train" / "labels.csv").write_text("x")
    dm = ImageFolderDataModule(str(tree), **KW)
    with caplog.at_level(logging.WARNING):
        dm.setup()
    assert len(dm.splits["train"]) == 12 and dm.classes == ["apple", "bird", "cat"]
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "ignored 3 entries" in warning and "notes.txt" in warning and ".ipynb_checkpoints" in warning


def test_non_ascii_file_and_folder_names_load(tree):
    make_class_tree(tree / "train", ["café"], 1)
    make_class_tree(tree / "val", ["café"], 1)
    (tree / "train" / "café" / "café_0.jpg").rename(tree / "train" / "café" / "猫 ü.jpg")
    dm = ImageFolderDataModule(str(tree), **KW)
    dm.setup()
    train = dm.splits["train"]
    assert dm.classes == ["apple", "bird", "café", "cat"]
    assert any(train.dataset.path(i).endswith("猫 ü.jpg") for i in range(len(train)))
    assert {train[i][1] for i in range(len(train))} == {0, 1, 2, 3}


def test_labels_follow_the_sorted_folder_names_and_the_pixels(tree):
    dm = ImageFolderDataModule(str(tree), **KW)
    dm.setup()
    val = dm.splits["val"]
    assert dm.splits["test"] is val  # no test/ folder: val is also the test split
    labels = [val[i][1] for i in range(len(val))]
    assert labels == [0, 0, 1, 1, 2, 2]
    assert [nearest_photo(val[i][0].numpy(), 3) for i in range(len(val))] == labels


def test_any_mode_and_size_loads_as_rgb_batches(tmp_path):
    root = tmp_path / "modes"
    base = photo(1, (90, 60))
    images = {
        "gray.jpg": base.convert("L"),
        "cmyk.jpg": base.convert("CMYK"),
        "rgba.png": base.convert("RGBA"),
        "palette.png": base.convert("P", palette=Image.Palette.ADAPTIVE),
        "tiny.png": photo(1, (9, 7)),
        "large.jpg": photo(1, (1200, 900)),
    }
    for split in ("train", "val"):
        for name, img in images.items():
            save(img, root / split / "only" / name)
    Image.fromarray((np.asarray(base.convert("L"), np.uint16) * 257)).save(root / "train" / "only" / "g16.png")
    Image.fromarray((np.asarray(base.convert("L"), np.uint16) * 257)).save(root / "val" / "only" / "g16.png")
    dm = ImageFolderDataModule(str(root), batch_size=7, image_size=32, num_workers=0,
                               augment={"randaugment": "rand-m9-mstd0.5-inc1"})
    dm.setup()
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        images_, labels, skipped = next(iter(loader))
        assert images_.shape == (7, 3, 32, 32) and images_.dtype == torch.uint8 and skipped.sum() == 0
    val = dm.splits["val"]
    gray = next(val[i][0] for i in range(len(val)) if val.dataset.path(i).endswith("gray.jpg"))
    assert (gray[0] == gray[1]).all() and (gray[1] == gray[2]).all()


def _corrupt(tree: Path) -> list[Path]:
    """A truncated JPEG in train/bird and a PNG of garbage bytes in train/cat."""
    garbage = tree / "train" / "cat" / "garbage.png"
    garbage.write_bytes(b"\x89PNG garbage, not an image")
    return [write_truncated(tree / "train" / "apple" / "apple_0.jpg", tree / "train" / "bird" / "truncated.jpg", 0.4),
            garbage]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_image_error_names_the_file_in_one_line(tree, num_workers):
    bad = write_truncated(tree / "train" / "apple" / "apple_0.jpg", tree / "train" / "apple" / "zz_truncated.jpg",
                          keep=0.4)
    dm = ImageFolderDataModule(str(tree), image_size=32, batch_size=13, num_workers=num_workers)
    dm.setup()
    with pytest.raises(CorruptImageError) as info:
        next(iter(dm.train_dataloader()))
    message = str(info.value)
    traceback.clear_frames(info.tb)  # the iterator shuts its workers down now, not at a later GC (see below)
    assert str(bad) in message and "data.skip_corrupt=true" in message
    assert "\n" not in message and "Traceback" not in message


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_corrupt_substitutes_and_counts_exactly_with_workers(tree, num_workers, caplog):
    bad = _corrupt(tree)
    dm = ImageFolderDataModule(str(tree), image_size=32, batch_size=7, num_workers=num_workers, skip_corrupt=True)
    dm.setup()
    assert len(dm.splits["train"]) == 14
    loader = dm.train_dataloader()  # shuffled, persistent workers
    for epoch in range(2):
        seen = 0
        with caplog.at_level(logging.WARNING):
            for batch in loader:
                images, targets = dm.on_before_batch_transfer(batch, 0)
                assert images.shape == (7, 3, 32, 32)  # substituted, not dropped
                seen += len(images)
        assert seen == 14 and dm.skipped["unattached"] == 2 * (epoch + 1)
    if num_workers == 0:  # worker processes log to their own stderr
        logged = " ".join(r.getMessage() for r in caplog.records)
        assert all(str(p) in logged for p in bad)


class _Finalized:
    """Garbage in a cycle: finalising it leaves a file named after the process that did."""

    def __init__(self, folder: Path, *held: object) -> None:
        self.folder, self.held, self.cycle = folder, held, self

    def __del__(self) -> None:
        (self.folder / str(os.getpid())).touch()


class _CollectsGarbage(Dataset):
    """``dataset`` whose every sample first runs a full GC (in whichever process loads it)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        gc.collect()
        return self.dataset[index]


def test_new_workers_leave_a_dead_iterator_they_inherit_to_the_parent(tree, tmp_path, capfd):
    """A persistent-worker iterator kept only by a cycle is copied into the next loader's workers at
    fork. Were it finalised there, its shutdown would write into the worker's descriptors (the flake
    that put a pickled None into a batch's skip counts): it must be finalised once, in the parent."""
    dm = ImageFolderDataModule(str(tree), image_size=32, batch_size=4, num_workers=2, skip_corrupt=True)
    dm.setup()
    dead = iter(dm.val_dataloader())
    next(dead)  # its two workers are up
    finalized = tmp_path / "finalized"
    finalized.mkdir()
    gc.disable()  # the parent must not collect the cycle before the new workers fork
    try:
        garbage = weakref.ref(_Finalized(finalized, dead))
        del dead
        dm.splits["train"] = _CollectsGarbage(dm.splits["train"])
        skipped = [int(batch[2].sum()) for batch in dm.train_dataloader()]
        # Freed by refcount, not by the parent's GC: a cyclic collection finalises the iterator's
        # pipes before the iterator, which then waits 5 s per worker for them to exit.
        garbage().cycle = None
    finally:
        gc.enable()
    assert skipped == [0, 0, 0]
    assert [p.name for p in finalized.iterdir()] == [str(os.getpid())]
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception ignored" not in err


def test_skipped_sample_is_replaced_by_the_next_one(tree):
    bad = write_truncated(tree / "train" / "apple" / "apple_0.jpg", tree / "train" / "apple" / "apple_00.jpg", keep=0.3)
    dm = ImageFolderDataModule(str(tree), skip_corrupt=True, **KW)
    dm.setup()
    train = dm.splits["train"]
    index = next(i for i in range(len(train)) if train.dataset.path(i) == str(bad))
    image, label, skipped = train[index]
    assert skipped == 1 and label == 0 and train[index + 1][2] == 0


def test_imagenet_uses_timm_class_order_and_rejects_other_folder_names(tmp_path):
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    wnids = IMAGENETTE_WNIDS[:3]
    for split in ("train", "val"):
        make_class_tree(tmp_path / "in1k" / split, wnids, 2)
    dm = ImageNetDataModule(str(tmp_path / "in1k"), **KW)
    with pytest.warns(UserWarning, match="3 of the 1000 ImageNet-1k class folders present"):
        dm.setup()
    assert dm.num_classes == 1000 and dm.classes[0] == "tench, Tinca tinca"
    labels = sorted({dm.splits["val"][i][1] for i in range(len(dm.splits["val"]))})
    assert labels == sorted(info.label_names().index(w) for w in wnids) and labels[1] == 217
    make_class_tree(tmp_path / "in1k" / "train", ["cats"], 1)
    make_class_tree(tmp_path / "in1k" / "val", ["cats"], 1)
    with pytest.raises(ConfigError, match=r"\['cats'\] are not ImageNet-1k wnids"):
        ImageNetDataModule(str(tmp_path / "in1k"), **KW).setup()


def test_num_workers_is_capped_at_the_cpus_this_process_may_use(monkeypatch, caplog):
    import os

    from data.datamodule import usable_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    with caplog.at_level(logging.INFO):
        assert usable_workers(8) == 2
    assert "data.num_workers=8: this process may use 2 CPUs, so 2 loader workers" in caplog.text
    assert usable_workers(2) == 2 and usable_workers(0) == 0


# --- folder scan: links, loops, unreadable folders ----------------------------------------


def _train_files(dm) -> list[str]:
    train = dm.splits["train"].dataset
    return sorted(os.path.relpath(train.path(i), dm.root / "train") for i in range(len(train)))


def test_symlink_loops_are_not_followed_and_each_image_counts_once(tree, caplog):
    sub = tree / "train" / "apple" / "sub"
    save(photo(0, (40, 30)), sub / "deep.jpg")
    (sub / "loop").symlink_to("..", target_is_directory=True)  # apple/sub/loop -> apple
    (tree / "train" / "bird" / "all").symlink_to("../..", target_is_directory=True)  # -> train/
    (tree / "train" / "cat" / "again").symlink_to("../apple/sub", target_is_directory=True)  # another class: kept
    dm = ImageFolderDataModule(str(tree), **KW)
    with caplog.at_level(logging.WARNING):
        dm.setup()
    apples = [f"apple/apple_{i}.jpg" for i in range(4)]
    assert _train_files(dm) == sorted(
        [*apples, "apple/sub/deep.jpg", *[f"bird/bird_{i}.jpg" for i in range(4)],
         "cat/again/deep.jpg", *[f"cat/cat_{i}.jpg" for i in range(4)]]
    )
    assert dm.splits["train"].dataset.labels.tolist().count(0) == 5
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped 3 folders that loop through a link" in warning and "bird/all" in warning
    assert "apple/sub/loop" in warning and "cat/again/loop" in warning  # the same link, reached from cat too


def test_symlinked_class_folders_and_files_elsewhere_load(tree, tmp_path):
    elsewhere = make_class_tree(tmp_path / "elsewhere", ["dog"], 3)
    (tree / "train" / "dog").symlink_to(elsewhere[0].parent, target_is_directory=True)
    make_class_tree(tree / "val", ["dog"], 1)
    (tree / "train" / "apple" / "linked.jpg").symlink_to(elsewhere[1])
    dm = ImageFolderDataModule(str(tree), **KW)
    dm.setup()
    files = _train_files(dm)
    assert len(files) == 12 + 3 + 1 and "apple/linked.jpg" in files and "dog/dog_2.jpg" in files
    train = dm.splits["train"]
    linked = next(i for i in range(len(train)) if train.dataset.path(i).endswith("linked.jpg"))
    assert train[linked][1] == 0 and dm.classes == ["apple", "bird", "cat", "dog"]


def _unlistable(monkeypatch, *blocked: Path) -> None:
    """Tests run as root, where chmod 000 does not stop reading: make os.scandir raise
    PermissionError for ``blocked`` as it would for an unprivileged user."""
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path) in {str(p) for p in blocked}:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_unreadable_sub_folders_are_named_in_a_warning(tree, monkeypatch, caplog):
    private = tree / "train" / "bird" / "private"
    save(photo(1, (40, 30)), private / "hidden.jpg")
    _unlistable(monkeypatch, private)
    dm = ImageFolderDataModule(str(tree), **KW)
    with caplog.at_level(logging.WARNING):
        dm.setup()
    assert len(dm.splits["train"]) == 12
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "could not list 1 folders" in warning and f"{private} (Permission denied)" in warning and "chmod" in warning


def test_unreadable_class_folder_is_a_config_error(tree, monkeypatch):
    _unlistable(monkeypatch, tree / "val" / "cat")
    with pytest.raises(ConfigError) as info:
        ImageFolderDataModule(str(tree), **KW).setup()
    message = str(info.value)
    assert f"cannot list class folder {tree / 'val' / 'cat'} (Permission denied)" in message and "chmod" in message


# --- data.max_image_pixels ------------------------------------------------------------------


def test_max_image_pixels_key_reaches_the_loader(tree, caplog):
    assert compose_data(f"data.root={tree}").data.max_image_pixels == Image.MAX_IMAGE_PIXELS
    big = save(photo(0, (200, 150)), tree / "train" / "apple" / "big.png")  # 30000 px, never drafted
    cfg = compose_data(f"data.root={tree}", "data.max_image_pixels=20000", "data.image_size=32")
    dm = instantiate(cfg.data, num_workers=0, batch_size=13)
    dm.setup()
    assert dm.splits["train"].dataset.loader.max_pixels == 20000 == dm.max_image_pixels
    with pytest.raises(ImageTooLargeError) as info:
        next(iter(dm.train_dataloader()))
    assert str(big) in str(info.value) and "data.max_image_pixels=20000" in str(info.value)
    dm = ImageFolderDataModule(str(tree), max_image_pixels=20000, skip_corrupt=True, **KW)
    dm.setup()
    train = dm.splits["train"]
    index = next(i for i in range(len(train)) if train.dataset.path(i) == str(big))
    with caplog.at_level(logging.WARNING):
        assert train[index][2] == 1
    assert f"skipped too large image {big}" in caplog.text
    with pytest.raises(ConfigError, match="data.max_image_pixels=0 must be a positive integer"):
        ImageFolderDataModule(str(tree), max_image_pixels=0, **KW)
