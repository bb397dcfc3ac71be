"""Pictures: validation predictions and attention maps over the input image."""
from __future__ import annotations

import io
from dataclasses import replace
from typing import Callable, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from timm.layers import to_2tuple  # noqa: E402

from .attention import AttnSpec, attention_class, attention_kinds, create_attention  # noqa: E402


def figure_to_array(fig: plt.Figure) -> np.ndarray:
    """Render a matplotlib figure to an RGB uint8 array and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def series_styles(keys: Sequence) -> dict:
    """A distinct colour and marker per key, stable for a given key order (plots of many kinds)."""
    colors, markers = plt.get_cmap("tab10" if len(keys) <= 10 else "tab20"), "osD^v<>pP*XhH"
    return {k: dict(color=colors(i % colors.N), marker=markers[i % len(markers)]) for i, k in enumerate(keys)}


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised ``(N, 3, H, W)`` floats -> uint8 ``(N, H, W, 3)``."""
    m = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    x = ((images.float() * s + m).clamp(0, 1) * 255).round().byte()
    return x.permute(0, 2, 3, 1).cpu().numpy()


def prediction_grid(images: np.ndarray, targets: Sequence[int], preds: Sequence[int],
                    classes: Sequence[str]) -> np.ndarray:
    """A grid of images titled ``true / predicted`` (green when right, red when wrong)."""
    n = len(images)
    cols = min(8, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.1 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, t, p in zip(axes.flat, images, targets, preds):
        ax.imshow(img)
        ax.set_title(f"{classes[t]}\n→ {classes[p]}", fontsize=7, color="tab:green" if t == p else "tab:red")
    return figure_to_array(fig)


def query_points(h: int, w: int) -> list[tuple[int, int]]:
    """Three query tokens: a corner, the centre, and a point off the window grid."""
    return [(0, 0), (h // 2, w // 2), (min(h - 1, (3 * h) // 4 + 1), max(0, w // 4 - 1))]


def kind_patterns(dim: int, num_heads: int, h: int, w: int, spec: AttnSpec,
                  sr_ratio: int = 2) -> dict[str, torch.Tensor]:
    """Receptive field of every registered kind on an ``h x w`` token map: ``{kind: (P, h, w)}``.

    ``spec`` is the stage's (window, kernel...); the dilation shown is at least 2 and the
    reduction ratio ``sr_ratio``, so those kinds differ visibly from their plain neighbours.
    Fresh modules with q = k = 0 attend uniformly over exactly the keys each query may see.
    Data-dependent kinds (lsh, routed) hash / route on a fixed random map, so the picture shows
    the keys they pick for a typical input.
    """
    points = query_points(h, w)
    spec = replace(spec, dilation=max(spec.dilation, 2), options={**spec.options, "sr_ratio": sr_ratio},
                   attn_drop=0.0, proj_drop=0.0)
    square = replace(spec, window_size=max(to_2tuple(spec.window_size)))  # for kinds that take no (h, w) window
    x = torch.randn(1, h, w, dim, generator=torch.Generator().manual_seed(0))
    maps = {}
    for kind in attention_kinds():
        fits = getattr(attention_class(kind), "non_square_window", False)
        module = create_attention(kind, dim, num_heads, spec if fits else square).eval()
        if not module.exposes_maps:
            continue
        maps[kind] = module.attention_maps(x, points, pattern_only=True).mean(0)
    return maps


def attention_figure(image: np.ndarray, maps: dict[str, torch.Tensor], points: list[tuple[int, int]],
                     title: str) -> np.ndarray:
    """Rows: attention kinds (or blocks); columns: query tokens; weights over the image."""
    H, W = image.shape[:2]
    rows, cols = len(maps), len(points)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows), squeeze=False)
    for r, (label, m) in enumerate(maps.items()):
        h, w = m.shape[-2:]
        for c, (qy, qx) in enumerate(points):
            ax = axes[r, c]
            weights = m[c].float().cpu().numpy()
            ax.imshow(image, extent=(0, W, H, 0))
            ax.imshow(weights / max(weights.max(), 1e-12), cmap="magma", alpha=0.6, extent=(0, W, H, 0),
                      interpolation="nearest", vmin=0, vmax=1)
            ax.scatter([(qx + 0.5) * W / w], [(qy + 0.5) * H / h], s=30, c="cyan", marker="x")
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
            if r == 0:
                ax.set_title(f"query ({qy},{qx})", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(top=1 - 0.55 / fig.get_figheight(), bottom=0.1 / fig.get_figheight())  # title close to the grid
    return figure_to_array(fig)


@torch.no_grad()
def learned_maps(model: torch.nn.Module, images: torch.Tensor, stage: int = 0,
                 prepare: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                 ) -> tuple[dict[str, torch.Tensor], list]:
    """Head-averaged attention of each block of ``stage`` for one image: ``{label: (P, h, w)}``.

    With global (or memory) tokens the maps show the map-token part of each query's attention,
    renormalised. A tiled model (``model.tile_size``) shows its first tile. ``prepare``: the
    model's input preparation for uint8 ``images`` (tile streams: applied per tile).
    """
    inputs: list[torch.Tensor] = []
    blocks = list(model.layers[stage].blocks)

    def keep(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        # the attention's map input (norm1 also sees global tokens, (B, G, C)); a tiled model's
        # later tiles run the same blocks again: only the first tile's inputs are kept
        if out.dim() == 4 and len(inputs) < len(blocks):
            inputs.append(out[:1].detach())

    hooks = [b.norm1.register_forward_hook(keep) for b in blocks]
    try:
        model(images[:1]) if prepare is None else model.forward_prepared(images[:1], prepare)
    finally:
        for hook in hooks:
            hook.remove()
    h, w = inputs[0].shape[1:3]
    points = query_points(h, w)
    tokens = [f"+{t}" for t in model.layers[stage].extra_tokens()]
    extra = f" ({', '.join(tokens)}, not drawn)" if tokens else ""
    tile = getattr(model, "tile_size", None)
    if tile and max(images.shape[-2:]) > tile:
        extra += f" [first {tile}px tile]"
    maps = {
        f"block {i}: {b.attn.kind}{extra}": b.attn.attention_maps(x, points).mean(0)
        for i, (b, x) in enumerate(zip(blocks, inputs))
        if b.attn.exposes_maps
    }
    return maps, points
