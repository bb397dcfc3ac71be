"""Train and evaluate one variant: ``python train.py [model=swin_local] [key=value ...]``.

compose config -> instantiate DataModule, LightningModule, callbacks, loggers -> Trainer.fit
-> Trainer.test(best checkpoint) -> print metrics -> return the monitored metric.

Resume a run in its own directory: ``python train.py hydra.run.dir=<run dir> resume=true``
(or ``ckpt_path=last``): model, optimizer, LR schedule, epoch/step, data position, RNG state and
the same W&B run. Exit codes: 2 config error, 3 NaN/Inf loss or gradients, 143 stopped by SIGTERM
in any phase (in fit after writing ``checkpoints/last.ckpt``; never with a ``results.json``).
Distributed: ``trainer=ddp`` (conf/trainer/ddp.yaml says how to launch with torchrun / srun).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Any, Optional

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vision_attn.errors import ConfigError, TrainingDiverged, config_error_in
from vision_attn.files import atomic_write_json
from vision_attn.fault import AtomicCheckpointIO, FaultTolerance, SigtermGuard, Terminated, resolve_ckpt_path
from vision_attn.loggers import read_run_id, write_run_id
from vision_attn.memory import return_freed_memory

log = logging.getLogger("train")


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
        raise ConfigError(f"data.num_classes is null and {type(datamodule).__name__} does not count its classes: set it")
    given = cfg.module.get("num_classes")
    if given is not None and given != num_classes:
        raise ConfigError(f"module.num_classes={given} but the data has {num_classes} classes; leave it ${{data.num_classes}}")
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
        "num_classes": module.hparams.get("num_classes"),
        "overrides": list(HydraConfig.get().overrides.task),
        "params": summary.params if summary else None,
        "gflops": summary.gflops if summary else None,
        "reach": list(summary.reach) if summary else None,  # per stage: what one query sees
        "best_val_acc1": float(best) if best is not None else metrics.get("val/acc1"),
        "test_acc1": metrics.get("test/acc1"),
        "images_per_sec": metrics.get("train/images_per_sec"),  # all devices together
        "images_per_sec_per_device": metrics.get("train/images_per_sec_per_device"),
        "devices": trainer.world_size,
        "peak_mem_mb": metrics.get("train/peak_mem_mb"),
        "wall_time_s": round(wall, 1),
        "epochs": trainer.current_epoch,
    }
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


def train(cfg: DictConfig, guard: Optional[SigtermGuard] = None) -> Optional[float]:
    """Fit, test the best checkpoint, and return the monitored metric. ``guard`` (main's) turns a
    SIGTERM in any phase into :class:`Terminated` (exit 143)."""
    guard = guard or SigtermGuard()
    start = time.monotonic()
    L.seed_everything(cfg.seed, workers=True)
    run_dir = HydraConfig.get().runtime.output_dir
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), bool(cfg.get("resume", False)), run_dir)
    resuming = ckpt_path not in (None, "best", "hpc")
    wandb_id = read_run_id(os.path.dirname(ckpt_path), os.path.dirname(os.path.dirname(ckpt_path))) if resuming else None
    if cfg.model.get("tile_size"):  # tile streams: memory must stay one tile, not grow with the image
        return_freed_memory()
    datamodule = instantiate(cfg.data)
    num_classes = dataset_num_classes(cfg, datamodule)
    module = instantiate(cfg.module, num_classes=num_classes)
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = build_loggers(cfg.get("logger"), wandb_id)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=trainer_plugins(cfg))
    refuse_multirun_relaunch(cfg, trainer)
    if trainer.is_global_zero:  # ranks are known once the Trainer exists
        for logger in loggers:
            if isinstance(logger, WandbLogger) and logger.version:
                write_run_id(run_dir, logger.version)
    for logger in loggers:  # rank-zero only
        logger.log_hyperparams(logged_config(cfg, datamodule, num_classes))
    if resuming:
        log.info(f"resuming from {ckpt_path}" + (f" (W&B run {wandb_id})" if wandb_id else ""))

    guard.check()
    guard.phase = "fit"
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        guard.check()
    except (SIGTERMException, Terminated):
        saved = [cb.sigterm_checkpoint for cb in callbacks if isinstance(cb, FaultTolerance) and cb.sigterm_checkpoint]
        last = os.path.join(run_dir, "checkpoints", "last.ckpt")
        where = f"saved {saved[0]}" if saved else (f"last checkpoint {last}" if os.path.isfile(last) else "no checkpoint written")
        log.warning(f"SIGTERM: stopped at step {trainer.global_step}, {where}; "
                    f"resume with: python train.py hydra.run.dir={run_dir} resume=true")
        raise Terminated("fit") from None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    monitored = metrics.get(cfg.monitor)
    if cfg.test_after_fit:
        guard.phase = "test"
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        try:
            results = trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False, weights_only=True)
        except SIGTERMException:  # a SystemExit without a code: exit status 0 if let through
            raise Terminated("test") from None
        guard.check()
        metrics.update({k: float(v) for k, v in (results[0] if results else {}).items()})
    log.info("final metrics: " + "  ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if "/" in k))
    if trainer.is_global_zero:
        guard.phase = "writing results"
        try:
            write_results(cfg, trainer, module, metrics, time.monotonic() - start)
            guard.check()
        except Terminated:
            with contextlib.suppress(OSError):  # no results.json claiming a run that was killed
                os.remove(os.path.join(run_dir, "results.json"))
            raise
    guard.phase = "done"
    return monitored


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> Optional[float]:
    failed = True
    guard = SigtermGuard().install()
    try:
        result = train(cfg, guard)
        failed = False
        return result
    except Terminated as e:  # SIGTERM in any phase: exit 143, never a success
        if e.phase != "fit":  # fit logged its own line (the checkpoint and how to resume)
            log.warning(f"SIGTERM during {e.phase}: stopped, exit 143 (no results.json)")
        sys.exit(143)
    except TrainingDiverged as e:  # NaN/Inf loss or gradients: one line naming the step, checkpoints untouched
        log.error(f"training diverged: {e}")
        sys.exit(3)
    except Exception as e:  # a bad config value: one clear line, no deep traceback
        error = config_error_in(e)
        if error is None:
            raise
        log.error(f"config error: {error}")
        sys.exit(2)
    finally:
        guard.uninstall()
        finish_wandb(failed)


if __name__ == "__main__":
    main()
