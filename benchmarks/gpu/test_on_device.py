"""Device paths of training, checkpoints, sampling, RTI, the expert cache and the policy server.

The device comes from MIXPOLICY_TEST_DEVICE (default: cuda when present, else cpu), so the
same tests run here on the CPU and there on the GPU:

    MIXPOLICY_TEST_DEVICE=cuda PYTHONPATH=$PWD python -m pytest benchmarks/gpu/test_on_device.py

benchmarks/gpu/run.sh runs them in its tests phase. Data and policies are tiny and built here.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gpu_bench import shape_meta, synthetic_training_data, train_config
from mixpolicy.deploy.local import LocalPolicy
from mixpolicy.deploy.rti import RTIConfig, RTISampler
from mixpolicy.deploy.subprocess_backend import SubprocessPolicy
from mixpolicy.policies.checkpoint import load_policy, save_policy
from mixpolicy.policies.config import policy_config_from_dict
from mixpolicy.policies.denoising_policy import DenoisingPolicy, example_observation
from mixpolicy.train.trainer import Trainer

DEVICE = torch.device(os.environ.get("MIXPOLICY_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
CUDA = DEVICE.type == "cuda"
if CUDA and not torch.cuda.is_available():
    pytest.exit(f"MIXPOLICY_TEST_DEVICE={DEVICE} but no CUDA GPU is visible", returncode=2)
TINY = dict(width=32, depth=2, heads=2)
HORIZON, N_ACTION = 8, 4
# Equal up to float32 rounding; on cuda kernels may sum in another order than on the CPU.
CLOSE = dict(rtol=1e-3, atol=1e-4) if CUDA else dict(rtol=1e-5, atol=1e-6)


def policy(network="transformer", head=None, **net_kw) -> DenoisingPolicy:
    cfg = {
        "network": {"type": network, **TINY, **net_kw},
        "objective": {"type": "edm", "num_inference_steps": 6},
        "horizon": HORIZON,
        "n_action_steps": N_ACTION,
        "obs_hidden": 32,
    }
    if head:
        cfg["head"] = head
    torch.manual_seed(0)
    return DenoisingPolicy(policy_config_from_dict(cfg), shape_meta())


def on_device(obs: dict) -> dict:
    return {k: v.to(DEVICE) for k, v in obs.items()}


@contextlib.contextmanager
def full_fp32_matmuls():
    """The trainer turns on TF32 matmuls on cuda for the whole process; comparisons turn it off."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def trainer(tmp_path, name, **kw) -> Trainer:
    data = synthetic_training_data(episodes=4, length=30, horizon=HORIZON)
    policy_cfg = {"network": {"type": "transformer", **TINY}, "horizon": HORIZON, "n_action_steps": N_ACTION, "obs_hidden": 32}
    cfg = train_config(tmp_path / name, "tiny", DEVICE, 8, 1, policy=policy_cfg, warmup_steps=1, log_every=1, **kw)
    return Trainer(cfg, data=data)


def losses(run_dir) -> list[float]:
    import json

    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


# ---------------------------------------------------------------------------- training
def test_training_runs_on_the_device_in_fp32_and_bf16(tmp_path):
    runs = {}
    for precision in ("fp32", "bf16"):
        t = trainer(tmp_path, precision, steps=3, precision=precision)
        assert t.device.type == DEVICE.type
        assert all(p.device.type == DEVICE.type for p in t.policy.parameters())
        assert (t.autocast_dtype is torch.bfloat16) == (precision == "bf16")
        t.run()
        runs[precision] = losses(tmp_path / precision)
    assert len(runs["fp32"]) == 3 and all(np.isfinite(runs["bf16"]))
    assert runs["bf16"][0] != runs["fp32"][0]  # autocast changed the numerics ...
    assert runs["bf16"][0] == pytest.approx(runs["fp32"][0], rel=0.05)  # ... not the loss


@pytest.mark.skipif(not CUDA, reason="inductor builds C++ for minutes on a small CPU; the train phase compiles there with the eager backend")
def test_compiled_training_on_the_device_follows_eager(tmp_path):
    eager = trainer(tmp_path, "eager", steps=3)
    eager.run()
    compiled = trainer(tmp_path, "compiled", steps=3, compile=True)
    compiled.run()
    np.testing.assert_allclose(losses(tmp_path / "compiled"), losses(tmp_path / "eager"), rtol=1e-2)


