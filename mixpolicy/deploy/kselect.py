"""Choosing RTI's k on validation windows (``mixpolicy select-k``).

Reasoning. A warm-started call maps the shifted previous solution ``g`` to
``T_k(g)``: noise it to level ``k`` (optional) and run the last ``k`` sampling steps.
Two things decide whether that matches a full solve ``a*`` from the new observation:

* the shift error ``||shift(a*_prev) - a*||``: how far the initial guess is. The tail of
  the schedule can only correct errors of about the noise scale ``sigma_k`` of its first
  level; a guess further away than that needs a larger k;
* the contraction of the truncated map: its Lipschitz factor
  ``L_k = ||T_k(g + d) - T_k(g)|| / ||d||``. Below 1 the map pulls nearby guesses
  together, so guess errors shrink instead of accumulating from call to call.

Both are measured here numerically on windows of a dataset, with the same fixed noise
for the perturbed and unperturbed guesses. The recommendation is the smallest k whose
error to a full solve, over the actions that get executed, stays within the tolerance in
the mean and in the 90th percentile; by default the tolerances are 1.2 times the mean and
the p90 of the distance between two full solves of the same observation with different
noise: the policy's own sampling spread, near which a warm start is indistinguishable
from resampling (the 20% margin absorbs the estimate's noise over a finite number of
windows). The tail matters: where a contact mode switches, the shifted guess sits on the
wrong side and a few low-noise steps cannot move it, which barely changes the mean error.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mixpolicy.config import check
from mixpolicy.deploy.rti import RTIConfig, RTISampler, shift_chunk
from mixpolicy.errors import UserError
from mixpolicy.policies.denoising_policy import TASK_KEY
from mixpolicy.policies.denoising_policy import WarmStart


@dataclass
class SelectKConfig:
    checkpoint: str = ""
    dataset: str = ""  # zarr dataset with the policy's observation keys (held-out episodes are best)
    windows: int = 128  # validation window pairs
    shift: int = 0  # control steps between two calls (0: the policy's n_action_steps)
    ks: list[int] = field(default_factory=list)  # empty: every k of the schedule
    schedule_steps: int = 0  # 0: the policy's num_inference_steps
    renoise: bool = True
    discrete: str = "none"
    tolerance: float = 0.0  # RMS error to a full solve (normalized units); 0: tolerance_factor x the seed-to-seed spread
    tolerance_factor: float = 1.2
    perturbation: float = 0.05  # size of the guess perturbation for the contraction estimate
    seed: int = 0
    device: str = "auto"
    num_threads: int = 0
    out: str = ""  # JSON results (default: <checkpoint>/select_k.json)

    def __post_init__(self):
        check(bool(self.checkpoint), "checkpoint", "a checkpoint folder is required (checkpoint=path)")
        check(bool(self.dataset), "dataset", "a dataset is required (dataset=path.zarr)")
        check(self.windows >= 2, "windows", "must be >= 2")
        check(self.shift >= 0, "shift", "must be >= 0")
        check(all(k >= 1 for k in self.ks), "ks", "every k must be >= 1")
        check(self.tolerance >= 0, "tolerance", "must be >= 0")
        check(self.tolerance_factor > 0, "tolerance_factor", "must be > 0")
        check(self.perturbation > 0, "perturbation", "must be > 0")


def _windows(policy, dataset: str, n: int, shift: int, rng: np.random.Generator) -> tuple[dict, dict]:
    """Observation histories at steps t and t + shift of the same episode (n pairs)."""
    from mixpolicy.datasets.replay_buffer import ReplayBuffer

    buf = ReplayBuffer.open(dataset)
    keys = list(policy.cfg.obs_keys)
    missing = [k for k in keys if k not in buf.keys]
    if missing:
        raise UserError(f"dataset {dataset} lacks the policy's observation key(s) {missing}")
    arrays = buf.load(keys)
    starts, lengths = buf.episode_starts, buf.episode_lengths
    ok = np.flatnonzero(lengths > shift)
    if ok.size == 0:
        raise UserError(f"no episode of {dataset} is longer than shift={shift}")
    ep = rng.choice(ok, size=n)
    t = np.array([rng.integers(0, lengths[e] - shift) for e in ep])
    tasks = buf.episode_tasks
    if policy.task_embedding is not None:
        task_ids = np.array([policy.task_index(tasks[e]) for e in ep])
    else:
        task_ids = np.zeros(n, int)
    h = policy.cfg.n_obs_steps

    def history(offset: int) -> dict[str, torch.Tensor]:
        steps = (t + offset)[:, None] + np.arange(-(h - 1), 1)[None, :]
        rows = starts[ep][:, None] + np.clip(steps, 0, None)  # edge-pad the episode start
        out = {k: torch.as_tensor(arrays[k][rows], device=policy.device) for k in keys}
        out[TASK_KEY] = torch.as_tensor(task_ids, device=policy.device)
        return out

    return history(0), history(shift)


def _rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).flatten(1).mean(1).sqrt()


@torch.no_grad()
def select_k(cfg: SelectKConfig) -> dict[str, Any]:
    from mixpolicy.policies.inference import load_for_inference

    policy, _ = load_for_inference(cfg.checkpoint, cfg.device, cfg.num_threads)
    shift = cfg.shift or policy.cfg.n_action_steps
    execute = policy.cfg.n_action_steps
    rti = RTISampler(policy, RTIConfig(k=1, schedule_steps=cfg.schedule_steps, renoise=cfg.renoise, discrete=cfg.discrete))
    schedule, objective = rti.schedule, policy.objective
    n = len(schedule)
    ks = sorted(set(cfg.ks)) if cfg.ks else list(range(1, n + 1))
    if ks[-1] > n:
        raise UserError(f"ks up to {ks[-1]} exceed the schedule's {n} steps")
    rng = np.random.default_rng(cfg.seed)
    obs_prev, obs_now = _windows(policy, cfg.dataset, cfg.windows, shift, rng)
    gen = torch.Generator(device=policy.device).manual_seed(cfg.seed)
    shape = (cfg.windows, policy.cfg.horizon, policy.shape_meta.action_dim)
    dev, dt = policy.device, torch.float32

    def full(obs) -> torch.Tensor:
        return rti.discretize(policy.plan(obs, gen, num_steps=n).normalized)

    _, prev_stored = full(obs_prev)
    ref_exec, _ = full(obs_now)
    ref2_exec, _ = full(obs_now)
    guess = shift_chunk(prev_stored, shift)
    spread = _rms(ref_exec[:, :execute], ref2_exec[:, :execute])
    shift_err = _rms(guess[:, :execute], ref_exec[:, :execute])
    # Mean and tail (p90) both count: a contact-mode switch shows up in the tail only.
    tol = cfg.tolerance or cfg.tolerance_factor * float(spread.mean())
    tol_p90 = cfg.tolerance or cfg.tolerance_factor * float(spread.quantile(0.9))
    rows = []
    for k in ks:
        start = n - k
        level = schedule[start]
        noise = torch.randn(shape, generator=gen, device=dev, dtype=dt)  # add_noise's standard normal noise

        def run(g: torch.Tensor) -> torch.Tensor:
            # One fixed noise draw for every run, so the contraction compares like with like.
            x = objective.add_noise(g, noise, level.expand(g.shape[0])) if cfg.renoise else g
            return policy.plan(obs_now, gen, num_steps=n, warm_start=WarmStart(x, start, renoise=False)).normalized

        out = run(guess)
        out_exec, _ = rti.discretize(out)
        err = _rms(out_exec[:, :execute], ref_exec[:, :execute])
        d = torch.randn(shape, generator=gen, device=dev) * cfg.perturbation
        lip = (out - run(guess + d)).flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1)
        rows.append(
            {
                "k": k,
                "level": float(level),
                "sigma": float(objective.noise_std(level.cpu())),
                "contraction_median": float(lip.median()),
                "contraction_p90": float(lip.quantile(0.9)),
                "error_mean": float(err.mean()),
                "error_p90": float(err.quantile(0.9)),
                "within_tolerance": bool(float(err.mean()) <= tol and float(err.quantile(0.9)) <= tol_p90),
            }
        )
    ok = [r["k"] for r in rows if r["within_tolerance"]]
    result = {
        "checkpoint": cfg.checkpoint,
        "dataset": cfg.dataset,
        "windows": cfg.windows,
        "shift": shift,
        "executed_actions": execute,
        "schedule": [float(s) for s in schedule],
        "renoise": cfg.renoise,
        "seed_spread_mean": float(spread.mean()),
        "seed_spread_p90": float(spread.quantile(0.9)),
        "shift_error_mean": float(shift_err.mean()),
        "shift_error_p90": float(shift_err.quantile(0.9)),
        "tolerance": tol,
        "tolerance_p90": tol_p90,
        "rows": rows,
        "recommended_k": ok[0] if ok else None,
        "config": asdict(cfg),
    }
    out = Path(cfg.out) if cfg.out else Path(cfg.checkpoint) / "select_k.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    result["out"] = str(out)
    return result


def format_select_k(r: dict[str, Any]) -> str:
    lines = [
        f"shift {r['shift']} steps, {r['windows']} windows; errors are RMS over the first {r['executed_actions']} actions, normalized units",
        f"shift error (guess vs full solve) mean {r['shift_error_mean']:.4f}  p90 {r['shift_error_p90']:.4f}",
        f"seed-to-seed spread of full solves mean {r['seed_spread_mean']:.4f}  p90 {r['seed_spread_p90']:.4f}; "
        f"tolerance mean {r['tolerance']:.4f}  p90 {r['tolerance_p90']:.4f}",
        f"{'k':>3} {'level':>8} {'sigma':>8} {'L_k med':>8} {'L_k p90':>8} {'err mean':>9} {'err p90':>8}  ok",
    ]
    for row in r["rows"]:
        lines.append(
            f"{row['k']:>3} {row['level']:>8.3g} {row['sigma']:>8.3g} {row['contraction_median']:>8.3f} {row['contraction_p90']:>8.3f} "
            f"{row['error_mean']:>9.4f} {row['error_p90']:>8.4f}  {'yes' if row['within_tolerance'] else 'no'}"
        )
    rec = r["recommended_k"]
    lines.append(f"recommended k: {rec}" if rec is not None else "no k within tolerance: use full denoising or raise the tolerance")
    return "\n".join(lines)
