"""The LeRobot config of a mixpolicy policy: flat fields that map to mixpolicy's config parts.

``network`` (transformer | mode), ``head`` (single | moh) and ``objective`` (ddpm | edm | flow | shortcut)
pick the parts; the other fields are their main sizes. ``mixpolicy_overrides`` takes any
other mixpolicy policy field as a JSON object, e.g. ``{"network": {"dropout": 0.1}}``.
The mapping itself is :mod:`mixpolicy.policies.lerobot_layout`, which mixpolicy's own
loader uses for the saved ``pretrained_model/`` folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lerobot.configs import PreTrainedConfig
from lerobot.optim import AdamWConfig, DiffuserSchedulerConfig

from mixpolicy.datasets.normalizer import MODES
from mixpolicy.errors import UserError
from mixpolicy.policies import lerobot_layout
from mixpolicy.policies.config import policy_config_from_dict


@PreTrainedConfig.register_subclass(lerobot_layout.POLICY_TYPE)
@dataclass
class MixpolicyConfig(PreTrainedConfig):
    n_obs_steps: int = 2
    horizon: int = 16
    n_action_steps: int = 8
    network: str = "transformer"  # transformer (dense) | mode (mixture of denoising experts)
    head: str = "single"  # single horizon | moh (mixture of horizons)
    objective: str = "ddpm"  # ddpm | edm | flow | shortcut (num_inference_steps a power of two, e.g. 2)
    width: int = 128
    depth: int = 4
    heads: int = 4
    num_experts: int = 4  # network=mode
    top_k: int = 2  # network=mode
    horizons: list[int] = field(default_factory=lambda: [4, 8, 16])  # head=moh; the last is horizon
    num_inference_steps: int = 10
    task_conditioning: str = "none"  # none | embedding (one learned goal per dataset task)
    tasks: list[str] = field(default_factory=list)  # filled from the dataset when task_conditioning=embedding
    crop_size: int = 76  # camera random crop in training, center crop at inference (0: none)
    normalization: str = "min_max"  # how the policy's own normalizer uses the dataset stats
    mixpolicy_overrides: str = ""  # JSON object of further mixpolicy policy fields

    optimizer_lr: float = 1e-3
    optimizer_betas: tuple[float, float] = (0.9, 0.95)
    optimizer_weight_decay: float = 1e-4
    optimizer_grad_clip_norm: float = 1.0
    scheduler_warmup_steps: int = 100

    def __post_init__(self):
        super().__post_init__()
        if self.normalization not in MODES:
            raise UserError(f"policy.normalization: {self.normalization!r} is not one of {', '.join(MODES)}")
        # The parts validate now, naming the field; the observation keys are known only
        # once LeRobot has filled input_features from the dataset (validate_features).
        policy_config_from_dict(lerobot_layout.policy_dict(self.layout_fields(), obs_keys=["state"]))

    def layout_fields(self) -> dict[str, Any]:
        """This config as the plain dict :mod:`mixpolicy.policies.lerobot_layout` maps (as in config.json)."""
        fields = {name: getattr(self, name) for name in lerobot_layout.FIELDS}
        for which in ("input_features", "output_features"):
            features = getattr(self, which) or {}
            fields[which] = {k: {"type": ft.type.value, "shape": list(ft.shape)} for k, ft in features.items()}
        return fields

    def validate_features(self) -> None:
        fields = self.layout_fields()
        policy_config_from_dict(lerobot_layout.policy_dict(fields))
        lerobot_layout.shape_meta_dict(fields)

    @property
    def observation_delta_indices(self) -> list[int]:
        return list(range(1 - self.n_obs_steps, 1))

    @property
    def action_delta_indices(self) -> list[int]:
        return list(range(self.horizon))

    @property
    def reward_delta_indices(self) -> None:
        return None

    def get_optimizer_preset(self) -> AdamWConfig:
        return AdamWConfig(
            lr=self.optimizer_lr,
            betas=self.optimizer_betas,
            weight_decay=self.optimizer_weight_decay,
            grad_clip_norm=self.optimizer_grad_clip_norm,
        )

    def get_scheduler_preset(self) -> DiffuserSchedulerConfig:
        return DiffuserSchedulerConfig(name="cosine", num_warmup_steps=self.scheduler_warmup_steps)
