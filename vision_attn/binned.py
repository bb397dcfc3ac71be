"""Accuracy by distance bins: how often a model is right, per range of distance between the evidence.

``accuracy_by_bins(distances, correct, edges)`` -> one row per bin ``[lo, hi)`` (the last bin
includes ``hi``): ``{"lo", "hi", "n", "acc"}`` (``acc`` None for an empty bin). train.py writes it
to ``results.json`` as ``val_acc_by_distance`` for datasets that record the distance per sample
(``data=shapes_far``); ``python -m vision_attn.bench ablation`` tabulates a sweep's bins.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np


def accuracy_by_bins(distances: Sequence[float], correct: Sequence[bool],
                     edges: Sequence[float]) -> list[dict[str, Any]]:
    """``correct``: per sample, right (bool) or the share of its tokens that are right (dense targets)."""
    d, c = np.asarray(distances, dtype=float), np.asarray(correct, dtype=float)
    if d.shape != c.shape:
        raise ValueError(f"{len(d)} distances but {len(c)} correctness flags")
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"bin edges must be at least two increasing values, got {list(edges)}")
    rows = []
    for i, (lo, hi) in enumerate(zip(edges, edges[1:])):
        last = i == len(edges) - 2
        inside = (d >= lo) & ((d <= hi) if last else (d < hi))
        n = int(inside.sum())
        rows.append({"lo": float(lo), "hi": float(hi), "n": n, "acc": float(c[inside].mean()) if n else None})
    return rows


def val_accuracy_by_distance(datamodule: Any, module: Any) -> Optional[list[dict[str, Any]]]:
    """The best validation epoch's accuracy by distance bins, where the val split records distances
    (``evidence_distances``, ``evidence_bin_edges``) and the module kept per-sample correctness."""
    split = getattr(datamodule, "splits", {}).get("val") if datamodule is not None else None
    correct = getattr(module, "best_val_correct", None)
    if split is None or correct is None or not hasattr(split, "evidence_distances"):
        return None
    distances = split.evidence_distances()
    if distances is None or len(distances) != len(correct):  # e.g. trainer.limit_val_batches cut the split
        return None
    return accuracy_by_bins(distances, correct.numpy(), split.evidence_bin_edges())
