"""`mixpolicy deploy` / `--report` / `serve` / `select-k`, and the simulated robot in real time."""

import dataclasses
import json
import time

import numpy as np
import pytest
import torch

from mixpolicy.cli import compose
from mixpolicy.config import from_dict
from mixpolicy.deploy.kselect import SelectKConfig
from mixpolicy.deploy.runner import DeployConfig
from mixpolicy.deploy.server import ServeConfig
from mixpolicy.policies.checkpoint import save_policy
from mixpolicy.policies.denoising_policy import DenoisingPolicy
from factories import metaworld_shape_meta, tiny_policy_config, tiny_shape_meta
from test_cli import assert_one_line_error, run_main


def fields(cls):
    return {f.name for f in dataclasses.fields(cls)}


@pytest.fixture(scope="module")
def metaworld_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    cfg = tiny_policy_config(horizon=8, n_action_steps=4)
    meta = metaworld_shape_meta(tasks=("reach-v3", "push-v3"), discrete_action_dims=[3])
    return save_policy(DenoisingPolicy(cfg, meta), tmp_path_factory.mktemp("ckpt") / "tiny")


def test_deploy_yamls_match_their_dataclasses():
    d = compose("deploy", [])
    assert set(d) == fields(DeployConfig)
    for section, cls in (("robot", "RobotConfig"), ("inference", "InferenceConfig"), ("loop", "LoopConfig"), ("safety", "SafetyConfig")):
        import mixpolicy.deploy.runner as runner

        owner = {"LoopConfig": "mixpolicy.deploy.loop", "SafetyConfig": "mixpolicy.deploy.safety"}.get(cls)
        klass = getattr(__import__(owner, fromlist=[cls]), cls) if owner else getattr(runner, cls)
        assert set(d[section]) == fields(klass), section
    from mixpolicy.deploy.rti import RTIConfig

    assert set(d["inference"]["rti"]) == fields(RTIConfig)
    s = compose("serve", ["checkpoint=x"])
    assert set(s) == fields(ServeConfig) and set(s["rti"]) == fields(RTIConfig)
    k = compose("select-k", ["checkpoint=x", "dataset=y"])
    assert set(k) == fields(SelectKConfig)
    from_dict(DeployConfig, {**d, "checkpoint": "x"})
    from_dict(ServeConfig, s)
    from_dict(SelectKConfig, k)


def test_deploy_errors_are_one_line(capsys, tmp_path):
    code, _, err = run_main(capsys, "deploy", f"log={tmp_path}/l.jsonl")
    assert_one_line_error(code, err, "checkpoint")
    code, _, err = run_main(capsys, "deploy", "checkpoint=/nonexistent", f"log={tmp_path}/l.jsonl")
    assert_one_line_error(code, err, "checkpoint not found")
    code, _, err = run_main(capsys, "deploy", "checkpoint=x", "loop.seam=zigzag")
    assert_one_line_error(code, err, "loop.seam")
    code, _, err = run_main(capsys, "deploy", "checkpoint=x", "inference.rti.discrete=round")
    assert_one_line_error(code, err, "rti.discrete")
    code, _, err = run_main(capsys, "deploy", "checkpoint=x", "robot.tasks=[reach-v9]")
    assert_one_line_error(code, err, "unknown Meta-World task")
    code, _, err = run_main(capsys, "deploy", "--report", str(tmp_path / "missing.jsonl"))
    assert_one_line_error(code, err, "log file not found")
    code, out, _ = run_main(capsys, "deploy", "--help")
    assert code == 0 and "--report" in out and "rti" in out and "seam" in out


