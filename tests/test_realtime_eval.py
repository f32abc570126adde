"""Evaluation under a simulated inference delay, and the real-time inference modes."""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mixpolicy.envs.chunking import ChunkPlanner, SlotChunks
from mixpolicy.errors import UserError
from mixpolicy.policies.denoising_policy import ActionPlan

H = 8


class ClockPolicy:
    """Plans the chunk 'action i of the chunk from observation t is t + i': a perfect predictor of time."""

    cfg = SimpleNamespace(objective=SimpleNamespace(num_inference_steps=4))
    objective = SimpleNamespace(warm_start_noise=None)  # warm starts run the tail of the schedule
    prefix_conditioned = False

    def __init__(self):
        self.calls = []

    def plan(self, obs, generator=None, num_steps=None, warm_start=None, prefix=None):
        t = obs["t"].float()
        self.calls.append({"t": t.tolist(), "warm": warm_start is not None, "prefix": None if prefix is None else prefix.frozen})
        actions = (t[:, None] + torch.arange(H)[None, :].float())[..., None]
        return ActionPlan(actions, torch.full((len(t),), 4), normalized=actions.clone())


def rollout(planner, steps=20):
    slot = SimpleNamespace(queue=deque(), steps=0, chunks=SlotChunks())
    executed = []
    while slot.steps < steps:
        if planner.wants_chunk(slot):
            (chunk, n, norm), = planner.plan([slot], {"t": torch.tensor([slot.steps])}, None)
            planner.accept(slot, chunk, 4, norm)
        executed.append(float(planner.next_action(slot)[0]))
        slot.steps += 1
    return executed, slot


@pytest.mark.parametrize("delay", [0, 1, 2, 3])
def test_a_delayed_chunk_arrives_after_the_queued_actions_and_drops_its_past(delay):
    """With a perfect predictor the executed actions are 0, 1, 2, ... whatever the delay, and
    every chunk is planned `delay` steps before it takes over."""
    policy = ClockPolicy()
    executed, slot = rollout(ChunkPlanner(policy, "naive", delay=delay))
    assert executed == list(range(20))
    assert slot.chunks.seams and max(slot.chunks.seams) == pytest.approx(1.0)  # consecutive steps of the clock
    plan_steps = [c["t"][0] for c in policy.calls]
    assert plan_steps[:3] == [0, 4 - delay, 8 - delay]


def test_modes_warm_start_and_constrain_every_call_after_the_first():
    for mode, warm, prefix in (("naive", False, None), ("rti", True, None), ("rtc", False, 2), ("rti+rtc", True, 2)):
        policy = ClockPolicy()
        rollout(ChunkPlanner(policy, mode, delay=2, rti_k=2))
        assert not policy.calls[0]["warm"] and policy.calls[0]["prefix"] is None
        assert all(c["warm"] is warm and c["prefix"] == prefix for c in policy.calls[1:]), mode
    policy = ClockPolicy()
    rollout(ChunkPlanner(policy, "rtc", delay=2, assumed_delay=4))  # a misestimated delay
    assert {c["prefix"] for c in policy.calls[1:]} == {4}


def test_bad_modes_are_refused():
    with pytest.raises(UserError, match="inference mode"):
        ChunkPlanner(ClockPolicy(), "fast")
    with pytest.raises(UserError, match="rti_k"):
        ChunkPlanner(ClockPolicy(), "rti", rti_k=9)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["naive", "rti+rtc"])
def test_metaworld_evaluation_with_a_delay_reports_seams_and_is_deterministic(mode):
    from mixpolicy.datasets.normalizer import Normalizer
    from mixpolicy.envs.evaluate import evaluate_policy
    from mixpolicy.policies.config import policy_config_from_dict
    from mixpolicy.policies.denoising_policy import DenoisingPolicy, ShapeMeta

    torch.manual_seed(0)
    cfg = policy_config_from_dict({"horizon": 8, "n_action_steps": 4, "obs_hidden": 32, "network": {"width": 32, "depth": 1, "heads": 2},
                                   "objective": {"type": "flow", "num_inference_steps": 3}})  # fmt: skip
    norm = Normalizer.from_data({"state": np.random.default_rng(0).normal(size=(20, 39)), "action": np.random.default_rng(1).uniform(-1, 1, (20, 4))})
    policy = DenoisingPolicy(cfg, ShapeMeta(obs={"state": [39]}, action_dim=4, tasks=["reach-v3"]), norm)
    kw = dict(episodes_per_task=2, num_envs=2, max_episode_steps=24, progress=False, delay=2, mode=mode)
    a = evaluate_policy(policy, ["reach-v3"], **kw)
    b = evaluate_policy(policy, ["reach-v3"], **kw)
    r = a["tasks"]["reach-v3"]
    assert a["realtime"]["delay"] == 2 and a["realtime"]["mode"] == mode
    if "rti" in mode:  # flow: the tail of the 3-step schedule, from t = 2/3 (k = 2): noise std 2
        assert a["realtime"]["rti_schedule_steps"] == 3 and a["realtime"]["rti_start_noise_std"] == pytest.approx(2.0)
    assert r["seam_jump_max"] >= r["seam_jump_mean"] > 0 and r["mean_policy_calls"] == pytest.approx(1 + (24 - 4) / 4, abs=1)
    assert [e["seam_jump_mean"] for e in r["per_episode"]] == [e["seam_jump_mean"] for e in b["tasks"]["reach-v3"]["per_episode"]]
    with pytest.raises(UserError, match="must be at most the 4 actions"):
        evaluate_policy(policy, ["reach-v3"], **{**kw, "delay": 5})
    # At delay = n_action_steps a chunk is always in flight: one call per 4 steps after the first.
    full = evaluate_policy(policy, ["reach-v3"], **{**kw, "delay": 4})["tasks"]["reach-v3"]
    assert full["mean_policy_calls"] == pytest.approx(1 + 24 / 4, abs=1)
