"""The local backend: a policy in this process, with its own warm-start state.

Every request is checked against the checkpoint before it reaches the network (the
policy server serves through this class too): an out-of-range task index or a huge
shift would otherwise become a CUDA device-side assert that breaks the device for every
later request.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from mixpolicy.config import check
from mixpolicy.deploy.backend import InferenceResult, PolicySpec
from mixpolicy.deploy.rti import RTIConfig, RTISampler
from mixpolicy.errors import UserError
from mixpolicy.policies.denoising_policy import TASK_KEY

LOWDIM_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))  # native byte order only
IMAGE_DTYPES = (np.dtype(np.uint8),)


class FairLock:
    """A lock granted in arrival order: a client that sends back-to-back requests cannot starve the others."""

    def __init__(self):
        self._cond = threading.Condition()
        self._waiting: deque[object] = deque()
        self._held = False

    def __enter__(self) -> "FairLock":
        me = object()
        with self._cond:
            self._waiting.append(me)
            try:
                while self._held or self._waiting[0] is not me:
                    self._cond.wait()
            except BaseException:  # interrupted while queued: leave the queue, or it stalls behind us
                self._waiting.remove(me)
                self._cond.notify_all()
                raise
            self._waiting.popleft()
            self._held = True
        return self

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()


def is_integer(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_task(task: Any, spec: PolicySpec) -> int:
    if not is_integer(task):
        raise UserError(f"'task' must be an integer index, got {type(task).__name__}")
    if not 0 <= task < spec.task_count:
        raise UserError(f"'task' {task} is out of range: this policy has {spec.task_count} task(s)")
    return int(task)


def check_shift(shift: Any, spec: PolicySpec) -> int | None:
    """Counts beyond the horizon leave nothing of the previous chunk: clamped, which also keeps indices in range."""
    if shift is None:
        return None
    if not is_integer(shift) or shift < 0:
        raise UserError(f"'shift' must be a non-negative integer or nil, got {repr(shift)[:40]}")
    return int(min(shift, spec.horizon))


def check_delay_arg(delay: Any, spec: PolicySpec) -> int | None:
    """A call's frozen prefix (real-time chunking): None (the policy's rti.delay) or 0..horizon."""
    if delay is None:
        return None
    if not is_integer(delay) or not 0 <= delay <= spec.horizon:
        raise UserError(f"'delay' must be an integer in [0, {spec.horizon}] or nil, got {repr(delay)[:40]}")
    return int(delay)


def delay_kwarg(delay: Any, spec: PolicySpec) -> dict[str, int]:
    """``{"delay": d}`` for a call that sends its frozen prefix, else nothing (a client without one keeps its signature)."""
    d = check_delay_arg(delay, spec)
    return {} if d is None else {"delay": d}


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
        # The checkpoint's shape meta (fps, feature names, image sizes) lets a robot check it fits.
        extra={"rti": asdict(sampler.cfg), "shape_meta": policy.shape_meta.to_json()},
    )


class LocalPolicy:
    """A policy in this process, with its own warm-start state.

    Several LocalPolicy objects may share one torch module (the policy server gives each
    connection its own); ``lock`` serializes their forward passes.
    """

    def __init__(self, policy, rti: RTIConfig | None = None, seed: int = 0, lock: Any = None):
        self.policy = policy.eval()  # execution settings (policy.set_execution) are the caller's
        self.sampler = RTISampler(policy, rti)
        self.spec = policy_spec(policy, self.sampler)
        self.device = policy.device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.lock = lock or threading.Lock()
        image_keys = set(policy.image_keys)
        # (shape, accepted dtypes) of each key's history, from the checkpoint
        self.obs_schema = {
            k: ((self.spec.n_obs_steps, *policy.shape_meta.obs[k]), IMAGE_DTYPES if k in image_keys else LOWDIM_DTYPES)
            for k in self.spec.obs_keys
        }

    def check_obs(self, obs: Any) -> dict[str, np.ndarray]:
        if not isinstance(obs, Mapping):
            raise UserError("'obs' must be a map of arrays")
        out = {}
        for k, (shape, dtypes) in self.obs_schema.items():
            if k not in obs:
                raise UserError(f"observation lacks key {k!r} (the policy needs {self.spec.obs_keys})")
            x = obs[k]
            if not isinstance(x, np.ndarray):
                raise UserError(f"obs[{k!r}] must be an array, got {type(x).__name__}")
            if x.ndim >= 1 and x.ndim == len(shape) and x.shape[0] != shape[0]:
                raise UserError(f"obs[{k!r}] has {x.shape[0]} steps, the policy needs n_obs_steps={shape[0]}")
            if x.shape != shape:
                raise UserError(f"obs[{k!r}] has shape {x.shape}, the policy needs {shape} (n_obs_steps, ...)")
            if x.dtype not in dtypes:
                raise UserError(f"obs[{k!r}] has dtype {x.dtype.str}, the policy takes {' or '.join(d.str for d in dtypes)}")
            if x.dtype.kind == "f" and not np.isfinite(x).all():
                raise UserError(f"obs[{k!r}] holds non-finite values")
            out[k] = x
        return out

    def _tensors(self, obs: Mapping[str, np.ndarray], task: int) -> dict[str, torch.Tensor]:
        # np.array copies: wire arrays are read-only
        out = {k: torch.as_tensor(np.array(x), device=self.device)[None] for k, x in obs.items()}
        out[TASK_KEY] = torch.tensor([task], device=self.device)
        return out

    def infer(self, obs: Mapping[str, np.ndarray], task: int = 0, shift: int | None = None, delay: int | None = None) -> InferenceResult:
        batch = self._tensors(self.check_obs(obs), check_task(task, self.spec))
        shift, delay = check_shift(shift, self.spec), check_delay_arg(delay, self.spec)
        with self.lock:
            t0 = time.perf_counter()
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                res = self.sampler(batch, shift=shift, generator=self.generator, delay=delay)
            actions = res.actions[0].cpu().numpy().astype(np.float32)
            ms = 1e3 * (time.perf_counter() - t0)
        executable = None if res.executable is None else int(res.executable[0])
        return InferenceResult(actions=actions, steps=res.steps, warm=res.warm, compute_ms=ms, executable=executable)

    def reset(self) -> None:
        self.sampler.reset()

    def close(self) -> None:
        pass


def check_composition(compose: Sequence[str], weights: Sequence[float]) -> None:
    """A deploy or serve composition's one-line config error: one weight per policy."""
    n = len(compose) + 1
    check(not compose or len(weights) == n, "compose_weights", f"a composition of {n} checkpoints needs {n} weights (checkpoint's first)")
    check(bool(compose) or not weights, "compose_weights", "weights without compose=[...] checkpoints")