def test_pinned_memory_workers_feed_the_device_as_the_in_process_gather_does(tmp_path):
    trainer(tmp_path, "gather", steps=3).run()
    trainer(tmp_path, "workers", steps=3, loader={"num_workers": 1, "pin_memory": True, "prefetch_factor": 2}).run()
    a = load_file(str(tmp_path / "gather" / "checkpoints" / "last" / "training_state.safetensors"))
    b = load_file(str(tmp_path / "workers" / "checkpoints" / "last" / "training_state.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], **CLOSE, msg=k)


def test_a_checkpoint_written_on_the_device_loads_on_the_cpu_with_the_same_denoiser(tmp_path):
    t = trainer(tmp_path, "run", steps=2)
    result = t.run()
    on_dev, _ = load_policy(result["checkpoint"], device=DEVICE)
    on_cpu, _ = load_policy(result["checkpoint"])
    assert next(on_dev.parameters()).device.type == DEVICE.type and next(on_cpu.parameters()).device.type == "cpu"
    obs = example_observation(on_cpu, batch=3)
    x = torch.randn(3, HORIZON, 4)
    level = torch.full((3,), 10.0)
    with torch.no_grad(), full_fp32_matmuls():
        want = on_cpu.denoiser(on_cpu.encode_obs(obs))(x, level)
        got = on_dev.denoiser(on_dev.encode_obs(on_device(obs)))(x.to(DEVICE), level.to(DEVICE))
    torch.testing.assert_close(got.cpu(), want, **CLOSE)


# ---------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("head", [None, {"type": "moh", "horizons": [4, HORIZON]}], ids=["single", "moh"])
def test_plan_on_the_device_is_seeded_and_finite(head):
    p = policy(head=head).to(DEVICE).eval()
    obs = on_device(example_observation(p, batch=5))
    plans = [p.plan(obs, torch.Generator(device=DEVICE).manual_seed(s)) for s in (3, 3, 4)]
    assert plans[0].actions.shape == (5, HORIZON, 4) and plans[0].actions.device.type == DEVICE.type
    assert torch.isfinite(plans[0].actions).all()
    torch.testing.assert_close(plans[0].actions, plans[1].actions, rtol=0, atol=0)  # same seed, same chunk
    assert not torch.equal(plans[0].actions, plans[2].actions)
    assert plans[0].executable.tolist() == [N_ACTION] * 5


@pytest.mark.parametrize("k", [1, 2])
def test_rti_on_the_device_warm_starts_with_k_steps(k):
    p = policy().to(DEVICE).eval()
    sampler = RTISampler(p, RTIConfig(k=k))
    obs = on_device(example_observation(p, batch=2))
    g = torch.Generator(device=DEVICE).manual_seed(0)
    first = sampler(obs, shift=None, generator=g)
    warm = sampler(obs, shift=N_ACTION, generator=g)
    assert (first.warm, first.steps) == (False, 6) and (warm.warm, warm.steps) == (True, k)
    assert warm.actions.device.type == DEVICE.type and torch.isfinite(warm.actions).all()


def test_the_expert_cache_on_the_device_matches_uncached_routing():
    cached = policy("mode", expert_cache=True).to(DEVICE).eval()
    uncached = policy("mode", expert_cache=False).to(DEVICE).eval()
    uncached.load_state_dict(cached.state_dict())
    obs = on_device(example_observation(cached, batch=4))
    with full_fp32_matmuls():
        a = cached.plan(obs, torch.Generator(device=DEVICE).manual_seed(1)).actions
        b = uncached.plan(obs, torch.Generator(device=DEVICE).manual_seed(1)).actions
    torch.testing.assert_close(a, b, **CLOSE)


# ---------------------------------------------------------------------------- deploy
def test_local_policy_on_the_device_returns_host_chunks():
    client = LocalPolicy(policy().to(DEVICE), RTIConfig(k=2), seed=1)  # bf16 autocast on cuda
    obs = {"state": np.random.default_rng(0).normal(size=(2, 39)).astype(np.float32)}
    first, warm = client.infer(obs, task=3, shift=None), client.infer(obs, task=3, shift=N_ACTION)
    assert isinstance(first.actions, np.ndarray) and first.actions.shape == (HORIZON, 4) and first.actions.dtype == np.float32
    assert np.isfinite(warm.actions).all() and (first.steps, warm.steps, warm.warm) == (6, 2, True)


def test_the_policy_server_process_serves_on_the_device(tmp_path):
    ckpt = save_policy(policy(), tmp_path / "ckpt")
    client = SubprocessPolicy(str(ckpt), RTIConfig(k=2), device=str(DEVICE), seed=4, timeout_s=30)
    try:
        obs = {"state": np.zeros((2, 39), np.float32)}
        first = client.infer(obs, task=0, shift=None)
        warm = client.infer(obs, task=0, shift=N_ACTION)
    finally:
        client.close()
    assert client.spec.horizon == HORIZON and first.actions.shape == (HORIZON, 4)
    assert np.isfinite(warm.actions).all() and (first.steps, warm.steps) == (6, 2)
