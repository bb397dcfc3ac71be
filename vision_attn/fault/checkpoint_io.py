"""Atomic checkpoint files: written to a hidden temp file, fsynced, renamed over the target;
non-finite weights are never written."""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from ..errors import TrainingDiverged
from ..files import atomic_write, is_remote, load_checkpoint_file

log = logging.getLogger(__name__)


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` atomically (:func:`vision_attn.files.atomic_write`)."""
    atomic_write(os.fspath(path), lambda f: torch.save(obj, f))


def _floating(tensors: Any) -> list[torch.Tensor]:
    return [t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every value of ``tensors`` is finite: one ``_foreach_norm`` over them (a NaN or Inf
    anywhere makes its tensor's norm non-finite), one host sync."""
    tensors = _floating(tensors)
    if not tensors:
        return True
    norms = torch._foreach_norm([t.detach() for t in tensors])
    return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())


def checkpoint_weights_finite(checkpoint: dict[str, Any]) -> bool:
    """Every floating tensor in the checkpoint's ``state_dict`` (and EMA's ``current_model_state``) is finite."""
    tensors = [*checkpoint.get("state_dict", {}).values(), *checkpoint.get("current_model_state", {}).values()]
    return all_finite(tensors)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO with atomic local writes, ``weights_only=True`` loads, no
    remote paths, and no checkpoint with non-finite weights: that save raises
    :class:`TrainingDiverged` and the previous file stays."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if not checkpoint_weights_finite(checkpoint):
            raise TrainingDiverged(
                f"non-finite weights at step {checkpoint.get('global_step')}: not saving {path} "
                "(the previous file, if any, is kept)"
            )
        if storage_options is not None or is_remote(path):
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        atomic_torch_save(checkpoint, str(path))

    def load_checkpoint(self, path: Any, map_location: Optional[Any] = None,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Always ``weights_only=True`` (see :func:`load_checkpoint_file`), whatever the caller asks."""
        if not is_remote(path) and not os.path.isfile(str(path)):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return load_checkpoint_file(str(path), map_location=map_location)
