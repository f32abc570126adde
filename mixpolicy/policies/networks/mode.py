"""Mixture of denoising experts (MoDE): block MLPs routed by the noise embedding only.

The router sees only the noise embedding ``c``, so every token of a sample uses the same
experts and, at inference, the choice is a fixed function of the sampling step. Training
samples the top-k experts without replacement from the router's softmax
(``train_routing="sample"``) or takes the k most probable (``"topk"``); evaluation takes
the k most probable; the chosen probabilities are renormalized to sum to one.

Expert caching: for a fixed sampling schedule, :meth:`MoDEMLP.build_cache` fuses each
step's chosen experts (weights scaled by their probabilities) into one dense SwiGLU, keyed
by the step index. While a cache is active, a call with a step index it lacks raises
:class:`ExpertCacheMiss` instead of falling back to routing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mixpolicy.policies.config import MoDETransformerConfig
from mixpolicy.policies.networks.transformer import DenoisingTransformer


class ExpertCacheMiss(RuntimeError):
    """A cached MoDE layer was asked for a step its cache was not built for."""


def _init_stack(t: torch.Tensor, fan_in: int) -> torch.Tensor:
    bound = 1.0 / math.sqrt(fan_in)
    return nn.init.uniform_(t, -bound, bound)


class MoDEMLP(nn.Module):
    """``num_experts`` SwiGLU experts (+ optional shared expert) routed by the noise embedding."""

    def __init__(self, cfg: MoDETransformerConfig):
        super().__init__()
        w, e = cfg.width, cfg.num_experts
        self.hidden = hidden = max(1, int(w * cfg.mlp_ratio))
        self.num_experts, self.top_k = e, cfg.top_k
        self.sample_in_training = cfg.train_routing == "sample"
        # Stacked expert weights: w1 (gate) and w3 (value) are (E, hidden, w), w2 (E, w, hidden).
        self.w1 = nn.Parameter(_init_stack(torch.empty(e, hidden, w), w))
        self.w3 = nn.Parameter(_init_stack(torch.empty(e, hidden, w), w))
        self.w2 = nn.Parameter(_init_stack(torch.empty(e, w, hidden), hidden))
        router_hidden = max(1, int(w * cfg.router_hidden_ratio))
        self.router = nn.Sequential(nn.Linear(w, router_hidden), nn.GELU(), nn.Linear(router_hidden, e))
        self.shared = None
        if cfg.shared_expert:
            self.shared = nn.ParameterDict(
                {
                    "w1": nn.Parameter(_init_stack(torch.empty(hidden, w), w)),
                    "w3": nn.Parameter(_init_stack(torch.empty(hidden, w), w)),
                    "w2": nn.Parameter(_init_stack(torch.empty(w, hidden), hidden)),
                }
            )
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        # Router statistics of the last training forward, read by the policy's loss.
        self.aux: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ routing
    def route(self, c: torch.Tensor, sample: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indices (B, k), renormalized weights (B, k), logits (B, E)) for noise embeddings c."""
        logits = self.router(c).float()
        probs = logits.softmax(-1)
        if sample:
            idx = torch.multinomial(probs, self.top_k, replacement=False)
        else:
            idx = probs.topk(self.top_k, dim=-1).indices
        weights = probs.gather(1, idx)
        weights = weights / weights.sum(-1, keepdim=True)
        return idx, weights, logits

    @staticmethod
    def _swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)

    def forward(self, x: torch.Tensor, c: torch.Tensor, step: int | None = None) -> torch.Tensor:
        if self._cache is not None:
            if step is None or step not in self._cache:
                raise ExpertCacheMiss(
                    f"expert cache has no entry for sampling step {step!r} (it holds steps {sorted(self._cache)}); "
                    "rebuild it for this schedule or clear it"
                )
            w13, w2 = self._cache[step]
            a, v = F.linear(x, w13).chunk(2, dim=-1)
            return self.dropout(F.linear(F.silu(a) * v, w2))
        idx, weights, logits = self.route(c, sample=self.training and self.sample_in_training)
        b = x.shape[0]
        chosen = torch.zeros(b, self.num_experts, dtype=torch.bool, device=x.device).scatter_(1, idx, True)
        gate = torch.zeros(b, self.num_experts, dtype=weights.dtype, device=x.device).scatter_(1, idx, weights)
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            rows = chosen[:, e].nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            y = self._swiglu(x[rows], self.w1[e], self.w3[e], self.w2[e])
            # (under autocast y may be bf16 while the residual stream stays float32)
            out.index_add_(0, rows, (y * gate[rows, e].to(y.dtype)[:, None, None]).to(out.dtype))
        if self.shared is not None:
            out = out + self._swiglu(x, self.shared["w1"], self.shared["w3"], self.shared["w2"])
        if self.training:
            probs = logits.softmax(-1)
            # Switch-style balance: E * sum_i (mean router prob_i) * (share of assignments_i).
            share = chosen.float().mean(0) / self.top_k
            self.aux = {
                "load_balance": self.num_experts * (probs.mean(0) * share).sum(),
                "z_loss": torch.logsumexp(logits, dim=-1).pow(2).mean(),
                "usage": chosen.float().mean(0).detach(),
            }
        return self.dropout(out)

    # ------------------------------------------------------------------ caching
    @torch.no_grad()
    def build_cache(self, c_steps: torch.Tensor) -> list[list[int]]:
        """Fuse the chosen experts of each step; ``c_steps`` (S, width) are the steps'
        noise embeddings. Returns the experts chosen per step."""
        idx, weights, _ = self.route(c_steps, sample=False)
        cache, chosen = {}, []
        for s in range(c_steps.shape[0]):
            experts = idx[s].tolist()
            w1 = [self.w1[e] for e in experts]
            w3 = [self.w3[e] for e in experts]
            w2 = [self.w2[e] * weights[s, j].to(self.w2.dtype) for j, e in enumerate(experts)]
            if self.shared is not None:
                w1.append(self.shared["w1"])
                w3.append(self.shared["w3"])
                w2.append(self.shared["w2"])
            # One GEMM pair: first layer [gates; values] stacked, second layer side by side.
            cache[s] = (torch.cat(w1 + w3, dim=0).contiguous(), torch.cat(w2, dim=1).contiguous())
            chosen.append(experts)
        self._cache = cache
        return chosen

    def clear_cache(self) -> None:
        self._cache = None

    @property
    def cached(self) -> bool:
        return self._cache is not None

    def parameter_counts(self) -> tuple[int, int]:
        """(total, active per sample) parameters; active excludes the unchosen experts."""
        total = sum(p.numel() for p in self.parameters())
        per_expert = self.w1[0].numel() + self.w3[0].numel() + self.w2[0].numel()
        return total, total - (self.num_experts - self.top_k) * per_expert


