"""Observation encoders: low-dim MLP, camera images (ResNet-18 + spatial softmax), goals.

Images arrive as uint8 (..., H, W, 3) and stay uint8 until they are on the policy's
device; the encoder converts, crops (random in training, center at inference), runs the
trunk with FiLM conditioning on the goal after every ResNet stage, and turns the feature
map into keypoints with a spatial softmax.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mixpolicy.datasets.augment import crop_images
from mixpolicy.errors import UserError
from mixpolicy.policies.config import ImageEncoderConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET_STAGE_CHANNELS = (64, 128, 256, 512)


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


def trunk_output_size(pixels: int) -> int:
    """Side of the ResNet-18 feature map for an input side (five stride-2 stages)."""
    for _ in range(5):
        pixels = (pixels - 1) // 2 + 1
    return pixels


def _group_norm(channels: int) -> nn.Module:
    return nn.GroupNorm(max(1, channels // 16), channels)


class ResNet18Trunk(nn.Module):
    """torchvision's ResNet-18 without pooling and classifier; optional FiLM per stage."""

    def __init__(self, cfg: ImageEncoderConfig, goal_dim: int):
        super().__init__()
        from torchvision.models import resnet18

        net = resnet18(weights=None, norm_layer=_group_norm if cfg.norm == "group" else None)
        if cfg.pretrained:
            _load_pretrained(net, cfg.pretrained)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.stages = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        self.film = None
        if goal_dim:
            self.film = nn.ModuleList(nn.Linear(goal_dim, 2 * c) for c in RESNET_STAGE_CHANNELS)
            for lin in self.film:  # start as the identity
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
        self.out_channels = RESNET_STAGE_CHANNELS[-1]

    def forward(self, x: torch.Tensor, goal: torch.Tensor | None = None) -> torch.Tensor:
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if self.film is not None and goal is not None:
                gamma, beta = self.film[i](goal).chunk(2, dim=-1)
                x = x * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]
        return x


def _load_pretrained(net: nn.Module, path: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"image_encoder.pretrained: no weights at {p} (mixpolicy never downloads weights; "
            "give a local torchvision resnet18 state dict, .safetensors or .pth, or leave it empty)"
        )
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    own = net.state_dict()
    # Convolutions always match; norm affine parameters match for GroupNorm too, while
    # BatchNorm running statistics only exist for norm=batch.
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape and not k.startswith("fc.")}
    convs = [k for k in own if k.endswith(".weight") and own[k].ndim == 4]
    missing = [k for k in convs if k not in usable]
    if missing:
        raise UserError(f"image_encoder.pretrained: {p} is not a resnet18 state dict (lacks {missing[0]})")
    net.load_state_dict(usable, strict=False)


class ImageEncoder(nn.Module):
    """One token per camera for images (B, T, H, W, 3) uint8 of each camera key."""

    def __init__(self, cfg: ImageEncoderConfig, cameras: list[str], width: int, goal_dim: int):
        super().__init__()
        self.cfg = cfg
        self.cameras = list(cameras)
        film_dim = goal_dim if cfg.film else 0
        n_trunks = 1 if cfg.share_trunk else len(self.cameras)
        self.trunks = nn.ModuleList(ResNet18Trunk(cfg, film_dim) for _ in range(n_trunks))
        self.pools = nn.ModuleList(SpatialSoftmax(self.trunks[0].out_channels, cfg.num_keypoints) for _ in self.cameras)
        self.proj = nn.ModuleList(nn.Linear(2 * cfg.num_keypoints, width) for _ in self.cameras)
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if cfg.pretrained else ((0.5,) * 3, (0.5,) * 3)
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
            x = crop_images(x.view(b, t, *x.shape[1:]), self.cfg.crop_size, random=self.training).flatten(0, 1)
            g = goal.repeat_interleave(t, dim=0) if (goal is not None and self.cfg.film) else None
            feat = self.trunks[0 if self.cfg.share_trunk else i](x, g)
            tokens.append(self.proj[i](self.pools[i](feat)).view(b, t, -1))
        return torch.stack(tokens, dim=2)
