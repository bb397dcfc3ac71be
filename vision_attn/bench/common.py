"""Helpers shared by the benchmarks: interleaved repetitions, medians, markdown tables, log-log figures."""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable, Sequence

import torch


def machine() -> str:
    """One line naming the machine the figures come from: CPU model, its vector extensions, threads."""
    from vision_attn.attention.fused import cpu_signature, isa_summary

    signature = cpu_signature()
    model, has_flags, _ = signature.partition(" | ")
    cpu = model if has_flags else platform.processor() or platform.machine()  # no /proc/cpuinfo
    return f"{cpu} ({isa_summary(signature)}), {torch.get_num_threads()} threads, torch {torch.__version__}"


def avx512_flags() -> str:
    """The CPU's avx512 flags, as ``lscpu | grep -o 'avx512[a-z_0-9]*'`` lists them ("none", "unknown")."""
    from vision_attn.attention.fused import cpu_signature

    _, has_flags, flags = cpu_signature().partition(" | ")
    if not has_flags:
        return "unknown"
    return " ".join(sorted(f for f in flags.split() if f.startswith("avx512"))) or "none"


def interleaved(cases: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time every case ``reps`` times, alternating between cases so noise hits all alike."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def save_loglog_figure(fig, axes, xlabel: str, ylabels: Sequence[str], title: str, path, right: float = 0.8,
                       fontsize: int = 8) -> None:
    """Log-log panels with grids and labels, one legend (the first panel's) on the right, saved."""
    import matplotlib.pyplot as plt

    for ax, ylabel in zip(axes, ylabels):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=fontsize, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, right, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
