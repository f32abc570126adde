"""The camera encoder's config and how its ``auto`` crop resolves against the image size."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mixpolicy.config import check

IMAGE_TRUNKS = ("resnet18", "light")
IMAGE_NORMS = ("group", "batch")
AUTO_CROP_RATIO = 0.9  # crop_size=auto: this share of the smaller image side


@dataclass
class ImageEncoderConfig:
    """Camera images -> one token per camera and time step.

    ``resnet18``: torchvision's ResNet-18 (norm layers GroupNorm by default, ~11M
    parameters); ``light``: a few strided convolutions with GroupNorm (``light_channels``,
    ~240k parameters by default) that fits a CPU budget. Either ends in spatial softmax
    keypoints and a linear projection; random crop in training, centre crop at inference;
    FiLM of every stage / layer by the goal (task or language embedding).
    """

    trunk: str = "resnet18"  # resnet18 | light
    norm: str = "group"  # group (GroupNorm, 16 channels a group) | batch
    share_trunk: bool = False  # one trunk for every camera instead of one per camera
    # Square crop: random in training, centre at inference. auto: 0.9 x the smaller image
    # side (resolved when the policy is built and saved so in its checkpoint); 0: no crop.
    crop_size: int | str = "auto"
    num_keypoints: int = 32  # spatial softmax keypoints
    film: bool = True  # FiLM-condition the trunk on the goal (needs task_conditioning)
    pretrained: str = ""  # local trunk weights (.safetensors, or a .pth state dict); never downloaded
    freeze: bool = False  # keep the trunk's weights fixed (FiLM, keypoints and projection still train)
    light_channels: list[int] = field(default_factory=lambda: [32, 64, 128, 128])  # light: one conv each; the first three stride 2

    def __post_init__(self):
        check(self.trunk in IMAGE_TRUNKS, "image_encoder.trunk", f"must be one of {IMAGE_TRUNKS}")
        check(self.norm in IMAGE_NORMS, "image_encoder.norm", f"must be one of {IMAGE_NORMS}")
        if isinstance(self.crop_size, str) and self.crop_size != "auto":
            try:
                self.crop_size = int(self.crop_size)
            except ValueError:
                check(False, "image_encoder.crop_size", f"must be auto or a whole number of pixels, got {self.crop_size!r}")
        check(self.crop_size == "auto" or self.crop_size >= 0, "image_encoder.crop_size", "must be auto or >= 0 (0: no crop)")
        check(self.num_keypoints >= 1, "image_encoder.num_keypoints", "must be >= 1")
        check(len(self.light_channels) >= 1 and all(c >= 1 for c in self.light_channels), "image_encoder.light_channels", "needs positive channel counts")
        check(not self.freeze or bool(self.pretrained), "image_encoder.freeze", "a frozen trunk needs pretrained weights (image_encoder.pretrained=PATH)")


def auto_crop(image_sides: list[tuple[int, int]]) -> int:
    """The crop ``auto`` stands for: 0.9 x the smallest side of any camera, in pixels."""
    return max(1, int(round(AUTO_CROP_RATIO * min(min(hw) for hw in image_sides)))) if image_sides else 0


def resolve_crop(cfg: ImageEncoderConfig, image_sides: list[tuple[int, int]]) -> ImageEncoderConfig:
    """``cfg`` with ``crop_size=auto`` replaced by its number of pixels for these image sizes."""
    if cfg.crop_size != "auto":
        return cfg
    return dataclasses.replace(cfg, crop_size=auto_crop(image_sides))
