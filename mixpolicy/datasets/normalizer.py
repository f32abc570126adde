"""Per-key affine normalization whose statistics travel inside the policy checkpoint.

Every mode is an affine map ``x_norm = x * scale + offset`` per feature (broadcast over
the last dimension), so a checkpoint holds the same two buffers per key whatever the mode:

- ``min_max`` (default): [min, max] -> [-1, 1]
- ``mean_std``: (x - mean) / std
- ``quantile``: [q01, q99] -> [-1, 1] (outliers land slightly outside)
- ``identity``: unchanged

Statistics come from :class:`RunningStats`, which accumulates chunk by chunk (exact
min/max/mean/std, quantiles from a bounded uniform sample), so a store never has to fit
in memory to be normalized.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn

from mixpolicy.errors import UserError

# Dimensions whose range (or std) is below this are treated as constant: they map to 0
# and unnormalize back to their constant value instead of dividing by ~0.
RANGE_EPS = 1e-4
MODES = ("min_max", "mean_std", "quantile", "identity")
DEFAULT_MODE = "min_max"
STAT_NAMES = ("min", "max", "mean", "std", "q01", "q99")


class _Affine(nn.Module):
    def __init__(self, scale: torch.Tensor, offset: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale.float())
        self.register_buffer("offset", offset.float())


def minmax_params(x_min: np.ndarray, x_max: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scale, offset with x * scale + offset in [-1, 1]; constant dims map to 0."""
    x_min = np.asarray(x_min, np.float64)
    x_max = np.asarray(x_max, np.float64)
    rng = x_max - x_min
    const = rng < RANGE_EPS
    scale = np.where(const, 1.0, 2.0 / np.where(const, 1.0, rng))
    offset = np.where(const, -x_min, -1.0 - x_min * scale)
    return scale.astype(np.float32), offset.astype(np.float32)


