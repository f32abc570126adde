"""Policy configs: one validated dataclass per policy type, found through a registry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from mixpolicy.config import ConfigError, check, from_dict

OBJECTIVES = ("ddpm",)
ACTION_ATTENTION = ("causal", "bidirectional")
TASK_CONDITIONING = ("embedding", "none")


@dataclass
class ObjectiveConfig:
    """Generative objective and its sampler.

    ``ddpm``: DDPM training (diffusers' DDPMScheduler), DDIM sampling (DDIMScheduler).
    """

    name: str = "ddpm"
    num_train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "epsilon"
    num_inference_steps: int = 10
    clip_sample: bool = True

    def __post_init__(self):
        check(self.name in OBJECTIVES, "objective.name", f"unknown objective {self.name!r}; choose from {OBJECTIVES}")
        check(self.num_train_timesteps >= 2, "objective.num_train_timesteps", "must be >= 2")
        check(
            1 <= self.num_inference_steps <= self.num_train_timesteps,
            "objective.num_inference_steps",
            f"must be in [1, num_train_timesteps={self.num_train_timesteps}]",
        )
        check(
            self.prediction_type in ("epsilon", "sample", "v_prediction"),
            "objective.prediction_type",
            "must be epsilon, sample or v_prediction",
        )
        check(
            self.beta_schedule in ("linear", "scaled_linear", "squaredcos_cap_v2"),
            "objective.beta_schedule",
            "must be linear, scaled_linear or squaredcos_cap_v2",
        )


@dataclass
class TransformerConfig:
    """Denoising transformer: [noise token, condition tokens, action tokens]."""

    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    attn_dropout: float = 0.0
    action_attention: str = "bidirectional"
    qk_norm: bool = True
    # Add the noise embedding to every token before each attention (as MoDE does).
    noise_conditioned_attention: bool = True

    def __post_init__(self):
        check(self.width > 0 and self.width % self.heads == 0, "network.width", "must be a positive multiple of network.heads")
        check(self.depth >= 1, "network.depth", "must be >= 1")
        check(self.heads >= 1, "network.heads", "must be >= 1")
        check(self.mlp_ratio > 0, "network.mlp_ratio", "must be > 0")
        check(0 <= self.dropout < 1, "network.dropout", "must be in [0, 1)")
        check(0 <= self.attn_dropout < 1, "network.attn_dropout", "must be in [0, 1)")
        check(self.action_attention in ACTION_ATTENTION, "network.action_attention", f"must be one of {ACTION_ATTENTION}")


@dataclass
class PolicyConfig:
    """Dense transformer denoising policy (the baseline every mixture extends)."""

    type: str = "dit"
    obs_keys: list[str] = field(default_factory=lambda: ["state"])
    action_key: str = "action"
    n_obs_steps: int = 2
    horizon: int = 16
    n_action_steps: int = 8
    task_conditioning: str = "embedding"
    obs_hidden: int = 256
    # Divide the discrete action dims (dataset metadata, e.g. the gripper) by this factor in
    # normalized space: RTI's scale variant, where a mode switch needs only a small noise level.
    discrete_action_scale: float = 1.0
    network: TransformerConfig = field(default_factory=TransformerConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)

    def __post_init__(self):
        check(self.type in POLICY_REGISTRY, "policy.type", f"unknown policy type {self.type!r}; choose from {sorted(POLICY_REGISTRY)}")
        check(len(self.obs_keys) >= 1, "policy.obs_keys", "needs at least one observation key")
        check(self.n_obs_steps >= 1, "policy.n_obs_steps", "must be >= 1")
        check(self.horizon >= 1, "policy.horizon", "must be >= 1")
        check(
            1 <= self.n_action_steps <= self.horizon,
            "policy.n_action_steps",
            f"must be in [1, horizon={self.horizon}] (the chunk is shorter than the executed steps)",
        )
        check(self.task_conditioning in TASK_CONDITIONING, "policy.task_conditioning", f"must be one of {TASK_CONDITIONING}")
        check(self.obs_hidden > 0, "policy.obs_hidden", "must be > 0")
        check(self.discrete_action_scale >= 1.0, "policy.discrete_action_scale", "must be >= 1 (1: unscaled)")


# type name -> (config class, policy class factory). Policy modules register themselves.
POLICY_REGISTRY: dict[str, tuple[type, Callable[[], type]]] = {}


def register_policy(name: str, config_cls: type, policy_cls_loader: Callable[[], type]) -> None:
    POLICY_REGISTRY[name] = (config_cls, policy_cls_loader)


def policy_config_from_dict(data: dict[str, Any]) -> Any:
    """The registered config class for ``data['type']``, built and validated."""
    kind = (data or {}).get("type", "dit")
    if kind not in POLICY_REGISTRY:
        raise ConfigError(f"config field 'policy.type': unknown policy type {kind!r}; choose from {sorted(POLICY_REGISTRY)}")
    config_cls, _ = POLICY_REGISTRY[kind]
    return from_dict(config_cls, data, prefix="policy.")


def policy_class(kind: str) -> type:
    if kind not in POLICY_REGISTRY:
        raise ConfigError(f"unknown policy type {kind!r}; choose from {sorted(POLICY_REGISTRY)}")
    return POLICY_REGISTRY[kind][1]()


def _dit_policy_cls():
    from mixpolicy.policies.denoising_policy import DenoisingPolicy

    return DenoisingPolicy


register_policy("dit", PolicyConfig, _dit_policy_cls)
