"""``python -m vision_attn.bench erf``: the effective receptive field of every variant's stages.

    python -m vision_attn.bench erf                                  # all variants, pico, 224 and 448 px
    python -m vision_attn.bench erf --variants swin swin_local --sizes 64 128 --images 4
    python -m vision_attn.bench erf --ckpt outputs/.../checkpoints/last.ckpt   # init vs trained

Method (Luo et al. 2016, as RepLKNet measures it; ``vision_attn/erf.py``): for each of ``--images``
photographs (the ones scikit-image ships, centre-cropped and resized to the size, ImageNet-normalised),
the output of each stage at the centre token of its map, summed over channels, is differentiated
with respect to the input pixels (``forward_intermediates``, eval mode); its absolute value, summed
over colour channels and averaged over images, is the stage's mass map. Reported: the side of the
smallest square centred on the image's centre (RepLKNet's rule) holding 20, 50 and 99 % of the mass, in
pixels and as a share of the image side, next to the stage's theoretical reach (``stage_reach``)
and the bounding box of the pixels with any gradient at all (``support``).

* Weights: at initialisation (seed ``--seed``), and with ``--ckpt FILE`` also from a checkpoint:
  a Lightning checkpoint of train.py (variant, size and overrides read from it), or any state dict
  ``model.pretrained`` accepts (then ``--variants`` names its one variant and ``--size`` its size).
* Output: ``--out``/erf.md (one table per image size) and erf_<size>.png per image size (variant x
  stage, log-scaled share of the mass per pixel, one colour scale per stage; the centred 50 % and
  99 % squares drawn in white and cyan).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from vision_attn.bench.common import avx512_flags, machine, markdown_table
from vision_attn.erf import StageMap, erf_masses, square_side, stage_maps, support_box
from vision_attn.errors import ConfigError
from vision_attn.factory import create_model
from vision_attn.variants import SIZES, VARIANTS

IMG_SIZES = [224, 448]
FRACTIONS = (0.2, 0.5, 0.99)
# Config keys of a train.py checkpoint that are not create_model arguments (or must not load again).
_NOT_MODEL_KEYS = ("variant", "size", "compile", "channels_last", "pretrained", "grad_checkpointing")


@dataclass
class StageERF:
    """One stage of one model at one image size: where the gradient went, and how far."""

    variant: str
    weights: str  # "init" or "ckpt <file name>"
    img: int
    stage: int  # 1-based
    grid: StageMap
    reach: str  # theoretical, from stage_reach
    mass: np.ndarray  # (img, img), mean |gradient| per pixel
    sides: dict[float, int]  # fraction -> side in pixels
    support: tuple[int, int, int, int]  # bounding box of the non-zero gradient

    @property
    def support_px(self) -> str:
        top, left, bottom, right = self.support
        whole = (top, left, bottom, right) == (0, 0, self.img, self.img)
        return "whole image" if whole else f"{bottom - top}x{right - left}"


# ----------------------------------------------------------------------------- inputs


def photo_names() -> tuple[str, ...]:
    """The scikit-image photographs of the ``photos`` dataset (``data/photos.py``), in its order."""
    from data.photos import PHOTOS

    return PHOTOS


def photo_batch(n: int, size: int) -> torch.Tensor:
    """``n`` photographs ``(n, 3, size, size)``, ImageNet-normalised. Image ``i`` is photo
    ``i mod P``: its centred square crop, shrunk by 0.8 per further round and mirrored on odd rounds."""
    from PIL import Image
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from data.photos import photo

    names, out = photo_names(), []
    for i in range(n):
        img, rnd = photo(names[i % len(names)]), i // len(names)
        W, H = img.size
        side = int(min(W, H) * 0.8**rnd)
        left, top = (W - side) // 2, (H - side) // 2
        crop = img.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BILINEAR)
        if rnd % 2:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1))
    mean, std = (torch.tensor(c).view(1, 3, 1, 1) for c in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    return (torch.stack(out) - mean) / std


# ----------------------------------------------------------------------------- models


def checkpoint_model_config(path: str) -> Optional[dict[str, Any]]:
    """The ``model`` config and ``num_classes`` stored in a train.py (Lightning) checkpoint, or None
    for a plain state dict."""
    from vision_attn.files import load_checkpoint_file

    if path.endswith(".safetensors"):
        return None
    obj = load_checkpoint_file(path)
    hp = obj.get("hyper_parameters") if isinstance(obj, dict) else None
    if not isinstance(hp, dict) or not isinstance(hp.get("model"), dict):
        return None
    return dict(model=dict(hp["model"]), num_classes=int(hp.get("num_classes", 1000)))


def init_model(variant: str, size: str, img: int, seed: int, num_classes: int = 1000,
               **overrides: Any) -> nn.Module:
    """A freshly initialised model (seeded), in eval mode."""
    torch.manual_seed(seed)
    return create_model(variant, size=size, num_classes=num_classes, img_size=img, **overrides).eval()


@dataclass(frozen=True)
class ModelSpec:
    """How to build one measured model: variant, size, overrides, and the weights to load."""

    variant: str
    size: str
    num_classes: int = 1000
    overrides: tuple[tuple[str, Any], ...] = ()
    ckpt: Optional[str] = None

    @property
    def weights(self) -> str:
        return "init" if self.ckpt is None else f"ckpt {os.path.basename(self.ckpt)}"

    def build(self, img: int, seed: int) -> nn.Module:
        """The model at ``img`` px: initialised with ``seed``, then the checkpoint's weights if any."""
        model = init_model(self.variant, self.size, img, seed, self.num_classes, **dict(self.overrides))
        if self.ckpt is not None:
            from vision_attn.pretrained import load_pretrained

            load_pretrained(model, self.ckpt)
        return model.eval()