def meanstd_params(mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = np.asarray(mean, np.float64)
    std = np.asarray(std, np.float64)
    const = std < RANGE_EPS
    scale = np.where(const, 1.0, 1.0 / np.where(const, 1.0, std))
    return scale.astype(np.float32), (-mean * scale).astype(np.float32)


def params_from_stats(stats: Mapping[str, np.ndarray], mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) for one key from its statistics dict (see :data:`STAT_NAMES`)."""
    if mode not in MODES:
        raise UserError(f"unknown normalization mode {mode!r}; choose from {', '.join(MODES)}")
    if mode == "min_max":
        return minmax_params(stats["min"], stats["max"])
    if mode == "quantile":
        return minmax_params(stats["q01"], stats["q99"])
    if mode == "mean_std":
        return meanstd_params(stats["mean"], stats["std"])
    dim = np.asarray(stats["mean"]).shape
    return np.ones(dim, np.float32), np.zeros(dim, np.float32)


class RunningStats:
    """Streaming per-feature statistics over rows ``(n, ..., features)``.

    min/max/mean/std are exact (Chan's parallel update in float64); q01/q99 come from a
    uniform reservoir of at most ``max_sample`` rows, so memory stays bounded.
    """

    def __init__(self, max_sample: int = 100_000, seed: int = 0):
        self.count = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None
        self.min: np.ndarray | None = None
        self.max: np.ndarray | None = None
        self.max_sample = max_sample
        self._rng = np.random.default_rng(seed)
        self._sample: np.ndarray | None = None
        self._seen = 0

    def update(self, x: np.ndarray, name: str = "data") -> None:
        x = np.asarray(x)
        x = x.reshape(-1, x.shape[-1] if x.ndim > 1 else 1).astype(np.float64)
        if len(x) == 0:
            return
        if not np.all(np.isfinite(x)):
            raise UserError(f"key {name!r} contains NaN or inf; cannot compute normalization stats")
        n = len(x)
        mean = x.mean(0)
        m2 = ((x - mean) ** 2).sum(0)
        if self.count == 0:
            self.mean, self.m2, self.min, self.max = mean, m2, x.min(0), x.max(0)
        else:
            total = self.count + n
            delta = mean - self.mean
            self.mean = self.mean + delta * n / total
            self.m2 = self.m2 + m2 + delta**2 * self.count * n / total
            self.min = np.minimum(self.min, x.min(0))
            self.max = np.maximum(self.max, x.max(0))
        self.count += n
        self._reservoir(x)

    def _reservoir(self, x: np.ndarray) -> None:
        # Vectorized reservoir sampling (algorithm R): row i of the stream replaces a
        # random slot with probability max_sample / (i + 1).
        if self._sample is None:
            self._sample = x[: self.max_sample].copy()
            self._seen = len(self._sample)
            x = x[len(self._sample) :]
        if len(x) == 0:
            return
        if len(self._sample) < self.max_sample:
            take = min(len(x), self.max_sample - len(self._sample))
            self._sample = np.concatenate([self._sample, x[:take]])
            self._seen += take
            x = x[take:]
            if len(x) == 0:
                return
        stream_index = self._seen + np.arange(len(x))
        slot = (self._rng.random(len(x)) * (stream_index + 1)).astype(np.int64)
        keep = slot < self.max_sample
        # later rows win on repeated slots, as in the sequential algorithm
        self._sample[slot[keep]] = x[keep]
        self._seen += len(x)

    def result(self) -> dict[str, np.ndarray]:
        if self.count == 0:
            raise UserError("no data to compute statistics from")
        std = np.sqrt(self.m2 / self.count)
        q01, q99 = np.quantile(self._sample, [0.01, 0.99], axis=0)
        out = {"min": self.min, "max": self.max, "mean": self.mean, "std": std, "q01": q01, "q99": q99}
        return {k: np.asarray(v, np.float64) for k, v in out.items()} | {"count": np.int64(self.count)}


def stats_to_json(stats: Mapping[str, Mapping[str, np.ndarray]]) -> dict:
    return {k: {n: np.asarray(v).tolist() for n, v in s.items()} for k, s in stats.items()}


def stats_from_json(d: Mapping) -> dict[str, dict[str, np.ndarray]]:
    return {k: {n: np.asarray(v, np.float64) for n, v in s.items()} for k, s in d.items()}


class Normalizer(nn.Module):
    """Holds scale/offset per key; x_norm = x * scale + offset (broadcast over the last dim)."""

    def __init__(self, params: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None):
        super().__init__()
        self.params = nn.ModuleDict()
        for key, (scale, offset) in (params or {}).items():
            self.params[key] = _Affine(torch.as_tensor(scale), torch.as_tensor(offset))

    @classmethod
    def from_stats(
        cls, stats: Mapping[str, Mapping[str, np.ndarray]], modes: str | Mapping[str, str] = DEFAULT_MODE
    ) -> "Normalizer":
        """From per-key statistics (:class:`RunningStats` results or a store's saved stats).

        ``modes`` is one mode for every key or a mapping key -> mode (missing keys: min_max).
        """
        params = {}
        for key, s in stats.items():
            mode = modes if isinstance(modes, str) else modes.get(key, DEFAULT_MODE)
            params[key] = params_from_stats(s, mode)
        return cls(params)

    @classmethod
    def from_data(cls, arrays: Mapping[str, np.ndarray], modes: str | Mapping[str, str] = DEFAULT_MODE) -> "Normalizer":
        stats = {}
        for key, x in arrays.items():
            x = np.asarray(x)
            running = RunningStats()
            running.update(x.reshape(len(x), -1) if x.ndim <= 2 else x, key)
            stats[key] = running.result()
        return cls.from_stats(stats, modes)

    @classmethod
    def empty_like(cls, shapes: Mapping[str, int]) -> "Normalizer":
        """Identity-initialized placeholder whose buffers a checkpoint load overwrites."""
        return cls({k: (np.ones(d, np.float32), np.zeros(d, np.float32)) for k, d in shapes.items()})

    def __contains__(self, key: str) -> bool:
        return key in self.params

    def scale_dims(self, key: str, dims: list[int], factor: float) -> None:
        """Multiply the normalized values of ``dims`` of ``key`` by ``factor``."""
        p = self.params[key]
        p.scale[dims] *= factor
        p.offset[dims] *= factor

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        p = self.params[key]
        return x * p.scale + p.offset

    def unnormalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        p = self.params[key]
        return (x - p.offset) / p.scale
