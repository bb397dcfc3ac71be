"""Image folders (``<split>/<class>/**/<image>``): scanning, checks, datasets, corrupt-image policy.

Scanning reports everything it does not load: non-image files, hidden folders, folder links
not followed (symlink loops, a folder reached twice) and sub-folders that cannot be listed are
counted and named in a warning; empty or unreadable class folders and class sets that differ
between splits raise a :class:`~vision_attn.errors.ConfigError` naming the folders, before
training starts. Links are followed (a class folder or a file may live elsewhere), each folder
is listed once.
File lists are kept as numpy byte arrays, not Python lists, so DataLoader workers (forked)
do not copy them page by page through reference counting.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from vision_attn.errors import ConfigError

from .decode import IMG_EXTENSIONS, BadImageError, CorruptImageError, is_image_file

log = logging.getLogger(__name__)


@dataclass
class FolderSplit:
    """One split of an image folder: class folder names, files (relative, bytes) and labels."""

    root: Path
    classes: list[str]
    files: np.ndarray
    labels: np.ndarray
    counts: dict[str, int] = field(default_factory=dict)  # images per class folder
    ignored: list[str] = field(default_factory=list)  # skipped entries, relative to root
    loops: list[str] = field(default_factory=list)  # folders not scanned (link loops, repeats), relative to root
    unreadable: list[str] = field(default_factory=list)  # sub-folders that could not be listed: "path (error)"

    def __len__(self) -> int:
        return len(self.files)


def class_folders(split_dir: Path) -> tuple[list[str], list[str]]:
    """Sorted class folder names under ``split_dir`` and the ignored entries (files, hidden dirs)."""
    if not split_dir.is_dir():
        raise ConfigError(f"{split_dir} is not a folder: expected {split_dir}/<class>/<images>")
    classes, ignored = [], []
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if entry.is_dir() and not entry.name.startswith("."):
            classes.append(entry.name)
        else:
            ignored.append(entry.name)
    return classes, ignored


@dataclass
class _Walk:
    """What a recursive scan of one class folder found."""

    images: list[str] = field(default_factory=list)  # relative to the class folder's parent
    ignored: list[str] = field(default_factory=list)  # files that are not images
    loops: list[str] = field(default_factory=list)  # folders not scanned: link loops and repeats
    unreadable: list[str] = field(default_factory=list)  # folders that could not be listed: "path (error)"


def _dir_id(path: str) -> Optional[tuple[int, int]]:
    """``(st_dev, st_ino)`` of a folder, links followed; None if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _is_ancestor(target: str, real: str) -> bool:
    """True if the real path ``target`` is ``real`` or one of its ancestors (a link there loops)."""
    return real == target or real.startswith(target.rstrip(os.sep) + os.sep)


def _images_in(class_dir: Path) -> _Walk:
    """Image files found recursively under ``class_dir``, links followed, each folder listed once.

    A link to an ancestor of its own real location or of ``class_dir`` (a loop), and a folder
    already scanned through another path (a repeat), are recorded in ``loops``, not scanned;
    sub-folders that cannot be listed are recorded in ``unreadable``; an unreadable
    ``class_dir`` raises a ConfigError naming it.
    """
    walk = _Walk()
    seen = {i for i in (_dir_id(str(p)) for p in Path(os.path.realpath(class_dir)).parents) if i}
    stack = [str(class_dir)]
    while stack:
        dirpath = stack.pop()
        rel_dir = os.path.relpath(dirpath, class_dir.parent)
        ident = _dir_id(dirpath)
        if ident in seen:
            walk.loops.append(rel_dir)
            continue
        if ident is not None:
            seen.add(ident)
        try:
            with os.scandir(dirpath) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            if dirpath == str(class_dir):
                raise ConfigError(
                    f"cannot list class folder {dirpath} ({e.strerror or e}): make it readable by this user "
                    "(e.g. chmod a+rx on it) or remove it"
                ) from e
            walk.unreadable.append(f"{dirpath} ({e.strerror or e})")
            continue
        subdirs, real = [], os.path.realpath(dirpath)
        for entry in entries:
            if entry.is_dir():  # follows links
                if entry.is_symlink() and _is_ancestor(os.path.realpath(entry.path), real):
                    walk.loops.append(os.path.join(rel_dir, entry.name))
                else:
                    subdirs.append(entry.path)
            else:
                (walk.images if is_image_file(entry.name) else walk.ignored).append(os.path.join(rel_dir, entry.name))
        stack.extend(reversed(subdirs))  # depth-first, in name order
    return walk


