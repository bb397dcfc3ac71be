"""LightningModule: image classification with any backbone variant."""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from . import lightning_compat as compat
from .errors import ConfigError, TrainingDiverged
from .factory import create_model
from .summary import summarize, zeros_image
from .tiling import Prepare


class ClassificationModule(L.LightningModule):
    """Cross-entropy (label smoothing), timm AdamW, per-step cosine schedule with warmup.

    Soft ``(B, num_classes)`` targets (Mixup/CutMix from the DataModule, smoothing included) use
    ``SoftTargetCrossEntropy``; accuracy is then measured against their argmax.

    ``model`` holds the model config (``variant``, ``size`` and overrides, see
    :func:`vision_attn.create_model`); ``optim`` holds ``opt, lr, weight_decay, warmup_epochs,
    warmup_lr, min_lr, label_smoothing``. Both are stored as plain containers in checkpoints.

    Speed knobs in ``model`` (kept out of :func:`vision_attn.create_model`): ``compile``
    (``torch.compile`` of the backbone; ``self.model`` stays the eager module, so checkpoints keep
    their keys and hooks still work) and ``channels_last`` (the stem's conv weights and the input
    images in channels-last memory format, so the stem's NCHW -> NHWC permute is free).
    ``check_finite``: stop with :class:`TrainingDiverged` naming the step when the training loss or
    the gradients' total norm is NaN/Inf (on any rank), before the optimizer step (checkpoints
    untouched). With fp16 mixed precision the gradient check is the GradScaler's (it skips such
    steps). The tests poison a step with a test-only callback (``tests/poison.py``).
    """

    def __init__(
        self,
        model: dict[str, Any],
        num_classes: int,
        img_size: int,
        optim: dict[str, Any],
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        model = dict(model)
        compile_model = bool(model.pop("compile", False))
        self.channels_last = bool(model.pop("channels_last", False))
        self.model = create_model(num_classes=num_classes, img_size=img_size, **model)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        # Not a registered submodule: same parameters, no "_orig_mod." keys in the state dict.
        self.__dict__["_compiled"] = torch.compile(self.model) if compile_model else None
        self.check_finite = check_finite
        self.optim = dict(optim)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=self.optim.get("label_smoothing", 0.0))
        self.soft_criterion = SoftTargetCrossEntropy()
        top5 = min(5, num_classes)
        self.metrics = nn.ModuleDict(
            {
                f"{split}_acc{k}": MulticlassAccuracy(num_classes, top_k=k, average="micro")
                for split in ("train", "val", "test")
                for k in sorted({1, top5})
            }
        )
        self._top_ks = sorted({1, top5})
        self.img_size, self.in_chans = img_size, int(model.get("in_chans", 3))
        if not compile_model:  # Lightning's summary table then shows per-module FLOPs and in/out sizes
            self.example_input_array = zeros_image(self.in_chans, img_size)
        self._val_correct: Optional[list[torch.Tensor]] = None  # this validation epoch's, while recorded
        self.best_val_correct: Optional[torch.Tensor] = None  # the best validation epoch's (CPU)
        self.best_val_acc1 = float("-inf")  # that epoch's val/acc1

    def setup(self, stage: str) -> None:
        """Print and log the model summary (params, GFLOPs at the training resolution)."""
        if stage != "fit":
            return
        device, dtype, batch = self._step_setting()
        self.summary = summary = summarize(self.model, self.img_size, self.in_chans, device, dtype, batch)
        rank_zero_info(f"model: {self.hparams['model'].get('variant')} {self.hparams['model'].get('size')}: {summary}")
        for logger in self.loggers:
            logger.log_metrics({"model/params": summary.params, "model/gflops": summary.gflops}, step=0)
            if summary.reach:
                logger.log_hyperparams({"model_reach": list(summary.reach), "model_routes": list(summary.routes)})

    def _step_setting(self) -> tuple[str, torch.dtype, int]:
        """Where a training step runs: the device type, autocast's dtype (else fp32), the batch per device."""
        trainer = self._trainer
        if trainer is None:
            return "cpu", torch.float32, 1
        precision = str(trainer.precision)
        dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") \
            else torch.float32
        batch = getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule is not None else None
        return trainer.strategy.root_device.type, dtype, int(batch or 1)

    @property
    def normalizes_tiles(self) -> bool:
        """Whether uint8 batches come in as they are and are normalised tile by tile in the model
        (eager tile streams, :mod:`vision_attn.tiling`): no float copy of the whole image."""
        return bool(getattr(self.model, "streams", False)) and self._compiled is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, prepare = self._model_input(x)
        if prepare is not None:
            return self.model.forward_prepared(x, prepare)
        return (self.model if self._compiled is None else self._compiled)(x)

    def _model_input(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[Prepare]]:
        """The batch as the model takes it (channels-last if set) and, for uint8 tile streams, the
        per-tile normalisation to hand the model (None: ``x`` goes in as it is)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self._normalize() if x.dtype == torch.uint8 and self.normalizes_tiles else None

    def _normalize(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The datamodule's uint8 -> float normalisation (applied to each tile)."""
        normalize = getattr(self._trainer.datamodule if self._trainer is not None else None, "normalize", None)
        if normalize is None:
            raise ValueError("uint8 images need the datamodule's normalize (mean/std): pass floats or a datamodule")
        return normalize

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        images, targets = batch
        if targets.ndim == 3:  # a dense (B, h, w) target (data=shapes_far_dense): one logit per last-stage token
            logits, labels, per_sample = self._dense_step(images, targets)
            loss = self.criterion(logits, labels)
        else:
            logits = self(images)
            soft = targets.ndim == 2
            loss = self.soft_criterion(logits, targets) if soft else self.criterion(logits, targets)
            labels = targets.argmax(dim=1) if soft else targets
            per_sample = logits.detach().argmax(dim=1) == labels
        on_step = split == "train"
        # val/test loss: a plain tensor, so averaged over all ranks' samples explicitly (accuracy:
        # torchmetrics objects sync themselves); training: each rank's own, no per-step all-reduce.
        self.log(f"{split}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=len(images),
                 sync_dist=not on_step)
        if split == "val":
            self._record_val_correct(per_sample)
        for k in self._top_ks:
            metric = self.metrics[f"{split}_acc{k}"]
            metric(logits.detach(), labels)
            show = k == 1
            self.log(f"{split}/acc{k}", metric, on_step=on_step, on_epoch=True, prog_bar=show, batch_size=len(images))
        return loss

    def _dense_step(self, images: torch.Tensor, targets: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dense targets: the head's linear layer on every token of the last stage's normed map (a 1x1
        head, no pooling; tile streams: each tile's map, stitched, see ``forward_dense``). Returns the
        logits and labels of the labelled tokens (target >= 0) and, per image, the share of its
        labelled tokens predicted right."""
        dense = self.model.head.fc(self.model.forward_dense(*self._model_input(images)))  # (B, h, w, classes)
        if dense.shape[1:3] != targets.shape[1:]:
            raise ConfigError(
                f"data.task=far_dense: the targets are a {tuple(targets.shape[1:])} map (one per 32 px cell) but "
                f"the model's last stage is {tuple(dense.shape[1:3])}: use a stride-32 model (patch 4, 3 merges)"
            )
        valid = targets >= 0
        right = (dense.detach().argmax(-1) == targets) & valid
        per_image = right.sum((1, 2)) / valid.sum((1, 2)).clamp(min=1)
        return dense[valid], targets[valid], per_image

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._shared_step(batch, "train")
        if self.check_finite:
            self._stop_if_not_finite(loss, batch_idx)
        return loss

    def _any_rank(self, bad: bool) -> bool:
        """``bad`` on any rank (every rank stops at the same step)."""
        if self._trainer is not None and self._trainer.world_size > 1:
            return self._trainer.strategy.reduce_boolean_decision(bad, all=False)
        return bad

    def _stop_if_not_finite(self, loss: torch.Tensor, batch_idx: int) -> None:
        bad = self._any_rank(not bool(torch.isfinite(loss.detach()).all()))
        if bad:
            raise TrainingDiverged(
                f"non-finite training loss ({float(loss.detach())}) at step {self.global_step} "
                f"(epoch {self.current_epoch}, batch {batch_idx}); stopped before the optimizer step, "
                "checkpoints left as they were. Try a lower optim.lr, more optim.warmup_epochs or "
                "trainer.gradient_clip_val=1.0"
            )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Stop before AdamW turns non-finite gradients (e.g. a bf16 overflow) into NaN weights."""
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not self.check_finite or not grads or getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return
        norm = torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(grads)]))
        if self._any_rank(not bool(torch.isfinite(norm))):
            raise TrainingDiverged(
                f"non-finite gradient norm ({float(norm)}) at step {self.global_step} "
                f"(epoch {self.current_epoch}, batch {compat.training_batch_index(self.trainer)}); "
                "stopped before the optimizer step, "
                "checkpoints left as they were. Try bf16 -> 32-true precision, a lower optim.lr or "
                "trainer.gradient_clip_val=1.0"
            )

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    # Per-sample top-1 correctness (dense: share of right tokens) of the validation split, in loader
    # order (the val loader does not shuffle, so position i is val sample i): ``best_val_correct``
    # keeps the epoch with the best val/acc1 (the best checkpoint's, when ``monitor`` is val/acc1),
    # for reports by distance bins (``results.json``: ``val_acc_by_distance``). One device only:
    # DDP ranks see strided shards.
    def on_validation_epoch_start(self) -> None:
        self._val_correct = None
        sanity = self._trainer is not None and self.trainer.sanity_checking
        if not sanity and (self._trainer is None or self.trainer.world_size == 1):
            self._val_correct = []

    def _record_val_correct(self, per_sample: torch.Tensor) -> None:
        """``per_sample``: each image's top-1 correctness (dense targets: its share of right tokens)."""
        if self._val_correct is not None:  # kept on the device: one transfer at the epoch's end, no sync a batch
            self._val_correct.append(per_sample.detach().float())

    def on_validation_epoch_end(self) -> None:
        if not self._val_correct:
            return
        correct = torch.cat(self._val_correct).cpu()
        # The epoch's val/acc1 itself (dense targets: over all labelled tokens, not the mean of the
        # per-image shares, which weighs a 2-token image like a 20-token one); strictly better, as
        # ModelCheckpoint(mode="max") decides.
        score = float(self.metrics["val_acc1"].compute())
        best = self.best_val_correct
        if best is None or len(best) != len(correct) or score > self.best_val_acc1:
            self.best_val_correct, self.best_val_acc1 = correct, score
        self._val_correct = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A resumed run keeps the best epoch's per-sample record (the distance bins of results.json)."""
        if self.best_val_correct is not None:
            checkpoint["best_val_correct"] = self.best_val_correct
            checkpoint["best_val_acc1"] = self.best_val_acc1

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "best_val_correct" in checkpoint:
            self.best_val_correct = checkpoint["best_val_correct"]
            # written before the score was kept: the mean is val/acc1 exactly for one label per image
            self.best_val_acc1 = float(checkpoint.get("best_val_acc1", self.best_val_correct.float().mean()))

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def _warmup_steps(self, total_steps: int) -> int:
        """``optim.warmup_epochs`` in optimizer steps (also when training by ``trainer.max_steps``)."""
        epochs = float(self.optim.get("warmup_epochs", 0.0))
        if not epochs or self.trainer is None:
            return 0
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs >= 1:
            per_epoch = total_steps / max_epochs
        else:  # step-based run: one epoch = the train loader's batches per optimizer step
            compat.setup_train_data(self.trainer)
            per_epoch = self.trainer.num_training_batches / self.trainer.accumulate_grad_batches
        if not math.isfinite(per_epoch):
            return 0
        return min(int(epochs * per_epoch), max(total_steps - 1, 0))

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.optim
        optimizer = create_optimizer_v2(
            self.model, opt=o.get("opt", "adamw"), lr=o["lr"], weight_decay=o["weight_decay"], foreach=True
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = CosineLRScheduler(
            optimizer,
            t_initial=total,
            lr_min=o.get("min_lr", 0.0),
            warmup_t=self._warmup_steps(total),
            warmup_lr_init=o.get("warmup_lr", 0.0),
            t_in_epochs=False,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_scheduler_step(self, scheduler: CosineLRScheduler, metric: Optional[Any]) -> None:
        scheduler.step_update(num_updates=self.global_step)
