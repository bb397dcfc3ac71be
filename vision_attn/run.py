"""The pieces of a train.py run: config groups to objects, loggers, the run's record files.

train.py reads top-down (compose, instantiate, fit, test, results); what it calls lives here.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, Optional

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.io import CheckpointIO
from omegaconf import DictConfig, OmegaConf

from vision_attn.binned import val_accuracy_by_distance
from vision_attn.errors import ConfigError
from vision_attn.fault import AtomicCheckpointIO, FaultTolerance
from vision_attn.files import atomic_write_json
from vision_attn.loggers import read_run_id, write_run_id

log = logging.getLogger("train")


def wandb_run_to_continue(ckpt_path: str) -> Optional[str]:
    """The W&B run a checkpoint continues: the id saved in its run directory (``checkpoints/..``)."""
    return read_run_id(os.path.dirname(ckpt_path), os.path.dirname(os.path.dirname(ckpt_path)))


def record_run(cfg: DictConfig, trainer: L.Trainer, loggers: list[Any], datamodule: Any, num_classes: int,
               run_dir: str) -> None:
    """The W&B run id in the run dir (so that a resume continues the same run) and the logged config."""
    if trainer.is_global_zero:  # ranks are known once the Trainer exists
        for logger in loggers:
            if isinstance(logger, WandbLogger) and logger.version:
                write_run_id(run_dir, logger.version)
    for logger in loggers:  # rank-zero only
        logger.log_hyperparams(logged_config(cfg, datamodule, num_classes))


def log_sigterm_in_fit(trainer: L.Trainer, callbacks: list[Any], run_dir: str) -> None:
    """One line: where a SIGTERM in fit left the checkpoint, and the command that resumes."""
    saved = [cb.sigterm_checkpoint for cb in callbacks if isinstance(cb, FaultTolerance) and cb.sigterm_checkpoint]
    last = os.path.join(run_dir, "checkpoints", "last.ckpt")
    where = (f"saved {saved[0]}" if saved else
             f"last checkpoint {last}" if os.path.isfile(last) else "no checkpoint written")
    log.warning(f"SIGTERM: stopped at step {trainer.global_step}, {where}; "
                f"resume with: python train.py hydra.run.dir={run_dir} resume=true")


def remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def instantiate_group(cfg: Optional[DictConfig]) -> list[Any]:
    """Instantiate every non-null entry of a config group holding a dict of objects; a factory
    may return None for "off" (``callbacks.ema`` with ``ema_decay: null``)."""
    objects = [instantiate(c) for c in (cfg or {}).values() if c is not None]
    return [o for o in objects if o is not None]


def finish_wandb(failed: bool) -> None:
    """Close the W&B run, if one was started (each multirun job must finish its own)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)


def dataset_num_classes(cfg: DictConfig, datamodule: Any) -> int:
    """The number of classes, read from the instantiated DataModule (the one source of truth).

    A folder dataset with ``data.num_classes: null`` counts its class folders in ``setup()``: it
    runs here, before the LightningModule needs its head size (Lightning's own ``setup`` call in
    ``fit`` reuses the scan). A ``module.num_classes`` given explicitly must agree with it.
    """
    num_classes = getattr(datamodule, "num_classes", None)
    if num_classes is None:
        if getattr(datamodule, "download", False):
            raise ConfigError(
                "data.num_classes is null with data.download=true: set data.num_classes "
                "(classes are only counted from data already on disk)"
            )
        datamodule.setup("fit")
        num_classes = getattr(datamodule, "num_classes", None)
    if num_classes is None:
        raise ConfigError(f"data.num_classes is null and {type(datamodule).__name__} does not count its classes: "
                          "set it")
    given = cfg.module.get("num_classes")
    if given is not None and given != num_classes:
        raise ConfigError(f"module.num_classes={given} but the data has {num_classes} classes; "
                          "leave it ${data.num_classes}")
    return int(num_classes)