def scan_split(split_dir: Path, class_index: Optional[Mapping[str, int]] = None) -> FolderSplit:
    """Scan ``split_dir/<class>/**`` for images. Labels come from ``class_index`` when given
    (a canonical class order, e.g. ImageNet's), else from the sorted folder names."""
    classes, ignored = class_folders(split_dir)
    if not classes:
        raise ConfigError(f"{split_dir} holds no class folders: expected {split_dir}/<class>/<images>")
    index = dict(class_index) if class_index is not None else {c: i for i, c in enumerate(classes)}
    files: list[str] = []
    labels: list[int] = []
    counts: dict[str, int] = {}
    loops: list[str] = []
    unreadable: list[str] = []
    for name in classes:
        walk = _images_in(split_dir / name)
        counts[name] = len(walk.images)
        ignored += walk.ignored
        loops += walk.loops
        unreadable += walk.unreadable
        files += walk.images
        labels += [index[name]] * len(walk.images)
    encoded = np.array([os.fsencode(f) for f in files], dtype=np.bytes_)  # any file name, 1 byte per char
    return FolderSplit(split_dir, classes, encoded, np.array(labels, dtype=np.int64), counts, ignored, loops,
                       unreadable)


def check_splits(splits: Mapping[str, FolderSplit]) -> None:
    """Raise a ConfigError naming empty class folders or class folders missing from a split;
    warn (with examples) about the entries that are not loaded."""
    empty = [str(s.root / c) for s in splits.values() for c, n in s.counts.items() if n == 0]
    if empty:
        raise ConfigError(
            f"empty class folders (no {'/'.join(IMG_EXTENSIONS)} files): {', '.join(empty)}; "
            "add images or remove the folders"
        )
    names = list(splits)
    reference = set(splits[names[0]].classes)
    for name in names[1:]:
        other = set(splits[name].classes)
        if other != reference:
            first, second = splits[names[0]].root, splits[name].root
            raise ConfigError(
                f"class folders differ between {first} and {second}: "
                f"only in {first}: {sorted(reference - other)}; only in {second}: {sorted(other - reference)}; "
                "every split needs the same class folders"
            )
    for split in splits.values():
        if split.ignored:
            examples = ", ".join(split.ignored[:3])
            log.warning(f"{split.root}: ignored {len(split.ignored)} entries that are not images (e.g. {examples})")
        if split.loops:
            log.warning(f"{split.root}: skipped {len(split.loops)} folders that loop through a link or were already "
                        f"scanned through another path (each image is loaded once): {', '.join(split.loops[:5])}")
        if split.unreadable:
            log.warning(f"{split.root}: could not list {len(split.unreadable)} folders, their images are not loaded: "
                        f"{', '.join(split.unreadable[:5])}; make them readable (chmod a+rx) or remove them")


class ImageFileDataset(Dataset):
    """``(transform(loader(path)), label)`` for the files of a :class:`FolderSplit`."""

    def __init__(self, split: FolderSplit, loader: Callable[[str], Any], transform: Callable[[Any], Any]) -> None:
        self.root = os.fspath(split.root)
        self.files, self.labels = split.files, split.labels
        self.loader, self.transform = loader, transform

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> str:
        return os.path.join(self.root, os.fsdecode(self.files[index]))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.loader(self.path(index))), int(self.labels[index])


class SkipCorrupt(Dataset):
    """Wraps a dataset whose loader raises :class:`~data.decode.BadImageError` (a corrupt or a
    too-large image); yields ``(image, target, skipped)``.

    With ``skip=False`` the error (naming the file) propagates. With ``skip=True`` the next
    index is substituted (up to ``max_tries`` in a row), the file is logged with what is wrong
    with it ("corrupt", "too large"), and ``skipped`` says how many files were passed over for
    this sample. The count travels inside the batch, so it is exact with any number of
    DataLoader workers; the DataModule strips and sums it before the transfer. Read errors of
    the storage and permission errors are never skipped.
    """

    def __init__(self, dataset: Dataset, skip: bool = False, max_tries: int = 32) -> None:
        self.dataset, self.skip, self.max_tries = dataset, skip, max_tries

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any, int]:
        skipped = 0
        for attempt in range(min(self.max_tries, len(self))):
            try:
                image, target = self.dataset[(index + attempt) % len(self)]
                return image, target, skipped
            except BadImageError as e:
                if not self.skip:
                    raise
                skipped += 1
                log.warning(f"skipped {e.kind} image {e.path} ({e.reason}) [data.skip_corrupt=true]")
        raise CorruptImageError(
            f"{skipped} unreadable images in a row from index {index} of {len(self)}: "
            "the dataset is badly damaged; check the files named in the warnings above"
        )
