"""Validation loss: the training loss of the EMA weights on held-out episodes.

``val_ratio`` holds out that share of each task's episodes (``datasets.selection``: by
episode, stratified by task, fixed by ``seed``); every ``val_every`` steps the EMA
weights score the same ``val_windows`` windows (evenly spaced over the validation
windows) with the same noise draws, in eval mode (no dropout, centre crops, no
augmentation), so the figure changes only because the weights do.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from mixpolicy.datasets.sampler import WindowDataset


def validation_seed(seed: int, batch_index: int) -> int:
    """Seed of the noise draws of one validation batch: the same at every evaluation."""
    return int(np.random.SeedSequence([seed, batch_index, 3]).generate_state(1, np.uint64)[0]) >> 1


def validation_ids(n_windows: int, max_windows: int) -> np.ndarray:
    """Window ids scored: all, or ``max_windows`` evenly spaced ones."""
    if max_windows == 0 or n_windows <= max_windows:
        return np.arange(n_windows, dtype=np.int64)
    return np.unique(np.linspace(0, n_windows - 1, max_windows).round().astype(np.int64))


class ValidationLoss:
    """``loss(policy, device, autocast_dtype)`` -> mean of every loss term over the validation windows."""

    def __init__(self, windows: Any, max_windows: int, batch_size: int, seed: int, transform: Any = None):
        self.windows = windows
        self.transform = transform  # applied to each batch on the device (the camera resize of data.image_size)
        ids = validation_ids(len(windows), max_windows)
        self.batches = [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
        self.seed = seed

    def _read(self, ids: np.ndarray) -> dict[str, torch.Tensor]:
        if isinstance(self.windows, WindowDataset):
            return self.windows.batch(ids)
        return default_collate([self.windows[int(i)] for i in ids])

    @torch.no_grad()
    def __call__(self, policy: torch.nn.Module, device: torch.device, autocast_dtype: torch.dtype | None) -> dict[str, float]:
        was_training = policy.training
        policy.eval()
        sums: dict[str, float] = {}
        total = 0
        try:
            for k, ids in enumerate(self.batches):
                batch = {key: v.to(device) for key, v in self._read(ids).items()}
                batch = self.transform(batch) if self.transform is not None else batch
                generator = torch.Generator(device=device).manual_seed(validation_seed(self.seed, k))
                with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
                    _, logs = policy.compute_loss(batch, generator)
                for name, value in logs.items():
                    sums[name] = sums.get(name, 0.0) + float(value) * len(ids)
                total += len(ids)
        finally:
            policy.train(was_training)
        out = {name: v / total for name, v in sums.items()}
        out["windows"] = float(total)
        return out
