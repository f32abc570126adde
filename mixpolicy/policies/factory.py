"""Registries of policy parts: for each part, ``type`` -> (config dataclass, implementation).

Adding a part (a network, head or objective) is one module and one :func:`register` call;
:class:`~mixpolicy.policies.denoising_policy.DenoisingPolicy` builds whatever its config
names through :func:`build_network`, :func:`build_head` and :func:`make_objective`.
Configs never import implementations; this module imports both.
"""

from __future__ import annotations

from typing import Any, Callable

from mixpolicy.errors import UserError
from mixpolicy.policies.config import (
    DDPMConfig,
    EDMConfig,
    FlowConfig,
    HeadConfig,
    MoDETransformerConfig,
    MoHConfig,
    PART_CONFIGS,
    ShortcutConfig,
    TransformerConfig,
    register_part_config,
)
from mixpolicy.policies.heads import SingleHead
from mixpolicy.policies.moh import MoHHead
from mixpolicy.policies.networks.mode import MoDETransformer
from mixpolicy.policies.networks.transformer import DenoisingTransformer
from mixpolicy.policies.objectives import DDPMObjective, EDMObjective, FlowObjective
from mixpolicy.policies.shortcut import ShortcutObjective

# part -> type -> implementation (a class built from its config and the part's arguments)
IMPLEMENTATIONS: dict[str, dict[str, Callable[..., Any]]] = {"network": {}, "head": {}, "objective": {}}


def register(part: str, name: str, config_cls: type, implementation: Callable[..., Any]) -> None:
    """Make ``<part>.type: name`` mean ``config_cls`` configuring ``implementation``."""
    register_part_config(part, name, config_cls)
    IMPLEMENTATIONS[part][name] = implementation


def implementation(part: str, name: str) -> Callable[..., Any]:
    impls = IMPLEMENTATIONS[part]
    if name not in impls:
        raise UserError(f"config field 'policy.{part}.type': unknown {part} type {name!r}; choose from {sorted(impls)}")
    return impls[name]


def part_types(part: str) -> list[str]:
    return sorted(PART_CONFIGS[part][1])


def build_network(cfg: TransformerConfig, action_dim: int, horizon: int, n_cond_tokens: int, clean_prefix: bool = False, step_conditioned: bool = False):
    # step_conditioned (a shortcut objective: the network also embeds the step size) is only
    # passed when set, so networks that do not know it keep working with other objectives.
    extra = {"step_conditioned": True} if step_conditioned else {}
    return implementation("network", cfg.type)(cfg, action_dim, horizon, n_cond_tokens, clean_prefix=clean_prefix, **extra)


def build_head(cfg: HeadConfig, horizon: int, net):
    return implementation("head", cfg.type)(cfg, horizon, net)


def make_objective(cfg):
    return implementation("objective", cfg.type)(cfg)


register("network", "transformer", TransformerConfig, DenoisingTransformer)
register("network", "mode", MoDETransformerConfig, MoDETransformer)
register("head", "single", HeadConfig, SingleHead)
register("head", "moh", MoHConfig, MoHHead)
register("objective", "ddpm", DDPMConfig, DDPMObjective)
register("objective", "edm", EDMConfig, EDMObjective)
register("objective", "flow", FlowConfig, FlowObjective)
register("objective", "shortcut", ShortcutConfig, ShortcutObjective)
