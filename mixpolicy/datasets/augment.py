"""Batched image augmentation on the training device; images arrive as uint8.

Windows carry camera frames as uint8 ``(B, T, H, W, C)`` from the store to the device
(4x less to copy than float32); :class:`BatchImageAugment` converts them there and
augments the whole batch at once, with independent random parameters per sample and the
same parameters for all T frames of one sample (so motion between frames stays real):

- resize to ``resize`` (H, W) when given (train's ``data.image_size``), in train and eval mode:
  scaled to cover it and centre-cropped, as ``mixpolicy data convert ... resize=`` does;
- random crop to ``crop_size`` (centre crop in eval mode), as Diffusion Policy does;
- random shift by up to ``shift_pad`` pixels with edge padding, as DrQ does;
- colour jitter: brightness, contrast, saturation per sample; hue per group of samples
  (torchvision's ``adjust_hue`` takes one factor per call).

Conversions and colour operations are torchvision transforms v2 functionals; the
per-sample crop/shift is one gather. In eval mode only the centre crop applies.
:meth:`BatchImageAugment.frames` returns uint8 frames in the input layout, for a model
that takes camera frames as they come from the store and from the robot (the trainer
augments each training batch that way, ``augment.*`` in train.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

from mixpolicy.config import check


@dataclass
class ImageAugmentConfig:
    crop_size: int = 0  # 0: no crop; else a random (train) / centre (eval) square crop
    shift_pad: int = 0  # random shift by up to this many pixels (0: none)
    brightness: float = 0.0  # factor drawn from [1 - b, 1 + b]
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0  # in [0, 0.5]
    hue_groups: int = 8  # hue factors per batch

    def __post_init__(self):
        check(self.crop_size >= 0, "augment.crop_size", "must be >= 0")
        check(self.shift_pad >= 0, "augment.shift_pad", "must be >= 0")
        for name in ("brightness", "contrast", "saturation"):
            check(0 <= getattr(self, name) < 1, f"augment.{name}", "must be in [0, 1)")
        check(0 <= self.hue <= 0.5, "augment.hue", "must be in [0, 0.5]")
        check(self.hue_groups >= 1, "augment.hue_groups", "must be >= 1")


def uniform(lo: float, hi: float, n: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """n draws from U[lo, hi): on the CPU generator (so one seed serves any device), then moved."""
    return torch.rand(n, generator=generator, device="cpu").to(device) * (hi - lo) + lo


def crop_images(x: torch.Tensor, size: int, random: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Crop (N, C, H, W) or (B, T, C, H, W) to ``size`` x ``size``: one random window per
    sample, the same for all its T frames, or the centre. ``size`` 0 (or not smaller than
    the image) leaves it as it is."""
    h, w = x.shape[-2:]
    if size <= 0 or (size >= h and size >= w):
        return x
    single = x.ndim == 4
    x5 = x[:, None] if single else x
    ch, cw = min(size, h), min(size, w)
    b = x5.shape[0]
    if random:
        top = (uniform(0, 1, b, generator, x.device) * (h - ch + 1)).long().clamp_(max=h - ch)
        left = (uniform(0, 1, b, generator, x.device) * (w - cw + 1)).long().clamp_(max=w - cw)
    else:
        top = torch.full((b,), (h - ch) // 2, device=x.device)
        left = torch.full((b,), (w - cw) // 2, device=x.device)
    out = _crop(x5, top, left, ch, cw)
    return out[:, 0] if single else out


def _crop(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Per-sample crops of (B, T, C, H, W) at (top[b], left[b]) in one gather."""
    b = x.shape[0]
    rows = (top[:, None] + torch.arange(h, device=x.device))[:, None, None, :, None]
    cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, None, None, :]
    bi = torch.arange(b, device=x.device)[:, None, None, None, None]
    ti = torch.arange(x.shape[1], device=x.device)[None, :, None, None, None]
    ci = torch.arange(x.shape[2], device=x.device)[None, None, :, None, None]
    return x[bi, ti, ci, rows, cols]


def resize_batch(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Float (..., C, h, w) -> (..., C, H, W): scaled to cover ``size`` (antialiased bilinear), centre-cropped."""
    from mixpolicy.datasets.resize import cover_size

    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    flat = x.reshape(-1, *x.shape[-3:])
    flat = TF.center_crop(TF.resize(flat, list(cover_size(h, w, size)), antialias=True), list(size))
    return flat.reshape(*x.shape[:-2], *size).clamp_(0, 1)


class BatchImageAugment(nn.Module):
    """uint8 (B, T, H, W, C) or (B, H, W, C) -> float (B, T, C, H', W') / (B, C, H', W') in [0, 1]."""

    def __init__(self, cfg: ImageAugmentConfig | None = None, resize: tuple[int, int] | None = None):
        super().__init__()
        self.cfg = cfg or ImageAugmentConfig()
        self.resize = tuple(resize) if resize else None

    @property
    def active(self) -> bool:
        """Whether training-mode calls change anything."""
        c = self.cfg
        return bool(self.resize or c.crop_size or c.shift_pad or c.brightness or c.contrast or c.saturation or c.hue)

    def frames(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 (B, T, H, W, C) -> augmented uint8 (B, T, H', W', C), rounded to the nearest level."""
        x = self(images, generator)
        x = x.permute(0, 1, 3, 4, 2) if x.ndim == 5 else x.permute(0, 2, 3, 1)
        return x.mul(255).round_().to(torch.uint8)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        single = images.ndim == 4
        x = images[:, None] if single else images
        if x.ndim != 5:
            raise ValueError(f"images must be (B, T, H, W, C) or (B, H, W, C), got {tuple(images.shape)}")
        x = TF.to_dtype(x.permute(0, 1, 4, 2, 3), torch.float32, scale=True)  # (B, T, C, H, W) in [0, 1]
        cfg, b, dev = self.cfg, x.shape[0], x.device

        def draw(lo: float, hi: float, n: int = b) -> torch.Tensor:
            return uniform(lo, hi, n, generator, dev)

        if self.resize is not None:
            x = resize_batch(x, self.resize)
        h, w = x.shape[-2:]
        if cfg.crop_size and cfg.crop_size < min(h, w):
            x = crop_images(x, cfg.crop_size, random=self.training, generator=generator)
        if not self.training:
            return x[:, 0] if single else x
        if cfg.shift_pad:
            p = cfg.shift_pad
            h, w = x.shape[-2:]
            padded = torch.nn.functional.pad(x.flatten(0, 1), (p, p, p, p), mode="replicate").unflatten(0, x.shape[:2])
            top = (draw(0, 1) * (2 * p + 1)).long().clamp_(max=2 * p)
            left = (draw(0, 1) * (2 * p + 1)).long().clamp_(max=2 * p)
            x = _crop(padded, top, left, h, w)
        shape = (b, 1, 1, 1, 1)
        if cfg.brightness:
            x = (x * draw(1 - cfg.brightness, 1 + cfg.brightness).view(shape)).clamp_(0, 1)
        if cfg.contrast:
            gray_mean = TF.rgb_to_grayscale(x.flatten(0, 1)).unflatten(0, x.shape[:2]).mean(dim=(-3, -2, -1), keepdim=True)
            f = draw(1 - cfg.contrast, 1 + cfg.contrast).view(shape)
            x = (f * x + (1 - f) * gray_mean).clamp_(0, 1)
        if cfg.saturation:
            gray = TF.rgb_to_grayscale(x.flatten(0, 1)).unflatten(0, x.shape[:2])
            f = draw(1 - cfg.saturation, 1 + cfg.saturation).view(shape)
            x = (f * x + (1 - f) * gray).clamp_(0, 1)
        if cfg.hue:
            groups = torch.arange(b, device=dev).chunk(min(cfg.hue_groups, b))
            factors = draw(-cfg.hue, cfg.hue, len(groups))
            x = torch.cat([TF.adjust_hue(x[g], float(f)) for g, f in zip(groups, factors)])
        return x[:, 0] if single else x
