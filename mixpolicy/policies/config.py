"""Policy configs: one denoising policy composed of parts, one validated dataclass per part.

A policy is an observation encoder (low-dim keys, cameras, task or language goal), a
``network`` (``transformer``, or ``mode``: block MLPs replaced by noise-routed experts), a
``head`` (``single`` horizon, or ``moh``: a mixture of nested horizons) and an
``objective`` (``ddpm``, ``edm``, ``flow``, ``shortcut``; their dataclasses in
:mod:`mixpolicy.policies.objective_config`). Each part's ``type`` picks its dataclass
(:data:`mixpolicy.config.VARIANTS`); any combination is one config, no new class.
This module imports no implementation: :mod:`mixpolicy.policies.factory` maps each
part type to the module that implements it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any

from mixpolicy.config import ConfigError, check, from_dict, register_variant
from mixpolicy.keys import is_image_key
from mixpolicy.policies.objective_config import (  # noqa: F401  (re-exported: the part dataclasses live here too)
    OBJECTIVE_CONFIGS,
    PREDICTION_TYPES,
    DDPMConfig,
    EDMConfig,
    FlowConfig,
    ObjectiveConfig,
    ShortcutConfig,
)
from mixpolicy.policies.image_config import IMAGE_NORMS, IMAGE_TRUNKS, ImageEncoderConfig  # noqa: F401  (part of this module's API)

CONDITION_LAYOUTS = ("joint", "cached")
NORMS = ("rms", "layer")
ACTION_ATTENTION = ("causal", "bidirectional")
TRAIN_ROUTING = ("sample", "topk")
ROUTER_INPUTS = ("noise", "task", "both")
TASK_CONDITIONING = ("embedding", "language", "none")


@dataclass
class TransformerConfig:
    """Denoising transformer: [noise token, condition tokens, action tokens]."""

    type: str = "transformer"
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    attn_dropout: float = 0.0
    action_attention: str = "bidirectional"
    actions_per_token: int = 1  # consecutive actions sharing one token (fewer tokens per step)
    qk_norm: bool = True
    # Add the noise embedding to every token before each attention (as MoDE does).
    noise_conditioned_attention: bool = True
    # joint: condition tokens in every block's sequence, recomputed each denoising step;
    # cached: encoded once per chunk into a memory the action tokens attend to.
    condition: str = "joint"
    condition_layers: int = 1  # cached: blocks over the condition tokens alone
    norm: str = "rms"  # rms | layer (LayerNorm: fewer kernels per step on CPU)

    def __post_init__(self):
        check(self.width > 0 and self.width % self.heads == 0, "network.width", "must be a positive multiple of network.heads")
        for name in ("depth", "heads", "actions_per_token"):
            check(getattr(self, name) >= 1, f"network.{name}", "must be >= 1")
        check(self.mlp_ratio > 0, "network.mlp_ratio", "must be > 0")
        check(0 <= self.dropout < 1, "network.dropout", "must be in [0, 1)")
        check(0 <= self.attn_dropout < 1, "network.attn_dropout", "must be in [0, 1)")
        check(self.action_attention in ACTION_ATTENTION, "network.action_attention", f"must be one of {ACTION_ATTENTION}")
        check(self.condition in CONDITION_LAYOUTS, "network.condition", f"must be one of {CONDITION_LAYOUTS}")
        check(self.condition_layers >= 0, "network.condition_layers", "must be >= 0")
        check(self.norm in NORMS, "network.norm", f"must be one of {NORMS}")


@dataclass
class MoDETransformerConfig(TransformerConfig):
    """Transformer whose block MLPs are mixtures of SwiGLU experts routed by the noise level.
    ``mlp_ratio`` is each expert's hidden size over the width: a dense GELU MLP of ratio 4 has
    8 w^2 weights per block, top-2 SwiGLU experts of ratio r 6 r w^2 plus a router of about
    w^2 / 2, so r = 1.25 gives the dense block's active parameters."""

    type: str = "mode"
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
    # What the router sees: noise (MoDE), task (the goal embedding, as Sparse Diffusion
    # Policy) or both (noise and goal embeddings concatenated); task and both need a task_conditioning.
    router_input: str = "noise"
    # Continual learning (train add_experts=N): experts appended per stage, the last of num_experts,
    # each stage with its own parameters and router outputs; per task index, how many leading
    # experts it may be routed to (empty: all). Written by add_experts; rarely set by hand.
    added_experts: list[int] = field(default_factory=list)
    task_experts: list[int] = field(default_factory=list)

    def __post_init__(self):
        super().__post_init__()
        check(self.num_experts >= 1, "network.num_experts", "must be >= 1")
        check(1 <= self.top_k <= self.num_experts, "network.top_k", f"must be in [1, num_experts={self.num_experts}]")
        check(self.router_hidden_ratio > 0, "network.router_hidden_ratio", "must be > 0")
        check(self.train_routing in TRAIN_ROUTING, "network.train_routing", f"must be one of {TRAIN_ROUTING}")
        check(self.load_balance_weight >= 0, "network.load_balance_weight", "must be >= 0")
        check(self.z_loss_weight >= 0, "network.z_loss_weight", "must be >= 0")
        check(self.router_input in ROUTER_INPUTS, "network.router_input", f"must be one of {ROUTER_INPUTS}")
        check(all(n >= 1 for n in self.added_experts) and sum(self.added_experts) < self.num_experts, "network.added_experts",
              f"must be positive counts summing to less than num_experts={self.num_experts}")  # fmt: skip
        check(all(self.top_k <= n <= self.num_experts for n in self.task_experts), "network.task_experts",
              f"each task's expert count must be in [top_k={self.top_k}, num_experts={self.num_experts}]")  # fmt: skip


