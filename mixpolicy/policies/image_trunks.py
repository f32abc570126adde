"""Convolutional trunks of the camera encoder: torchvision's ResNet-18 and a light CNN.

Each trunk maps (N, 3, H, W) float images to a feature map (N, C, H', W'), with optional
FiLM conditioning on a goal vector after every stage (ResNet-18) or layer (light), and
knows the side of its feature map for an input side (:meth:`feature_side`). Weights
come from a local file only (``image_encoder.pretrained``): a ``.safetensors`` file or a
``.pth`` state dict read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mixpolicy.errors import UserError
from mixpolicy.policies.image_config import ImageEncoderConfig

RESNET_STAGE_CHANNELS = (64, 128, 256, 512)
LIGHT_STRIDED_LAYERS = 3  # the first layers of the light trunk halve the image


def _group_norm(channels: int) -> nn.Module:
    return nn.GroupNorm(max(1, channels // 16), channels)


def _norm(kind: str, channels: int) -> nn.Module:
    return _group_norm(channels) if kind == "group" else nn.BatchNorm2d(channels)


def _film_layers(goal_dim: int, channels) -> nn.ModuleList | None:
    if not goal_dim:
        return None
    film = nn.ModuleList(nn.Linear(goal_dim, 2 * c) for c in channels)
    for lin in film:  # start as the identity
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)
    return film


def _apply_film(film: nn.ModuleList | None, i: int, x: torch.Tensor, goal: torch.Tensor | None) -> torch.Tensor:
    if film is None or goal is None:
        return x
    gamma, beta = film[i](goal).chunk(2, dim=-1)
    return x * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]


def read_weights(path: str) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"image_encoder.pretrained: no weights at {p} (mixpolicy never downloads weights; "
            "give a local state dict, .safetensors or .pth, or leave it empty)"
        )
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    try:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # an unpickling refusal or a damaged file
        raise UserError(f"image_encoder.pretrained: {p} is not a plain tensor state dict ({type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise UserError(f"image_encoder.pretrained: {p} holds a {type(state).__name__}, not a state dict")
    return state


def _load_into(net: nn.Module, state: dict[str, torch.Tensor], path: str, what: str, skip: tuple[str, ...] = ()) -> None:
    own = net.state_dict()
    # Convolutions always match; norm affine parameters match for GroupNorm too, while
    # BatchNorm running statistics only exist for norm=batch.
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape and not k.startswith(skip)}
    convs = [k for k in own if k.endswith(".weight") and own[k].ndim == 4]
    missing = [k for k in convs if k not in usable]
    if missing:
        raise UserError(f"image_encoder.pretrained: {path} is not a {what} state dict (lacks {missing[0]} of its shape)")
    net.load_state_dict(usable, strict=False)


class ResNet18Trunk(nn.Module):
    """torchvision's ResNet-18 without pooling and classifier; optional FiLM per stage."""

    def __init__(self, cfg: ImageEncoderConfig, goal_dim: int):
        super().__init__()
        from torchvision.models import resnet18

        net = resnet18(weights=None, norm_layer=_group_norm if cfg.norm == "group" else None)
        if cfg.pretrained:
            _load_into(net, read_weights(cfg.pretrained), cfg.pretrained, "torchvision resnet18", skip=("fc.",))
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.stages = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        self.film = _film_layers(goal_dim, RESNET_STAGE_CHANNELS)
        self.out_channels = RESNET_STAGE_CHANNELS[-1]

    @staticmethod
    def feature_side(pixels: int, cfg: ImageEncoderConfig) -> int:
        for _ in range(5):  # five stride-2 stages
            pixels = (pixels - 1) // 2 + 1
        return pixels

    def backbone(self) -> list[nn.Module]:
        return [self.stem, self.stages]

    def forward(self, x: torch.Tensor, goal: torch.Tensor | None = None) -> torch.Tensor:
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            x = _apply_film(self.film, i, stage(x), goal)
        return x


class LightTrunk(nn.Module):
    """A few convolutions (5x5 then 3x3; the first three stride 2), each norm + ReLU; FiLM per layer."""

    def __init__(self, cfg: ImageEncoderConfig, goal_dim: int):
        super().__init__()
        layers, c_in = [], 3
        for i, c in enumerate(cfg.light_channels):
            k = 5 if i == 0 else 3
            layers.append(nn.Sequential(
                nn.Conv2d(c_in, c, k, stride=2 if i < LIGHT_STRIDED_LAYERS else 1, padding=k // 2, bias=False),
                _norm(cfg.norm, c), nn.ReLU(inplace=True),
            ))  # fmt: skip
            c_in = c
        self.layers = nn.ModuleList(layers)
        if cfg.pretrained:
            # a light trunk's own layers, also as saved inside a policy (``...layers.0.0.weight``)
            state = {k.rsplit("layers.", 1)[-1]: v for k, v in read_weights(cfg.pretrained).items()}
            _load_into(self.layers, state, cfg.pretrained, f"light trunk {list(cfg.light_channels)}")
        self.film = _film_layers(goal_dim, cfg.light_channels)
        self.out_channels = cfg.light_channels[-1]

    @staticmethod
    def feature_side(pixels: int, cfg: ImageEncoderConfig) -> int:
        for _ in range(min(LIGHT_STRIDED_LAYERS, len(cfg.light_channels))):
            pixels = (pixels - 1) // 2 + 1
        return pixels

    def backbone(self) -> list[nn.Module]:
        return [self.layers]

    def forward(self, x: torch.Tensor, goal: torch.Tensor | None = None) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = _apply_film(self.film, i, layer(x), goal)
        return x


TRUNKS: dict[str, type[nn.Module]] = {"resnet18": ResNet18Trunk, "light": LightTrunk}


def build_trunk(cfg: ImageEncoderConfig, goal_dim: int) -> nn.Module:
    trunk = TRUNKS[cfg.trunk](cfg, goal_dim)
    if cfg.freeze:  # the convolutions and norms; FiLM (if any) still learns
        for part in trunk.backbone():
            part.requires_grad_(False)
    return trunk
