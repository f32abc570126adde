"""MoDE policy: the denoising policy with mixture-of-denoising-experts blocks.

Adds the router losses (load balancing and z-loss, logged per training step), optional
frozen routers for fine-tuning, and expert caching at inference: for the schedule being
sampled, each block's chosen experts are fused per step index before sampling starts.
The cache is dropped whenever the policy switches to training mode or loads weights.
"""

from __future__ import annotations

import torch

from mixpolicy.policies.denoising_policy import DenoisingPolicy
from mixpolicy.policies.networks.mode import MoDEMLP, mode_mlp


class MoDEPolicy(DenoisingPolicy):
    mlp_factory = staticmethod(mode_mlp)
    may_skip_parameters = True  # an expert no sample was routed to gets no gradient

    def __init__(self, cfg, shape_meta, normalizer=None):
        super().__init__(cfg, shape_meta, normalizer)
        if cfg.network.freeze_router:
            for layer in self.moe_layers():
                layer.router.requires_grad_(False)
        self._cached_schedule: torch.Tensor | None = None
        self.register_load_state_dict_post_hook(lambda module, keys: module.clear_expert_cache())

    def moe_layers(self) -> list[MoDEMLP]:
        return [m for m in self.net.modules() if isinstance(m, MoDEMLP)]

    def parameter_counts(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.parameters())
        inactive = sum(t - a for t, a in (layer.parameter_counts() for layer in self.moe_layers()))
        return {"total": total, "active": total - inactive}

    # ------------------------------------------------------------------ training
    def train(self, mode: bool = True):
        if mode:
            self.clear_expert_cache()
        return super().train(mode)

    def auxiliary_losses(self):
        layers = [m for m in self.moe_layers() if m.aux]
        if not layers or not self.training:
            return 0.0, {}
        balance = torch.stack([m.aux["load_balance"] for m in layers]).mean()
        z = torch.stack([m.aux["z_loss"] for m in layers]).mean()
        usage = torch.stack([m.aux["usage"] for m in layers]).mean(0)
        net = self.cfg.network
        logs = {"load_balance": float(balance.detach()), "router_z_loss": float(z.detach())}
        logs.update({f"expert_usage_{i}": float(u) for i, u in enumerate(usage)})
        for m in layers:
            m.aux = {}
        return net.load_balance_weight * balance + net.z_loss_weight * z, logs

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def build_expert_cache(self, schedule: torch.Tensor) -> list[list[list[int]]]:
        """Fuse each block's experts for every step of ``schedule``; returns the experts
        chosen per block and step."""
        levels = self.objective.network_level(schedule.to(self.device))
        c = self.net.noise_embed(levels)
        chosen = [layer.build_cache(c) for layer in self.moe_layers()]
        self._cached_schedule = schedule.detach().cpu().clone()
        return chosen

    def clear_expert_cache(self) -> None:
        for layer in self.moe_layers():
            layer.clear_cache()
        self._cached_schedule = None

    def prepare_sampling(self, schedule: torch.Tensor | None) -> None:
        if schedule is None or self.training or not self.cfg.network.expert_cache:
            self.clear_expert_cache()
            return
        cached = self._cached_schedule
        if cached is None or cached.shape != schedule.shape or not torch.equal(cached, schedule.detach().cpu()):
            self.build_expert_cache(schedule)
