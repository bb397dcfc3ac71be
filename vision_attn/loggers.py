"""Experiment loggers. W&B goes offline unless the user is logged in, and never prompts."""
from __future__ import annotations

import netrc
import os
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


def wandb_logger(
    save_dir: str,
    project: str = "vision_attn",
    name: Optional[str] = None,
    group: Optional[str] = None,
    tags: Sequence[str] = (),
    log_model: bool = False,
    **kwargs: Any,
) -> WandbLogger:
    """A WandbLogger whose run files live in ``save_dir`` (the Hydra run directory)."""
    import wandb

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
        mode=mode,
        settings=settings,
        **kwargs,
    )
