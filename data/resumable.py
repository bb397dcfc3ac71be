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

Exactness: identical order and batches after a resume with the same world size and batch size.
Per-sample random augmentation in loader workers restarts its worker RNG streams at the resume
point, so augmented pixels (not the image order) differ from an uninterrupted run after it.
"""
from __future__ import annotations

import os
from typing import Any, Iterator, Optional

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled with ``seed + epoch``) that can start an epoch at a position."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self._skip = 0

    def skip_next(self, samples: int) -> None:
        """The next ``__iter__`` starts ``samples`` positions into this rank's order of the epoch."""
        self._skip = max(int(samples), 0)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self._skip = self._skip, 0
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


def resumable_train_loader(loader: DataLoader, trainer: Optional[Any] = None) -> ResumableDataLoader:
    """The same loader settings as ``loader`` (a shuffled training DataLoader) over a
    :class:`ResumableSampler` for this process's rank in ``trainer``'s world."""
    world = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
    rank = int(getattr(trainer, "global_rank", 0) or 0) if trainer is not None else 0
    seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    sampler = ResumableSampler(loader.dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    extra: dict[str, Any] = {}
    if loader.num_workers > 0:
        extra.update(prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers,
                     multiprocessing_context=loader.multiprocessing_context)
    return ResumableDataLoader(
        loader.dataset,
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
