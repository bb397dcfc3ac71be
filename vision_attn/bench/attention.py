"""Attention kernels side by side: forward+backward time and peak memory.

    python -m vision_attn.bench attention                       # 28², 56², 112², 224²
    python -m vision_attn.bench attention --sizes 28 56 --reps 3  # quick

Every kind runs as its functional kernel on the same ``q, k, v`` ``(B, heads, L, L, D)`` with a
learned relative position bias (gradients flow into a timm-layout table), forward + backward.
Beyond-local kinds: ``spatial_reduction`` (k, v average-pooled by ``SR_RATIO``, standing in for the
module's depthwise strided conv), ``lsh`` (chunks of ``LSH_CHUNK``, one hash round, keys hashed),
``routed`` (regions of ``KERNEL`` x ``KERNEL``, top ``ROUTED_TOPK``) and ``window+global_tokens``
(window attention merged with ``GLOBAL_TOKENS`` global tokens, here the first map tokens' q, k, v).

* Time: all kinds in ONE process, interleaved over repetitions (the order rotates every
  repetition), after one warm-up call each; the median is reported with the ratio to window.
  Each kind runs at least ``--reps`` times, fast ones more (``--budget`` seconds per kind).
* Peak memory: each (kind, size) runs in fresh subprocesses (median of ``--mem-reps``).
  After the inputs are built the kernel's peak resident-set growth is read from
  ``/proc/self/status``: ``VmHWM`` is reset through ``/proc/self/clear_refs`` (falls back to
  ``ru_maxrss``), so the number is ``VmHWM - VmRSS`` around one forward+backward (after
  ``malloc_trim``), i.e. everything the kernel allocates on top of its inputs, including the
  q/k/v/bias gradients and its cached index plans. ``tracemalloc`` would not see torch buffers.
* ``global`` is skipped where its estimated peak exceeds ``--mem-cap-gb``.
* One intra-op thread by default: on a small shared box a co-running job turns every OpenMP
  region into a scheduler stall, which swamps the kernels. ``--threads 0`` keeps torch's default.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from vision_attn.attention import (
    backends,
    global_attention,
    global_token_attention,
    grid_attention,
    lsh_attention,
    neighborhood_attention,
    routed_attention,
    spatial_reduction_attention,
    window_attention,
)
from vision_attn.attention import neighborhood as nb
from vision_attn.attention.lsh import lsh_num_buckets, lsh_rotations
from vision_attn.attention.rel_pos import bias_grid, new_bias_table
from vision_attn.attention.window import window_attention_lse
from vision_attn.bench.common import interleaved, machine, markdown_table, save_loglog_figure
from vision_attn.memory import proc_status_kib, reset_cpu_peak

B, HEADS, HEAD_DIM, KERNEL = 2, 3, 32, 7
SR_RATIO, LSH_CHUNK, ROUTED_TOPK, GLOBAL_TOKENS = 4, 64, 4, 4
KINDS = ["window", "window[sdpa]", "shifted_window", "neighborhood", "neighborhood[torch]", "dilated_2",
         "dilated_2[torch]", "dilated_3", "dilated_3[torch]", "dilated_4", "dilated_4[torch]", "grid", "global",
         "spatial_reduction", "lsh", "routed", "window+global_tokens"]
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def kernel_for(kind: str) -> Kernel:
    """The functional kernel of ``kind``: ``(q, k, v, bias_grid) -> out``.

    A suffix forces a route of :mod:`vision_attn.attention.backends` (no suffix: ``auto``):
    ``neighborhood[tiled]`` / ``dilated_2[fused]``, ``window[sdpa_heads]``; two older names stay:
    ``[torch]`` is ``tiled`` and ``window[sdpa]`` is ``sdpa_5d`` (SDPA's math path training the bias
    as a mask, instead of the per-head window kernel).
    """
    base, _, suffix = kind.partition("[")
    suffix = suffix.rstrip("]")
    fn = _base_kernel(base)
    if not suffix:
        return fn
    route = {"torch": "tiled", "sdpa": "sdpa_5d"}.get(suffix, suffix)

    def routed(q, k, v, g, fn=fn):
        with backends.force(route):
            return fn(q, k, v, g)
    return routed


def _base_kernel(kind: str) -> Kernel:
    if kind == "window":
        return lambda q, k, v, g: window_attention(q, k, v, KERNEL, 0, g)
    if kind == "shifted_window":
        return lambda q, k, v, g: window_attention(q, k, v, KERNEL, KERNEL // 2, g)
    if kind == "neighborhood":
        return lambda q, k, v, g: neighborhood_attention(q, k, v, KERNEL, 1, g)
    if kind.startswith("dilated_"):
        d = int(kind.split("_")[1])
        return lambda q, k, v, g: neighborhood_attention(q, k, v, KERNEL, d, g)
    if kind.startswith("neighborhood@"):  # tile sweep, e.g. neighborhood@4x8
        tile = tuple(int(t) for t in kind.split("@")[1].split("x"))
        return lambda q, k, v, g: nb.tiled_attention(q, k, v, *nb.neighborhood_patterns(
            q.shape[2], q.shape[3], KERNEL, 1, tile), g)  # type: ignore[arg-type]
    if kind == "grid":
        return lambda q, k, v, g: grid_attention(q, k, v, KERNEL, g)
    if kind == "global":
        return lambda q, k, v, g: global_attention(q, k, v, g)
    if kind in BEYOND_LOCAL:
        return BEYOND_LOCAL[kind]
    raise ValueError(f"unknown kind {kind!r}")


def _spatial_reduction(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    B, nh, H, W, D = k.shape

    def pool(t: torch.Tensor) -> torch.Tensor:
        t = F.avg_pool2d(t.reshape(B * nh, H, W, D).permute(0, 3, 1, 2), SR_RATIO, ceil_mode=True)
        return t.permute(0, 2, 3, 1).reshape(B, nh, t.shape[-2], t.shape[-1], D)

    return spatial_reduction_attention(q, pool(k), pool(v), SR_RATIO, g)


def _lsh(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    nh, N, D = q.shape[1], q.shape[2] * q.shape[3], q.shape[-1]
    rot = lsh_rotations(1, nh, D, lsh_num_buckets(N, LSH_CHUNK), seed=0, device=q.device, dtype=q.dtype)
    return lsh_attention(q, k, v, rot, LSH_CHUNK, g)


def _window_global_tokens(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    gq, gk, gv = (t.flatten(2, 3)[:, :, :GLOBAL_TOKENS] for t in (q, k, v))
    local = lambda q, k, v: window_attention_lse(q, k, v, KERNEL, 0, g)  # noqa: E731
    out, g_out = global_token_attention(local, q, k, v, gq, gk, gv)
    return out + g_out.sum() * 0  # the global tokens' output joins the graph


BEYOND_LOCAL: dict[str, Kernel] = {
    "spatial_reduction": _spatial_reduction,
    "lsh": _lsh,
    "routed": lambda q, k, v, g: routed_attention(q, k, v, KERNEL, ROUTED_TOPK, g),
    "window+global_tokens": _window_global_tokens,
}


@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    table: torch.nn.Parameter
    grad_out: torch.Tensor

    @classmethod
    def make(cls, size: int, seed: int = 0) -> "Inputs":
        torch.manual_seed(seed)
        q, k, v = (torch.randn(B, HEADS, size, size, HEAD_DIM, requires_grad=True) for _ in range(3))
        return cls(q, k, v, new_bias_table(HEADS, KERNEL), torch.randn(B, HEADS, size, size, HEAD_DIM))

    def step(self, fn: Kernel) -> None:
        """One forward + backward (gradients w.r.t. q, k, v and the bias table)."""
        out = fn(self.q, self.k, self.v, bias_grid(self.table))
        torch.autograd.grad(out, (self.q, self.k, self.v, self.table), self.grad_out)


def global_estimate_bytes(size: int) -> int:
    """Rough peak of dense global attention with a bias: the (heads, N, N) bias plus ~5 score-sized buffers."""
    n2 = (size * size) ** 2
    return 4 * n2 * (HEADS + 5 * B * HEADS)


def skipped(kind: str, size: int, cap_gb: float) -> bool:
    """Quadratic kinds over the memory cap: global, and spatial_reduction (N * N / r^2 scores)."""
    if kind == "spatial_reduction":
        return global_estimate_bytes(size) / SR_RATIO**2 > cap_gb * 1e9
    return kind == "global" and global_estimate_bytes(size) > cap_gb * 1e9


# ----------------------------------------------------------------------------- time


def time_kinds(size: int, kinds: list[str], reps: int, budget: float) -> dict[str, float]:
    """Median forward+backward seconds per kind, interleaved in this process.

    Every kind gets at least ``reps`` samples; kinds fast enough get more (the same number for
    all of them) until about ``budget`` seconds per kind, which steadies small maps.
    """
    inputs = Inputs.make(size)
    fns = {kind: kernel_for(kind) for kind in kinds}
    warm = {}
    for kind, fn in fns.items():  # warm-up: plan caches, allocator
        t0 = time.perf_counter()
        inputs.step(fn)
        warm[kind] = time.perf_counter() - t0
    slow = {kind for kind in kinds if warm[kind] * reps > budget}
    slowest_fast = max((warm[kind] for kind in kinds if kind not in slow), default=0.0)
    total = max(reps, min(50, int(budget / slowest_fast))) if slowest_fast else reps
    samples: dict[str, list[float]] = {kind: [] for kind in kinds}
    for rep in range(total):
        order = kinds[rep % len(kinds):] + kinds[: rep % len(kinds)]
        for kind in order:
            if kind in slow and len(samples[kind]) >= reps:
                continue
            t0 = time.perf_counter()
            inputs.step(fns[kind])
            samples[kind].append(time.perf_counter() - t0)
    return {kind: statistics.median(s) for kind, s in samples.items()}


def halo_floor(size: int, tiles: list[str], reps: int) -> list[list[str]]:
    """Lower bound for any halo-tiled exact neighborhood kernel: fused SDPA forward+backward (no
    mask, no bias, no gather: only the GEMMs and softmax) on ``size``² queries cut into windows vs
    into query tiles that each score their ``(ty+k-1) x (tx+k-1)`` halo, one process, interleaved."""
    n_tokens = B * HEADS * size * size
    shapes = {"window": (KERNEL * KERNEL, KERNEL * KERNEL)}
    for t in tiles:
        ty, tx = (int(v) for v in t.split("x"))
        shapes[f"tile {t}"] = (ty * tx, (ty + KERNEL - 1) * (tx + KERNEL - 1))
    cases = {}
    for name, (nq, nk) in shapes.items():
        batch = -(-n_tokens // (nq * HEADS))
        q = torch.randn(batch, HEADS, nq, HEAD_DIM, requires_grad=True)
        kv = [torch.randn(batch, HEADS, nk, HEAD_DIM, requires_grad=True) for _ in range(2)]
        up = torch.randn(batch, HEADS, nq, HEAD_DIM)

        def run(q=q, kv=kv, up=up) -> None:
            out = F.scaled_dot_product_attention(q, *kv)
            torch.autograd.grad(out, (q, *kv), up)

        cases[name] = run
    samples = interleaved(cases, reps)
    base = statistics.median(samples["window"])
    rows = []
    for name, (nq, nk) in shapes.items():
        ms = statistics.median(samples[name])
        rows.append([f"{size}²", name, f"{nq} x {nk}", f"{nk / KERNEL**2:.2f}x", f"{ms * 1e3:.1f}",
                     f"{ms / base:.2f}x"])
    return rows


# ----------------------------------------------------------------------------- memory


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc), so the kernel cannot reuse setup garbage."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_memory_here(kind: str, size: int) -> dict[str, float | str]:
    """Peak RSS growth (MB) of one forward+backward of ``kind``; run in a fresh process."""
    inputs = Inputs.make(size)
    fn = kernel_for(kind)
    _trim_heap()
    base = proc_status_kib("VmRSS")
    if base is not None and reset_cpu_peak():
        inputs.step(fn)
        peak, method = proc_status_kib("VmHWM"), "VmHWM-VmRSS"
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        inputs.step(fn)
        peak, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
    return {"peak_mb": (peak - base) / 1024, "method": method}


def measure_memory(kind: str, size: int, threads: int, reps: int) -> dict[str, float | str]:
    """Median of ``reps`` runs of :func:`measure_memory_here`, each in a fresh interpreter."""
    cmd = [sys.executable, "-m", "vision_attn.bench.attention", "--memory-case", kind, str(size),
           "--threads", str(threads)]
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    runs = []
    for _ in range(reps):
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if res.returncode:
            raise RuntimeError(f"memory case {kind} {size} failed:\n{res.stderr[-2000:]}")
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return {"peak_mb": statistics.median(r["peak_mb"] for r in runs), "method": runs[0]["method"]}


# ----------------------------------------------------------------------------- report


def markdown(rows: list[dict], reps: int) -> str:
    lines = [
        f"B={B}, heads={HEADS}, D={HEAD_DIM}, k = window = grid = region = {KERNEL}, sr_ratio={SR_RATIO}, "
        f"lsh chunk={LSH_CHUNK}, routed top-{ROUTED_TOPK}, {GLOBAL_TOKENS} global tokens, relative position bias, "
        f"forward+backward, median of >= {reps} interleaved runs; 'window' in the ratios is the faster of window "
        f"and window[sdpa]; [torch]: the pure-PyTorch tiled kernel, no suffix: the default route; {machine()}",
        "",
        "| map | kind | time ms (median) | time / window | peak MB | peak / window |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['size']}² | {r['kind']} | skipped (memory) | | skipped (memory) | |")
            continue
        mem = f"{r['peak_mb']:.1f}" if r.get("peak_mb") is not None else "-"
        mem_ratio = f"{r['peak_ratio']:.2f}x" if r.get("peak_ratio") is not None else "-"
        lines.append(f"| {r['size']}² | {r['kind']} | {r['ms']:.1f} | {r['ratio']:.2f}x | {mem} | {mem_ratio} |")
    return "\n".join(lines)


def _lookup(rows: list[dict], kind: str, size: int, key: str) -> Optional[float]:
    for r in rows:
        if r["kind"] == kind and r["size"] == size and not r.get("skipped"):
            return r.get(key)
    return None


def _window_ms(rows: list[dict], size: int) -> Optional[float]:
    """The faster window baseline at ``size``: our window kernel or SDPA with the bias as mask."""
    times = [t for t in (_lookup(rows, "window", size, "ms"), _lookup(rows, "window[sdpa]", size, "ms")) if t]
    return min(times) if times else None


def targets(rows: list[dict]) -> str:
    """Issue 15's targets on this run's numbers, for the default (fused on CPU) and the tiled route."""
    out = ["", "| target | measured | |", "|---|---:|---|"]

    def line(name: str, value: Optional[float], ok: Callable[[float], bool]) -> None:
        if value is None:
            out.append(f"| {name} | not measured | - |")
        else:
            out.append(f"| {name} | {value:.2f}x | {'met' if ok(value) else 'MISSED'} |")

    sizes = sorted({r["size"] for r in rows})
    for route, tag in (("", "fused"), ("[torch]", "tiled")):
        for size in sizes:
            na, win = _lookup(rows, f"neighborhood{route}", size, "ms"), _window_ms(rows, size)
            line(f"{tag}: neighborhood / window time, {size}² (<= 1.0x)", na / win if na and win else None,
                 lambda x: x <= 1.0)
        for size in sizes:
            na = _lookup(rows, f"neighborhood{route}", size, "ms")
            dil = [_lookup(rows, f"dilated_{d}{route}", size, "ms") for d in (2, 3, 4)]
            worst = max(dil) / na if na and all(dil) else None  # type: ignore[type-var]
            line(f"{tag}: worst dilated (d=2..4) / neighborhood time, {size}² (<= 1.05x)", worst, lambda x: x <= 1.05)
        a = _lookup(rows, f"neighborhood{route}", 56, "peak_mb")
        b = _lookup(rows, f"neighborhood{route}", 112, "peak_mb")
        line(f"{tag}: neighborhood peak memory 56² -> 112² (<= 4.4x)", b / a if a and b else None, lambda x: x <= 4.4)
    a, b = _lookup(rows, "global", 56, "peak_mb"), _lookup(rows, "global", 112, "peak_mb")
    line("global peak memory 56² -> 112² (>= 12x, for contrast)", b / a if a and b else None, lambda x: x >= 12.0)
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vision_attn.visualize import series_styles

    fig, axes = plt.subplots(1, 2, figsize=(13.5, 4.5))
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    styles = series_styles(kinds)
    for kind in kinds:
        pts = [r for r in rows if r["kind"] == kind and not r.get("skipped")]
        tokens = [r["size"] ** 2 for r in pts]
        axes[0].plot(tokens, [r["ms"] for r in pts], label=kind, **styles[kind])
        mem = [(t, r["peak_mb"]) for t, r in zip(tokens, pts) if r.get("peak_mb") is not None]
        if mem:
            axes[1].plot(*zip(*mem), label=kind, **styles[kind])
    save_loglog_figure(fig, axes, "tokens (H*W)", ("forward+backward time (ms, median)", "peak memory growth (MB)"),
                       f"attention kernels, B={B} heads={HEADS} D={HEAD_DIM} k={KERNEL}, with bias", path,
                       right=0.85, fontsize=9)


# ----------------------------------------------------------------------------- CLI


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vision_attn.bench attention", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[28, 56, 112, 224], help="square token maps (side)")
    p.add_argument("--reps", type=int, default=7, help="minimum timed repetitions per kind (median)")
    p.add_argument("--budget", type=float, default=2.0,
                   help="seconds per kind and map: fast kinds get more repetitions (0 = exactly --reps)")
    p.add_argument("--kinds", nargs="+", default=KINDS, help=f"subset of {KINDS}")
    p.add_argument("--tiles", nargs="*", default=[], metavar="TYxTX",
                   help="also time neighborhood with these query tiles, e.g. 4x4 4x8 7x7 (no memory)")
    p.add_argument("--floor", nargs="*", metavar="TYxTX",
                   help="only print the halo-tiling lower bound (fused SDPA on window vs halo-tile shapes), "
                        "e.g. --floor 2x8 4x8 8x8")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (0 = torch default)")
    p.add_argument("--mem-cap-gb", type=float, default=4.0, help="skip global where its estimated peak exceeds this")
    p.add_argument("--mem-reps", type=int, default=3, help="fresh processes per memory case (median)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-case memory subprocesses")
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="directory for attention.{md,json,png}")
    p.add_argument("--memory-case", nargs=2, metavar=("KIND", "SIZE"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_case:
        print(json.dumps(measure_memory_here(args.memory_case[0], int(args.memory_case[1]))))
        return 0
    if args.floor is not None:
        header = ["map", "shape", "queries x keys", "scores / window's", "fused SDPA fwd+bwd ms", "time / window"]
        rows_ = [r for size in args.sizes for r in halo_floor(size, args.floor or ["2x8", "4x8", "8x8"], args.reps)]
        print(f"halo-tiling lower bound, {machine()}\n\n" + markdown_table(header, rows_))
        return 0
    rows: list[dict] = []
    for size in args.sizes:
        kinds = [k for k in args.kinds if not skipped(k, size, args.mem_cap_gb)]
        times = time_kinds(size, kinds + [f"neighborhood@{t}" for t in args.tiles], args.reps, args.budget)
        for kind in args.kinds + [f"neighborhood@{t}" for t in args.tiles]:
            row: dict = {"size": size, "kind": kind}
            if kind not in times:
                row["skipped"] = True
            else:
                window = min((times[w] for w in ("window", "window[sdpa]") if w in times), default=float("nan"))
                ratio = times[kind] / window
                row.update(ms=times[kind] * 1e3, ratio=ratio)
                if not args.no_memory and "@" not in kind:
                    row.update(measure_memory(kind, size, args.threads, args.mem_reps))
            rows.append(row)
            print(f"{size}² {kind}: " + ("skipped (memory)" if row.get("skipped") else
                  f"{row['ms']:.1f} ms" + (f", {row['peak_mb']:.1f} MB" if "peak_mb" in row else "")), flush=True)
        win_mb = _lookup(rows, "window", size, "peak_mb")
        for r in rows:
            if r["size"] == size and r.get("peak_mb") is not None and win_mb:
                r["peak_ratio"] = r["peak_mb"] / win_mb
    report = markdown(rows, args.reps) + "\n" + targets(rows)
    print("\n" + report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention.md").write_text(report + "\n")
    (args.out / "attention.json").write_text(json.dumps(rows, indent=1))
    plot(rows, args.out / "attention.png")
    print(f"\nwrote {args.out / 'attention.md'}, {args.out / 'attention.json'}, {args.out / 'attention.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
