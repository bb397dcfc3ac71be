"""RNG states of this process (python, numpy, torch CPU, its CUDA device) as plain containers, so
that they load with ``torch.load(weights_only=True)``; gathered over ranks."""
from __future__ import annotations

import random
from contextlib import suppress
from typing import Any, Optional

import numpy as np
import torch


def dist_rank_world() -> tuple[int, int]:
    """(global rank, world size) of the default process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def collect_rng_states() -> dict[str, Any]:
    """This process's RNG states: python, numpy, torch CPU and the CUDA generator of its own device."""
    np_state = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [str(np_state[0]), np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()  # the current device's (each rank has its own)
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore :func:`collect_rng_states`'s output in this process."""
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        with suppress(Exception):  # another GPU model / count: keep the fresh CUDA stream
            if isinstance(cuda, (list, tuple)):  # checkpoints before per-rank states: all devices, from rank 0
                cuda = cuda[torch.cuda.current_device()]
            torch.cuda.set_rng_state(cuda)


def gather_rng_states(mine: Optional[dict[str, Any]] = None) -> dict[int, dict[str, Any]]:
    """Every rank's RNG states keyed by global rank. In a process group this is a collective:
    all ranks must call it at the same point (``trainer.save_checkpoint`` is one)."""
    mine = collect_rng_states() if mine is None else mine
    rank, world = dist_rank_world()
    if world == 1:
        return {0: mine}
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, mine)
    return dict(enumerate(gathered))
