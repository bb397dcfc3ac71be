"""``python -m vision_attn.bench knobs``: what each training speed knob buys on this machine.

One training step (forward, loss, backward, AdamW step) of ``ClassificationModule`` (the
code path ``train.py`` runs) for each knob alone, against the plain fp32 baseline:

- ``bf16-mixed``: ``trainer.precision=bf16-mixed`` (autocast to bfloat16, as Lightning does)
- ``channels_last``: ``model.channels_last=true`` (stem conv + input images channels-last)
- ``compile``: ``model.compile=true`` (``torch.compile`` of the backbone; compile time excluded)
- ``grad_ckpt``: ``model.grad_checkpointing=true`` (recompute block activations in backward)

Step times: median over ``--reps`` repetitions, the cases interleaved so machine noise hits all
alike. Memory, each knob in a fresh process after one warm-up step (compilation, optimizer
state): on CUDA the allocator's peak during a step; on CPU, which has no allocator peak counter,
the peak RSS (VmHWM, reset through /proc/self/clear_refs) during a step minus the RSS before it,
with glibc's mmap threshold pinned at 64 KiB so freed tensors go back to the OS. Either way the
figure is what a step needs on top of the resting weights and optimizer state: activations kept
for backward, gradients, temporaries.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
from typing import Callable

import torch

from vision_attn.bench.common import interleaved, machine, markdown_table, median
from vision_attn.memory import cpu_peak_kib, proc_status_kib, reset_cpu_peak

KNOBS = {
    "fp32": {},
    "bf16-mixed": {"precision": "bf16-mixed"},
    "channels_last": {"channels_last": True},
    "compile": {"compile": True},
    "grad_ckpt": {"grad_checkpointing": True},
}


def make_step(knob: str, variant: str, size: str, img: int, batch: int, device: str,
              **model_overrides: object) -> Callable[[], None]:
    """A closure running one training step with ``knob`` on; models and data seeded alike.

    ``model_overrides``: further model config keys (e.g. ``tile_size``, ``memory_tokens``)."""
    from vision_attn.module import ClassificationModule

    spec = dict(KNOBS[knob])
    precision = spec.pop("precision", "32-true")
    torch.manual_seed(0)
    module = ClassificationModule(
        model=dict(variant=variant, size=size, **spec, **model_overrides),
        num_classes=10,
        img_size=img,
        optim=dict(opt="adamw", lr=1e-3, weight_decay=0.05),
    ).to(device)
    module.train()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3, foreach=True)
    x = torch.randn(batch, 3, img, img, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    autocast = precision == "bf16-mixed"

    def step() -> None:
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            loss = torch.nn.functional.cross_entropy(module(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return step


def _peak_memory_child(args: tuple, queue: "mp.Queue") -> None:
    knob, variant, size, img, batch, device, threads = args
    torch.set_num_threads(threads)
    try:
        step = make_step(knob, variant, size, img, batch, device)
        if device.startswith("cuda"):
            step()  # compile / cudnn autotune outside the measurement
            torch.cuda.reset_peak_memory_stats()
            step()
            queue.put(torch.cuda.max_memory_allocated() / 2**20)
            return
        step()  # compilation, optimizer state
        reset_cpu_peak()  # the peak RSS (VmHWM) restarts from the current RSS
        before = proc_status_kib("VmRSS") or 0
        step()
        queue.put((cpu_peak_kib() - before) / 1024)
    except Exception as e:  # report, do not hang the parent
        queue.put(f"error: {type(e).__name__}: {e}")


def peak_memory_mb(knob: str, variant: str, size: str, img: int, batch: int, device: str) -> float | str:
    """Peak memory of ``knob``'s training step, measured in a fresh process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_memory_child,
                       args=((knob, variant, size, img, batch, device, torch.get_num_threads()), queue))
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by the child's glibc at start-up
    try:
        proc.start()
    finally:
        if saved is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_")
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    result = queue.get(timeout=1800)
    proc.join()
    return result


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m vision_attn.bench knobs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="swin")
    p.add_argument("--size", default="pico")
    p.add_argument("--img", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per knob first (compilation happens here)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--knobs", default=",".join(KNOBS), help=f"comma-separated subset of {','.join(KNOBS)}")
    p.add_argument("--no-memory", action="store_true", help="skip the per-knob memory processes")
    args = p.parse_args(argv)
    knobs = [k.strip() for k in args.knobs.split(",") if k.strip()]
    unknown = sorted(set(knobs) - set(KNOBS))
    if unknown:
        p.error(f"unknown knob(s) {unknown}; choose from {sorted(KNOBS)}")
    if "fp32" not in knobs:
        knobs.insert(0, "fp32")

    shape = (args.variant, args.size, args.img, args.batch, args.device)
    cases = {knob: make_step(knob, *shape) for knob in knobs}
    times = interleaved(cases, args.reps, warmup=args.warmup)
    memory = {knob: None if args.no_memory else peak_memory_mb(knob, *shape) for knob in knobs}

    base_t = median(times["fp32"])
    base_m = memory["fp32"]
    rows = []
    for knob in knobs:
        t, m = median(times[knob]), memory[knob]
        mem = "-" if m is None else (m if isinstance(m, str) else f"{m:.0f}")
        rel = "-" if not isinstance(m, float) or not isinstance(base_m, float) or base_m <= 0 else f"{m / base_m:.2f}x"
        rows.append([knob, f"{t * 1000:.0f}", f"{base_t / t:.2f}x", f"{args.batch / t:.1f}", mem, rel])
    print(f"{args.variant}-{args.size}, batch {args.batch}, {args.img}x{args.img}, {args.device}, "
          f"train step (fwd+bwd+AdamW), {args.reps} reps interleaved (median)")
    print(f"machine: {machine()}\n")
    mem_name = "step peak MB (CUDA alloc)" if args.device.startswith("cuda") else "step peak MB (RSS)"
    print(markdown_table(["knob", "step ms", "speed vs fp32", "img/s", mem_name, "memory vs fp32"], rows))
    return 0
