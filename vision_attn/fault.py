"""Fault tolerance: atomic checkpoint files, step-wise resume points, SIGTERM saves, RNG state,
and where a resumed run takes its checkpoint from.

- :class:`AtomicCheckpointIO`: every checkpoint (ModelCheckpoint's, ours, Lightning's SLURM
  ``hpc_ckpt_*``) is written to a hidden temp file in the same directory, fsynced and renamed
  over the target: a kill at any moment leaves the previous file whole.
- :class:`FaultTolerance` (callback): ``<dirpath>/last.ckpt`` every ``every_n_train_steps``
  optimizer steps (mid-epoch resume points); on SIGTERM, ``last.ckpt`` at the point the loops
  stop, then the run exits; the global RNG states (torch, CUDA, numpy, random) go into every
  checkpoint and are restored when the resumed run starts training, so dropout / drop-path /
  Mixup draws continue the interrupted run's streams; the fit's validation leaves them as they
  were before it (:meth:`FaultTolerance.on_validation_end`).
- :func:`resolve_ckpt_path`: ``resume=true`` / ``ckpt_path=last`` / a requeued SLURM job -> the
  newest valid checkpoint of the run (``last.ckpt``, ``hpc_ckpt_*.ckpt``).
- Every checkpoint is loaded with ``torch.load(weights_only=True)`` (:func:`load_checkpoint_file`);
  remote ``ckpt_path`` URLs are refused; a checkpoint with non-finite weights is never written.
- :class:`SigtermGuard`: SIGTERM in any phase of train.py (setup, fit, test, results) -> exit 143.
"""
from __future__ import annotations

import glob
import logging
import os
import random
import signal
from contextlib import contextmanager, suppress
from types import FrameType
from typing import Any, Callable, Iterator, Optional

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .errors import ConfigError, TrainingDiverged
from .files import atomic_write, is_remote, load_checkpoint_file

log = logging.getLogger(__name__)

LAST = "last.ckpt"


# --- atomic checkpoint files ----------------------------------------------------------------


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


# --- RNG state as plain containers (loads with torch.load(weights_only=True)) ----------------


def dist_rank_world() -> tuple[int, int]:
    """(global rank, world size) of the default process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def collect_rng_states() -> dict[str, Any]:
    """This process's RNG states: python, numpy, torch CPU and the CUDA generator of its own device."""
    np_state = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [str(np_state[0]), np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()  # the current device's (each rank has its own)
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore :func:`collect_rng_states`'s output in this process."""
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        with suppress(Exception):  # another GPU model / count: keep the fresh CUDA stream
            if isinstance(cuda, (list, tuple)):  # checkpoints before per-rank states: all devices, from rank 0
                cuda = cuda[torch.cuda.current_device()]
            torch.cuda.set_rng_state(cuda)


def gather_rng_states(mine: Optional[dict[str, Any]] = None) -> dict[int, dict[str, Any]]:
    """Every rank's RNG states keyed by global rank. In a process group this is a collective:
    all ranks must call it at the same point (``trainer.save_checkpoint`` is one)."""
    mine = collect_rng_states() if mine is None else mine
    rank, world = dist_rank_world()
    if world == 1:
        return {0: mine}
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, mine)
    return dict(enumerate(gathered))


# --- the callback ------------------------------------------------------------------------------


