"""``python -m vision_attn.bench model``: our Swin vs timm's Swin, same shapes, one process.

Training step (forward + backward + SGD step) and inference throughput, alternating the two
models every repetition; timm runs with its fused attention (``TIMM_FUSED_ATTN=2``).

``--attention-share`` adds a third training case: ours with the window-attention kernel replaced
by a pass-through (``out = v``; qkv/proj linears, partitions and everything else kept). Its time
bounds what any attention kernel could buy: with free attention ours would run ``timm / that``.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("TIMM_FUSED_ATTN", "2")  # must be set before timm is imported

import timm  # noqa: E402
import torch  # noqa: E402

from vision_attn import create_model  # noqa: E402
from vision_attn.attention import backends  # noqa: E402
from vision_attn.bench.common import interleaved, machine, markdown_table, median  # noqa: E402

TIMM_NAMES = {"tiny": "swin_tiny_patch4_window7_224", "small": "swin_small_patch4_window7_224"}


def _train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer):
    def step() -> None:
        model.train()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _attention_skipped(step):
    """``step`` with the attention kernels replaced by ``out = v`` (see module docstring)."""

    def run() -> None:
        with backends.attention_free():
            step()

    return run


def _infer(model: torch.nn.Module, x: torch.Tensor):
    def run() -> None:
        model.eval()
        with torch.inference_mode():
            model(x)

    return run


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m vision_attn.bench model", description=__doc__)
    p.add_argument("--size", default="tiny", choices=sorted(TIMM_NAMES))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--attention-share", action="store_true", help="also time ours with attention skipped")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    theirs = timm.create_model(TIMM_NAMES[args.size], num_classes=1000)
    ours = create_model("swin", args.size, num_classes=1000, img_size=args.img)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(args.batch, 3, args.img, args.img)
    y = torch.randint(0, 1000, (args.batch,))
    cases = {
        f"{name}|train": _train_step(model, x, y, torch.optim.SGD(model.parameters(), lr=1e-4))
        for name, model in (("vision_attn swin", ours), (f"timm {TIMM_NAMES[args.size]}", theirs))
    }
    skipped = "vision_attn swin, attention skipped|train"
    if args.attention_share:
        cases[skipped] = _attention_skipped(cases["vision_attn swin|train"])
    train_times = interleaved(cases, args.reps)
    infer_cases = {
        "vision_attn swin|infer": _infer(ours, x),
        f"timm {TIMM_NAMES[args.size]}|infer": _infer(theirs, x),
    }
    infer_times = interleaved(infer_cases, args.reps)

    rows = []
    names = ["vision_attn swin", f"timm {TIMM_NAMES[args.size]}"]
    base_train = median(train_times[f"{names[1]}|train"])
    base_infer = median(infer_times[f"{names[1]}|infer"])
    for name in names:
        t_train, t_infer = median(train_times[f"{name}|train"]), median(infer_times[f"{name}|infer"])
        rows.append(
            [
                name,
                f"{args.batch / t_train:.1f}",
                f"{base_train / t_train:.3f}x",
                f"{args.batch / t_infer:.1f}",
                f"{base_infer / t_infer:.3f}x",
            ]
        )
    print(f"Swin-{args.size}, batch {args.batch}, {args.img}x{args.img}, fp32, {args.reps} reps (median)")
    print(f"machine: {machine()}; TIMM_FUSED_ATTN={os.environ['TIMM_FUSED_ATTN']}\n")
    header = ["model", "train img/s", "train vs timm", "infer img/s", "infer vs timm"]
    print(markdown_table(header, rows))
    if args.attention_share:
        t_ours, t_skip = median(train_times["vision_attn swin|train"]), median(train_times[skipped])
        print(f"\nattention share of our training step: {1 - t_skip / t_ours:.1%}; with attention free, "
              f"ours would train at {base_train / t_skip:.3f}x timm "
              f"(attention skipped: {args.batch / t_skip:.1f} img/s)")
    return 0