def load_inference_policy(
    checkpoint: str, device: str, num_threads: int, execution: str = "", adaptive_ratio: float = 0.0,
    compose: Sequence[str] = (), compose_weights: Sequence[float] = (),
):  # fmt: skip
    """The checkpoint's policy for the deploy backends (the local backend and the policy server);
    with ``compose`` (more checkpoints) the composition of all of them with ``compose_weights``."""
    from mixpolicy.policies.inference import load_composition, load_for_inference

    if not compose:
        return load_for_inference(checkpoint, device, num_threads, execution, adaptive_ratio)[0]
    policy = load_composition([checkpoint, *compose], list(compose_weights), device, num_threads)[0]
    policy.set_execution(execution or None, adaptive_ratio or None)  # a composition runs fixed execution
    return policy


def load_local_policy(
    checkpoint: str,
    rti: RTIConfig,
    device: str = "auto",
    num_threads: int = 1,
    seed: int = 0,
    execution: str = "",
    adaptive_ratio: float = 0.0,
    compose: Sequence[str] = (),
    compose_weights: Sequence[float] = (),
) -> LocalPolicy:
    """``execution`` / ``adaptive_ratio`` override a mixture-of-horizons policy's own (empty / 0: keep);
    ``compose`` / ``compose_weights``: more checkpoints denoising with this one (a composition)."""
    policy = load_inference_policy(checkpoint, device, num_threads, execution, adaptive_ratio, compose, compose_weights)
    return LocalPolicy(policy, rti, seed=seed)
