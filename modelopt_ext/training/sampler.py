"""A deterministic, resumable, sharded batch sampler: each rank reads only its own shard.

Every epoch has one global order: a permutation of the dataset seeded by `seed + epoch`, extended by
wrapping around to a whole number of optimizer steps (`world_size * batch_size * grad_accum` samples), so
every rank runs the same number of micro-batches and every optimizer step is complete. Ranks take the
order round-robin: the k-th sample rank r reads is `order[position + k * world_size + r]`.

The data position is the number of samples of the epoch's order consumed by all ranks together. A
resume hands it back with `set_epoch(epoch, position)` and reading continues at the exact next sample.
Because the position is global, a resume with a different number of ranks still continues with the
unread samples (it is only bit-identical with the same number of ranks).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class ResumableShardedSampler:
    """Yields lists of dataset indices (one micro-batch of this rank) for use as a DataLoader batch_sampler."""

    def __init__(
        self,
        dataset_size: int,
        *,
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        grad_accum: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if dataset_size < 1:
            raise ValueError("the dataset is empty: nothing to train on")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.grad_accum = grad_accum
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0

    @property
    def samples_per_step(self) -> int:
        """Samples all ranks consume together in one optimizer step."""
        return self.world_size * self.batch_size * self.grad_accum

    @property
    def epoch_length(self) -> int:
        """Samples in one epoch's global order (the dataset, wrapped up to whole optimizer steps)."""
        per = self.samples_per_step
        return -(-self.dataset_size // per) * per

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch."""
        return self.epoch_length // self.samples_per_step

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        """Select the epoch's order and where to start reading in it (samples consumed by all ranks)."""
        if not 0 <= position <= self.epoch_length:
            raise ValueError(f"data position {position} outside epoch of {self.epoch_length} samples")
        if position % (self.world_size * self.batch_size):
            raise ValueError(
                f"data position {position} is not a whole number of micro-batches "
                f"({self.world_size} ranks x batch {self.batch_size})"
            )
        self.epoch = epoch
        self.position = position

    def epoch_order(self, epoch: int) -> list[int]:
        """The global order of an epoch: a seeded permutation, wrapped to `epoch_length`."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            perm = torch.randperm(self.dataset_size, generator=g).tolist()
        else:
            perm = list(range(self.dataset_size))
        reps = -(-self.epoch_length // self.dataset_size)
        return (perm * reps)[: self.epoch_length]

    def __len__(self) -> int:
        """Micro-batches this rank still reads in the current epoch."""
        return (self.epoch_length - self.position) // (self.world_size * self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.epoch_order(self.epoch)
        mine = order[self.position + self.rank :: self.world_size]
        for i in range(len(self)):
            yield mine[i * self.batch_size : (i + 1) * self.batch_size]

    def advance(self, micro_batches: int = 1) -> int:
        """Record that every rank consumed `micro_batches` more micro-batches; returns the new position."""
        self.position += micro_batches * self.world_size * self.batch_size
        return self.position
