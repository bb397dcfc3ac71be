"""Fault tolerance: atomic checkpoint files, step-wise resume points, SIGTERM saves, RNG state,
and where a resumed run takes its checkpoint from.

- :class:`AtomicCheckpointIO`: every checkpoint (ModelCheckpoint's, ours, Lightning's SLURM
  ``hpc_ckpt_*``) is written to a hidden temp file in the same directory, fsynced and renamed
  over the target: a kill at any moment leaves the previous file whole.
- :class:`FaultTolerance` (callback): ``<dirpath>/last.ckpt`` every ``every_n_train_steps``
  optimizer steps (mid-epoch resume points); on SIGTERM, ``last.ckpt`` at the point the loops
  stop, then the run exits; the global RNG states (torch, CUDA, numpy, random) go into every
  checkpoint and are restored when the resumed run starts training, so dropout / drop-path /
  Mixup draws continue the interrupted run's streams.
- :func:`resolve_ckpt_path`: ``resume=true`` / ``ckpt_path=last`` -> ``<run dir>/checkpoints/last.ckpt``.
"""
from __future__ import annotations

import glob
import logging
import os
import random
from contextlib import suppress
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .errors import ConfigError

log = logging.getLogger(__name__)

LAST = "last.ckpt"


# --- atomic checkpoint files ----------------------------------------------------------------


