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

from .callback import LAST, FaultTolerance
from .checkpoint_io import AtomicCheckpointIO, all_finite, atomic_torch_save, checkpoint_weights_finite
from .resume import RESUME_KEYS, inspect_checkpoint, newest_valid_checkpoint, resolve_ckpt_path
from .rng import collect_rng_states, dist_rank_world, gather_rng_states, set_rng_states
from .sigterm import SigtermGuard, Terminated

__all__ = [
    "LAST", "RESUME_KEYS", "AtomicCheckpointIO", "FaultTolerance", "SigtermGuard", "Terminated", "all_finite",
    "atomic_torch_save", "checkpoint_weights_finite", "collect_rng_states", "dist_rank_world", "gather_rng_states",
    "inspect_checkpoint", "newest_valid_checkpoint", "resolve_ckpt_path", "set_rng_states",
]
