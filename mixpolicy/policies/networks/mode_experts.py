"""MoDE's mixture layer: SwiGLU experts, their router and their per-step fused caches
(see :mod:`mixpolicy.policies.networks.mode`)."""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mixpolicy.policies.config import MoDETransformerConfig


class ExpertCacheMiss(RuntimeError):
    """A cached MoDE layer was asked for a step its cache was not built for."""


def _init_stack(t: torch.Tensor, fan_in: int) -> torch.Tensor:
    bound = 1.0 / math.sqrt(fan_in)
    return nn.init.uniform_(t, -bound, bound)


# Fused entries a task-routed layer keeps (least recently used dropped first).
TASK_CACHE_ENTRIES = 256


@dataclass
class RouteInput:
    """What a MoDE layer routes one network call on, built by :class:`MoDETransformer`.

    ``vector`` (B, router input width); ``groups``: (L, rows) pairs, the samples ``rows``
    (None: all) routed among the first L experts, None when every sample may use all;
    ``key``: the expert-cache key of the whole batch, (step, task) for goal routing or
    (step, L) for noise routing, when the batch allows it; None when it mixes tasks
    (such a call is routed, uncached)."""

    vector: torch.Tensor
    groups: list[tuple[int, torch.Tensor | None]] | None
    key: tuple | None


