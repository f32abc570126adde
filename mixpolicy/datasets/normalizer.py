"""Per-key affine normalization whose statistics travel inside the policy checkpoint."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn

from mixpolicy.errors import UserError

# Dimensions whose range is below this are treated as constant: they map to 0 and
# unnormalize back to their constant value instead of dividing by ~0.
RANGE_EPS = 1e-4


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


class Normalizer(nn.Module):
    """Holds scale/offset per key; x_norm = x * scale + offset (broadcast over the last dim)."""

    def __init__(self, params: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None):
        super().__init__()
        self.params = nn.ModuleDict()
        for key, (scale, offset) in (params or {}).items():
            self.params[key] = _Affine(torch.as_tensor(scale), torch.as_tensor(offset))

    @classmethod
    def from_data(cls, arrays: Mapping[str, np.ndarray]) -> "Normalizer":
        params = {}
        for key, x in arrays.items():
            x = np.asarray(x, np.float64).reshape(len(x), -1)
            if not np.all(np.isfinite(x)):
                raise UserError(f"key {key!r} contains NaN or inf; cannot compute normalization stats")
            params[key] = minmax_params(x.min(0), x.max(0))
        return cls(params)

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
