"""Experiment loggers. W&B goes offline unless the user is logged in, and never prompts."""
from __future__ import annotations

import netrc
import os
import sys
from typing import Any, Optional, Sequence
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger


def wandb_logged_in() -> bool:
    """An API key in ``WANDB_API_KEY`` or in ``~/.netrc`` for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode() -> str:
    """``WANDB_MODE`` if set, else ``online`` when logged in, else ``offline``."""
    return os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")


def hydra_sweep() -> Optional[tuple[str, str]]:
    """``(sweep group, job name from its overrides)`` inside a Hydra multirun job, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return None
    if hc.mode != RunMode.MULTIRUN:
        return None
    sweep_dir = os.path.normpath(hc.sweep.dir)
    group = "sweep-" + "_".join(sweep_dir.split(os.sep)[-2:])
    varying = _swept_keys(sys.argv[1:]) | set((hc.sweeper.get("params") or {}).keys())
    name = ",".join(o for o in hc.overrides.task if o.split("=", 1)[0].lstrip("+~") in varying)
    return group, name or hc.job.override_dirname or f"job{hc.job.num}"


def _swept_keys(argv: list[str]) -> set[str]:
    """Keys a multirun command line sweeps over (``key=a,b``, ``key=range(..)``, ``choice(..)``)."""
    keys = set()
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            continue
        key, value = arg.split("=", 1)
        depth, top_level_comma = 0, False
        for ch in value:
            depth += ch in "[({"
            depth -= ch in "])}"
            top_level_comma |= ch == "," and depth == 0
        if top_level_comma or value.startswith(("range(", "choice(", "interval(", "glob(")):
            keys.add(key.lstrip("+~"))
    return keys


RUN_ID_FILE = "wandb_run_id"


def read_run_id(*run_dirs: str) -> Optional[str]:
    """The W&B run id persisted in the first of ``run_dirs`` that holds one (see :func:`write_run_id`)."""
    for run_dir in run_dirs:
        try:
            with open(os.path.join(run_dir, RUN_ID_FILE)) as f:
                run_id = f.read().strip()
        except OSError:
            continue
        if run_id:
            return run_id
    return None


def write_run_id(run_dir: str, run_id: str) -> None:
    """Persist the W&B run id in the run directory, so a resumed run logs to the same W&B run."""
    os.makedirs(run_dir, exist_ok=True)
    tmp = os.path.join(run_dir, f".{RUN_ID_FILE}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(run_id + "\n")
    os.replace(tmp, os.path.join(run_dir, RUN_ID_FILE))


def wandb_logger(
    save_dir: str,
    project: str = "vision_attn",
    name: Optional[str] = None,
    group: Optional[str] = None,
    tags: Sequence[str] = (),
    log_model: bool = False,
    name_from_overrides: bool = True,
    id: Optional[str] = None,
    resume: Optional[str] = None,
    **kwargs: Any,
) -> WandbLogger:
    """A WandbLogger whose run files live in ``save_dir`` (the Hydra run directory).

    In a Hydra multirun every job shares one group named after the sweep directory, and is
    named after its overrides (``model=swin_local,seed=1``), unless group/name are given.

    The run id is fixed up front (``id``, else a fresh one): train.py persists it in the run
    directory (:func:`write_run_id`) and, when resuming, passes it back with ``resume="allow"``.
    """
    import wandb
    from wandb.sdk.lib.runid import generate_id

    sweep = hydra_sweep()
    if sweep is not None:
        group = group or sweep[0]
        name = sweep[1] if name_from_overrides else name

    os.makedirs(save_dir, exist_ok=True)
    mode = wandb_mode()
    settings = wandb.Settings(init_timeout=60, silent=mode != "online")
    return WandbLogger(
        save_dir=save_dir,
        project=project,
        name=name,
        group=group,
        tags=list(tags),
        log_model=log_model,
        id=id or generate_id(),
        resume=resume,
        mode=mode,
        settings=settings,
        **kwargs,
    )