def checkpoint_specs(path: str, variants: Optional[Sequence[str]], size: str) -> list[ModelSpec]:
    """The checkpoint's model at initialisation and with its weights (``[init, ckpt]``)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--ckpt {path}: no such file")
    stored = checkpoint_model_config(path)
    if stored is not None:
        cfg = stored["model"]
        variant, size = cfg.get("variant", "swin"), cfg.get("size", "tiny")
        if variants and list(variants) != [variant]:
            raise ConfigError(f"--ckpt {path} holds a {variant!r} model; drop --variants {list(variants)} "
                              f"or pass --variants {variant}")
        overrides = tuple((k, v) for k, v in cfg.items() if k not in _NOT_MODEL_KEYS and v is not None)
        base = ModelSpec(variant, size, stored["num_classes"], overrides)
    else:
        if not variants or len(variants) != 1:
            raise ConfigError(f"--ckpt {path} is a plain state dict (no train.py hyper_parameters): name its "
                              f"variant with exactly one --variants (and its size with --size), got {variants}")
        base = ModelSpec(variants[0], size)
    return [base, ModelSpec(base.variant, base.size, base.num_classes, base.overrides, path)]


# ----------------------------------------------------------------------------- measurement


def reach_labels(model: nn.Module, img: int) -> list[str]:
    """``stage_reach`` per stage without its ``"HxW tokens: "`` prefix."""
    return [r.split(": ", 1)[1] for r in model.stage_reach(img)]


def measure(model: nn.Module, spec: ModelSpec, img: int, images: torch.Tensor, batch: int) -> list[StageERF]:
    """Every stage's ERF of ``model`` on ``images`` (already at ``img`` px)."""
    masses = erf_masses(model, images, batch)
    rows = []
    for i, (grid, reach, mass) in enumerate(zip(stage_maps(model, (img, img)), reach_labels(model, img), masses)):
        m = mass.numpy()
        sides = {f: square_side(m, f) for f in FRACTIONS}
        rows.append(StageERF(spec.variant, spec.weights, img, i + 1, grid, reach, m, sides, support_box(m)))
    return rows


def run(specs: Sequence[ModelSpec], img_sizes: Sequence[int], n_images: int, batch: int, seed: int,
        log: bool = True) -> list[StageERF]:
    """Measure every model at every image size."""
    rows: list[StageERF] = []
    for img in img_sizes:
        images = photo_batch(n_images, img)
        for spec in specs:
            t0 = time.perf_counter()
            got = measure(spec.build(img, seed), spec, img, images, batch)
            rows += got
            if log:
                sides = "  ".join(f"s{r.stage} {r.sides[FRACTIONS[1]]}/{r.sides[FRACTIONS[2]]}" for r in got)
                print(f"{spec.variant} ({spec.weights}) {img} px: ERF 50/99 % side {sides}  "
                      f"[{time.perf_counter() - t0:.1f} s]", flush=True)
    return rows


# ----------------------------------------------------------------------------- report


def side_cell(side: int, img: int) -> str:
    return f"{side} ({side / img:.2f})"


def table(rows: Sequence[StageERF]) -> str:
    """variant, weights, stage, map, theoretical reach, gradient support, ERF 20/50/99 % side: px (share)."""
    header = ["variant", "weights", "stage", "map", "theoretical reach", "support (px)"]
    header += [f"ERF {f:.0%} side px (share)" for f in FRACTIONS]
    body = [[r.variant, r.weights, r.stage, f"{r.grid.height}x{r.grid.width} /{r.grid.stride}", r.reach,
             r.support_px] + [side_cell(r.sides[f], r.img) for f in FRACTIONS] for r in rows]
    return markdown_table(header, body)


