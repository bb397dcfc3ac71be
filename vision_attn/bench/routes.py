"""``python -m vision_attn.bench routes``: whole models per neighborhood route, one process.

Training steps (forward + backward + SGD step) of ``swin`` and the neighborhood variants, the
latter on the fused CPU kernel and on the pure-PyTorch tiled kernel, interleaved every repetition.
Defaults: the ``make train`` setting (pico, 48², batch 128). ``--attention-share`` adds each case
with its attention kernel replaced by a pass-through (``out = v``; everything else kept): the
share of the step that attention takes, before (tiled) and after (fused).
"""
from __future__ import annotations

import argparse
import contextlib
from typing import Callable

import torch

from vision_attn import create_model
from vision_attn.attention import backends
from vision_attn.bench.common import interleaved, machine, markdown_table, median

LOCAL = ("swin_local", "swin_dilated")


def train_step(variant: str, size: str, img: int, batch: int, route: str, free: bool) -> Callable[[], None]:
    """One training step of ``variant`` on ``route`` (optionally attention-free), same seed each case."""
    torch.manual_seed(0)
    model = create_model(variant, size, num_classes=10, img_size=img)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, 3, img, img), torch.randint(0, 10, (batch,))

    def step() -> None:
        with backends.force(route), backends.attention_free() if free else contextlib.nullcontext():
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def cases(variants: list[str], size: str, img: int, batch: int, share: bool) -> dict[str, Callable[[], None]]:
    out = {}
    for variant in variants:
        for route in (("fused", "tiled") if variant in LOCAL else ("auto",)):
            name = variant if route == "auto" else f"{variant} [{route}]"
            out[name] = train_step(variant, size, img, batch, route, False)
            if share:
                out[f"{name} (attention free)"] = train_step(variant, size, img, batch, route, True)
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m vision_attn.bench routes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["swin", *LOCAL])
    p.add_argument("--size", default="pico")
    p.add_argument("--img", type=int, default=48)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = torch default)")
    p.add_argument("--attention-share", action="store_true", help="also time each case with attention free")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    times = interleaved(cases(args.variants, args.size, args.img, args.batch, args.attention_share), args.reps)
    base = median(times[args.variants[0]])
    rows = []
    for name, samples in times.items():
        if name.endswith("(attention free)"):
            continue
        t = median(samples)
        row = [name, f"{t * 1e3:.1f}", f"{args.batch / t:.1f}", f"{base / t:.3f}x"]
        if args.attention_share:
            row.append(f"{1 - median(times[f'{name} (attention free)']) / t:.1%}")
        rows.append(row)
    header = ["model [route]", "train step ms", "img/s", f"throughput vs {args.variants[0]}"]
    header += ["attention share"] if args.attention_share else []
    print(f"{args.size}, {args.img}², batch {args.batch}, fp32, median of {args.reps} interleaved steps; {machine()}\n")
    print(markdown_table(header, rows))
    return 0
