"""Effective receptive field (Luo et al. 2016, measured as RepLKNet does).

For each stage, the output feature at the centre token of the stage's map, summed over channels,
is differentiated with respect to the input pixels; the gradient's absolute value, summed over
colour channels and averaged over images, is the stage's *mass map*. Its spread is summarised
by :func:`square_side`: the side of the smallest square centred on the image's centre (as
RepLKNet's ``get_rectangle``) that holds a given share of the mass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class StageMap:
    """A stage's token map on an image: its size, stride, and the centre token's footprint."""

    height: int  # tokens
    width: int
    stride: int  # pixels per token (the stage's reduction)

    @property
    def centre_token(self) -> tuple[int, int]:
        """``(row, col)`` of the token whose gradient is taken: ``(h // 2, w // 2)``."""
        return self.height // 2, self.width // 2

    def footprint(self) -> tuple[int, int, int, int]:
        """Pixels ``(top, left, bottom, right)`` (exclusive ends) the centre token's patch covers."""
        r, c = self.centre_token
        return r * self.stride, c * self.stride, (r + 1) * self.stride, (c + 1) * self.stride


def stage_maps(model: nn.Module, img_size: tuple[int, int]) -> list[StageMap]:
    """One :class:`StageMap` per stage of a :class:`~vision_attn.VisionAttnTransformer` at ``img_size``."""
    H, W = img_size
    return [StageMap(-(-H // i["reduction"]), -(-W // i["reduction"]), i["reduction"]) for i in model.feature_info]


def centre_gradients(model: nn.Module, images: torch.Tensor, stages: Sequence[int] | None = None) -> list[torch.Tensor]:
    """Per stage, ``sum_b |d (sum_c f_b[centre, c]) / d x_b|`` summed over colour channels: ``(H, W)`` float64.

    ``images`` ``(B, 3, H, W)`` go through ``model.forward_intermediates`` (NHWC, no final norm) in
    one forward; each stage's backward reuses it. Images do not interact (the model must be in eval
    mode), so the gradient of the batch sum is each image's own gradient.
    """
    if model.training:
        raise ValueError("centre_gradients needs model.eval(): drop path and dropout would mix noise into the ERF")
    x = images.detach().clone().requires_grad_(True)
    maps = model.forward_intermediates(x, output_fmt="NHWC", intermediates_only=True)
    stages = list(range(len(maps))) if stages is None else list(stages)
    out = []
    for n, i in enumerate(stages):
        f = maps[i]
        r, c = f.shape[1] // 2, f.shape[2] // 2
        (grad,) = torch.autograd.grad(f[:, r, c, :].sum(), x, retain_graph=n < len(stages) - 1)
        out.append(grad.abs().sum(dim=(0, 1)).double())
    return out


def erf_masses(model: nn.Module, images: torch.Tensor, batch: int = 1) -> list[torch.Tensor]:
    """Per stage, the mass map ``(H, W)`` averaged over ``images`` (``batch`` images per forward)."""
    total: list[torch.Tensor] | None = None
    for chunk in images.split(batch):
        masses = centre_gradients(model, chunk)
        total = masses if total is None else [t + m for t, m in zip(total, masses)]
    assert total is not None, "erf_masses needs at least one image"
    return [t / len(images) for t in total]


def _axis_bounds(centre: float, half: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    lo = np.clip(np.rint(centre - half).astype(np.int64), 0, length)
    hi = np.clip(np.rint(centre + half).astype(np.int64), 0, length)
    return lo, hi


def square_sides(mass: np.ndarray | torch.Tensor, centre: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Every candidate side ``n`` of a square centred on ``centre`` (rows ``[cy - n/2, cy + n/2)``, the same
    for columns, clipped to the map), from the smallest to the first one covering the whole map, and
    the share of the total mass each holds.

    Sides are even for a centre on a pixel corner (integer ``cy``) and odd for one on a pixel centre
    (``cy`` = i + 0.5), so the square's edges fall on pixel edges.
    """
    m = np.asarray(mass, dtype=np.float64)
    H, W = m.shape
    cy, cx = centre
    if (2 * cy) % 1 or (2 * cx) % 1 or (cy % 1) != (cx % 1):
        raise ValueError(f"centre {centre} must be both integers or both half-integers")
    total = m.sum()
    if not total > 0:
        raise ValueError("the mass map is all zero (no gradient reached the input)")
    odd = int(cy % 1 == 0.5)
    reach = max(cy, H - cy, cx, W - cx)
    sides = np.arange(2 - odd, int(np.ceil(2 * reach)) + 2, 2)
    sides = sides[: np.searchsorted(sides, 2 * reach) + 1]  # up to the first square covering the map
    integral = np.zeros((H + 1, W + 1))
    integral[1:, 1:] = m.cumsum(0).cumsum(1)
    (y0, y1), (x0, x1) = _axis_bounds(cy, sides / 2, H), _axis_bounds(cx, sides / 2, W)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return sides, inside / total


def image_centre(mass: np.ndarray | torch.Tensor) -> tuple[float, float]:
    """The middle of an ``(H, W)`` map in continuous pixel coordinates (pixel ``i`` spans ``[i, i + 1)``)."""
    H, W = np.shape(mass)
    return H / 2, W / 2


def square_side(mass: np.ndarray | torch.Tensor, fraction: float, centre: tuple[float, float] | None = None) -> int:
    """Side (pixels) of the smallest square centred on ``centre`` (default: the map's middle) holding
    at least ``fraction`` of the mass.

    The square is clipped to the map; around a centre off the map's middle, the square that holds
    everything is up to twice the centre's distance to the farthest edge, larger than the map.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    sides, share = square_sides(mass, image_centre(mass) if centre is None else centre)
    return int(sides[np.argmax(share >= fraction * (1 - 1e-12))])


def support_box(mass: np.ndarray | torch.Tensor) -> tuple[int, int, int, int]:
    """Bounding box ``(top, left, bottom, right)`` (exclusive ends) of the non-zero entries."""
    m = np.asarray(mass)
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    if not len(rows):
        raise ValueError("the mass map is all zero (no gradient reached the input)")
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1
