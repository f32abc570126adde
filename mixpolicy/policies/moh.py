"""Mixture of horizons (MoH): one chunk, several nested horizons, fused per action index.

For horizons h_1 < ... < h_K = H, every horizon's prefix ``x[:, :h_k]`` of the same noisy
chunk (same noise, same level) goes through the policy's own denoiser in one network
call. Each horizon's sequence [noise, condition..., actions[:h_k]] gets a slot in rows
of one full-length sequence each; shorter horizons share a row (:class:`HorizonLayout`)
and a block-diagonal mask keeps every sequence to itself, so horizon k's outputs are
those of the network run on its prefix with the padded action keys masked, without
paying for the padding. A linear gate on each output token gives a logit per horizon;
indices a horizon does not cover get -inf, and a softmax over horizons gives the weights
alpha[k, j] that fuse the horizons' outputs into one prediction per index.

The head works on whatever the network outputs (epsilon, x0, velocity, EDM's F): it uses
the network's embeddings, blocks (``run_blocks``, dense or MoDE, with their per-step
expert caches) and output projection, and leaves objectives and samplers alone. Training scores the fused prediction and every horizon's own
prefix against the objective's target in one ``objective.loss`` call (the prediction
carries a leading head dimension that the loss broadcasts over), plus a gate-balance term.

Adaptive execution ("cross-horizon consensus"): at every denoising step each horizon's
output is taken through the objective's step (first-order, so Heun's second evaluation
is not repeated per horizon) and compared with the fused step; the disagreement
d[b, j] += sum_k alpha[k, b, j] * |step_k - step_fused|_1 accumulates over the steps.
Afterwards each sample executes its first ``min_executed`` actions and extends while
d[b, j] <= ratio * mean(d[b, :min_executed]) and at least ``min_active_horizons``
horizons cover j. Everything is batched: lengths are per sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixpolicy.policies.config import MoHConfig
from mixpolicy.policies.heads import SingleHead, masked_mean, select_rows
from mixpolicy.policies.solvers import first_order_update, sample


def horizon_padding(horizons: list[int], chunk: int, device=None) -> torch.Tensor:
    """(K, chunk) bool, True where index j is past horizon k (j >= h_k)."""
    h = torch.as_tensor(horizons, device=device)
    return torch.arange(chunk, device=device)[None, :] >= h[:, None]


def active_horizons(horizons: list[int], chunk: int, device=None) -> torch.Tensor:
    """(chunk,) long: how many horizons cover each action index."""
    return (~horizon_padding(horizons, chunk, device)).sum(0)


def gate_balance(alpha: torch.Tensor, horizons: list[int]) -> torch.Tensor:
    """Squared coefficient of variation of the mean gate weight of the active horizons,
    averaged over the segments between horizon boundaries that two or more horizons cover.

    ``alpha`` is (K, B, H). Segment s = [h_{s-1}, h_s) is covered by horizons s..K-1.
    """
    starts = [0, *horizons[:-1]]
    terms = []
    for s, (lo, hi) in enumerate(zip(starts, horizons)):
        if len(horizons) - s < 2:
            continue
        mean_weight = alpha[s:, :, lo:hi].mean(dim=(1, 2))  # (active,)
        terms.append(mean_weight.var(unbiased=False) / mean_weight.mean().pow(2).clamp_min(1e-12))
    if not terms:
        return alpha.new_zeros(())
    return torch.stack(terms).mean()


def adaptive_lengths(
    disagreement: torch.Tensor,
    horizons: list[int],
    ratio: float,
    min_executed: int,
    min_active_horizons: int,
) -> torch.Tensor:
    """(B,) executable prefix lengths from the accumulated disagreement (B, H).

    Each sample runs ``min_executed`` actions and extends while its disagreement stays
    within ``ratio`` times its mean over those first actions and at least
    ``min_active_horizons`` horizons cover the index.
    """
    b, h = disagreement.shape
    if not 1 <= min_executed <= h:
        raise ValueError(f"min_executed={min_executed} must be in [1, {h}]")
    tau = ratio * disagreement[:, :min_executed].mean(dim=1, keepdim=True)
    covered = active_horizons(horizons, h, disagreement.device) >= min_active_horizons
    ok = (disagreement <= tau) & covered[None, :]
    ok[:, :min_executed] = True
    return ok.long().cumprod(dim=1).sum(dim=1)


class HorizonLayout:
    """How the K horizon sequences [noise, condition..., actions[:h_k]] are packed into rows.

    A row holds ``n_prefix + H`` tokens, one full-length sequence's worth. Sequences are
    placed first-fit by decreasing length, so shorter horizons share a row ({4, 8, 16}
    with 4 prefix tokens: [16] and [4 | 8], two rows instead of three). A block-diagonal
    mask keeps each sequence to itself, with the network's own mask (causal or not)
    inside each block; unused slots attend only to themselves and nothing attends to
    them. Horizon k's valid outputs are those of the network run on its prefix alone
    with padded keys masked, as :meth:`DenoisingTransformer.encode` with an
    ``action_padding_mask`` computes them, at the cost of the tokens that exist.
    ``pack=False`` gives every horizon its own padded row (for comparisons).
    """

    def __init__(self, horizons: list[int], n_prefix: int, base_mask: torch.Tensor | None, pack: bool = True):
        chunk = horizons[-1]
        self.row_length = length = n_prefix + chunk
        lengths = [n_prefix + h for h in horizons]
        fill: list[int] = []
        place: list[tuple[int, int]] = [(0, 0)] * len(horizons)
        for k in sorted(range(len(horizons)), key=lambda i: -lengths[i]):
            row = next((r for r, used in enumerate(fill) if used + lengths[k] <= length), None) if pack else None
            if row is None:
                row = len(fill)
                fill.append(0)
            place[k] = (row, fill[row])
            fill[row] += lengths[k]
        self.rows = rows = len(fill)
        unused = n_prefix + chunk  # index of the zero token in the source sequence
        source = torch.full((rows, length), unused, dtype=torch.long)
        position = torch.zeros(rows, length, dtype=torch.long)
        allowed = torch.zeros(rows, length, length, dtype=torch.bool)
        base = base_mask if base_mask is not None else torch.ones(length, length, dtype=torch.bool)
        slots = torch.zeros(len(horizons), chunk, dtype=torch.long)
        for k, (row, offset) in enumerate(place):
            n = lengths[k]
            source[row, offset : offset + n] = torch.arange(n)
            position[row, offset : offset + n] = torch.arange(n)
            allowed[row, offset : offset + n, offset : offset + n] = base[:n, :n]
            slots[k, : horizons[k]] = row * length + offset + n_prefix + torch.arange(horizons[k])
        free = source == unused
        allowed[free] = False
        allowed.diagonal(dim1=1, dim2=2)[free] = True  # a query needs a key: its own
        self.source_index, self.position, self.action_slots = source, position, slots
        # One full-length sequence per row needs no mask beyond the network's own.
        single = rows == len(horizons) and all(n == length for n in lengths)
        self.mask = base_mask if single else allowed

    def to(self, device) -> "HorizonLayout":
        for name in ("source_index", "position", "action_slots"):
            setattr(self, name, getattr(self, name).to(device))
        if self.mask is not None:
            self.mask = self.mask.to(device)
        return self


class MoHHead(SingleHead):
    """The mixture-of-horizons head on any network (dense or MoDE) and objective.

    :meth:`forward` returns the fused prediction, so RTI warm starts, k selection and
    every solver work unchanged; :meth:`horizon_forward` gives the per-horizon outputs
    and gate weights the loss and the consensus need.
    """

    def __init__(self, cfg: MoHConfig, horizon: int, net):
        super().__init__(cfg, horizon, net)
        width = net.cfg.width
        self.gate = nn.Linear(width, 1)
        self.gate_noise = nn.Linear(width, 1)
        # Start from equal weights over the active horizons.
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        self.register_buffer("horizon_pad", horizon_padding(cfg.horizons, horizon), persistent=False)
        self._layout = HorizonLayout(cfg.horizons, net.n_stream_prefix, net.mask)
        self.last_disagreement: torch.Tensor | None = None  # (B, H) of the last sampled batch
        # Capture hook for rollout recordings (`mixpolicy eval rerun=true`); off, sampling keeps nothing.
        self.capture_horizon_predictions = False
        self.last_horizon_predictions: torch.Tensor | None = None  # (K, B, H, A) normalized, see sample()

    @property
    def adaptive(self) -> bool:
        return self.cfg.execution == "adaptive"

    @property
    def layout(self) -> HorizonLayout:
        """The packing of the horizons' sequences, on the head's device."""
        if self._layout.position.device != self.horizon_pad.device:
            self._layout.to(self.horizon_pad.device)
        return self._layout

    def set_layout(self, layout: HorizonLayout) -> None:
        self._layout = layout

    def horizon_forward(
        self,
        net,
        x: torch.Tensor,
        level: torch.Tensor,
        cond: torch.Tensor,
        step: int | None = None,
        generator: torch.Generator | None = None,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every horizon on its prefix of ``x`` (B, H, A) in one network call.

        Returns (fused (B, H, A), per-horizon outputs (K, B, H, A) with zeros past each
        horizon, gate weights alpha (K, B, H), zero where a horizon does not reach).
        """
        layout = self.layout
        k = len(self.cfg.horizons)
        b, h, _ = x.shape
        if h != self.horizon:
            raise ValueError(f"x has {h} actions; this policy takes horizon={self.horizon}")
        # (a step-conditioned network's condition is (B, 2): level and step size)
        c = net.embed_level(level.expand(b, -1) if level.ndim == 2 else level.reshape(-1).expand(b), step)
        width = c.shape[-1]
        cond = net.condition(cond)
        # Source tokens in sequence order [noise, (condition...,) actions...] plus one zero
        # token for unused slots; each packed row gathers its horizons' sequences from it.
        source = torch.cat([net.stream_source(c, cond, net.embed_actions(x, prefix)), c.new_zeros(b, 1, width)], dim=1)
        tokens = source[:, layout.source_index.flatten()] + net.stream_pos()[0, layout.position.flatten()]
        rows = layout.rows
        tokens = tokens.view(b * rows, layout.row_length, width)
        mask = layout.mask
        if mask is not None and mask.ndim == 3:
            mask = mask[None].expand(b, -1, -1, -1).reshape(b * rows, 1, layout.row_length, layout.row_length)
        memory = cond.repeat_interleave(rows) if net.cached else None
        tokens = net.run_blocks(tokens, c.repeat_interleave(rows, dim=0), mask, step, memory)
        tokens = tokens.view(b, rows * layout.row_length, width)[:, layout.action_slots.flatten()]
        tokens = net.norm_out(tokens.view(b, k, h, width).transpose(0, 1))  # (K, B, H, W)
        pad = self.horizon_pad
        out = net.action_out(tokens).masked_fill(pad[:, None, :, None], 0.0)
        logits = self.gate(tokens).squeeze(-1).float()
        if self.training and self.cfg.gate_noise:
            scale = F.softplus(self.gate_noise(tokens).squeeze(-1).float()) + self.cfg.gate_noise_floor
            noise = torch.randn(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
            logits = logits + noise * scale
        alpha = logits.masked_fill(pad[:, None, :], float("-inf")).softmax(dim=0)
        fused = (alpha.unsqueeze(-1).to(out.dtype) * out).sum(0)
        return fused, out, alpha

    def forward(self, net, x, level, cond, step=None, prefix=None):
        return self.horizon_forward(net, x, level, cond, step, prefix=prefix)[0]

    def loss(self, net, objective, cond, actions, generator=None, prefix_mask=None):
        moh = self.cfg
        seen: dict[str, torch.Tensor] = {}
        prefix = None if prefix_mask is None else (actions, prefix_mask)

        def stacked(x, level, step=None, rows=None):
            c, p = select_rows(cond, prefix, rows)
            fused, heads, alpha = self.horizon_forward(net, x, level, c, step, generator, p)
            if rows is None:  # the gate balance is scored on the whole batch's call
                seen["alpha"] = alpha
            return torch.cat([fused.unsqueeze(0), heads], dim=0)  # (1 + K, B, H, A): the fused prediction first

        per_elem = objective.loss(stacked, actions, generator)  # broadcast against one target
        fused_loss = masked_mean(per_elem[0], prefix_mask)
        horizon_losses = [
            masked_mean(per_elem[1 + i, :, :h], None if prefix_mask is None else prefix_mask[:, :h]) for i, h in enumerate(moh.horizons)
        ]
        balance = gate_balance(seen["alpha"], moh.horizons)
        loss = moh.fused_loss_weight * fused_loss + moh.horizon_loss_weight * torch.stack(horizon_losses).sum()
        loss = loss + moh.balance_loss_weight * balance
        logs = {
            "denoise_loss": float(fused_loss.detach()),
            "fused_loss": float(fused_loss.detach()),
            **{f"horizon_loss_{h}": float(v.detach()) for h, v in zip(moh.horizons, horizon_losses)},
            "gate_balance": float(balance.detach()),
            **{f"gate_weight_{h}": float(w) for h, w in zip(moh.horizons, seen["alpha"].detach().mean(dim=(1, 2)))},
        }
        return loss, logs

    @torch.no_grad()
    def sample(self, net, objective, cond, x, schedule, start=0, generator=None, constraint=None):
        """The fused chunk, tracking cross-horizon consensus; with adaptive execution also
        the executable lengths (B,)."""
        moh = self.cfg
        seen: dict[str, torch.Tensor] = {}

        def fused_denoise(x_in, level, step=None, prefix=None):
            fused, heads, alpha = self.horizon_forward(net, x_in, level, cond, step, prefix=prefix)
            seen["heads"], seen["alpha"] = heads, alpha
            return fused

        disagreement = torch.zeros(x.shape[:2], device=x.device, dtype=torch.float32)

        def consensus(i, x_i, out):
            # Every horizon's first-order step against the fused one (Heun's second
            # evaluation is the fused trajectory's business).
            steps = first_order_update(objective, torch.cat([out.unsqueeze(0), seen["heads"]], dim=0), x_i, schedule, i)
            diff = (steps[1:] - steps[:1]).abs().sum(-1).float()  # (K, B, H): L1 over action dims
            disagreement.add_((seen["alpha"] * diff).sum(0))
            if self.capture_horizon_predictions and i == len(schedule) - 1:
                # Each horizon's clean-chunk estimate at the last step, zero past the horizon.
                x0, _ = objective.prediction(seen["heads"], x_i, schedule[i].to(x_i.device))
                self.last_horizon_predictions = x0.masked_fill(self.horizon_pad[:, None, :, None], 0.0)

        x = sample(objective, fused_denoise, x, schedule, start, generator, callback=consensus, constraint=constraint)
        self.last_disagreement = disagreement
        if not self.adaptive:
            return x, None
        return x, adaptive_lengths(disagreement, moh.horizons, moh.adaptive_ratio, moh.min_executed, moh.min_active_horizons)

    def execution_info(self, n_action_steps: int) -> dict:
        moh = self.cfg
        if not self.adaptive:
            return super().execution_info(n_action_steps)
        keys = ("adaptive_ratio", "min_executed", "min_active_horizons")
        return {"execution": "adaptive", **{k: getattr(moh, k) for k in keys}, "longest": moh.longest_adaptive_prefix()}