class FaultTolerance(L.Callback):
    """Owns ``<dirpath>/last.ckpt``, the resume point: written at the end of every training epoch
    (after validation and after ModelCheckpoint updated its best-k state), every
    ``every_n_train_steps`` optimizer steps (null or 0: off) and on SIGTERM. Adds the RNG states of
    every rank (``rng``: ``{rank: states}``); each rank restores its own on resume.

    (ModelCheckpoint's own ``save_last`` is off in the config: since Lightning 2.6 it only
    refreshes ``last.ckpt`` when a top-k checkpoint is saved at the same step.)

    SIGTERM (outside SLURM too): Lightning's signal connector sets ``trainer.received_sigterm``
    and its loops raise ``SIGTERMException`` at the next batch boundary; this callback then writes
    ``last.ckpt`` from that consistent state (rank 0 writes; no collective, so ranks that stop at
    different points cannot deadlock: ranks >= 1 write their RNG states to
    ``<dirpath>/.rng_rank<r>.pt``) and train.py exits with code 143. Weights that are not finite
    are never written (the previous ``last.ckpt`` stays).

    A checkpoint written in the middle of the fit's validation (SIGTERM, SLURM's requeue signal)
    records that validation as not yet run, with the RNG states from before it: the resumed run
    re-runs the whole validation, so the epoch's score (and the best checkpoint) are the same as
    an uninterrupted run's.
    """

    def __init__(self, dirpath: str, every_n_train_steps: Optional[int] = None, save_on_sigterm: bool = True) -> None:
        if every_n_train_steps is not None and every_n_train_steps < 0:
            raise ConfigError(f"checkpoint_every_n_steps={every_n_train_steps} must be >= 0 (0 or null: off)")
        self.dirpath = dirpath
        self.every_n_train_steps = every_n_train_steps or 0
        self.save_on_sigterm = save_on_sigterm
        self.sigterm_checkpoint: Optional[str] = None
        self._last_step_saved = -1
        self._rng_to_restore: Optional[dict[int, dict[str, Any]]] = None
        self._rng_before_validation: Optional[dict[str, Any]] = None
        self._trainer: Optional[L.Trainer] = None
        self._synchronized = True  # False while saving on SIGTERM: no collectives then

    @property
    def last_path(self) -> str:
        return os.path.join(self.dirpath, LAST)

    def rank_rng_path(self, rank: int) -> str:
        """Where rank ``rank`` >= 1 puts its RNG states on SIGTERM (rank 0's go into last.ckpt)."""
        return os.path.join(self.dirpath, f".rng_rank{rank}.pt")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        # The states a validation that starts after this batch must be re-run from (see on_save_checkpoint).
        self._rng_before_validation = collect_rng_states()
        n, step = self.every_n_train_steps, trainer.global_step
        if not n or step == 0 or step % n or step == self._last_step_saved or trainer.sanity_checking:
            return
        trainer.save_checkpoint(self.last_path, weights_only=False)
        self._last_step_saved = step

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs after the epoch's validation (Lightning calls the epoch-end hooks after the validation
        # loop). A ModelCheckpoint that saves at train epoch end (Lightning's default when validation
        # runs once an epoch) comes after this callback (Lightning moves checkpoint callbacks last):
        # let it save first, so last.ckpt holds this epoch's best-k state. It saves once per step,
        # so its own call later is a no-op.
        if not trainer.sanity_checking:
            for callback in trainer.checkpoint_callbacks:
                if isinstance(callback, ModelCheckpoint):
                    callback.on_train_epoch_end(trainer, pl_module)
            trainer.save_checkpoint(self.last_path, weights_only=False)
            self._last_step_saved = trainer.global_step

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Put back the RNG states from before the fit's validation: whatever drew from the global
        generators in it (loader iterators, callbacks, hooks) leaves training's streams where they
        were, as in a resumed run that re-runs a validation cut short (see :meth:`state_dict`)."""
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking and self._rng_before_validation:
            set_rng_states(self._rng_before_validation)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not (self.save_on_sigterm and isinstance(exception, SIGTERMException)):
            return
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        if not all_finite(list(pl_module.state_dict().values())):
            log.warning(f"SIGTERM: weights are not finite at step {trainer.global_step}: not saving {self.last_path} "
                        "(the previous one is kept)")
            return
        rank, world = dist_rank_world()
        self._synchronized = False
        try:
            if rank > 0:  # rank 0 writes last.ckpt; the others only their own RNG states
                mine = self._rng_before_validation if self._mid_validation(trainer) else collect_rng_states()
                atomic_torch_save({"global_step": trainer.global_step, "rng": mine}, self.rank_rng_path(rank))
                return
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        finally:
            self._synchronized = True
        trainer.strategy.save_checkpoint(checkpoint, self.last_path)  # global rank 0 writes
        self.sigterm_checkpoint = self.last_path
        rank_zero_info(f"SIGTERM: saved {self.last_path} at step {trainer.global_step} (epoch {trainer.current_epoch})")

    @staticmethod
    def _mid_validation(trainer: Optional[L.Trainer]) -> bool:
        """Inside the fit's validation loop, before its last batch finished."""
        if trainer is None or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return False
        if trainer.state.stage != RunningStage.VALIDATING:
            return False
        return not trainer.fit_loop.epoch_loop.val_loop.batch_progress.is_last_batch

    # RNG: captured whenever a checkpoint is written; restored when the resumed run starts
    # training, after the sanity check and after every iterator was created, so nothing between
    # the restore and the first training batch draws from the global generators.
    def state_dict(self) -> dict[str, Any]:
        mine = None
        if self._mid_validation(self._trainer) and self._rng_before_validation is not None:
            mine = self._rng_before_validation
        rank, world = dist_rank_world()
        if self._synchronized:
            rng = gather_rng_states(mine)
        else:
            rng = {rank: mine if mine is not None else collect_rng_states()}
        return {"rng": rng, "world_size": world, "every_n_train_steps": self.every_n_train_steps}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Mid-validation: record the validation as started but with no batch run, so Lightning's
        restart re-runs it from its first batch (it would otherwise finish it from the saved batch
        count, with the metrics of the batches before the stop lost)."""
        if not self._mid_validation(trainer):
            return
        loops = checkpoint.get("loops", {}).get("fit_loop", {})
        key = "epoch_loop.val_loop.batch_progress"
        if key in loops:
            start = {"ready": 1, "started": 1, "processed": 0, "completed": 0}
            loops[key] = {**loops[key], "total": dict(start), "current": dict(start), "is_last_batch": False}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rng = state_dict.get("rng")
        if isinstance(rng, dict) and "torch" in rng:  # checkpoints before per-rank states: rank 0's
            rng = {0: rng}
        self._rng_to_restore = rng

    def _own_rng(self, trainer: L.Trainer) -> Optional[dict[str, Any]]:
        """This rank's saved RNG states: from the checkpoint, else (ranks >= 1 after a SIGTERM)
        from ``.rng_rank<r>.pt`` when it was written at the checkpoint's step."""
        rank = trainer.global_rank
        states = (self._rng_to_restore or {}).get(rank)
        if states is None and rank > 0 and os.path.isfile(self.rank_rng_path(rank)):
            with suppress(Exception):
                saved = torch.load(self.rank_rng_path(rank), weights_only=True)
                if saved.get("global_step") == trainer.global_step:
                    states = saved["rng"]
        if states is None:
            log.warning(f"rank {rank}: the checkpoint holds no RNG state for this rank (saved with "
                        f"{len(self._rng_to_restore or {})} rank(s)); its random streams start fresh")
        return states

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        restore_train_loader_position(trainer)
        if self._rng_to_restore is not None:
            states = self._own_rng(trainer)
            if states is not None:
                set_rng_states(states)
            self._rng_to_restore = None
        self._rng_before_validation = collect_rng_states()  # a validation re-run before the first batch


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
    if fit_loop.epoch_loop.batch_progress.current.ready >= trainer.num_training_batches:
        # Stopped after the epoch's last training batch (in its validation): no batch of this epoch
        # is left, and a skip set now would never be consumed and would empty the next epoch.
        fit_loop._combined_loader_states_to_load = []
        return
    fit_loop._load_combined_loader_states()
    if getattr(fit_loop, "_data_fetcher", None) is not None:
        iter(fit_loop._data_fetcher)  # a fresh iterator: worker prefetching starts at the restored position