def _fsync_dir(path: str) -> None:
    with suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` via ``.<name>.<pid>.tmp`` in the same directory + fsync + ``os.replace``."""
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    for stale in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.*.tmp")):
        with suppress(OSError):  # left by a process killed while writing
            os.remove(stale)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, with atomic local writes (remote URLs: Lightning's own path)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        atomic_torch_save(checkpoint, str(path))


# --- RNG state as plain containers (loads with torch.load(weights_only=True)) ----------------


def collect_rng_states() -> dict[str, Any]:
    np_state = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [str(np_state[0]), np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        with suppress(Exception):  # a different number of GPUs: keep the fresh CUDA streams
            torch.cuda.set_rng_state_all(states["cuda"])


# --- the callback ------------------------------------------------------------------------------


class FaultTolerance(L.Callback):
    """Owns ``<dirpath>/last.ckpt``, the resume point: written at the end of every training epoch
    (after validation and after ModelCheckpoint updated its best-k state), every
    ``every_n_train_steps`` optimizer steps (null or 0: off) and on SIGTERM. Adds the RNG state.

    (ModelCheckpoint's own ``save_last`` is off in the config: since Lightning 2.6 it only
    refreshes ``last.ckpt`` when a top-k checkpoint is saved at the same step.)

    SIGTERM (outside SLURM too): Lightning's signal connector sets ``trainer.received_sigterm``
    and its loops raise ``SIGTERMException`` at the next batch boundary; this callback then writes
    ``last.ckpt`` from that consistent state (rank 0 writes; no barrier, so ranks that stop at
    different points cannot deadlock) and train.py exits with code 143.
    """

    def __init__(self, dirpath: str, every_n_train_steps: Optional[int] = None, save_on_sigterm: bool = True) -> None:
        if every_n_train_steps is not None and every_n_train_steps < 0:
            raise ConfigError(f"checkpoint_every_n_steps={every_n_train_steps} must be >= 0 (0 or null: off)")
        self.dirpath = dirpath
        self.every_n_train_steps = every_n_train_steps or 0
        self.save_on_sigterm = save_on_sigterm
        self.sigterm_checkpoint: Optional[str] = None
        self._last_step_saved = -1
        self._rng_to_restore: Optional[dict[str, Any]] = None

    @property
    def last_path(self) -> str:
        return os.path.join(self.dirpath, LAST)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        n, step = self.every_n_train_steps, trainer.global_step
        if not n or step == 0 or step % n or step == self._last_step_saved or trainer.sanity_checking:
            return
        trainer.save_checkpoint(self.last_path)
        self._last_step_saved = step

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs after the epoch's validation and ModelCheckpoint.on_validation_end (Lightning
        # calls the epoch-end hooks after the validation loop), so the best-k state is current.
        if not trainer.sanity_checking:
            trainer.save_checkpoint(self.last_path)
            self._last_step_saved = trainer.global_step

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not (self.save_on_sigterm and isinstance(exception, SIGTERMException)):
            return
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        trainer.strategy.save_checkpoint(checkpoint, self.last_path)  # global rank 0 writes
        self.sigterm_checkpoint = self.last_path
        rank_zero_info(f"SIGTERM: saved {self.last_path} at step {trainer.global_step} (epoch {trainer.current_epoch})")

    # RNG: captured whenever a checkpoint is written; restored when the resumed run starts
    # training, after the sanity check and after every iterator was created, so nothing between
    # the restore and the first training batch draws from the global generators.
    def state_dict(self) -> dict[str, Any]:
        return {"rng": collect_rng_states(), "every_n_train_steps": self.every_n_train_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng_to_restore = state_dict.get("rng")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        restore_train_loader_position(trainer)
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None


def restore_train_loader_position(trainer: L.Trainer) -> None:
    """Load the saved position into the training loader, which Lightning 2.6 skips when the loader
    was built before the checkpoint's loop state was restored, as it is whenever
    ``configure_optimizers`` reads ``trainer.estimated_stepping_batches`` (ours does, for the LR
    schedule): ``FitLoop.setup_data`` then returns early and never calls
    ``_load_combined_loader_states``. Loads them here (only when Lightning restarts mid-epoch,
    i.e. ``fit_loop.restarting``) and re-creates the epoch's iterator from that position."""
    fit_loop = trainer.fit_loop
    pending = getattr(fit_loop, "_combined_loader_states_to_load", None)
    if not pending or not fit_loop.restarting or getattr(fit_loop, "_combined_loader", None) is None:
        return
    fit_loop._load_combined_loader_states()
    if getattr(fit_loop, "_data_fetcher", None) is not None:
        iter(fit_loop._data_fetcher)  # a fresh iterator: worker prefetching starts at the restored position


# --- where a resumed run starts from -----------------------------------------------------------


def _newest(paths: list[str]) -> Optional[str]:
    existing = [p for p in paths if os.path.isfile(p)]
    return max(existing, key=os.path.getmtime) if existing else None


def resolve_ckpt_path(ckpt_path: Optional[str], resume: bool, run_dir: str,
                      env: Optional[dict[str, str]] = None) -> Optional[str]:
    """The checkpoint ``trainer.fit`` resumes from, or None for a fresh start.

    - ``resume=true`` or ``ckpt_path=last``: ``<run_dir>/checkpoints/last.ckpt`` (ConfigError
      naming the path if it is missing). Resume a run with ``hydra.run.dir=<its dir> resume=true``.
    - ``ckpt_path=<file>``: that file (ConfigError if missing).
    - nothing, in a SLURM job that was requeued (``SLURM_RESTART_COUNT`` > 0): the newest of
      ``last.ckpt`` and Lightning's ``<run_dir>/hpc_ckpt_*.ckpt`` (saved at the requeue signal),
      so a requeued job continues wherever it was stopped.
    """
    env = os.environ if env is None else env
    last = os.path.join(run_dir, "checkpoints", LAST)
    if resume or ckpt_path == "last":
        key = "resume=true" if resume else "ckpt_path=last"
        if resume and ckpt_path not in (None, "last"):
            raise ConfigError(f"resume=true and ckpt_path={ckpt_path}: give one of them")
        if not os.path.isfile(last):
            raise ConfigError(
                f"{key}: no checkpoint at {last}; resume a run with hydra.run.dir=<its directory> {key}"
            )
        return last
    if ckpt_path in ("best", "hpc"):
        return ckpt_path  # Lightning's own keywords
    if ckpt_path:
        if "://" not in ckpt_path and not os.path.isfile(ckpt_path):
            raise ConfigError(f"ckpt_path={ckpt_path}: no such checkpoint file")
        return ckpt_path
    if int(env.get("SLURM_RESTART_COUNT", "0") or 0) > 0:
        return _newest([last, *glob.glob(os.path.join(glob.escape(run_dir), "hpc_ckpt_*.ckpt"))])
    return None