EXECUTION_MODES = ("fixed", "adaptive")


@dataclass
class HeadConfig:
    """Single-horizon head: the network's prediction for the whole chunk."""

    type: str = "single"


@dataclass
class MoHConfig(HeadConfig):
    """Mixture of horizons: nested prefixes of one action chunk, fused per action index.

    Every horizon's prefix of the same noisy chunk goes through the shared denoiser in one
    batched call (padded actions hidden as keys); a linear gate per action index weighs
    the horizons that cover it. Execution: ``fixed`` runs the policy's ``n_action_steps``;
    ``adaptive`` extends the executed prefix from ``min_executed`` while the horizons'
    denoising steps agree (cross-horizon consensus, see :mod:`mixpolicy.policies.moh`).
    """

    type: str = "moh"
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
        check(len(self.horizons) >= 1, "policy.head.horizons", "needs at least one horizon")
        check(all(h >= 1 for h in self.horizons), "policy.head.horizons", f"must be positive, got {self.horizons}")
        increasing = all(a < b for a, b in zip(self.horizons, self.horizons[1:]))
        check(increasing, "policy.head.horizons", f"must be strictly increasing, got {self.horizons}")
        for name in ("horizon_loss_weight", "fused_loss_weight", "balance_loss_weight", "gate_noise_floor"):
            check(getattr(self, name) >= 0, f"policy.head.{name}", "must be >= 0")
        check(self.horizon_loss_weight + self.fused_loss_weight > 0, "policy.head.fused_loss_weight", "the horizon and fused loss weights cannot both be 0")
        check(self.execution in EXECUTION_MODES, "policy.head.execution", f"must be one of {EXECUTION_MODES}")
        check(self.adaptive_ratio > 0, "policy.head.adaptive_ratio", "must be > 0")
        for name in ("min_executed", "min_active_horizons"):
            check(getattr(self, name) >= 1, f"policy.head.{name}", "must be >= 1")
        if self.execution == "adaptive":
            check(
                self.min_active_horizons <= len(self.horizons),
                "policy.head.min_active_horizons",
                f"must be <= {len(self.horizons)}, the number of horizons",
            )

    def longest_adaptive_prefix(self) -> int:
        """Adaptive execution never goes past the indices ``min_active_horizons`` horizons cover."""
        return self.horizons[len(self.horizons) - self.min_active_horizons]


