"""Experiment loggers. W&B goes offline unless the user is logged in, and never prompts."""
from __future__ import annotations

import logging
import netrc
import os
import socket
import sys
from typing import Any, Optional, Sequence
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment

from .files import atomic_write_text

log = logging.getLogger(__name__)


def wandb_logged_in() -> bool:
    """An API key in ``WANDB_API_KEY`` or in ``~/.netrc`` for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_host() -> str:
    """The W&B server's host name (``WANDB_BASE_URL``, else the public server)."""
    return urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"


def wandb_reachable(timeout: float = 5.0) -> Optional[str]:
    """None when the W&B server accepts a TCP connection within ``timeout`` s, else why not."""
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((wandb_host(), port), timeout=timeout).close()
    except OSError as e:
        return f"{wandb_host()}:{port} unreachable ({type(e).__name__}: {e})"
    return None


def wandb_mode() -> str:
    """``WANDB_MODE`` if set; else ``online`` when logged in and the server answers; else ``offline``.

    A compute node is often logged in (a shared ``~/.netrc``) but has no route out: there
    ``wandb.init`` would wait 60 s and crash the run, so such a run logs offline, saying why once.
    """
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if not wandb_logged_in():
        return "offline"
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return "online"  # only the proxy knows the way: a failed start falls back (FallbackWandbLogger)
    problem = wandb_reachable()
    if problem is not None:
        log.warning(f"W&B: logged in, but {problem}: logging offline in the run directory; "
                    "sync later with: wandb sync <run dir>/wandb/offline-run-*")
        return "offline"
    return "online"


class FallbackWandbLogger(WandbLogger):
    """A WandbLogger that, when an online ``wandb.init`` fails (server down, proxy, timeout),
    logs offline in the same directory instead of crashing the run, with one warning."""

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        try:
            return WandbLogger.experiment.fget(self)  # type: ignore[attr-defined]
        except Exception as e:
            if self._wandb_init.get("mode") != "online" or self._experiment is not None:
                raise
            log.warning(f"W&B: online start failed ({type(e).__name__}: {e}): logging offline in the run "
                        "directory; sync later with: wandb sync <run dir>/wandb/offline-run-*")
            self._wandb_init["mode"] = "offline"
            return WandbLogger.experiment.fget(self)  # type: ignore[attr-defined]


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
    """Persist the W&B run id in the run directory (atomically), so a resumed run logs to the same W&B run."""
    atomic_write_text(os.path.join(run_dir, RUN_ID_FILE), run_id + "\n")


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
    """A WandbLogger whose run files live in ``save_dir`` (the Hydra run directory), online when
    logged in and the server answers, else offline (:func:`wandb_mode`, :class:`FallbackWandbLogger`).

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
    return FallbackWandbLogger(
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
