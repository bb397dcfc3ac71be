"""Train and evaluate one variant: ``python train.py [model=swin_local] [key=value ...]``.

compose config -> instantiate DataModule, LightningModule, callbacks, loggers -> Trainer.fit
-> Trainer.test(best checkpoint) -> print metrics -> return the monitored metric.
"""
from __future__ import annotations

import json
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

from vision_attn.errors import ConfigError, config_error_in

log = logging.getLogger("train")


def instantiate_group(cfg: Optional[DictConfig]) -> list[Any]:
    """Instantiate every non-null entry of a config group holding a dict of objects."""
    return [instantiate(c) for c in (cfg or {}).values() if c is not None]


def finish_wandb(failed: bool) -> None:
    """Close the W&B run, if one was started (each multirun job must finish its own)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)


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
        "overrides": list(HydraConfig.get().overrides.task),
        "params": summary.params if summary else None,
        "gflops": summary.gflops if summary else None,
        "best_val_acc1": float(best) if best is not None else metrics.get("val/acc1"),
        "test_acc1": metrics.get("test/acc1"),
        "images_per_sec": metrics.get("train/images_per_sec"),
        "peak_mem_mb": metrics.get("train/peak_mem_mb"),
        "wall_time_s": round(wall, 1),
        "epochs": trainer.current_epoch,
    }
    with open(os.path.join(HydraConfig.get().runtime.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)


def train(cfg: DictConfig) -> Optional[float]:
    """Fit, test the best checkpoint, and return the monitored metric."""
    start = time.monotonic()
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.module)
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    monitored = metrics.get(cfg.monitor)
    if cfg.test_after_fit:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        results = trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        metrics.update({k: float(v) for k, v in (results[0] if results else {}).items()})
    log.info("final metrics: " + "  ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if "/" in k))
    write_results(cfg, trainer, module, metrics, time.monotonic() - start)
    return monitored


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> Optional[float]:
    failed = True
    try:
        result = train(cfg)
        failed = False
        return result
    except Exception as e:  # a bad config value: one clear line, no deep traceback
        error = config_error_in(e)
        if error is None:
            raise
        log.error(f"config error: {error}")
        sys.exit(2)
    finally:
        finish_wandb(failed)


if __name__ == "__main__":
    main()
