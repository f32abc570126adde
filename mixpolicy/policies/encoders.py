"""Observation encoders: low-dim MLP, camera images (a CNN trunk + spatial softmax), goals.

Images arrive as uint8 (..., H, W, 3) and stay uint8 until they are on the policy's
device; the encoder converts, crops (random in training, center at inference), runs the
trunk (:mod:`mixpolicy.policies.image_trunks`: ResNet-18 or the light CNN) with FiLM
conditioning on the goal, and turns the feature map into keypoints with a spatial softmax.
"""

from __future__ import annotations

import torch
from torch import nn

from mixpolicy.datasets.augment import crop_images
from mixpolicy.policies.image_config import ImageEncoderConfig, auto_crop
from mixpolicy.policies.image_trunks import TRUNKS, build_trunk

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class LowDimEncoder(nn.Module):
    """Concatenated low-dim keys of one time step -> one token."""

    def __init__(self, in_dim: int, hidden: int, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SpatialSoftmax(nn.Module):
    """Feature map (N, C, H, W) -> expected image coordinates of K keypoints (N, 2K)."""

    def __init__(self, channels: int, num_keypoints: int):
        super().__init__()
        self.keypoints = nn.Conv2d(channels, num_keypoints, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.keypoints(x)
        n, k, h, w = x.shape
        attn = x.flatten(2).softmax(-1).view(n, k, h, w)
        ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=attn.dtype)
        xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=attn.dtype)
        ey = (attn.sum(3) * ys).sum(-1)
        ex = (attn.sum(2) * xs).sum(-1)
        return torch.cat([ex, ey], dim=-1)


def trunk_output_size(pixels: int, cfg: ImageEncoderConfig | None = None) -> int:
    """Side of the trunk's feature map for an input side (default: ResNet-18)."""
    cfg = cfg or ImageEncoderConfig()
    return TRUNKS[cfg.trunk].feature_side(pixels, cfg)


class ImageEncoder(nn.Module):
    """One token per camera for images (B, T, H, W, 3) uint8 of each camera key.

    ``cfg.crop_size`` ``auto`` crops each camera to 0.9 x its smaller side (a policy resolves
    it to pixels when it is built, so its checkpoint records the number).
    """

    def __init__(self, cfg: ImageEncoderConfig, cameras: list[str], width: int, goal_dim: int):
        super().__init__()
        self.cfg = cfg
        self.cameras = list(cameras)
        film_dim = goal_dim if cfg.film else 0
        n_trunks = 1 if cfg.share_trunk else len(self.cameras)
        self.trunks = nn.ModuleList(build_trunk(cfg, film_dim) for _ in range(n_trunks))
        self.pools = nn.ModuleList(SpatialSoftmax(self.trunks[0].out_channels, cfg.num_keypoints) for _ in self.cameras)
        self.proj = nn.ModuleList(nn.Linear(2 * cfg.num_keypoints, width) for _ in self.cameras)
        imagenet = cfg.pretrained and cfg.trunk == "resnet18"  # torchvision's weights expect ImageNet statistics
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if imagenet else ((0.5,) * 3, (0.5,) * 3)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, 3, H, W) float, normalized."""
        if images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (H, W, 3), got {images.dtype}")
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self.mean) / self.std

    def forward(self, images: dict[str, torch.Tensor], goal: torch.Tensor | None) -> torch.Tensor:
        """images[camera]: (B, T, H, W, 3) uint8 -> tokens (B, T, n_cameras, width)."""
        tokens = []
        for i, cam in enumerate(self.cameras):
            x = images[cam]
            b, t = x.shape[:2]
            x = self.preprocess(x.reshape(b * t, *x.shape[2:]))
            # one crop window per sample, the same for all of its frames
            crop = auto_crop([tuple(x.shape[-2:])]) if self.cfg.crop_size == "auto" else self.cfg.crop_size
            x = crop_images(x.view(b, t, *x.shape[1:]), crop, random=self.training).flatten(0, 1)
            g = goal.repeat_interleave(t, dim=0) if (goal is not None and self.cfg.film) else None
            feat = self.trunks[0 if self.cfg.share_trunk else i](x, g)
            tokens.append(self.proj[i](self.pools[i](feat)).view(b, t, -1))
        return torch.stack(tokens, dim=2)


def encoder_cost(encoder: ImageEncoder, image_shapes: dict[str, list[int]], goal_dim: int = 0, frames: int = 1) -> dict[str, float]:
    """Parameters (all and trainable) and forward MFLOPs of one sample (``frames`` frames per camera,
    eval-mode crop), counted by ``torch.utils.flop_counter.FlopCounterMode`` (not timed)."""
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(p.numel() for p in encoder.parameters())
    trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    device = next(encoder.parameters()).device
    images = {c: torch.zeros(1, frames, *image_shapes[c], dtype=torch.uint8, device=device) for c in encoder.cameras}
    goal = torch.zeros(1, goal_dim, device=device) if goal_dim else None
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            encoder(images, goal)
    finally:
        encoder.train(was_training)
    return {"params": params, "trainable": trainable, "mflops_per_sample": counter.get_total_flops() / 1e6}
