"""The :class:`FaultTolerance` callback: ``last.ckpt`` resume points, SIGTERM saves, RNG streams."""
from __future__ import annotations

import logging
import os
from contextlib import suppress
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .. import lightning_compat as compat
from ..errors import ConfigError
from .checkpoint_io import all_finite, atomic_torch_save
from .rng import collect_rng_states, dist_rank_world, gather_rng_states, set_rng_states

log = logging.getLogger(__name__)

LAST = "last.ckpt"


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
            checkpoint = compat.dump_checkpoint(trainer)
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
        return not compat.validation_on_last_batch(trainer)

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
        compat.mark_validation_unstarted(checkpoint)

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
        compat.restore_train_loader_position(trainer)  # Lightning #20550
        if self._rng_to_restore is not None:
            states = self._own_rng(trainer)
            if states is not None:
                set_rng_states(states)
            self._rng_to_restore = None
        self._rng_before_validation = collect_rng_states()  # a validation re-run before the first batch