def mode_mlp(cfg: MoDETransformerConfig, layer: int) -> nn.Module:
    """``mlp_factory`` for :class:`DenoisingTransformer`."""
    return MoDEMLP(cfg)


class MoDETransformer(DenoisingTransformer):
    """The denoising transformer with MoDE blocks.

    Adds the router losses (load balancing and z-loss, logged per training step), optional
    frozen routers for fine-tuning, and expert caching at inference: for the schedule being
    sampled, each block's chosen experts are fused per step index before sampling starts.
    The cache is dropped whenever the network switches to training mode or loads weights.
    """

    mlp_factory = staticmethod(mode_mlp)
    skips_parameters = True  # an expert no sample was routed to gets no gradient

    def __init__(self, cfg: MoDETransformerConfig, action_dim: int, horizon: int, n_cond_tokens: int, clean_prefix: bool = False):
        super().__init__(cfg, action_dim, horizon, n_cond_tokens, clean_prefix=clean_prefix)
        if cfg.freeze_router:
            for layer in self.moe_layers():
                layer.router.requires_grad_(False)
        self._cached_schedule: torch.Tensor | None = None
        self.register_load_state_dict_post_hook(lambda module, keys: module.clear_expert_cache())

    def moe_layers(self) -> list[MoDEMLP]:
        return [m for m in self.modules() if isinstance(m, MoDEMLP)]

    def parameter_counts(self) -> tuple[int, int]:
        total = sum(p.numel() for p in self.parameters())
        inactive = sum(t - a for t, a in (layer.parameter_counts() for layer in self.moe_layers()))
        return total, total - inactive

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
        logs = {"load_balance": float(balance.detach()), "router_z_loss": float(z.detach())}
        logs.update({f"expert_usage_{i}": float(u) for i, u in enumerate(usage)})
        for m in layers:
            m.aux = {}
        return self.cfg.load_balance_weight * balance + self.cfg.z_loss_weight * z, logs

    @torch.no_grad()
    def build_expert_cache(self, schedule: torch.Tensor, network_levels: torch.Tensor) -> list[list[list[int]]]:
        """Fuse each block's experts for every step of ``schedule`` (at ``network_levels``);
        returns the experts chosen per block and step."""
        c = self.noise_embed(network_levels.to(self.pos.device))
        chosen = [layer.build_cache(c) for layer in self.moe_layers()]
        self._cached_schedule = schedule.detach().cpu().clone()
        return chosen

    def clear_expert_cache(self) -> None:
        for layer in self.moe_layers():
            layer.clear_cache()
        self._cached_schedule = None

    def prepare_sampling(self, schedule, network_levels) -> None:
        if schedule is None or self.training or not self.cfg.expert_cache:
            self.clear_expert_cache()
            return
        cached = self._cached_schedule
        if cached is None or cached.shape != schedule.shape or not torch.equal(cached, schedule.detach().cpu()):
            self.build_expert_cache(schedule, network_levels)
