"""Which windows each training step sees, and two ways to load them.

:class:`StepBatchSampler` makes the sample stream a pure function of (seed, step): global
batches are consecutive slices of a per-epoch permutation of the windows (no window
repeats within an epoch; an epoch's incomplete last slice is dropped), and each global
batch splits into ``world_size * grad_accum_steps`` equal micro-batches of which process
``r`` takes ``r * accum ... (r + 1) * accum - 1``. Resuming at a step therefore resumes the
exact stream, and one process accumulating k micro-batches sees the same micro-batches
as k processes with one each.

Loading: a :class:`~mixpolicy.datasets.sampler.WindowDataset` (in memory or read from
the store) gathers a whole micro-batch with one vectorized ``batch(ids)``; with
``loader.num_workers=0`` that runs in the training process, which is fastest for state
data held in memory. With workers, or for any other ``torch.utils.data.Dataset`` of
windows (read window by window), a ``DataLoader`` (``datasets.sampler.window_loader``)
with worker processes, pinned memory and prefetching feeds the loop;
the loader's iterator lives for the whole run (the batch sampler is endless), so its
workers start once and are never restarted between epochs. Before such a dataset reads a
micro-batch, torch, numpy and ``random`` are seeded from (seed, step, micro-batch), so
random augmentations inside a dataset are reproduced exactly by a resumed run and do not
depend on the number of workers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from mixpolicy.config import check
from mixpolicy.datasets.sampler import WindowDataset, window_loader
from mixpolicy.errors import UserError


@dataclass
class LoaderConfig:
    """How batches reach the model. ``num_workers=0`` gathers in the training process."""

    num_workers: int = 0
    pin_memory: bool = True
    prefetch_factor: int = 4

    def __post_init__(self):
        check(self.num_workers >= 0, "loader.num_workers", "must be >= 0 (0: load in the training process)")
        check(self.prefetch_factor >= 1, "loader.prefetch_factor", "must be >= 1")


class StepBatchSampler:
    def __init__(self, n_windows: int, batch_size: int, seed: int, world_size: int = 1, rank: int = 0, grad_accum_steps: int = 1):
        n_micro = world_size * grad_accum_steps
        if batch_size % n_micro:
            raise UserError(
                f"batch_size={batch_size} must be divisible by processes ({world_size}) x grad_accum_steps ({grad_accum_steps})"
            )
        if n_windows < batch_size:
            raise UserError(f"batch_size={batch_size} exceeds the {n_windows} training windows; lower batch_size")
        self.n_windows = n_windows
        self.batch_size = batch_size
        self.seed = seed
        self.micro_batch_size = batch_size // n_micro
        self.grad_accum_steps = grad_accum_steps
        self.first_shard = rank * grad_accum_steps
        self.steps_per_epoch = n_windows // batch_size
        self._perm_epoch = -1
        self._perm = np.empty(0, np.int64)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch index within the epoch) of ``step``."""
        return divmod(step, self.steps_per_epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._perm_epoch = epoch
        return self._perm

    def global_batch(self, step: int) -> np.ndarray:
        epoch, k = self.position(step)
        return self._permutation(epoch)[k * self.batch_size : (k + 1) * self.batch_size]

    def micro_batches(self, step: int) -> list[np.ndarray]:
        """This process's micro-batches of ``step``, in accumulation order."""
        ids = self.global_batch(step)
        m = self.micro_batch_size
        return [ids[(self.first_shard + k) * m : (self.first_shard + k + 1) * m] for k in range(self.grad_accum_steps)]

    def shard_index(self, k: int) -> int:
        """Index of this process's k-th micro-batch among all micro-batches of a step."""
        return self.first_shard + k

    def iter_from(self, step: int) -> Iterator[np.ndarray]:
        while True:
            yield from self.micro_batches(step)
            step += 1

    def iter_seeded_from(self, step: int) -> Iterator[tuple[int, np.ndarray]]:
        """(data seed, window ids) of this process's micro-batches from ``step`` on."""
        while True:
            for k, ids in enumerate(self.micro_batches(step)):
                yield data_seed(self.seed, step, self.shard_index(k)), ids
            step += 1

    def state(self, step: int) -> dict[str, int]:
        epoch, k = self.position(step)
        return {"epoch": epoch, "batch_in_epoch": k, "steps_per_epoch": self.steps_per_epoch, "n_windows": self.n_windows, "batch_size": self.batch_size}


def micro_batch_seed(seed: int, step: int, shard: int) -> int:
    """Seed of the torch random stream (noise levels, noise, dropout) of one micro-batch."""
    return int(np.random.SeedSequence([seed, step, shard]).generate_state(1, np.uint64)[0]) >> 1


def data_seed(seed: int, step: int, shard: int) -> int:
    """Seed of the random streams a dataset may draw from while reading one micro-batch."""
    return int(np.random.SeedSequence([seed, step, shard, 1]).generate_state(1, np.uint64)[0]) >> 1


def augment_seed(seed: int, step: int, shard: int) -> int:
    """Seed of the on-device image augmentation of one micro-batch (its own stream)."""
    return int(np.random.SeedSequence([seed, step, shard, 2]).generate_state(1, np.uint64)[0]) >> 1


class _SamplerFrom:
    """Endless batch sampler view starting at a step (DataLoader ``batch_sampler``): yields
    (data seed, window ids) per micro-batch."""

    def __init__(self, sampler: StepBatchSampler, step: int):
        self.sampler, self.step = sampler, step

    def __iter__(self):
        return self.sampler.iter_seeded_from(self.step)


class _SeededReader(Dataset):
    """Reads a (data seed, ids) micro-batch: seeds torch, numpy and ``random``, then fetches
    the whole micro-batch with one vectorized ``batch(ids)`` when the dataset has one, else
    window by window."""

    def __init__(self, windows):
        self.windows = windows
        self.vectorized = isinstance(windows, WindowDataset)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int):
        return self.windows[i]

    def __getitems__(self, seeded):
        seed, ids = seeded
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        if self.vectorized:
            return self.windows.batch(np.asarray(ids, dtype=np.int64))
        return [self.windows[int(i)] for i in ids]


def batch_stream(
    windows,
    sampler: StepBatchSampler,
    start_step: int,
    loader: LoaderConfig,
    device: torch.device,
) -> Iterator[dict[str, torch.Tensor]]:
    """This process's micro-batches from ``start_step`` on, as dicts of CPU tensors."""
    if loader.num_workers == 0 and isinstance(windows, WindowDataset):
        return (windows.batch(ids) for ids in sampler.iter_from(start_step))
    return iter(
        window_loader(
            _SeededReader(windows),
            batch_sampler=_SamplerFrom(sampler, start_step),
            num_workers=loader.num_workers,
            seed=sampler.seed,
            pin_memory=loader.pin_memory and device.type == "cuda",
            prefetch_factor=loader.prefetch_factor,
        )
    )
