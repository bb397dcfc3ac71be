"""LightningModule: no weight decay on bias tables and norms, warmup + cosine per step, metrics."""
from __future__ import annotations

import math
import os

import lightning as L
import pytest
import torch

from data.datamodule import ShapesDataModule
from vision_attn.module import ClassificationModule

MODEL = dict(variant="swin", size="pico", embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=2)
OPTIM = dict(lr=1e-2, weight_decay=0.05, warmup_epochs=0.5, warmup_lr=1e-4, min_lr=1e-5, label_smoothing=0.1)


class RecordLR(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def fit(max_epochs: int = 2, batches: int = 5, **trainer_kwargs) -> tuple[ClassificationModule, RecordLR, L.Trainer]:
    module = ClassificationModule(MODEL, num_classes=8, img_size=16, optim=OPTIM)
    dm = ShapesDataModule(image_size=16, batch_size=8, train_size=8 * batches, val_size=8, test_size=8)
    record = RecordLR()
    trainer = L.Trainer(
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
        num_sanity_val_steps=0,
        **trainer_kwargs,
    )
    trainer.fit(module, datamodule=dm)
    return module, record, trainer


def warmup_then_cosine(total: int, warmup: int) -> list[float]:
    """The per-step learning rates by hand: linear warm-up from warmup_lr, then cosine down to min_lr."""
    lr, wl, lo = OPTIM["lr"], OPTIM["warmup_lr"], OPTIM["min_lr"]
    return [wl + t * (lr - wl) / warmup if t < warmup else lo + 0.5 * (lr - lo) * (1 + math.cos(math.pi * t / total))
            for t in range(total)]


def test_warmup_then_cosine_per_step():
    _, record, _ = fit(max_epochs=2, batches=5)
    total, warmup = 10, 2  # 0.5 of 2 epochs x 5 steps
    assert record.lrs == pytest.approx(warmup_then_cosine(total, warmup), rel=1e-6)


def test_warmup_counts_epochs_of_the_loader_when_training_by_steps():
    """trainer.max_steps with max_epochs=-1: warmup 0.5 epoch of 6 batches = 3 steps, cosine over 9."""
    _, record, _ = fit(max_epochs=-1, batches=6, max_steps=9)
    total, warmup = 9, 3
    assert record.lrs == pytest.approx(warmup_then_cosine(total, warmup), rel=1e-6)


def test_bias_tables_norms_and_biases_get_no_weight_decay():
    module, _, trainer = fit(max_epochs=1, batches=1)
    groups = trainer.optimizers[0].param_groups
    names = {id(p): n for n, p in module.model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in groups if g["weight_decay"] == OPTIM["weight_decay"] for p in g["params"]}
    assert "layers.0.blocks.0.attn.relative_position_bias_table" in no_decay
    assert "layers.0.blocks.0.norm1.weight" in no_decay and "head.fc.bias" in no_decay
    assert "layers.0.blocks.0.attn.qkv.weight" in decay and "head.fc.weight" in decay
    assert not any("relative_position_bias_table" in n or "norm" in n for n in decay)


def test_loss_uses_label_smoothing_and_metrics_are_top1_top5():
    module = ClassificationModule(MODEL, num_classes=8, img_size=16, optim=OPTIM)
    assert module.criterion.label_smoothing == OPTIM["label_smoothing"]
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0, -2.0, -3.0, -4.0]] * 2)
    targets = torch.tensor([1, 4])  # sample 2: true class ranks 5th
    assert module.metrics["val_acc1"](logits, targets).item() == 0.5
    assert module.metrics["val_acc5"](logits, targets).item() == 1.0


def test_peak_memory_is_per_run_not_per_process():
    """Jobs of a Hydra multirun share one process: each must report its own CPU peak, so a 400 MB
    allocation before the run (an earlier job) must not show up in the run's figure."""
    from vision_attn.callbacks import PeakMemory, peak_memory_mb

    cpu = torch.device("cpu")
    big = torch.ones(100_000_000)  # 400 MB, touched
    del big
    before = peak_memory_mb(cpu)
    PeakMemory().on_fit_start(None, L.LightningModule())
    after = peak_memory_mb(cpu)
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("no writable /proc/self/clear_refs: peak memory is the process's lifetime peak here")
    assert before - after > 300, (before, after)


def test_lightning_summary_table_counts_the_same_flops_as_our_summary():
    """Lightning's summary table (example_input_array) and ours agree: 2 FLOPs per multiply-add."""
    from lightning.pytorch.utilities.model_summary import summarize as lightning_summarize

    from vision_attn.summary import summarize

    module = ClassificationModule(MODEL, num_classes=8, img_size=16, optim=OPTIM)
    theirs = lightning_summarize(module, max_depth=1)
    ours = summarize(module.model, 16)
    assert theirs.total_flops > 0
    assert theirs.total_flops == pytest.approx(2e9 * ours.gflops, rel=1e-6)
    assert theirs.total_parameters == ours.params
    compiled = ClassificationModule({**MODEL, "compile": True}, num_classes=8, img_size=16, optim=OPTIM)
    assert compiled.example_input_array is None  # no eval-mode compile just for the table


def test_fit_prints_lightning_summary_with_our_flops():
    """Through Trainer.fit: the example input passes the datamodule's batch hook; totals agree."""
    from lightning.pytorch.callbacks import ModelSummary

    seen: dict = {}

    class Record(ModelSummary):
        @staticmethod
        def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                      total_flops, **kwargs) -> None:
            seen.update(params=total_parameters, flops=total_flops)

    module = ClassificationModule(MODEL, num_classes=8, img_size=16, optim=OPTIM)
    dm = ShapesDataModule(image_size=16, batch_size=8, train_size=8, val_size=8, test_size=8)
    L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              callbacks=[Record()], num_sanity_val_steps=0).fit(module, datamodule=dm)
    assert seen == {"params": module.summary.params, "flops": pytest.approx(2e9 * module.summary.gflops, rel=1e-6)}
