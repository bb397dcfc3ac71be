"""Helpers shared by several test files (import them as ``from helpers import ...``; ``tests/`` is on
``sys.path`` through pyproject's ``pythonpath``): config composition, the tiny train.py overrides,
reading W&B offline runs and train.py's final metrics, the shapes dataset's object centres and far disks, the
attention kinds and variants beyond local windows with a float64 module factory for them."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from conftest import ROOT
from hydra import compose, initialize_config_dir
from scipy import ndimage

from vision_attn.attention import AttnSpec, create_attention

# ----------------------------------------------------------------------------- config (conf/)


def cfg_with(*overrides: str, hydra: bool = False):
    """conf/config.yaml with ``overrides``; ``hydra``: with the ``hydra`` node (sweeper params, run dir)."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


# ----------------------------------------------------------------------------- train.py runs


TINY = [
    "trainer=debug",
    "data.image_size=32",
    "data.batch_size=16",
    "data.train_size=64",
    "data.val_size=32",
    "data.test_size=32",
    "model.embed_dim=16",
    "callbacks.throughput.log_every_n_steps=1",
]


def _leet_inspect(run_dir: Path, *flags: str) -> str:
    """``python -m wandb leet inspect <flags> --json`` on the one offline run under ``run_dir``: its stdout."""
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline run in {run_dir / 'wandb'}, found {runs}"
    proc = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", *flags, "--json", str(runs[0])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def inspect_wandb(run_dir: Path) -> dict:
    """The offline run's summary, config and state (``leet inspect --summary``)."""
    return json.loads(_leet_inspect(run_dir, "--summary"))


def wandb_records(run_dir: Path, kind: str) -> list[dict]:
    """Records of one type from ``wandb leet inspect --json`` (the raw transaction log)."""
    return [r for r in map(json.loads, _leet_inspect(run_dir).splitlines()) if r.get("type") == kind]


def final_metrics(out: str) -> dict[str, float]:
    """``train.py``'s ``final metrics: k=v ...`` line as a dict."""
    line = [ln for ln in out.splitlines() if "final metrics:" in ln][-1]
    return {k: float(v) for k, v in re.findall(r"(\S+)=([-\d.naif]+)", line.split("final metrics:", 1)[1])}


def stage_px(stage: str) -> int:
    """The widest reach in pixels a stage's summary line names (``"... window 7 (224 px) / ..."``)."""
    return max(int(px) for px in re.findall(r"\((\d+) px\)", stage))


# ----------------------------------------------------------------------------- the shapes dataset


def centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return xs.mean() + 0.5, ys.mean() + 0.5


def objects(img: np.ndarray) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centres of the red disk and the blue square, found from the pixels alone."""
    r, g, b = (img[..., i].astype(int) for i in range(3))
    return centroid((r > 150) & (b < 120)), centroid((b > 150) & (r < 120))


# ----------------------------------------------------------------------------- attention beyond local windows

BEYOND_LOCAL_KINDS = ["spatial_reduction", "lsh", "routed"]
BEYOND_LOCAL_VARIANTS = ["swin_global_tokens", "swin_sr", "swin_lsh", "swin_routed"]


def attention_module(kind: str, dim: int = 8, heads: int = 2, seed: int = 0, **spec) -> torch.nn.Module:
    """A float64 eval-mode attention module (window 3, kernel 3 unless ``spec`` says otherwise) with a
    bias table large enough to matter."""
    torch.manual_seed(seed)
    m = create_attention(kind, dim, heads, AttnSpec.of(**{"window_size": 3, "kernel_size": 3, **spec})).double().eval()
    if getattr(m, "relative_position_bias_table", None) is not None:
        torch.nn.init.normal_(m.relative_position_bias_table, std=0.5)  # make the bias matter
    return m


def fit(
    loss_fn: Callable[[], torch.Tensor],
    opt: torch.optim.Optimizer,
    steps: int,
    check_first_grads: Optional[Callable[[], None]] = None,
) -> list[float]:
    """``steps`` optimiser steps on ``loss_fn()``, the loss of each; ``check_first_grads`` runs after the
    first backward, before its step."""
    losses = []
    for step in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        if step == 0 and check_first_grads is not None:
            check_first_grads()
        opt.step()
        losses.append(loss.item())
    return losses


# ----------------------------------------------------------------------------- shapes task=far

def far_disks(img: np.ndarray) -> list[dict]:
    """The two disks from the pixels alone: object pixels have a channel >= 200 (the tinted noise
    background stays below ~130); red where r > b. Per disk: colour (0 red, 1 blue), pixel box, centre."""
    mask = img.max(-1) >= 200
    labels, n = ndimage.label(mask)
    disks = []
    for k in range(1, n + 1):
        ys, xs = np.nonzero(labels == k)
        if len(xs) < 50:  # a stray noise pixel, never a disk (radius >= 0.075 of the side)
            continue
        r, b = img[ys, xs, 0].mean(), img[ys, xs, 2].mean()
        disks.append({"colour": int(b > r), "x0": xs.min(), "x1": xs.max(), "y0": ys.min(), "y1": ys.max(),
                      "cx": xs.mean() + 0.5, "cy": ys.mean() + 0.5, "pixels": (ys, xs)})
    return disks


def pixel_gap(a: dict, b: dict) -> int:
    """Chebyshev gap between two disks' pixel boxes: the larger of the x and y index differences
    between their nearest columns / rows (0 when the boxes overlap on both axes)."""
    gx = max(b["x0"] - a["x1"], a["x0"] - b["x1"], 0)
    gy = max(b["y0"] - a["y1"], a["y0"] - b["y1"], 0)
    return int(max(gx, gy))