def report(rows: Sequence[StageERF], args: argparse.Namespace, seconds: float) -> str:
    lines = [
        f"ERF of the centre token per stage, {args.size} unless a checkpoint says otherwise, {args.images} "
        f"scikit-image photos, batch {args.batch}, seed {args.seed}; {seconds:.0f} s in all",
        f"machine: {machine()}; avx512 flags: {avx512_flags()}",
        "sides: smallest square centred on the image's centre holding the share of the mean |gradient| "
        "(px, and share of the image side); support: bounding box of the pixels with a non-zero gradient",
    ]
    for img in dict.fromkeys(r.img for r in rows):
        lines += ["", f"### {img} x {img} px", "", table([r for r in rows if r.img == img])]
    return "\n".join(lines)


def plot(rows: Sequence[StageERF], path: Path, decades: float = 6.0) -> None:
    """Grid variant (and weights) x stage of log10(share of the mass per pixel), one colour scale per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    models = list(dict.fromkeys((r.variant, r.weights) for r in rows))
    stages = sorted({r.stage for r in rows})
    by = {(r.variant, r.weights, r.stage): r for r in rows}
    logs = {k: np.log10(np.maximum(r.mass / r.mass.sum(), 1e-30)) for k, r in by.items()}
    tops = {s: max(v.max() for k, v in logs.items() if k[2] == s) for s in stages}
    fig = plt.figure(figsize=(2.0 * len(stages) + 0.4, 2.0 * len(models) + 1.0), layout="constrained")
    axes = fig.subplots(len(models), len(stages), squeeze=False)
    for (i, (variant, weights)), (j, s) in ((a, b) for a in enumerate(models) for b in enumerate(stages)):
        ax, r = axes[i, j], by.get((variant, weights, s))
        ax.set_xticks([])
        ax.set_yticks([])
        if r is None:
            continue
        im = ax.imshow(logs[(variant, weights, s)], cmap="magma", vmin=tops[s] - decades, vmax=tops[s])
        for f, color in ((0.5, "white"), (0.99, "cyan")):
            n, (cy, cx) = r.sides[f], (r.img / 2, r.img / 2)
            ax.add_patch(Rectangle((cx - n / 2 - 0.5, cy - n / 2 - 0.5), n, n, fill=False, lw=0.8, ec=color))
        if i == 0:
            ax.set_title(f"stage {s} ({r.grid.height}x{r.grid.width})", fontsize=8)
        if j == 0:
            ax.set_ylabel(variant if weights == "init" else f"{variant}\n{weights}", fontsize=7)
        if i == len(models) - 1:
            fig.colorbar(im, ax=axes[:, j].tolist(), location="bottom", shrink=0.9, label="log10 share per pixel")
    fig.suptitle(f"ERF at {rows[0].img} px: |d centre feature / d pixel|, 50 % (white) and 99 % (cyan) squares",
                 fontsize=9)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vision_attn.bench erf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=None, help=f"subset of {list(VARIANTS)} (default: all)")
    p.add_argument("--size", default="pico", help=f"model.size, one of {list(SIZES)}")
    p.add_argument("--sizes", type=int, nargs="+", default=IMG_SIZES, help="square image sides in pixels")
    p.add_argument("--images", type=int, default=8, help="photographs averaged over")
    p.add_argument("--batch", type=int, default=1, help="images per forward (memory: global attention at 448 px)")
    p.add_argument("--ckpt", default=None, help="also measure these weights (train.py checkpoint or a state dict)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = torch default)")
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="directory for erf.md and erf_<size>.png")
    return p.parse_args(argv)


def check(args: argparse.Namespace) -> None:
    """Raise :class:`ConfigError` for a flag that cannot work (``--ckpt``: :func:`checkpoint_specs`)."""
    unknown = sorted(set(args.variants or []) - set(VARIANTS))
    if unknown:
        raise ConfigError(f"unknown variant(s) {unknown} (--variants); choose from {sorted(VARIANTS)}")
    if args.size not in SIZES:
        raise ConfigError(f"unknown --size {args.size!r}; choose one of {list(SIZES)}")
    if any(s < 32 for s in args.sizes):
        raise ConfigError(f"--sizes must be at least 32 px (the backbone's total stride), got {args.sizes}")
    for flag in ("images", "batch"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} must be at least 1, got {getattr(args, flag)}")


def model_specs(args: argparse.Namespace) -> list[ModelSpec]:
    if args.ckpt is not None:
        return checkpoint_specs(args.ckpt, args.variants, args.size)
    return [ModelSpec(v, args.size) for v in (args.variants or VARIANTS)]


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    check(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = model_specs(args)
    t0 = time.perf_counter()
    rows = run(specs, args.sizes, args.images, args.batch, args.seed)
    text = report(rows, args, time.perf_counter() - t0)
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "erf.md").write_text(text + "\n")
    figures = []
    for img in dict.fromkeys(r.img for r in rows):
        figures.append(args.out / f"erf_{img}.png")
        plot([r for r in rows if r.img == img], figures[-1])
    print(f"\nwrote {args.out / 'erf.md'}, " + ", ".join(map(str, figures)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
