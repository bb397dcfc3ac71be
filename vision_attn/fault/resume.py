"""Where a resumed run starts from: the newest valid checkpoint of its run directory."""
from __future__ import annotations

import glob
import logging
import os
from typing import Optional

from ..errors import ConfigError
from ..files import is_remote, load_checkpoint_file
from .callback import LAST

log = logging.getLogger(__name__)


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
                          "unpickled); download it yourself (e.g. curl -o model.ckpt <url>) "
                          "and pass ckpt_path=model.ckpt")
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
            log.info(f"requeued SLURM job (SLURM_RESTART_COUNT={env.get('SLURM_RESTART_COUNT')}): "
                     f"resuming from {chosen}")
        return chosen
    key = "resume=true" if resume else "ckpt_path=last" if from_run else f"requeued job (ckpt_path={ckpt_path})"
    if skipped:
        raise ConfigError(f"{key}: no loadable checkpoint in {run_dir}: " + "; ".join(skipped))
    if from_run:
        raise ConfigError(f"{key}: no checkpoint at {last}; resume a run with hydra.run.dir=<its directory> {key}")
    return None  # requeued before anything was saved: a fresh start
