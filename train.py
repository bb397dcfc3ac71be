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

import logging
import os
import sys
import time
from typing import Optional

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from vision_attn.errors import TrainingDiverged, config_error_in
from vision_attn.fault import SigtermGuard, Terminated, resolve_ckpt_path
from vision_attn.memory import return_freed_memory
from vision_attn.run import (
    build_loggers,
    dataset_num_classes,
    finish_wandb,
    instantiate_group,
    log_sigterm_in_fit,
    record_run,
    refuse_multirun_relaunch,
    remove_quietly,
    trainer_plugins,
    wandb_run_to_continue,
    write_results,
)

log = logging.getLogger("train")


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


def train(cfg: DictConfig, guard: Optional[SigtermGuard] = None) -> Optional[float]:
    """Fit, test the best checkpoint, and return the monitored metric. ``guard`` (main's) turns a
    SIGTERM in any phase into :class:`Terminated` (exit 143)."""
    guard = guard or SigtermGuard()
    start = time.monotonic()
    L.seed_everything(cfg.seed, workers=True)
    run_dir = HydraConfig.get().runtime.output_dir
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), bool(cfg.get("resume", False)), run_dir)
    resuming = ckpt_path not in (None, "best", "hpc")
    wandb_id = wandb_run_to_continue(ckpt_path) if resuming else None
    if cfg.model.get("tile_size"):  # tile streams: memory must stay one tile, not grow with the image
        return_freed_memory()
    datamodule = instantiate(cfg.data)
    num_classes = dataset_num_classes(cfg, datamodule)
    module = instantiate(cfg.module, num_classes=num_classes)
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = build_loggers(cfg.get("logger"), wandb_id)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=trainer_plugins(cfg))
    refuse_multirun_relaunch(cfg, trainer)
    record_run(cfg, trainer, loggers, datamodule, num_classes, run_dir)
    if resuming:
        log.info(f"resuming from {ckpt_path}" + (f" (W&B run {wandb_id})" if wandb_id else ""))

    with guard.during("fit", on_stop=lambda: log_sigterm_in_fit(trainer, callbacks, run_dir)):
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    monitored = metrics.get(cfg.monitor)
    if cfg.test_after_fit:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        with guard.during("test"):
            results = trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False,
                                   weights_only=True)
        metrics.update({k: float(v) for k, v in (results[0] if results else {}).items()})
    log.info("final metrics: " + "  ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if "/" in k))
    if trainer.is_global_zero:
        results_file = os.path.join(run_dir, "results.json")
        with guard.during("writing results", on_stop=lambda: remove_quietly(results_file)):  # never claim a killed run
            write_results(cfg, trainer, module, metrics, time.monotonic() - start)
    guard.phase = "done"
    return monitored


if __name__ == "__main__":
    main()
