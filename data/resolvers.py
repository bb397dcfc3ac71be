"""OmegaConf resolvers used by the data configs, registered on ``import data``.

``${va.class_folders:<root>}``: the number of class folders in ``<root>/train`` (so an image
folder needs no hand-counted ``data.num_classes``). ``conf/config.yaml`` registers them in
the Hydra app through the :class:`RegisterResolvers` Hydra callback, before the config is
resolved.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from vision_attn.errors import ConfigError


def class_folders(root: Any, split: str = "train") -> int:
    """Number of non-hidden sub-folders of ``<root>/<split>``; a ConfigError if it is missing."""
    if root is None:
        raise ConfigError("data.root is not set: pass data.root=/path/to/dataset (holding train/ and val/)")
    folder = Path(str(root)).expanduser() / split
    if not folder.is_dir():
        raise ConfigError(
            f"data.root={root}: {folder} not found; point data.root at a folder holding train/ and val/, "
            "each with one sub-folder per class"
        )
    count = sum(1 for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if count == 0:
        raise ConfigError(f"data.root={root}: {folder} holds no class folders (expected {folder}/<class>/<images>)")
    return count


def register() -> None:
    """Register the resolvers (idempotent)."""
    OmegaConf.register_new_resolver("va.class_folders", class_folders, replace=True)


class RegisterResolvers(Callback):
    """Hydra callback (``hydra.callbacks`` in conf/config.yaml): registers the resolvers in the
    app process and in every launched job."""

    def __init__(self) -> None:
        register()

    def on_job_start(self, config: Any = None, **kwargs: Any) -> None:
        register()
