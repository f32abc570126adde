"""Denoising transformer over [noise token, condition tokens, action tokens].

Two layouts of the condition (``network.condition``):

- ``joint``: one sequence [noise, condition..., actions...] through every block, so the
  condition tokens are recomputed at every denoising step.
- ``cached``: the condition tokens go through ``condition_layers`` blocks of their own once
  per chunk and become a memory; each block's attention of the [noise, actions...] stream
  reads that memory's keys and values (per-block projections) beside its own. Nothing of the
  memory depends on the noisy actions or the noise level, so :meth:`condition` computes it
  once per chunk and every denoising step runs only the action stream's tokens.

The network knows nothing about objectives: it maps (noisy actions, a scalar noise
condition per sample (with ``step_conditioned``: a level and a step size), condition tokens) to an output of the action's shape whose meaning
(epsilon, x0, velocity, ...) the objective defines.

Each block's feed-forward part comes from an ``mlp_factory(cfg, layer)``; its modules are
called as ``mlp(x, c, step)`` with the noise embedding ``c`` (B, width) and the sampling
step index (None in training), so mixtures routed by the noise level (MoDE) and their
per-step caches plug in without changing the blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mixpolicy.policies.config import TransformerConfig


class SinusoidalEmbedding(nn.Module):
    def __init__(self, dim: int, max_period: float = 10000.0):
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = x.float()[:, None] * self.freqs[None]
        return torch.cat([args.sin(), args.cos()], dim=-1)


class NoiseEmbedding(nn.Module):
    """Scalar noise condition -> width vector (sinusoidal features + MLP).

    With ``step_conditioned`` (shortcut models) the condition is (B, 2): the level and the
    step size, each through its own sinusoidal features and MLP, the two embeddings added.
    Without it the module holds exactly the level's parameters.
    """

    def __init__(self, width: int, step_conditioned: bool = False):
        super().__init__()
        self.sin = SinusoidalEmbedding(width)
        self.mlp = nn.Sequential(nn.Linear(width, width * 2), nn.SiLU(), nn.Linear(width * 2, width))
        self.step_mlp = nn.Sequential(nn.Linear(width, width * 2), nn.SiLU(), nn.Linear(width * 2, width)) if step_conditioned else None

    def forward(self, level: torch.Tensor) -> torch.Tensor:
        if self.step_mlp is None:
            if level.ndim != 1:
                raise ValueError(f"the noise condition must be (batch,), got {tuple(level.shape)}; a (batch, 2) condition needs a step-conditioned network")
            return self.mlp(self.sin(level))
        if level.ndim != 2 or level.shape[1] != 2:
            raise ValueError(f"a step-conditioned network takes (batch, 2) conditions [level, step size], got {tuple(level.shape)}")
        return self.mlp(self.sin(level[:, 0])) + self.step_mlp(self.sin(level[:, 1]))


def make_norm(kind: str, dim: int) -> nn.Module:
    """``rms``: RMSNorm; ``layer``: LayerNorm, one fused kernel on CPU where RMSNorm is several
    small ones (what batch-1 sampling pays for most)."""
    return nn.LayerNorm(dim) if kind == "layer" else nn.RMSNorm(dim)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, qk_norm: bool, dropout: float, norm: str = "rms"):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        head_dim = width // heads
        self.q_norm = make_norm(norm, head_dim) if qk_norm else nn.Identity()
        self.k_norm = make_norm(norm, head_dim) if qk_norm else nn.Identity()
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, memory: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``memory``: (keys, values) (B, heads, M, head_dim) every query may also attend to."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if memory is not None:
            k, v = torch.cat([memory[0], k], dim=2), torch.cat([memory[1], v], dim=2)
            if mask is not None:
                m = memory[0].shape[2]
                mask = torch.cat([mask.new_ones(*mask.shape[:-1], m), mask], dim=-1)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class MemoryProjection(nn.Module):
    """A block's keys and values of the condition memory (normed as the block's own keys)."""

    def __init__(self, width: int, attn: Attention, norm: str = "rms"):
        super().__init__()
        self.heads = attn.heads
        self.norm = make_norm(norm, width)
        self.kv = nn.Linear(width, 2 * width)

    def forward(self, memory: torch.Tensor, k_norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        b, m, d = memory.shape
        k, v = self.kv(self.norm(memory)).view(b, m, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return k_norm(k), v


@dataclass
class ConditionMemory:
    """The condition of a ``cached`` network, computed once per chunk by :meth:`DenoisingTransformer.condition`:
    per block, the memory's (keys, values) (B, heads, C, head_dim)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def batch(self) -> int:
        return self.kv[0][0].shape[0]

    def repeat_interleave(self, repeats: int) -> "ConditionMemory":
        return ConditionMemory([(k.repeat_interleave(repeats, dim=0), v.repeat_interleave(repeats, dim=0)) for k, v in self.kv])


