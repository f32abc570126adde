"""One interface for local and remote policies: ``spec``, ``infer``, ``reset``, ``close``.

A client serves one robot (batch size 1). ``infer`` takes the observation history as
raw arrays ``{key: (n_obs_steps, ...)}`` plus the task index and the number of control
steps since the previous call's observation (RTI's shift; ``None`` forces a full
denoise), and returns one raw action chunk.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Protocol

import numpy as np
import torch

from mixpolicy.deploy.rti import RTIConfig, RTISampler
from mixpolicy.errors import UserError
from mixpolicy.policies.denoising_policy import TASK_KEY


@dataclass
class PolicySpec:
    """What the control loop needs to know about a policy."""

    obs_keys: list[str]
    n_obs_steps: int
    horizon: int
    n_action_steps: int
    action_dim: int
    tasks: list[str]
    discrete_action_dims: list[int]
    action_low: list[float]  # range of the training actions
    action_high: list[float]
    full_steps: int  # network evaluations of a full denoise
    warm_steps: int  # of a warm-started (RTI) call
    policy_type: str = "dit"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "PolicySpec":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def task_index(self, task: str) -> int:
        if not self.tasks:
            return 0
        if task not in self.tasks:
            raise UserError(f"task {task!r} is not one this policy was trained on ({', '.join(self.tasks)})")
        return self.tasks.index(task)


@dataclass
class InferenceResult:
    actions: np.ndarray  # (H, A) raw actions
    steps: int  # network evaluations
    warm: bool
    compute_ms: float  # time spent in the policy (excludes transport)
    executable: int | None = None  # actions to run before re-planning, when the policy chooses (MoH adaptive)


class PolicyClient(Protocol):
    spec: PolicySpec

    def infer(self, obs: Mapping[str, np.ndarray], task: int, shift: int | None) -> InferenceResult: ...

    def reset(self) -> None: ...

    def close(self) -> None: ...


def action_range(policy) -> tuple[list[float], list[float]]:
    """Raw action range of the training data, read from the policy's normalizer."""
    key = policy.cfg.action_key
    lo = torch.full((policy.shape_meta.action_dim,), -1.0)
    hi = torch.ones(policy.shape_meta.action_dim)
    scale = float(policy.cfg.discrete_action_scale)
    for d in policy.shape_meta.discrete_action_dims:
        lo[d], hi[d] = -1.0 / scale, 1.0 / scale
    p = policy.normalizer.params[key]
    raw_lo = policy.normalizer.unnormalize(key, lo.to(p.scale.device)).cpu()
    raw_hi = policy.normalizer.unnormalize(key, hi.to(p.scale.device)).cpu()
    return torch.minimum(raw_lo, raw_hi).tolist(), torch.maximum(raw_lo, raw_hi).tolist()


def policy_spec(policy, sampler: RTISampler) -> PolicySpec:
    lo, hi = action_range(policy)
    cfg = policy.cfg
    return PolicySpec(
        obs_keys=list(cfg.obs_keys),
        n_obs_steps=cfg.n_obs_steps,
        horizon=cfg.horizon,
        n_action_steps=cfg.n_action_steps,
        action_dim=policy.shape_meta.action_dim,
        tasks=list(policy.shape_meta.tasks) if policy.task_conditioned else [],
        discrete_action_dims=list(policy.shape_meta.discrete_action_dims),
        action_low=lo,
        action_high=hi,
        full_steps=sampler.full_steps,
        warm_steps=sampler.warm_steps,
        policy_type=cfg.type,
        extra={"rti": asdict(sampler.cfg)},
    )


class LocalPolicy:
    """A policy in this process, with its own warm-start state.

    Several LocalPolicy objects may share one torch module (the policy server gives each
    connection its own); ``lock`` serializes their forward passes.
    """

    def __init__(self, policy, rti: RTIConfig | None = None, seed: int = 0, lock: threading.Lock | None = None):
        self.policy = policy.eval()  # execution settings (policy.set_execution) are the caller's
        self.sampler = RTISampler(policy, rti)
        self.spec = policy_spec(policy, self.sampler)
        self.device = policy.device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.lock = lock or threading.Lock()

    def _tensors(self, obs: Mapping[str, np.ndarray], task: int) -> dict[str, torch.Tensor]:
        out = {}
        for k in self.spec.obs_keys:
            if k not in obs:
                raise UserError(f"observation lacks key {k!r} (the policy needs {self.spec.obs_keys})")
            x = torch.as_tensor(np.array(obs[k]), device=self.device)  # a copy: wire arrays are read-only
            if x.shape[0] != self.spec.n_obs_steps:
                raise UserError(f"obs[{k!r}] has {x.shape[0]} steps, the policy needs n_obs_steps={self.spec.n_obs_steps}")
            out[k] = x[None]
        out[TASK_KEY] = torch.tensor([int(task)], device=self.device)
        return out

    def infer(self, obs: Mapping[str, np.ndarray], task: int = 0, shift: int | None = None) -> InferenceResult:
        batch = self._tensors(obs, task)
        with self.lock:
            t0 = time.perf_counter()
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                res = self.sampler(batch, shift=shift, generator=self.generator)
            actions = res.actions[0].cpu().numpy().astype(np.float32)
            ms = 1e3 * (time.perf_counter() - t0)
        executable = None if res.executable is None else int(res.executable[0])
        return InferenceResult(actions=actions, steps=res.steps, warm=res.warm, compute_ms=ms, executable=executable)

    def reset(self) -> None:
        self.sampler.reset()

    def close(self) -> None:
        pass


def load_local_policy(
    checkpoint: str,
    rti: RTIConfig,
    device: str = "auto",
    num_threads: int = 1,
    seed: int = 0,
    execution: str = "",
    adaptive_ratio: float = 0.0,
) -> LocalPolicy:
    """``execution`` / ``adaptive_ratio`` override a mixture-of-horizons policy's own (empty / 0: keep)."""
    from mixpolicy.policies.checkpoint import load_policy
    from mixpolicy.utils import resolve_device, set_threads

    set_threads(num_threads)
    policy, _ = load_policy(checkpoint, device=resolve_device(device))
    policy.set_execution(execution or None, adaptive_ratio or None)
    return LocalPolicy(policy, rti, seed=seed)