# --- where a resumed run starts from -----------------------------------------------------------


RESUME_KEYS = ("state_dict", "optimizer_states", "loops", "global_step", "epoch")


def inspect_checkpoint(path: str) -> tuple[int, Optional[str]]:
    """``(global_step, problem)`` of ``path``; ``problem`` (None: it can resume training) says why
    not: it does not load with ``weights_only=True`` or lacks one of :data:`RESUME_KEYS`.
    Memory-maps the file, so the tensors are not read."""
    try:
        try:
            ckpt = load_checkpoint_file(path, map_location="cpu", mmap=True)
        except ConfigError as e:
            if "mmap" not in str(e):
                raise
            ckpt = load_checkpoint_file(path, map_location="cpu")  # an old (non-zip) torch file
    except (ConfigError, OSError) as e:
        return -1, str(e)
    missing = [k for k in RESUME_KEYS if k not in ckpt] if isinstance(ckpt, dict) else list(RESUME_KEYS)
    if missing:
        return -1, (f"checkpoint {path} is not a training checkpoint (no {', '.join(missing)}); "
                    "a weights-only file cannot resume a run")
    return int(ckpt["global_step"]), None


def newest_valid_checkpoint(paths: list[str]) -> tuple[Optional[str], list[str]]:
    """The valid checkpoint among ``paths`` with the highest ``global_step`` (ties: the newest
    file), and the problems of the invalid ones (each logged as a warning: skipped)."""
    valid: list[tuple[int, float, str]] = []
    problems: list[str] = []
    for path in sorted({p for p in paths if os.path.isfile(p)}):
        step, problem = inspect_checkpoint(path)
        if problem is None:
            valid.append((step, os.path.getmtime(path), path))
        else:
            log.warning(f"skipping {path}: {problem}")
            problems.append(problem)
    return (max(valid)[2] if valid else None), problems


