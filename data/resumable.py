"""A training loader that resumes mid-epoch: seeded, epoch-aware, rank-aware, stateful.

Lightning 2.6 stores ``state_dict()`` of every training dataloader that has the
``state_dict``/``load_state_dict`` pair (``lightning.fabric.utilities.types._Stateful``) in the
checkpoint (``loops.fit_loop.state_dict.combined_loader``). When a run restarts mid-epoch, the
fit loop restores its batch counters (``batch_idx`` continues at the saved value and the epoch
ends after the remaining batches) and calls ``load_state_dict`` on the loader *before* it creates
the epoch's iterator (``FitLoop.setup_data``). So the loader only has to skip the batches the
interrupted run already consumed; it does so in the sampler, without loading those images.

Without this (a plain shuffled DataLoader) Lightning warns "resuming from a checkpoint that ended
before the epoch ended and your dataloader is not resumable": the resumed epoch restarts from a
new random order and is cut short after the remaining number of batches, so some images are seen
twice and others not at all in that epoch.

The order of epoch ``e`` is ``torch.randperm(len(dataset))`` seeded with ``seed + e`` (``seed``:
``seed_everything``'s, via ``PL_GLOBAL_SEED``), split across ranks like ``DistributedSampler``
(rank ``r`` takes positions ``r, r + W, ...``). As a ``DistributedSampler`` subclass, Lightning
leaves it in place under DDP instead of injecting its own, and calls ``set_epoch`` every epoch.
The loader also owns a ``torch.Generator`` reseeded every epoch, so creating its iterator never
draws from the global RNG (worker seeds are then a function of ``seed`` and the epoch).

Per-sample augmentation (random-resized-crop, flip, RandAugment: python ``random``, numpy and
torch's CPU generator) is made a function of ``(seed, epoch, index)``: the sampler yields
``(epoch, index)`` pairs (built in the main process, so persistent workers see every epoch) and
:class:`SeededSamples` seeds those three generators from them before it calls the dataset. A
sample's pixels then do not depend on which worker made it, how many workers there are, or where
a run was resumed; in the main process (``num_workers=0``) the generators' states are put back
afterwards, so loading never moves the training RNGs (drop path, random erasing, Mixup/CutMix).

Exactness: after a resume with the same world size and batch size, the same order, batches and
augmented pixels as an uninterrupted run, with any number of loader workers.
"""
from __future__ import annotations

import os
import random
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info

EpochIndex = tuple[int, int]


def seed_sample(seed: int, epoch: int, index: int) -> None:
    """Seed python ``random``, ``numpy.random`` and torch's CPU generator from ``(seed, epoch, index)``
    (not CUDA's: workers have none, and the main process's belongs to training)."""
    state = np.random.SeedSequence([seed % 2**32, epoch, index]).generate_state(4)
    random.seed(int.from_bytes(state.tobytes(), "little"))
    np.random.seed(state)
    torch.default_generator.manual_seed(int(state[0]) | int(state[1]) << 31)


@contextmanager
def global_rngs_kept() -> Iterator[None]:
    """Put python's, numpy's and torch's CPU generator states back on exit."""
    states = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.default_generator.set_state(states[2])


class SeededSamples(Dataset):
    """A training dataset whose item ``(epoch, index)`` is ``dataset[index]`` drawn with the global
    generators seeded by :func:`seed_sample`: the same pixels in any worker, any order, after any
    resume. A plain ``index`` is passed through unseeded (inspection by hand). Substitutes for
    skipped corrupt files (``data.folder.SkipCorrupt``) come from the same seeded stream."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: Union[EpochIndex, int]) -> Any:
        if not isinstance(item, tuple):
            return self.dataset[item]
        epoch, index = item
        if get_worker_info() is not None:  # a worker: its generators serve only samples
            seed_sample(self.seed, epoch, index)
            return self.dataset[index]
        with global_rngs_kept():  # the main process: training draws from them too
            seed_sample(self.seed, epoch, index)
            return self.dataset[index]


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled with ``seed + epoch``) that can start an epoch at a position.
    With ``with_epoch`` it yields ``(epoch, index)`` pairs, for :class:`SeededSamples`."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, with_epoch: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self._skip = 0
        self.with_epoch = with_epoch

    def skip_next(self, samples: int) -> None:
        """The next ``__iter__`` starts ``samples`` positions into this rank's order of the epoch."""
        self._skip = max(int(samples), 0)

    def __iter__(self) -> Iterator[Union[int, EpochIndex]]:
        indices = list(super().__iter__())
        skip, self._skip = self._skip, 0
        if self.with_epoch:
            return iter([(self.epoch, index) for index in indices[skip:]])
        return iter(indices[skip:])