def logged_config(cfg: DictConfig, datamodule: Any, num_classes: int) -> dict[str, Any]:
    """The resolved config for the loggers, with the class count the DataModule found and, where
    a recipe filled ``data.augment`` (``augment=``, ``recipe: auto``), every value it chose."""
    config = OmegaConf.to_container(cfg, resolve=True)
    for key in ("data", "module"):
        if isinstance(config.get(key), dict):
            config[key]["num_classes"] = num_classes
    augment = getattr(datamodule, "augment", None)
    if getattr(augment, "recipe", None) is not None and isinstance(config.get("data"), dict):
        config["data"]["augment"] = augment.as_dict()
    return config


def write_results(cfg: DictConfig, trainer: L.Trainer, module: Any, metrics: dict[str, float], wall: float) -> None:
    """``results.json`` in the run directory: what ``python -m vision_attn.review`` tabulates."""
    ckpt = trainer.checkpoint_callback
    best = ckpt.best_model_score if ckpt is not None and ckpt.best_model_score is not None else None
    summary = getattr(module, "summary", None)
    results = {
        "variant": cfg.model.variant,
        "size": cfg.model.size,
        "data": HydraConfig.get().runtime.choices.get("data"),
        "seed": cfg.seed,
        "image_size": cfg.data.get("image_size"),
        "tile_size": cfg.model.get("tile_size"),
        "num_classes": module.hparams.get("num_classes"),
        "overrides": list(HydraConfig.get().overrides.task),
        "params": summary.params if summary else None,
        "gflops": summary.gflops if summary else None,
        "reach": list(summary.reach) if summary else None,  # per stage: what one query sees
        "routes": list(summary.routes) if summary else None,  # per stage: the kernel route of each kind
        "best_val_acc1": float(best) if best is not None else metrics.get("val/acc1"),
        "test_acc1": metrics.get("test/acc1"),
        "images_per_sec": metrics.get("train/images_per_sec"),  # all devices together
        "images_per_sec_per_device": metrics.get("train/images_per_sec_per_device"),
        "devices": trainer.world_size,
        "peak_mem_mb": metrics.get("train/peak_mem_mb"),
        "wall_time_s": round(wall, 1),
        "epochs": trainer.current_epoch,
    }
    by_distance = val_accuracy_by_distance(getattr(trainer, "datamodule", None), module)
    if by_distance is not None:  # data=shapes_far: the best val epoch's top-1 per distance bin (px)
        results["val_acc_by_distance"] = by_distance
    atomic_write_json(os.path.join(HydraConfig.get().runtime.output_dir, "results.json"), results)


def build_loggers(cfg: Optional[DictConfig], wandb_id: Optional[str]) -> list[Any]:
    """The ``logger`` group; a W&B logger continues run ``wandb_id`` when given (resume)."""
    loggers = []
    for c in (cfg or {}).values():
        if c is None:
            continue
        resume = wandb_id and str(c.get("_target_", "")).endswith("wandb_logger")
        loggers.append(instantiate(c, id=wandb_id, resume="allow") if resume else instantiate(c))
    return loggers


def trainer_plugins(cfg: DictConfig) -> list[Any]:
    """``trainer.plugins`` plus atomic checkpoint writes (unless a CheckpointIO is given)."""
    given = cfg.trainer.get("plugins")
    plugins = list(instantiate(given)) if given else []
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def refuse_multirun_relaunch(cfg: DictConfig, trainer: L.Trainer) -> None:
    """Hydra -m with a strategy that re-executes train.py per device cannot work: refuse it."""
    from hydra.types import RunMode
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    launcher = trainer.strategy.launcher
    if (
        HydraConfig.get().mode == RunMode.MULTIRUN
        and isinstance(launcher, _SubprocessScriptLauncher)
        and not launcher.cluster_environment.creates_processes_externally
        and launcher.num_processes > 1
    ):
        raise ConfigError(
            f"trainer.strategy={cfg.trainer.get('strategy')} starts {launcher.num_processes} processes by re-running "
            "train.py, which Hydra multirun (-m) cannot do: run the jobs without -m one at a time, launch them with "
            "torchrun or srun (which start the processes themselves), or use launcher=slurm"
        )