class MLP(nn.Module):
    """Dense feed-forward block; ``c`` (the noise embedding) is accepted for API parity
    with mixture-of-experts blocks, which route on it."""

    def __init__(self, width: int, ratio: float, dropout: float):
        super().__init__()
        hidden = int(width * ratio)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # no kernel when off

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None, step: int | None = None) -> torch.Tensor:
        return self.dropout(self.fc2(F.gelu(self.fc1(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig, mlp: nn.Module, reads_memory: bool = False):
        super().__init__()
        self.norm1 = make_norm(cfg.norm, cfg.width)
        self.attn = Attention(cfg.width, cfg.heads, cfg.qk_norm, cfg.attn_dropout, cfg.norm)
        self.norm2 = make_norm(cfg.norm, cfg.width)
        self.mlp = mlp
        self.noise_conditioned = cfg.noise_conditioned_attention
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.memory = MemoryProjection(cfg.width, self.attn, cfg.norm) if reads_memory else None

    def forward(self, x: torch.Tensor, c: torch.Tensor | None, mask: torch.Tensor | None, step: int | None = None, memory=None, route=None) -> torch.Tensor:
        """``c``: the noise embeddings (B, width), None for blocks that never see the noise (the condition encoder);
        ``route``: what a mixture MLP routes on instead of ``c`` (MoDE's task routing)."""
        h = self.norm1(x)
        if self.noise_conditioned and c is not None:
            h = h + c[:, None, :]
        x = x + self.drop(self.attn(h, mask, memory))
        return x + self.mlp(self.norm2(x), c if route is None else route, step)


MLPFactory = Callable[[TransformerConfig, int], nn.Module]


def dense_mlp(cfg: TransformerConfig, layer: int) -> nn.Module:
    return MLP(cfg.width, cfg.mlp_ratio, cfg.dropout)


class DenoisingTransformer(nn.Module):
    """The dense network; mixtures (MoDE) extend it through the hooks below."""

    # True when a training step may leave parameters without a gradient (a mixture routing
    # samples to some experts only); data-parallel training then looks for them every step.
    skips_parameters = False
    mlp_factory = staticmethod(dense_mlp)

    def __init__(
        self,
        cfg: TransformerConfig,
        action_dim: int,
        horizon: int,
        n_cond_tokens: int,
        mlp_factory: MLPFactory | None = None,
        clean_prefix: bool = False,
        step_conditioned: bool = False,
    ):
        super().__init__()
        self.cfg = cfg
        self.horizon = horizon
        self.n_cond_tokens = n_cond_tokens
        self.per_token = k = cfg.actions_per_token
        if horizon % k:
            raise ValueError(f"horizon {horizon} is not a multiple of actions_per_token {k}")
        self.tokens = horizon // k  # action tokens, k consecutive actions each
        width = cfg.width
        self.noise_embed = NoiseEmbedding(width, step_conditioned)
        self.action_in = nn.Linear(k * action_dim, width)
        # Training-time real-time chunking: clean prefix actions enter through their own embedding.
        self.prefix_in = nn.Linear(action_dim, width) if clean_prefix else None
        self.pos = nn.Parameter(torch.zeros(1, 1 + n_cond_tokens + self.tokens, width))
        nn.init.normal_(self.pos, std=0.02)
        mlp_factory = mlp_factory or type(self).mlp_factory
        self.cached = cfg.condition == "cached"
        self.blocks = nn.ModuleList(Block(cfg, mlp_factory(cfg, i), reads_memory=self.cached) for i in range(cfg.depth))
        self.norm_out = make_norm(cfg.norm, width)
        self.action_out = nn.Linear(width, k * action_dim)
        if self.cached:
            # The condition encoder: blocks over the condition tokens alone, dense, noise-free.
            self.condition_blocks = nn.ModuleList(
                Block(cfg, MLP(width, 4.0, cfg.dropout)) for _ in range(cfg.condition_layers)
            )
        self.register_buffer("mask", self._build_mask(), persistent=False)
        # Set by prepare_sampling for one chunk: (the per-step stream's position embeddings,);
        # None in training. _level_cache: (step, shape, ...) -> (level, its noise embedding).
        # (A tuple: a joint network's stream_pos is the ``pos`` Parameter itself, which assigned
        # bare would register as a second parameter.)
        self._sampling: tuple[torch.Tensor] | None = None
        self._level_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cache_version: tuple = ()

    @property
    def n_stream_prefix(self) -> int:
        """Tokens before the actions in the sequence the blocks run per denoising step:
        the noise token, and the condition tokens in the joint layout."""
        return 1 if self.cached else 1 + self.n_cond_tokens

    def stream_pos(self) -> torch.Tensor:
        """Position embeddings (1, n_stream_prefix + tokens, width) of that sequence."""
        if not self.cached:
            return self.pos
        if self._sampling is not None and not torch.is_grad_enabled():  # (never a detached copy into a graph)
            return self._sampling[0]
        return torch.cat([self.pos[:, :1], self.pos[:, 1 + self.n_cond_tokens :]], dim=1)

    def stream_source(self, c: torch.Tensor, cond: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """The per-step sequence before position embeddings: [noise, (condition,) actions]."""
        parts = [c[:, None, :], actions] if self.cached else [c[:, None, :], cond, actions]
        return torch.cat(parts, dim=1)

    def condition(self, cond):
        """The condition as the blocks read it, computed once per chunk: the tokens themselves
        (joint layout), or the :class:`ConditionMemory` of the cached layout. Accepts its own
        output, so callers may pass either."""
        if not self.cached or isinstance(cond, ConditionMemory):
            return cond
        if cond.shape[1] != self.n_cond_tokens:
            raise ValueError(f"cond has {cond.shape[1]} tokens; this network takes {self.n_cond_tokens}")
        memory = cond + self.pos[:, 1 : 1 + self.n_cond_tokens]
        for block in self.condition_blocks:
            memory = block(memory, None, None)
        return ConditionMemory([block.memory(memory, block.attn.k_norm) for block in self.blocks])

    def _build_mask(self) -> torch.Tensor | None:
        if self.cfg.action_attention == "bidirectional":
            return None
        n_prefix = self.n_stream_prefix
        n = n_prefix + self.tokens
        allowed = torch.zeros(n, n, dtype=torch.bool)
        allowed[:, :n_prefix] = True  # everyone sees the noise and condition tokens
        allowed[n_prefix:, n_prefix:] = torch.tril(torch.ones(self.tokens, self.tokens, dtype=torch.bool))
        return allowed

    def attention_mask(self, action_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Boolean mask (True: may attend), shared (N, N) or per sample (B, 1, N, N)."""
        if action_padding_mask is None:
            return self.mask
        b = action_padding_mask.shape[0]
        n_prefix = self.n_stream_prefix
        keys = torch.cat(
            [torch.ones(b, n_prefix, dtype=torch.bool, device=action_padding_mask.device), ~action_padding_mask.bool()], dim=1
        )
        allowed = keys[:, None, None, :]
        if self.mask is not None:
            allowed = allowed & self.mask
        return allowed

    def encode(
        self,
        x: torch.Tensor,
        level: torch.Tensor,
        cond: torch.Tensor,
        step: int | None = None,
        action_padding_mask: torch.Tensor | None = None,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The final (normed) action tokens (B, H / actions_per_token, width), before the output projection.

        ``action_padding_mask`` (B, H), True for padded actions, hides those actions as
        keys (the condition tokens stay visible, so no query is left without keys).
        """
        if x.shape[1] != self.horizon:
            raise ValueError(f"x has {x.shape[1]} actions; this network takes horizon={self.horizon}")
        c = self.embed_level(level, step)
        cond = self.condition(cond)
        tokens = self.stream_source(c, cond, self.embed_actions(x, prefix)) + self.stream_pos()
        tokens = self.run_blocks(tokens, c, self.attention_mask(action_padding_mask), step, cond)
        return self.norm_out(tokens[:, -self.tokens :])

    def run_blocks(self, tokens: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None, step: int | None = None, cond=None) -> torch.Tensor:
        """The blocks on already embedded tokens (B, N, width), noise embeddings ``c``
        (B, width) and a boolean mask (True: may attend); the output is not yet normed.
        Callers that lay tokens out differently (several sequences packed in a row, as the
        mixture of horizons does) use this with their own mask. ``cond``: the
        :class:`ConditionMemory` (one per row of ``tokens``) of a cached network."""
        if self.cached and not isinstance(cond, ConditionMemory):
            raise ValueError("a cached-condition network's blocks need its ConditionMemory (network.condition(cond))")
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, c, mask, step, cond.kv[i] if self.cached else None)
        return tokens

    def forward(
        self,
        x: torch.Tensor,
        level: torch.Tensor,
        cond: torch.Tensor,
        step: int | None = None,
        action_padding_mask: torch.Tensor | None = None,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x: (B, H, A) noisy actions; level: (B,) noise condition; cond: (B, C, width) tokens
        (or, for a cached network, their :meth:`condition`);
        step: the sampling step index (expert caches are keyed by it); prefix: (clean
        actions (B, H, A), mask (B, H)) for a network with ``clean_prefix``."""
        out = self.action_out(self.encode(x, level, cond, step, action_padding_mask, prefix))
        return out.view(x.shape) if self.per_token > 1 else out

    def embed_actions(self, x: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Action tokens (B, H, width); masked positions of ``prefix`` embed its clean actions."""
        tokens = self.action_in(x.reshape(x.shape[0], self.tokens, -1) if self.per_token > 1 else x)
        if prefix is None:
            return tokens
        if self.prefix_in is None:
            raise ValueError("a clean action prefix needs a policy trained with policy.train_delay_max > 0")
        values, mask = prefix
        return torch.where(mask[..., None], self.prefix_in(values.to(x.dtype)), tokens)

    def embed_level(self, level: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """The noise embeddings (B, width) of ``level``. While sampling (``step`` given, after
        :meth:`prepare_sampling`), the embedding of a step's level is computed once and reused
        by later chunks with the same level, batch and weights: the same numbers, bit for bit."""
        if step is None or self._sampling is None or self.training or torch.compiler.is_compiling():
            return self.noise_embed(level)  # (a compiled network computes it in its graph)
        key = (step, tuple(level.shape), level.device, level.dtype, torch.is_autocast_enabled(level.device.type))
        hit = self._level_cache.get(key)
        if hit is not None and torch.equal(hit[0], level):
            return hit[1]
        c = self.noise_embed(level)
        if len(self._level_cache) >= 256:
            self._level_cache.clear()
        self._level_cache[key] = (level.clone(), c)
        return c

    def _weights_version(self) -> tuple:
        """Changes whenever a parameter of the noise embedding is replaced or updated in place
        (optimizer steps, load_state_dict, EMA copies)."""
        return tuple((id(q), q._version) for q in self.noise_embed.parameters())

    # ------------------------------------------------------------------ hooks
    def prepare_sampling(self, schedule: torch.Tensor | None, network_levels: torch.Tensor | None) -> None:
        """Called before sampling ``schedule`` (None: training or uncached evaluation): readies
        what no denoising step changes (the stream's position embeddings; the noise embeddings'
        reuse) for the chunk. Subclasses extend it (MoDE's expert cache)."""
        if schedule is None or self.training or torch.is_grad_enabled():
            self._sampling = None
            self._level_cache.clear()
            return
        version = self._weights_version()
        if version != self._cache_version:
            self._level_cache.clear()
            self._cache_version = version
        self._sampling = None  # stream_pos below computes from the parameters
        self._sampling = (self.stream_pos(),)

    def check_routing(self, n_tasks: int, task_conditioned: bool) -> None:
        """Refuse a routing the policy cannot feed (MoDE's task routing needs a goal)."""

    def set_routing_context(self, goal: torch.Tensor | None, task: torch.Tensor | None) -> None:
        """The goal embeddings (B, width) and task indices (B,) of the batch the policy just
        encoded, for networks that route on the task; dense networks ignore them."""

    def auxiliary_losses(self) -> tuple[torch.Tensor | float, dict[str, float]]:
        """Extra weighted loss terms of the last training forward, and their logs."""
        return 0.0, {}

    def parameter_counts(self) -> tuple[int, int]:
        """(total, active per sample) parameters; dense networks use every one."""
        total = sum(p.numel() for p in self.parameters())
        return total, total