@dataclass
class PolicyConfig:
    """A transformer denoising policy: shared observation side plus network, head and objective parts."""

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
    # Training-time real-time chunking: a random delay d in [0, train_delay_max] per sample (with
    # probability train_delay_prob); the first d actions enter clean through their own embedding
    # and carry no loss, so at inference a frozen prefix costs nothing (rti.prefix=conditioned).
    train_delay_max: int = 0
    train_delay_prob: float = 1.0
    network: TransformerConfig = field(default_factory=TransformerConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    objective: ObjectiveConfig = field(default_factory=DDPMConfig)

    def __post_init__(self):
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
        has_images = any(is_image_key(k) for k in self.obs_keys)
        check(
            not (has_images and self.image_encoder.film and self.task_conditioning == "none"),
            "image_encoder.film",
            "FiLM conditions the image trunk on the goal: set image_encoder.film=false or use a task_conditioning",
        )
        check(self.discrete_action_scale >= 1.0, "policy.discrete_action_scale", "must be >= 1 (1: unscaled)")
        check(0 <= self.train_delay_max < self.horizon, "policy.train_delay_max", f"must be in [0, horizon={self.horizon})")
        check(0 < self.train_delay_prob <= 1, "policy.train_delay_prob", "must be in (0, 1]")
        k = self.network.actions_per_token
        check(self.horizon % k == 0, "network.actions_per_token", f"must divide policy.horizon={self.horizon}")
        check(k == 1 or (self.head.type == "single" and self.train_delay_max == 0), "network.actions_per_token",
              "several actions per token work with the single-horizon head and without train_delay_max")  # fmt: skip
        if isinstance(self.head, MoHConfig):
            _check_moh(self)

    @property
    def type(self) -> str:
        """The policy's kind as checkpoints and reports name it: dit | mode, with _moh for a mixture-of-horizons head."""
        return ("mode" if self.network.type == "mode" else "dit") + ("_moh" if self.head.type == "moh" else "")


def _check_moh(cfg: PolicyConfig) -> None:
    moh = cfg.head
    largest = f"the largest horizon ({moh.horizons[-1]}) must equal the chunk length policy.horizon={cfg.horizon}"
    check(moh.horizons[-1] == cfg.horizon, "policy.head.horizons", largest)
    if moh.execution != "adaptive":
        return
    check(
        moh.min_executed <= moh.longest_adaptive_prefix(),
        "policy.head.min_executed",
        f"must be <= {moh.longest_adaptive_prefix()}, the longest prefix that min_active_horizons="
        f"{moh.min_active_horizons} of the horizons {moh.horizons} cover",
    )


NETWORK_CONFIGS: dict[str, type] = {"transformer": TransformerConfig, "mode": MoDETransformerConfig}
HEAD_CONFIGS: dict[str, type] = {"single": HeadConfig, "moh": MoHConfig}
# part name -> (base dataclass, its variants by type)
PART_CONFIGS: dict[str, tuple[type, dict[str, type]]] = {
    "network": (TransformerConfig, NETWORK_CONFIGS),
    "head": (HeadConfig, HEAD_CONFIGS),
    "objective": (ObjectiveConfig, OBJECTIVE_CONFIGS),
}
for _base, _variants in PART_CONFIGS.values():
    for _name, _cls in _variants.items():
        register_variant(_base, _name, _cls)


def register_part_config(part: str, name: str, config_cls: type) -> None:
    """Add a config dataclass for ``<part>.type: name`` (the factory pairs it with its implementation)."""
    if part not in PART_CONFIGS:
        raise ValueError(f"unknown policy part {part!r}; choose from {sorted(PART_CONFIGS)}")
    base, variants = PART_CONFIGS[part]
    variants[name] = config_cls
    register_variant(base, name, config_cls)


# Configs saved before the policy was composed of parts named a policy type
# (dit | mode | dit_moh | mode_moh), an objective ``name`` and a top-level ``moh`` block.
LEGACY_TYPES = ("dit", "mode", "dit_moh", "mode_moh")


def upgrade_legacy(data: Mapping[str, Any]) -> dict[str, Any]:
    """A config dict of the earlier per-type layout rewritten in the parts layout."""
    d = copy.deepcopy(dict(data))
    kind = d.pop("type", "dit")
    if kind not in LEGACY_TYPES:
        raise ConfigError(f"config field 'policy.type': unknown policy type {kind!r}; choose from {list(LEGACY_TYPES)}")
    d["network"] = {"type": "mode" if kind.startswith("mode") else "transformer", **d.get("network", {})}
    moh = d.pop("moh", None)
    if kind.endswith("_moh"):
        d["head"] = {"type": "moh", **(moh or {})}
    # The earlier types defaulted to EDM (dit: DDPM) when no objective was given; a given
    # objective without a name was DDPM, the objective dataclass's own default.
    objective = dict(d["objective"]) if "objective" in d else {"name": "ddpm" if kind == "dit" else "edm"}
    name = objective.pop("name", "ddpm")
    variant = OBJECTIVE_CONFIGS.get(name)
    if variant is None:
        raise ConfigError(f"config field 'policy.objective.name': unknown objective {name!r}; choose from {sorted(OBJECTIVE_CONFIGS)}")
    fields = set(variant.__dataclass_fields__)
    d["objective"] = {"type": name, **{k: v for k, v in objective.items() if k in fields}}
    return d


def policy_kind(data: Mapping[str, Any]) -> str:
    """The kind a policy config dict describes (as :attr:`PolicyConfig.type`), without building it."""
    if "type" in data:  # the earlier per-type layout
        return str(data["type"])
    network, head = data.get("network") or {}, data.get("head") or {}
    kind = "mode" if isinstance(network, Mapping) and network.get("type") == "mode" else "dit"
    return kind + ("_moh" if isinstance(head, Mapping) and head.get("type") == "moh" else "")


def policy_config_from_dict(data: Mapping[str, Any] | None) -> PolicyConfig:
    """A validated :class:`PolicyConfig` (parts layout; the earlier per-type layout is upgraded)."""
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(
            f"config field 'policy': expected a policy config, got {data!r}; pick one with policy=<name> "
            "(in quickstart: policy@train.policy=<name>)"
        )
    data = dict(data or {})
    if "type" in data or "moh" in data:
        data = upgrade_legacy(data)
    return from_dict(PolicyConfig, data, prefix="policy.")