class _CountingIterator:
    """Wraps a DataLoader iterator; counts the batches handed out (Lightning does not prefetch
    from sized loaders, so that is the number of batches consumed)."""

    def __init__(self, loader: "ResumableDataLoader", iterator: Iterator) -> None:
        self._loader, self._iterator = loader, iterator

    def __iter__(self) -> "_CountingIterator":
        return self

    def __next__(self) -> Any:
        batch = next(self._iterator)
        self._loader._batches += 1
        return batch

    def __len__(self) -> int:
        return len(self._iterator)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._iterator, name)


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler` whose position Lightning checkpoints."""

    sampler: ResumableSampler

    def __init__(self, *args: Any, seed: int = 0, **kwargs: Any) -> None:
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler):
            raise TypeError(f"ResumableDataLoader needs a ResumableSampler, got {type(self.sampler).__name__}")
        self.seed = seed
        self._batches = 0         # batches handed out in the current epoch (resumed ones included)
        self._resume_batches = 0  # batches to skip at the next __iter__

    def __iter__(self) -> _CountingIterator:
        assert self.generator is not None
        self.generator.manual_seed(self.seed * 1_000_003 + self.sampler.epoch)
        self._batches, self._resume_batches = self._resume_batches, 0
        return _CountingIterator(self, super().__iter__())

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": int(self.sampler.epoch),
            "batches": int(self._batches),
            "batch_size": int(self.batch_size or 1),
            "num_replicas": int(self.sampler.num_replicas),
            "seed": int(self.sampler.seed),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.set_epoch(int(state["epoch"]))
        batches = int(state.get("batches", 0))
        old_bs, old_world = int(state.get("batch_size", self.batch_size)), int(state.get("num_replicas", 1))
        bs, world = int(self.batch_size or 1), int(self.sampler.num_replicas)
        if (old_bs, old_world, int(state.get("seed", self.sampler.seed))) != (bs, world, self.sampler.seed):
            rank_zero_warn(
                f"resuming with batch size x processes {bs}x{world} (seed {self.sampler.seed}) instead of "
                f"{old_bs}x{old_world} (seed {state.get('seed')}): the rest of this epoch's order is approximate"
            )
        # Globally consumed: the first old_bs * old_world * batches positions of the epoch's order.
        consumed = batches * old_bs * old_world
        self.sampler.skip_next(consumed // world)
        self._resume_batches = batches


def resumable_train_loader(loader: DataLoader, trainer: Optional[Any] = None,
                           seed_samples: bool = True) -> ResumableDataLoader:
    """The same loader settings as ``loader`` (a shuffled training DataLoader) over a
    :class:`ResumableSampler` for this process's rank in ``trainer``'s world. ``seed_samples``:
    wrap the dataset in :class:`SeededSamples` (off for datasets that draw no global randomness)."""
    world = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
    rank = int(getattr(trainer, "global_rank", 0) or 0) if trainer is not None else 0
    seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    dataset = SeededSamples(loader.dataset, seed) if seed_samples else loader.dataset
    sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                               with_epoch=seed_samples)
    extra: dict[str, Any] = {}
    if loader.num_workers > 0:
        extra.update(prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers,
                     multiprocessing_context=loader.multiprocessing_context)
    return ResumableDataLoader(
        dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        seed=seed,
        **extra,
    )
