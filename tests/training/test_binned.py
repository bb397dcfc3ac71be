"""Accuracy by distance bins (vision_attn/binned.py) and the module's per-sample record of the best val epoch."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import cfg_with
from hydra.utils import instantiate
from torch.utils.data import DataLoader, TensorDataset

from vision_attn.binned import accuracy_by_bins
from vision_attn.errors import ConfigError


def test_accuracy_by_bins_hand_computed():
    distances = [10, 19.9, 20, 35, 40, 41, 5]
    correct = [1, 0, 1, 1, 0, 1, 1]
    rows = accuracy_by_bins(distances, correct, [10, 20, 40])
    # [10, 20): 10, 19.9 -> 1 of 2; [20, 40] (the last bin includes 40): 20, 35, 40 -> 2 of 3; 41 and 5 outside
    assert rows == [{"lo": 10.0, "hi": 20.0, "n": 2, "acc": 0.5}, {"lo": 20.0, "hi": 40.0, "n": 3, "acc": 2 / 3}]
    assert accuracy_by_bins([1.0], [True], [2, 3, 4]) == [{"lo": 2.0, "hi": 3.0, "n": 0, "acc": None},
                                                          {"lo": 3.0, "hi": 4.0, "n": 0, "acc": None}]
    with pytest.raises(ValueError, match="2 distances but 1 correctness"):
        accuracy_by_bins([1, 2], [True], [0, 3])
    with pytest.raises(ValueError, match="increasing"):
        accuracy_by_bins([1], [True], [3, 3])


def _validate(module, images: torch.Tensor, targets: torch.Tensor) -> float:
    """One validation epoch of ``module`` on one batch, run by a Trainer as fit runs it; its val/acc1."""
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    batches = DataLoader(TensorDataset(images, targets), batch_size=len(images))
    trainer.validate(module, dataloaders=batches, verbose=False)
    return float(trainer.callback_metrics["val/acc1"])


def test_module_keeps_the_best_val_epochs_per_sample_correctness():
    cfg = cfg_with("data=shapes_far", "data.image_size=32", "model.embed_dim=16")
    module = instantiate(cfg.module).eval()
    torch.manual_seed(0)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        pred = module(images).argmax(1)
    kept = []
    for right in ([1, 1, 0], [1, 0, 0], [1, 1, 1]):  # 2/3; 1/3: worse, not kept; 3/3: kept
        labels = torch.where(torch.tensor(right, dtype=torch.bool), pred, 1 - pred)
        assert _validate(module, images, labels) == pytest.approx(sum(right) / 3)
        kept.append(module.best_val_correct.tolist())
    assert kept == [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)  # a resumed run keeps it, and the score to beat
    resumed = instantiate(cfg.module)
    resumed.on_load_checkpoint(checkpoint)
    assert resumed.best_val_correct.tolist() == [1.0, 1.0, 1.0] and resumed.best_val_acc1 == 1.0
    # a checkpoint written before the score was kept: the score to beat is its record's mean
    resumed.on_load_checkpoint({"best_val_correct": torch.tensor([1.0, 0.0, 0.0, 0.0])})
    assert resumed.best_val_acc1 == 0.25


def test_dense_targets_keep_the_epoch_with_the_best_token_accuracy_the_checkpoint_monitors():
    """val/acc1 pools every labelled token; the mean of per-image shares would pick the other epoch."""
    module = instantiate(cfg_with("data=shapes_far_dense", "data.image_size=64", "model.embed_dim=16").module).eval()
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pred = module.model.head.fc(module.model.forward_dense(images)).argmax(-1).flatten(1)  # (2, 4 tokens)

    def targets(*per_image: tuple[int, int]) -> torch.Tensor:
        """Per image (right, wrong): its first tokens labelled, ``right`` of them as predicted, the rest -1."""
        t = torch.full((2, 4), -1)
        for b, (right, wrong) in enumerate(per_image):
            t[b, :right] = pred[b, :right]
            t[b, right:right + wrong] = 1 - pred[b, right:right + wrong]
        return t.view(2, 2, 2)

    a = targets((1, 0), (1, 2))  # shares 1 and 1/3 (mean 0.67); tokens 2 of 4 right
    b = targets((3, 1), (0, 1))  # shares 0.75 and 0 (mean 0.375); tokens 3 of 5 right: the better epoch
    assert _validate(module, images, a) == pytest.approx(0.5)
    assert _validate(module, images, b) == pytest.approx(0.6)
    assert module.best_val_correct.tolist() == [0.75, 0.0] and module.best_val_acc1 == pytest.approx(0.6)
    _validate(module, images, a)
    assert module.best_val_correct.tolist() == [0.75, 0.0]


def test_dense_targets_train_a_1x1_head_on_the_last_stage_tokens():
    """A (B, h, w) target: the loss and top-1 cover only the labelled tokens (target >= 0), read by the
    head's linear layer on each last-stage token; per image, the share of its labelled tokens right."""
    module = instantiate(cfg_with("data=shapes_far_dense", "data.image_size=64", "model.embed_dim=16").module)
    module.eval()  # no drop path: the same logits twice
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    targets = torch.tensor([[[0, -1], [-1, 1]], [[-1, -1], [1, -1]]])  # 64 px: a 2x2 last-stage map
    logits, labels, per_image = module._dense_step(images, targets)
    dense = module.model.head.fc(module.model.forward_features(images))  # (2, 2, 2, classes)
    torch.testing.assert_close(logits, torch.stack([dense[0, 0, 0], dense[0, 1, 1], dense[1, 1, 0]]))
    assert labels.tolist() == [0, 1, 1]
    right = (dense.argmax(-1) == targets.clamp(min=0)).float()
    expected = [(right[0, 0, 0] + right[0, 1, 1]) / 2, right[1, 1, 0]]
    torch.testing.assert_close(per_image, torch.stack(expected))
    loss = module._shared_step((images, targets), "train")
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1))
    with pytest.raises(ConfigError, match=r"targets are a \(3, 3\) map .* last stage is \(2, 2\)"):
        module._dense_step(images, torch.zeros(2, 3, 3, dtype=torch.long))
