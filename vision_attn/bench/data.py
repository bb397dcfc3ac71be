"""Data pipeline throughput: our training pipeline vs torchvision's standard one, on large JPEGs.

    python -m vision_attn.bench data                     # 64 JPEGs of 2000x1500 -> 224 crops
    python -m vision_attn.bench data --reps 3 --noise 0  # quick

Images: ``--images`` photos from scikit-image, upscaled to ``--size`` (a quarter in portrait)
and saved as JPEG quality 90, once as they are (smooth, small files) and once per extra
``--noise`` level with Gaussian grain added (camera-like bit rates, costlier entropy decoding).
They live in a temporary folder under ``--out`` and are deleted afterwards.

Pipelines, each one epoch through a ``DataLoader(batch_size, num_workers=0)`` in this process:

* ``torchvision``: ``ImageFolder`` + PIL + ``RandomResizedCrop(224)`` + ``ToTensor()``;
* ``ours (train)``: ``data=imagefolder``'s training split with RandAugment off: reduced-scale
  JPEG decode (shorter side >= 256), shorter side -> 256 + random-resized-crop 224 (one fused
  bicubic resample), flip, uint8 tensor, then the DataModule's batch hooks (normalisation to
  float on the CPU here; on the GPU in training);
* ``ours (train + RandAugment)``: the same with the photo recipe's ``rand-m9-mstd0.5-inc1``;
* ``torchvision eval`` / ``ours (eval)``: ``Resize(256)`` + ``CenterCrop(224)`` + ``ToTensor()``
  vs our eval split (crop_pct 0.875).

All pipelines are timed interleaved over ``--reps`` repetitions (order rotating) after one warm-up
epoch each, single-threaded torch. images/s = images / median CPU seconds of this process per
epoch: with no workers and one thread that is the work per image, and it moves less than wall
time when other jobs share the machine. Wall-clock images/s are reported alongside.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from vision_attn.bench.common import machine, markdown_table, median

TARGET = 3.0  # ours (train) / torchvision images/s


def make_images(root: Path, count: int, size: tuple[int, int], noise: float) -> dict[str, float]:
    """``root/train/<class>/*.jpg`` (``root/val`` links to it); returns file-size statistics."""
    from data.fakes import make_large_jpegs

    paths = make_large_jpegs(root / "train", count, size, noise=noise)
    (root / "val").symlink_to("train", target_is_directory=True)  # relative: works for any --out
    sizes = [p.stat().st_size for p in paths]
    return {"mean_kb": float(np.mean(sizes)) / 1024, "bits_per_pixel": 8 * float(np.mean(sizes)) / (size[0] * size[1])}


def epoch(loader: DataLoader, after: Callable[[object], object] = lambda b: b) -> Callable[[], int]:
    """A callable running one epoch over ``loader`` (``after`` applied per batch)."""

    def run() -> int:
        n = 0
        for batch in loader:
            images = after(batch)[0]
            n += len(images)
        return n

    return run


def our_epoch(root: Path, crop: int, batch_size: int, randaugment: bool, split: str) -> Callable[[], int]:
    from data.modules import ImageFolderDataModule

    augment = {"randaugment": "rand-m9-mstd0.5-inc1" if randaugment else None, "mixup": 0.0, "cutmix": 0.0}
    dm = ImageFolderDataModule(str(root), image_size=crop, batch_size=batch_size, num_workers=0, augment=augment)
    dm.setup()
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    return epoch(loader, lambda b: dm.on_after_batch_transfer(dm.on_before_batch_transfer(b, 0), 0))


def torchvision_epoch(root: Path, crop: int, batch_size: int, train: bool) -> Callable[[], int]:
    if train:
        tf = transforms.Compose([transforms.RandomResizedCrop(crop), transforms.ToTensor()])
    else:
        tf = transforms.Compose([transforms.Resize(int(crop / 0.875)), transforms.CenterCrop(crop),
                                 transforms.ToTensor()])
    loader = DataLoader(datasets.ImageFolder(str(root / "train"), transform=tf), batch_size=batch_size, shuffle=train,
                        num_workers=0)
    return epoch(loader)


def pipelines(root: Path, crop: int, batch_size: int) -> dict[str, Callable[[], int]]:
    return {
        "torchvision": torchvision_epoch(root, crop, batch_size, train=True),
        "ours (train)": our_epoch(root, crop, batch_size, randaugment=False, split="train"),
        "ours (train + RandAugment)": our_epoch(root, crop, batch_size, randaugment=True, split="train"),
        "torchvision eval": torchvision_epoch(root, crop, batch_size, train=False),
        "ours (eval)": our_epoch(root, crop, batch_size, randaugment=False, split="val"),
    }


def interleaved_clocks(cases: dict[str, Callable[[], int]], reps: int) -> dict[str, dict[str, list[float]]]:
    """Per case, ``reps`` epochs' CPU seconds (this process: user + system) and wall seconds,
    interleaved (the order rotates every repetition) after one warm-up epoch each."""
    for fn in cases.values():
        fn()
    names = list(cases)
    samples = {name: {"cpu": [], "wall": []} for name in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            c0, w0 = time.process_time(), time.perf_counter()
            cases[name]()
            samples[name]["cpu"].append(time.process_time() - c0)
            samples[name]["wall"].append(time.perf_counter() - w0)
    return samples


def measure(root: Path, args: argparse.Namespace) -> list[dict]:
    samples = interleaved_clocks(pipelines(root, args.crop, args.batch_size), args.reps)
    return [
        {
            "pipeline": name,
            "cpu_seconds": median(s["cpu"]),
            "wall_seconds": median(s["wall"]),
            "images_per_s": args.images / median(s["cpu"]),
            "images_per_s_wall": args.images / median(s["wall"]),
        }
        for name, s in samples.items()
    ]


def with_ratios(rows: list[dict]) -> list[dict]:
    by_name = {r["pipeline"]: r for r in rows}
    for r in rows:
        base = by_name["torchvision eval" if "eval" in r["pipeline"] else "torchvision"]
        r["vs_torchvision"] = r["images_per_s"] / base["images_per_s"]
        r["vs_torchvision_wall"] = r["images_per_s_wall"] / base["images_per_s_wall"]
    return rows


def report(results: Iterable[dict], args: argparse.Namespace) -> str:
    lines = [
        f"{args.images} JPEGs of {args.size[0]}x{args.size[1]} (quality 90) -> {args.crop}x{args.crop}, "
        f"batch {args.batch_size}, num_workers=0, one process, median of {args.reps} interleaved epochs. {machine()}",
        "images/s = images / CPU seconds of this process (user + system; everything is single-threaded, so this",
        "is the work per image, less sensitive to other jobs on a shared machine); wall-clock images/s alongside.",
        "",
    ]
    rows, checks = [], []
    for res in results:
        label = f"noise {res['noise']:g}: {res['mean_kb']:.0f} KB/img, {res['bits_per_pixel']:.2f} bpp"
        for r in res["rows"]:
            rows.append([
                label, r["pipeline"], f"{r['images_per_s']:.1f}", f"{1e3 / r['images_per_s']:.1f}",
                f"{r['vs_torchvision']:.2f}x", f"{r['images_per_s_wall']:.1f}", f"{r['vs_torchvision_wall']:.2f}x",
            ])
            if r["pipeline"] == "ours (train)":
                met = "met" if r["vs_torchvision"] >= TARGET else "MISSED"
                checks.append([label, f"{r['vs_torchvision']:.2f}x", f"{r['vs_torchvision_wall']:.2f}x",
                               f">= {TARGET:g}x", met])
    header = ["images", "pipeline", "images/s", "CPU ms/image", "vs torchvision", "wall images/s",
              "wall vs torchvision"]
    lines.append(markdown_table(header, rows))
    lines += ["", markdown_table(["images", "ours (train) / torchvision", "(wall clock)", "target", ""], checks)]
    return "\n".join(lines)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vision_attn.bench data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64, help="number of JPEGs")
    p.add_argument("--size", type=int, nargs=2, default=[2000, 1500], metavar=("W", "H"), help="JPEG size")
    p.add_argument("--crop", type=int, default=224, help="output crop (data.image_size)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=5, help="timed epochs per pipeline (median)")
    p.add_argument("--noise", type=float, nargs="+", default=[0.0, 6.0],
                   help="grain std levels, one image set each (0 = upscaled photos as they are)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="directory for data.{md,json} (and temp images)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for noise in args.noise:
        with tempfile.TemporaryDirectory(dir=args.out, prefix="bench-data-") as tmp:
            stats = make_images(Path(tmp), args.images, tuple(args.size), noise)
            rows = with_ratios(measure(Path(tmp), args))
        results.append({"noise": noise, **stats, "rows": rows})
        for r in rows:
            print(f"noise {noise:g} {r['pipeline']}: {r['images_per_s']:.1f} images/CPU-s "
                  f"({r['vs_torchvision']:.2f}x), "
                  f"{r['images_per_s_wall']:.1f} images/s wall ({r['vs_torchvision_wall']:.2f}x)", flush=True)
    text = report(results, args)
    print("\n" + text)
    (args.out / "data.md").write_text(text + "\n")
    (args.out / "data.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1))
    print(f"\nwrote {args.out / 'data.md'}, {args.out / 'data.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
