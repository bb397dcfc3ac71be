"""Every use of Lightning's internals (private attributes, loop state layout), in one place.

The package relies on these for exact resume (``vision_attn.fault``) and the LR schedule
(``vision_attn.module``). They are not Lightning's public API, so this module checks at import
that the installed Lightning is the minor version they were written and tested against
(``TESTED``): an upgrade fails here, loudly, instead of resuming a run subtly wrong.
"""
from __future__ import annotations

from typing import Any

import lightning as L

TESTED = "2.6"  # requirements.lock pins lightning 2.6.x
#: The fit loop's state-dict key of the validation loop's batch progress (inside ``loops.fit_loop``).
VAL_PROGRESS_KEY = "epoch_loop.val_loop.batch_progress"


def check_version(version: str = L.__version__) -> None:
    """Refuse a Lightning other than ``TESTED``.x, naming this file and what to re-check."""
    if version.split(".")[:2] != TESTED.split("."):
        raise RuntimeError(
            f"lightning {version} is installed, but vision_attn/lightning_compat.py uses Lightning {TESTED}'s "
            "internals (checkpoint connector, fit-loop progress and combined-loader state); re-check them "
            f"against {version} (tests/training/test_lightning_compat.py) and update TESTED, or install the locked "
            "version (make venv)"
        )


check_version()


def dump_checkpoint(trainer: L.Trainer) -> dict[str, Any]:
    """The full checkpoint Lightning would write now (used where no collective may run: SIGTERM)."""
    return trainer._checkpoint_connector.dump_checkpoint(weights_only=False)


def validation_on_last_batch(trainer: L.Trainer) -> bool:
    """Has the fit's validation loop run its last batch?"""
    return trainer.fit_loop.epoch_loop.val_loop.batch_progress.is_last_batch


def mark_validation_unstarted(checkpoint: dict[str, Any]) -> None:
    """Record the fit's validation in ``checkpoint`` as started with no batch run, so that
    Lightning's restart re-runs it from its first batch."""
    loops = checkpoint.get("loops", {}).get("fit_loop", {})
    if VAL_PROGRESS_KEY in loops:
        start = {"ready": 1, "started": 1, "processed": 0, "completed": 0}
        loops[VAL_PROGRESS_KEY] = {**loops[VAL_PROGRESS_KEY], "total": dict(start), "current": dict(start),
                                   "is_last_batch": False}


def training_batch_index(trainer: L.Trainer) -> int:
    return trainer.fit_loop.epoch_loop.batch_idx


def setup_train_data(trainer: L.Trainer) -> None:
    """Build the training loader now (what ``estimated_stepping_batches`` does without ``max_steps``)."""
    trainer.fit_loop.setup_data()


def loader_states_pending(trainer: L.Trainer) -> bool:
    """Lightning #20550: a checkpoint's loader position still waits to be loaded at train start
    (``FitLoop.setup_data`` returned early because the loader was built while
    ``configure_optimizers`` read ``estimated_stepping_batches``). True while the bug is there."""
    fit_loop = trainer.fit_loop
    return bool(getattr(fit_loop, "_combined_loader_states_to_load", None)) and fit_loop.restarting


def restore_train_loader_position(trainer: L.Trainer) -> None:
    """Load the saved position into the training loader, which Lightning 2.6 skips when the loader
    was built before the checkpoint's loop state was restored, as it is whenever
    ``configure_optimizers`` reads ``trainer.estimated_stepping_batches`` (ours does, for the LR
    schedule): ``FitLoop.setup_data`` then returns early and never calls
    ``_load_combined_loader_states``. Loads them here (only when Lightning restarts mid-epoch,
    i.e. ``fit_loop.restarting``) and re-creates the epoch's iterator from that position."""
    fit_loop = trainer.fit_loop
    if not loader_states_pending(trainer) or getattr(fit_loop, "_combined_loader", None) is None:
        return
    if fit_loop.epoch_loop.batch_progress.current.ready >= trainer.num_training_batches:
        # Stopped after the epoch's last training batch (in its validation): no batch of this epoch
        # is left, and a skip set now would never be consumed and would empty the next epoch.
        fit_loop._combined_loader_states_to_load = []
        return
    fit_loop._load_combined_loader_states()
    if getattr(fit_loop, "_data_fetcher", None) is not None:
        iter(fit_loop._data_fetcher)  # a fresh iterator: worker prefetching starts at the restored position
