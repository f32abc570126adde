"""Policy configs: one validated dataclass per policy type, found through a registry.

``dit`` is the dense transformer denoising policy; ``mode`` replaces each block's MLP by
a mixture of denoising experts routed by the noise level (MoDE). Both share the
observation side (low-dim keys, camera images, task or language goal) and the objective
(DDPM, EDM or flow matching). ``dit_moh`` and ``mode_moh`` add a mixture-of-horizons
head (``moh``) to either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any, Callable

from mixpolicy.config import ConfigError, check, from_dict

OBJECTIVES = ("ddpm", "edm", "flow")
# Sampling solvers per objective; the first is the default.
SOLVERS = {"ddpm": ("ddim",), "edm": ("dpm_solver_1", "heun"), "flow": ("euler", "heun")}
ACTION_ATTENTION = ("causal", "bidirectional")
TRAIN_ROUTING = ("sample", "topk")
TASK_CONDITIONING = ("embedding", "language", "none")
IMAGE_TRUNKS = ("resnet18",)
IMAGE_NORMS = ("group", "batch")
IMAGE_PREFIX = "image_"


@dataclass
class ObjectiveConfig:
    """Generative objective and its sampler.

    ``ddpm``: DDPM training (diffusers' DDPMScheduler), DDIM sampling.
    ``edm``: EDM preconditioning (as MoDE), log-logistic training sigmas, first-order
    DPM-Solver (or Heun) on an exponential sigma schedule.
    ``flow``: rectified flow / flow matching (as pi0), Beta time sampling, Euler or Heun.
    Fields of the other objectives are ignored.
    """

    name: str = "ddpm"
    num_inference_steps: int = 10
    solver: str = ""  # "" picks the objective's default (ddim, dpm_solver_1, euler)
    clip_sample: bool = True  # clip predicted clean actions to [-1, 1] (ddpm, edm)
    # ddpm
    num_train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "epsilon"
    # edm
    sigma_data: float = 0.5
    sigma_min: float = 0.001
    sigma_max: float = 80.0
    sigma_train_median: float = 0.5  # training sigmas: log-logistic, location log(median)
    sigma_train_scale: float = 0.5  # ... and this scale in log space
    # flow
    time_beta: list[float] = field(default_factory=lambda: [1.5, 1.0])  # t ~ Beta(a, b)
    time_min: float = 0.001  # t = time_min + (1 - time_min) * Beta draw

    def __post_init__(self):
        check(self.name in OBJECTIVES, "objective.name", f"unknown objective {self.name!r}; choose from {OBJECTIVES}")
        if not self.solver:
            self.solver = SOLVERS[self.name][0]
        check(
            self.solver in SOLVERS[self.name],
            "objective.solver",
            f"{self.solver!r} is not a solver of the {self.name} objective; choose from {SOLVERS[self.name]}",
        )
        check(self.num_inference_steps >= 1, "objective.num_inference_steps", "must be >= 1")
        if self.name == "ddpm":
            check(self.num_train_timesteps >= 2, "objective.num_train_timesteps", "must be >= 2")
            check(
                self.num_inference_steps <= self.num_train_timesteps,
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
        check(self.sigma_data > 0, "objective.sigma_data", "must be > 0")
        check(0 < self.sigma_min < self.sigma_max, "objective.sigma_min", "must satisfy 0 < sigma_min < sigma_max")
        check(self.sigma_train_median > 0, "objective.sigma_train_median", "must be > 0")
        check(self.sigma_train_scale > 0, "objective.sigma_train_scale", "must be > 0")
        check(len(self.time_beta) == 2 and all(b > 0 for b in self.time_beta), "objective.time_beta", "must be two positive numbers [a, b]")
        check(0 <= self.time_min < 1, "objective.time_min", "must be in [0, 1)")


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
class MoDETransformerConfig(TransformerConfig):
    """Transformer whose block MLPs are mixtures of SwiGLU experts routed by the noise level.

    ``mlp_ratio`` is each expert's hidden size over the width. A dense GELU MLP of ratio 4
    has 8 w^2 weights per block; top-2 SwiGLU experts of ratio r use 6 r w^2, and the
    router about w^2 / 2 more, so r = 1.25 gives the dense block's active parameters.
    """

    mlp_ratio: float = 1.25
    num_experts: int = 4
    top_k: int = 2
    shared_expert: bool = False  # one more SwiGLU expert that every sample uses
    router_hidden_ratio: float = 0.5  # router: Linear(w, r w) - GELU - Linear(r w, experts)
    # How training picks the k experts: "sample" draws them without replacement from the
    # router's softmax (the MoDE paper); "topk" takes the k most probable, as evaluation
    # and the expert cache always do, so training runs exactly the experts sampling uses.
    train_routing: str = "sample"
    load_balance_weight: float = 0.01
    z_loss_weight: float = 0.001
    freeze_router: bool = False  # for fine-tuning: keep the pretrained routing
    expert_cache: bool = True  # at inference, fuse each sampling step's experts into one MLP

    def __post_init__(self):
        super().__post_init__()
        check(self.num_experts >= 1, "network.num_experts", "must be >= 1")
        check(
            1 <= self.top_k <= self.num_experts,
            "network.top_k",
            f"must be in [1, num_experts={self.num_experts}]",
        )
        check(self.router_hidden_ratio > 0, "network.router_hidden_ratio", "must be > 0")
        check(self.train_routing in TRAIN_ROUTING, "network.train_routing", f"must be one of {TRAIN_ROUTING}")
        check(self.load_balance_weight >= 0, "network.load_balance_weight", "must be >= 0")
        check(self.z_loss_weight >= 0, "network.z_loss_weight", "must be >= 0")


@dataclass
class ImageEncoderConfig:
    """Camera images -> one token per camera and time step.

    ResNet-18 trunk (torchvision, norm layers replaced by GroupNorm by default), spatial
    softmax keypoints, linear projection; random crop in training, center crop at
    inference; FiLM of every ResNet stage by the goal (task or language embedding).
    """

    trunk: str = "resnet18"
    norm: str = "group"  # group (GroupNorm, 16 channels a group) | batch
    share_trunk: bool = False  # one trunk for every camera instead of one per camera
    crop_size: int = 76  # random crop in training, center crop at inference (0: no crop)
    num_keypoints: int = 32  # spatial softmax keypoints
    film: bool = True  # FiLM-condition the trunk on the goal (needs task_conditioning)
    pretrained: str = ""  # local torchvision resnet18 weights (.safetensors or .pth); never downloaded

    def __post_init__(self):
        check(self.trunk in IMAGE_TRUNKS, "image_encoder.trunk", f"must be one of {IMAGE_TRUNKS}")
        check(self.norm in IMAGE_NORMS, "image_encoder.norm", f"must be one of {IMAGE_NORMS}")
        check(self.crop_size >= 0, "image_encoder.crop_size", "must be >= 0 (0: no crop)")
        check(self.num_keypoints >= 1, "image_encoder.num_keypoints", "must be >= 1")


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
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    # Divide the discrete action dims (dataset metadata, e.g. the gripper) by this factor in
    # normalized space: RTI's scale variant, where a mode switch needs only a small noise level.
    discrete_action_scale: float = 1.0
    network: TransformerConfig = field(default_factory=TransformerConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)

    def __post_init__(self):
        check(self.type in POLICY_REGISTRY, "policy.type", f"unknown policy type {self.type!r}; choose from {sorted(POLICY_REGISTRY)}")
        expected = POLICY_REGISTRY[self.type][0]
        check(type(self) is expected, "policy.type", f"{self.type!r} is configured by {expected.__name__}, not {type(self).__name__}")
        check(len(self.obs_keys) >= 1, "policy.obs_keys", "needs at least one observation key")
        check(len(set(self.obs_keys)) == len(self.obs_keys), "policy.obs_keys", "contains duplicates")
        check(self.n_obs_steps >= 1, "policy.n_obs_steps", "must be >= 1")
        check(self.horizon >= 1, "policy.horizon", "must be >= 1")
        check(
            1 <= self.n_action_steps <= self.horizon,
            "policy.n_action_steps",
            f"must be in [1, horizon={self.horizon}] (the chunk is shorter than the executed steps)",
        )
        check(self.task_conditioning in TASK_CONDITIONING, "policy.task_conditioning", f"must be one of {TASK_CONDITIONING}")
        check(self.obs_hidden > 0, "policy.obs_hidden", "must be > 0")
        has_images = any(k.startswith(IMAGE_PREFIX) for k in self.obs_keys)
        check(
            not (has_images and self.image_encoder.film and self.task_conditioning == "none"),
            "image_encoder.film",
            "FiLM conditions the image trunk on the goal: set image_encoder.film=false or use a task_conditioning",
        )
        check(self.discrete_action_scale >= 1.0, "policy.discrete_action_scale", "must be >= 1 (1: unscaled)")


@dataclass
class MoDEPolicyConfig(PolicyConfig):
    """MoDE: the dense policy with mixture-of-denoising-experts blocks (EDM by default)."""

    type: str = "mode"
    network: MoDETransformerConfig = field(default_factory=MoDETransformerConfig)
    objective: ObjectiveConfig = field(default_factory=lambda: ObjectiveConfig(name="edm"))


EXECUTION_MODES = ("fixed", "adaptive")


@dataclass
class MoHConfig:
    """Mixture of horizons: nested prefixes of one action chunk, fused per action index.

    Every horizon's prefix of the same noisy chunk goes through the shared denoiser in one
    batched call (padded actions hidden as keys); a linear gate per action index weighs
    the horizons that cover it. Execution: ``fixed`` runs the policy's ``n_action_steps``;
    ``adaptive`` extends the executed prefix from ``min_executed`` while the horizons'
    denoising steps agree (cross-horizon consensus, see :mod:`mixpolicy.policies.moh`).
    """

    horizons: list[int] = field(default_factory=lambda: [4, 8, 16])  # increasing; the last is policy.horizon
    horizon_loss_weight: float = 1.0  # each horizon's denoising loss over its own prefix
    fused_loss_weight: float = 1.0  # the gate-fused prediction's denoising loss
    balance_loss_weight: float = 1e-3  # squared coefficient of variation of the gate weights, per segment
    gate_noise: bool = True  # noisy gating in training: logit += N(0, 1) * (softplus(W x) + gate_noise_floor)
    gate_noise_floor: float = 0.01
    execution: str = "fixed"  # fixed: n_action_steps | adaptive: cross-horizon consensus
    adaptive_ratio: float = 1.2  # adaptive: extend while disagreement <= ratio * its mean over the first min_executed
    min_executed: int = 2  # adaptive: always execute at least this many actions
    min_active_horizons: int = 2  # adaptive: extend only over indices that at least this many horizons cover

    def __post_init__(self):
        check(len(self.horizons) >= 1, "policy.moh.horizons", "needs at least one horizon")
        check(all(h >= 1 for h in self.horizons), "policy.moh.horizons", f"must be positive, got {self.horizons}")
        check(
            all(a < b for a, b in zip(self.horizons, self.horizons[1:])),
            "policy.moh.horizons",
            f"must be strictly increasing, got {self.horizons}",
        )
        for name in ("horizon_loss_weight", "fused_loss_weight", "balance_loss_weight", "gate_noise_floor"):
            check(getattr(self, name) >= 0, f"policy.moh.{name}", "must be >= 0")
        check(self.horizon_loss_weight + self.fused_loss_weight > 0, "policy.moh.fused_loss_weight", "the horizon and fused loss weights cannot both be 0")
        check(self.execution in EXECUTION_MODES, "policy.moh.execution", f"must be one of {EXECUTION_MODES}")
        check(self.adaptive_ratio > 0, "policy.moh.adaptive_ratio", "must be > 0")
        check(self.min_executed >= 1, "policy.moh.min_executed", "must be >= 1")
        check(self.min_active_horizons >= 1, "policy.moh.min_active_horizons", "must be >= 1")
        if self.execution == "adaptive":
            check(
                self.min_active_horizons <= len(self.horizons),
                "policy.moh.min_active_horizons",
                f"must be <= {len(self.horizons)}, the number of horizons",
            )

    def longest_adaptive_prefix(self) -> int:
        """Adaptive execution never goes past the indices ``min_active_horizons`` horizons cover."""
        return self.horizons[len(self.horizons) - self.min_active_horizons]


def _check_moh(cfg) -> None:
    moh = cfg.moh
    check(
        moh.horizons[-1] == cfg.horizon,
        "policy.moh.horizons",
        f"the largest horizon ({moh.horizons[-1]}) must equal the chunk length policy.horizon={cfg.horizon}",
    )
    if moh.execution != "adaptive":
        return
    check(
        moh.min_executed <= moh.longest_adaptive_prefix(),
        "policy.moh.min_executed",
        f"must be <= {moh.longest_adaptive_prefix()}, the longest prefix that min_active_horizons="
        f"{moh.min_active_horizons} of the horizons {moh.horizons} cover",
    )


@dataclass
class MoHPolicyConfig(PolicyConfig):
    """The dense policy with a mixture-of-horizons head (EDM by default)."""

    type: str = "dit_moh"
    objective: ObjectiveConfig = field(default_factory=lambda: ObjectiveConfig(name="edm"))
    moh: MoHConfig = field(default_factory=MoHConfig)

    def __post_init__(self):
        super().__post_init__()
        _check_moh(self)


@dataclass
class MoDEMoHPolicyConfig(MoDEPolicyConfig):
    """MoDE with a mixture-of-horizons head."""

    type: str = "mode_moh"
    moh: MoHConfig = field(default_factory=MoHConfig)

    def __post_init__(self):
        super().__post_init__()
        _check_moh(self)


# type name -> (config class, policy class factory). Policy modules register themselves.
POLICY_REGISTRY: dict[str, tuple[type, Callable[[], type]]] = {}


def register_policy(name: str, config_cls: type, policy_cls_loader: Callable[[], type]) -> None:
    POLICY_REGISTRY[name] = (config_cls, policy_cls_loader)


def policy_config_from_dict(data: dict[str, Any]) -> Any:
    """The registered config class for ``data['type']``, built and validated."""
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(
            f"config field 'policy': expected a policy config, got {data!r}; pick one with policy=<name> "
            "(in quickstart: policy@train.policy=<name>)"
        )
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


def _mode_policy_cls():
    from mixpolicy.policies.mode_policy import MoDEPolicy

    return MoDEPolicy


def _dit_moh_policy_cls():
    from mixpolicy.policies.moh import MoHPolicy

    return MoHPolicy


def _mode_moh_policy_cls():
    from mixpolicy.policies.moh import MoDEMoHPolicy

    return MoDEMoHPolicy


register_policy("dit", PolicyConfig, _dit_policy_cls)
register_policy("mode", MoDEPolicyConfig, _mode_policy_cls)
register_policy("dit_moh", MoHPolicyConfig, _dit_moh_policy_cls)
register_policy("mode_moh", MoDEMoHPolicyConfig, _mode_moh_policy_cls)