@pytest.mark.slow
def test_deploy_runs_the_simulated_robot_in_real_time_and_reports(capsys, tmp_path, metaworld_ckpt):
    log = tmp_path / "run" / "log.jsonl"
    args = [
        "deploy", f"checkpoint={metaworld_ckpt}", "robot.tasks=[reach-v3]", "robot.episodes_per_task=2",
        "loop.max_episode_ticks=25", "inference.backend=thread", f"log={log}", "progress=false",
        "inference.rti.k=1", "loop.execute_steps=2",
    ]  # fmt: skip
    code, out, err = run_main(capsys, *args)
    assert code == 0, err
    assert "50 cycles at 50 Hz over 2 episodes" in out
    lines = [json.loads(l) for l in log.read_text().splitlines()]
    assert lines[0]["type"] == "header" and lines[0]["spec"]["warm_steps"] == 1
    episodes = [l for l in lines if l["type"] == "episode"]
    assert [e["ticks"] for e in episodes] == [25, 25] and all(e["fault"] is None for e in episodes)
    assert all(e["denoise_steps"] == 4 + (e["calls"] - 1) for e in episodes)  # one full call, then k=1
    summary = json.loads(log.with_suffix(".summary.json").read_text())
    assert summary["cycles"] == 50 and summary["obs_age_ms"]["median"] < 20
    code, _, err = run_main(capsys, *args)  # the log exists: refuse to overwrite it
    assert_one_line_error(code, err, "exists")
    code, out, _ = run_main(capsys, "deploy", "--report", str(log))
    assert code == 0 and "inference, first call" in out and "reach-v3" in out
    pngs = sorted(p.name for p in (log.parent / "log_report").glob("*.png"))
    assert pngs == sorted(["jitter_ms.png", "work_ms.png", "obs_age_ms.png", "latency_ms.png", "queue_depth.png", "seam_jump.png"])
    assert all((log.parent / "log_report" / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)


@pytest.mark.slow
def test_simulated_robot_steps_at_the_control_rate():
    from mixpolicy.deploy.clock import now
    from mixpolicy.deploy.robots import SimulatedMetaWorldRobot

    robot = SimulatedMetaWorldRobot("reach-v3", control_hz=100)
    robot.connect()
    try:
        robot.start_episode(seed=100_000)
        first = robot.get_observation()
        t0 = now()
        for i in range(20):
            robot.send_action(np.array([0.0, 0.0, 1.0, 0.0]))
            time.sleep(max(0.0, t0 + 0.01 * (i + 1) + 0.003 - now()))  # just after the robot's next tick
        obs = robot.get_observation()
    finally:
        robot.disconnect()
    assert 18 <= obs["tick"] <= 22
    assert obs["state"][2] > first["state"][2]  # the hand moved up
    assert obs["timestamp"] - first["timestamp"] == pytest.approx(obs["tick"] / 100, abs=0.01)
    assert robot.missed_commands <= 5  # ticks without a fresh command (scheduling noise on a shared CPU)
    np.testing.assert_array_equal(robot.hold_action(np.array([0.3, 0.3, 0.3, -1.0])), [0, 0, 0, -1.0])


def test_select_k_reports_every_k_and_recommends_one(capsys, tmp_path, dataset_factory):
    dataset_factory(lengths=(12, 9, 14))
    torch.manual_seed(0)
    cfg = tiny_policy_config(horizon=4, n_action_steps=2)
    meta = tiny_shape_meta(discrete_action_dims=[2])
    ckpt = save_policy(DenoisingPolicy(cfg, meta), tmp_path / "ckpt")
    out = tmp_path / "k.json"
    code, text, err = run_main(capsys, "select-k", f"checkpoint={ckpt}", f"dataset={tmp_path / 'd.zarr'}", "windows=16", f"out={out}", "tolerance=10")
    assert code == 0, err
    res = json.loads(out.read_text())
    assert [r["k"] for r in res["rows"]] == [1, 2, 3, 4]
    assert res["recommended_k"] == 1  # a loose tolerance accepts the smallest k
    assert all(r["contraction_median"] >= 0 and np.isfinite(r["error_mean"]) for r in res["rows"])
    assert res["rows"][-1]["sigma"] > res["rows"][0]["sigma"]  # earlier levels are noisier
    assert "recommended k: 1" in text
    code, _, err = run_main(capsys, "select-k", f"checkpoint={ckpt}", f"dataset={tmp_path / 'd.zarr'}", "ks=[9]")
    assert_one_line_error(code, err, "exceed the schedule")