def resolve_ckpt_path(ckpt_path: Optional[str], resume: bool, run_dir: str,
                      env: Optional[dict[str, str]] = None) -> Optional[str]:
    """The checkpoint ``trainer.fit`` resumes from, or None for a fresh start.

    - ``resume=true`` or ``ckpt_path=last``: the newest valid checkpoint of the run:
      ``<run_dir>/checkpoints/last.ckpt`` or Lightning's ``<run_dir>/hpc_ckpt_*.ckpt`` (saved at
      SLURM's requeue signal), whichever has the highest ``global_step`` (ConfigError if none).
      Resume a run with ``hydra.run.dir=<its dir> resume=true``.
    - ``ckpt_path=<file>``: that file (ConfigError if missing, not loadable with
      ``weights_only=True`` or not a training checkpoint). Remote URLs are refused: download first.
    - a SLURM job that was requeued (``SLURM_RESTART_COUNT`` > 0): the newest valid of the run's
      checkpoints and the ``ckpt_path`` file it started from, so a requeued job continues where it
      was stopped, never from its initial ``ckpt_path`` again.

    Valid: loads with ``weights_only=True`` and holds :data:`RESUME_KEYS`; a corrupt newest
    checkpoint is skipped with a warning in favour of the next.
    """
    env = os.environ if env is None else env
    last = os.path.join(run_dir, "checkpoints", LAST)
    if ckpt_path and is_remote(ckpt_path):
        raise ConfigError(f"ckpt_path={ckpt_path}: remote checkpoints are not loaded (a checkpoint runs code when "
                          "unpickled); download it yourself (e.g. curl -o model.ckpt <url>) and pass ckpt_path=model.ckpt")
    if resume and ckpt_path not in (None, "last"):
        raise ConfigError(f"resume=true and ckpt_path={ckpt_path}: give one of them")
    if ckpt_path in ("best", "hpc"):
        return ckpt_path  # Lightning's own keywords
    given = ckpt_path if ckpt_path and ckpt_path != "last" else None
    if given is not None and not os.path.isfile(given):
        raise ConfigError(f"ckpt_path={given}: no such checkpoint file")
    from_run = resume or ckpt_path == "last"
    requeued = int(env.get("SLURM_RESTART_COUNT", "0") or 0) > 0
    if not (from_run or requeued):
        if given is not None:
            _, problem = inspect_checkpoint(given)
            if problem is not None:
                raise ConfigError(f"ckpt_path={given}: {problem}")
        return given
    run_ckpts = [last, *glob.glob(os.path.join(glob.escape(run_dir), "hpc_ckpt_*.ckpt"))]
    candidates = [*run_ckpts, *([given] if given else [])]
    chosen, skipped = newest_valid_checkpoint(candidates)  # each invalid file: a warning
    if chosen is not None:
        if requeued:
            log.info(f"requeued SLURM job (SLURM_RESTART_COUNT={env.get('SLURM_RESTART_COUNT')}): resuming from {chosen}")
        return chosen
    key = "resume=true" if resume else "ckpt_path=last" if from_run else f"requeued job (ckpt_path={ckpt_path})"
    if skipped:
        raise ConfigError(f"{key}: no loadable checkpoint in {run_dir}: " + "; ".join(skipped))
    if from_run:
        raise ConfigError(f"{key}: no checkpoint at {last}; resume a run with hydra.run.dir=<its directory> {key}")
    return None  # requeued before anything was saved: a fresh start


# --- SIGTERM in every phase of train.py ----------------------------------------------------------


class Terminated(SystemExit):
    """SIGTERM stopped train.py in ``phase``: exit status 143 (128 + SIGTERM)."""

    def __init__(self, phase: str) -> None:
        super().__init__(143)
        self.phase = phase


class SigtermGuard:
    """A SIGTERM handler for the whole of train.py. Outside Lightning's loops it raises
    :class:`Terminated` at once; inside them (Lightning chains this handler behind its own, which
    lets the loops stop at the next batch boundary) it only records the signal, and
    :meth:`check` raises :class:`Terminated` when the Trainer call returns without raising."""

    def __init__(self) -> None:
        self.received = False
        self.phase = "setup"
        self._previous: Any = None

    def install(self) -> "SigtermGuard":
        self._previous = signal.signal(signal.SIGTERM, self)
        return self

    def uninstall(self) -> None:
        if signal.getsignal(signal.SIGTERM) is self:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)

    def __call__(self, signum: int, frame: Optional[FrameType]) -> None:
        self.received = True
        if signal.getsignal(signal.SIGTERM) is self:  # not behind Lightning's handler: stop now
            raise Terminated(self.phase)

    def check(self) -> None:
        """Raise :class:`Terminated` if a SIGTERM came in (e.g. during a Trainer call that finished)."""
        if self.received:
            raise Terminated(self.phase)

    @contextmanager
    def during(self, phase: str, on_stop: Optional[Callable[[], None]] = None) -> Iterator[None]:
        """Run one phase of train.py: a SIGTERM before, inside (Lightning's ``SIGTERMException`` too) or
        recorded by its end raises :class:`Terminated` naming ``phase``, after ``on_stop()`` (e.g. a
        log line saying where the checkpoint is, or removing a half-written results file)."""
        self.check()
        self.phase = phase
        try:
            yield
            self.check()
        except (SIGTERMException, Terminated):  # SIGTERMException: a SystemExit without a code (exit 0)
            if on_stop is not None:
                on_stop()
            raise Terminated(phase) from None