class ExpertStage(nn.Module):
    """Experts added to a trained layer, with their router outputs (from the router's hidden layer)."""

    def __init__(self, n: int, width: int, hidden: int, router_hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(_init_stack(torch.empty(n, hidden, width), width))
        self.w3 = nn.Parameter(_init_stack(torch.empty(n, hidden, width), width))
        self.w2 = nn.Parameter(_init_stack(torch.empty(n, width, hidden), hidden))
        self.router = nn.Linear(router_hidden, n)


class MoDEMLP(nn.Module):
    """``num_experts`` SwiGLU experts (+ optional shared expert) routed per sample."""

    def __init__(self, cfg: MoDETransformerConfig):
        super().__init__()
        w, e = cfg.width, cfg.num_experts
        self.hidden = hidden = max(1, int(w * cfg.mlp_ratio))
        self.num_experts, self.top_k = e, cfg.top_k
        self.sample_in_training = cfg.train_routing == "sample"
        base = e - sum(cfg.added_experts)
        # Stacked expert weights: w1 (gate) and w3 (value) are (E, hidden, w), w2 (E, w, hidden).
        self.w1 = nn.Parameter(_init_stack(torch.empty(base, hidden, w), w))
        self.w3 = nn.Parameter(_init_stack(torch.empty(base, hidden, w), w))
        self.w2 = nn.Parameter(_init_stack(torch.empty(base, w, hidden), hidden))
        router_hidden = max(1, int(w * cfg.router_hidden_ratio))
        router_in = 2 * w if cfg.router_input == "both" else w
        self.router = nn.Sequential(nn.Linear(router_in, router_hidden), nn.GELU(), nn.Linear(router_hidden, base))
        self.stages = nn.ModuleList(ExpertStage(n, w, hidden, router_hidden) for n in cfg.added_experts)
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
        self._cache: dict | None = None
        # Router statistics of the last training forward, read by the policy's loss.
        self.aux: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ routing
    def experts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All experts' stacked (w1, w3, w2), the added stages after the first ones."""
        if not self.stages:
            return self.w1, self.w3, self.w2
        return tuple(torch.cat([getattr(self, n), *(getattr(s, n) for s in self.stages)]) for n in ("w1", "w3", "w2"))

    def router_logits(self, c: torch.Tensor) -> torch.Tensor:
        """(B, E) float logits of every expert, the added stages' after the first ones."""
        if not self.stages:
            return self.router(c).float()
        h = self.router[1](self.router[0](c))
        return torch.cat([self.router[2](h), *(s.router(h) for s in self.stages)], dim=-1).float()

    def _pick(self, logits: torch.Tensor, sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
        probs = logits.softmax(-1)
        if sample:
            idx = torch.multinomial(probs, self.top_k, replacement=False)
        else:
            idx = probs.topk(self.top_k, dim=-1).indices
        weights = probs.gather(1, idx)
        return idx, weights / weights.sum(-1, keepdim=True)

    def route(self, c: torch.Tensor, sample: bool, groups=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indices (B, k), renormalized weights (B, k), logits (B, E), -inf where a sample may
        not go) for router inputs c; ``groups`` as :class:`RouteInput`'s. A group limited to
        the first L experts is routed on those L logits alone, exactly as the network was
        before experts were added."""
        logits = self.router_logits(c)
        if groups is None:
            return (*self._pick(logits, sample), logits)
        b, k = logits.shape[0], self.top_k
        idx = torch.empty(b, k, dtype=torch.long, device=logits.device)
        weights = torch.empty(b, k, dtype=logits.dtype, device=logits.device)
        limit = torch.empty(b, dtype=torch.long, device=logits.device)
        for n, rows in groups:
            rows = slice(None) if rows is None else rows
            idx[rows], weights[rows] = self._pick(logits[rows, :n].contiguous(), sample)
            limit[rows] = n
        masked = logits.masked_fill(torch.arange(logits.shape[1], device=logits.device)[None, :] >= limit[:, None], float("-inf"))
        return idx, weights, masked

    @staticmethod
    def _swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)

    def forward(self, x: torch.Tensor, c: "torch.Tensor | RouteInput", step: int | None = None) -> torch.Tensor:
        """``c``: the noise embeddings (B, width), or a :class:`RouteInput`."""
        groups = None
        if isinstance(c, RouteInput):
            groups = c.groups
            if self._cache is not None and step is not None and c.key is not None:
                return self._fused(x, self._task_entry(c))
            c = c.vector
        elif self._cache is not None:
            if step is None or step not in self._cache:
                raise ExpertCacheMiss(
                    f"expert cache has no entry for sampling step {step!r} (it holds steps {sorted(self._cache)}); "
                    "rebuild it for this schedule or clear it"
                )
            return self._fused(x, self._cache[step])
        if self._cache is not None and step is None:
            raise ExpertCacheMiss("an expert-cached layer was called without a sampling step; clear the cache for uncached evaluation")
        idx, weights, logits = self.route(c, sample=self.training and self.sample_in_training, groups=groups)
        w1s, w3s, w2s = self.experts()
        b = x.shape[0]
        chosen = torch.zeros(b, self.num_experts, dtype=torch.bool, device=x.device).scatter_(1, idx, True)
        gate = torch.zeros(b, self.num_experts, dtype=weights.dtype, device=x.device).scatter_(1, idx, weights)
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            rows = chosen[:, e].nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            y = self._swiglu(x[rows], w1s[e], w3s[e], w2s[e])
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
    def _fused(self, x: torch.Tensor, entry: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        w13, w2 = entry
        a, v = F.linear(x, w13).chunk(2, dim=-1)
        return self.dropout(F.linear(F.silu(a) * v, w2))

    def _fuse(self, experts: list[int], weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One dense SwiGLU of the chosen experts, the second layer scaled by their weights."""
        w1s, w3s, w2s = self.experts()
        w1 = [w1s[e] for e in experts]
        w3 = [w3s[e] for e in experts]
        w2 = [w2s[e] * weights[j].to(w2s.dtype) for j, e in enumerate(experts)]
        if self.shared is not None:
            w1.append(self.shared["w1"])
            w3.append(self.shared["w3"])
            w2.append(self.shared["w2"])
        # One GEMM pair: first layer [gates; values] stacked, second layer side by side.
        return torch.cat(w1 + w3, dim=0).contiguous(), torch.cat(w2, dim=1).contiguous()

    @torch.no_grad()
    def _task_entry(self, route: RouteInput) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused experts of ``route.key``, fused from the batch's first sample on first use."""
        cache = self._cache
        if route.key in cache:
            cache.move_to_end(route.key)
            return cache[route.key]
        groups = None if route.groups is None else [(route.groups[0][0], None)]  # the batch has one limit
        idx, weights, _ = self.route(route.vector[:1], sample=False, groups=groups)
        cache[route.key] = entry = self._fuse(idx[0].tolist(), weights[0])
        while len(cache) > TASK_CACHE_ENTRIES:
            cache.popitem(last=False)
        return entry

    @torch.no_grad()
    def build_cache(self, c_steps: torch.Tensor, limits: list[int] | None = None) -> list[list[int]]:
        """Fuse the chosen experts of each step; ``c_steps`` (S, width) are the steps'
        noise embeddings. Returns the experts chosen per step. With ``limits`` (per-task
        expert limits), entries are keyed (step, L) for each limit L."""
        cache, chosen = OrderedDict(), []
        for n in limits or [None]:
            idx, weights, _ = self.route(c_steps, sample=False, groups=None if n is None else [(n, None)])
            for s in range(c_steps.shape[0]):
                experts = idx[s].tolist()
                cache[s if n is None else (s, n)] = self._fuse(experts, weights[s])
                chosen.append(experts)
        self._cache = cache
        return chosen

    def start_task_cache(self) -> None:
        """An empty cache for task-dependent routing, filled per (step, task) on use."""
        self._cache = OrderedDict()

    def clear_cache(self) -> None:
        self._cache = None

    def cache_state(self):
        """The current cache (kept by the network per schedule, see ``restore_cache``)."""
        return self._cache

    def restore_cache(self, state) -> None:
        self._cache = state

    @property
    def cached(self) -> bool:
        return self._cache is not None

    def parameter_counts(self) -> tuple[int, int]:
        """(total, active per sample) parameters; active excludes the unchosen experts."""
        total = sum(p.numel() for p in self.parameters())
        per_expert = self.w1[0].numel() + self.w3[0].numel() + self.w2[0].numel()
        return total, total - (self.num_experts - self.top_k) * per_expert

    def stage_parameters(self, stage: int) -> list[nn.Parameter]:
        """The parameters of added stage ``stage`` (its experts and router outputs)."""
        return list(self.stages[stage].parameters())
