"""``mixpolicy deploy``: run a policy on a robot (or the simulated one) and log every cycle.

The log is JSON lines: a ``header`` (config, policy spec), one ``cycle`` line per control
tick (columns in ``loop.CYCLE_COLUMNS``) and one ``episode`` line per episode, written
between episodes so that file I/O never lands inside a control period.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixpolicy.config import check, to_dict
from mixpolicy.deploy.backend import PolicyClient
from mixpolicy.deploy.clock import RealtimeSettings
from mixpolicy.deploy.local import check_composition
from mixpolicy.deploy.loop import CYCLE_COLUMNS, ControlLoop, EpisodeResult, LoopConfig
from mixpolicy.deploy.rti import RTIConfig
from mixpolicy.deploy.safety import SafetyConfig
from mixpolicy.deploy.wire import DEFAULT_TOKEN_ENV
from mixpolicy.errors import UserError

BACKENDS = ("process", "thread", "remote")
ROBOTS = ("sim_metaworld", "lerobot")
LOG_FORMAT = 1


@dataclass
class InferenceConfig:
    backend: str = "process"  # process: a policy server child process | thread: in this process | remote: inference.url
    url: str = ""  # remote: ws://host:port (loopback) or wss://host:port of `mixpolicy serve`
    token_env: str = DEFAULT_TOKEN_ENV  # remote: environment variable holding the shared token
    ca_file: str = ""  # remote wss://: CA bundle that verifies the server's certificate ("": the system's)
    allow_cleartext: bool = False  # remote: allow ws:// to a non-loopback host (token and data unencrypted)
    timeout_s: float = 2.0  # remote/process: per-call reply timeout
    device: str = "auto"
    num_threads: int = 1  # torch threads for inference; 1 is fastest for one small chunk on a shared CPU
    seed: int = 0
    execution: str = ""  # fixed | adaptive for a mixture-of-horizons policy (empty: the policy's own)
    adaptive_ratio: float = 0.0  # 0: the policy's own
    rti: RTIConfig = field(default_factory=RTIConfig)

    def __post_init__(self):
        check(self.backend in BACKENDS, "inference.backend", f"must be one of {BACKENDS}")
        check(self.execution in ("", "fixed", "adaptive"), "inference.execution", "must be fixed or adaptive (empty: the policy's own)")
        check(self.adaptive_ratio >= 0, "inference.adaptive_ratio", "must be >= 0 (0: the policy's own)")
        check(
            self.backend != "remote" or not (self.execution or self.adaptive_ratio),
            "inference.execution",
            "a remote server's execution is set where it runs (mixpolicy serve execution=...)",
        )
        check(self.backend != "remote" or bool(self.url), "inference.url", "backend=remote needs inference.url=ws://host:port")
        check(self.timeout_s > 0, "inference.timeout_s", "must be > 0")
        check(self.num_threads >= 0, "inference.num_threads", "must be >= 0 (0: all cores)")


@dataclass
class RobotConfig:
    type: str = "sim_metaworld"  # sim_metaworld | lerobot
    tasks: list[str] = field(default_factory=list)  # sim: tasks to run (empty: the policy's); lerobot: the one task to perform
    episodes_per_task: int = 10
    seed: int = 100_000  # sim: episode i of a task uses seed + i (demonstrations use 0, 1, ...)
    max_episode_steps: int = 500
    lerobot_type: str = ""  # lerobot: robot type, e.g. so100_follower
    lerobot_args: dict[str, Any] = field(default_factory=dict)  # lerobot: its config fields (port, id, ...)
    lerobot_state_features: list[str] = field(default_factory=list)  # lerobot: features forming `state` (empty: all scalars)
    torque_off_on_fault: bool = False  # lerobot: false keeps the motors holding their last target after a fault

    def __post_init__(self):
        check(self.type in ROBOTS, "robot.type", f"must be one of {ROBOTS}")
        check(self.episodes_per_task >= 1, "robot.episodes_per_task", "must be >= 1")
        check(1 <= self.max_episode_steps <= 500 or self.type != "sim_metaworld", "robot.max_episode_steps", "must be in [1, 500] for Meta-World")
        check(self.type != "lerobot" or bool(self.lerobot_type), "robot.lerobot_type", "robot.type=lerobot needs robot.lerobot_type")


@dataclass
class DeployConfig:
    checkpoint: str = ""
    # More checkpoints that denoise together with `checkpoint` (as `mixpolicy eval compose=`), fixed weights
    compose: list[str] = field(default_factory=list)
    compose_weights: list[float] = field(default_factory=list)
    log: str = "runs/deploy/log.jsonl"
    overwrite: bool = False
    progress: bool = True
    robot: RobotConfig = field(default_factory=RobotConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)

    def __post_init__(self):
        check(bool(self.checkpoint) or self.inference.backend == "remote", "checkpoint", "a checkpoint folder is required (checkpoint=path) unless inference.backend=remote")
        check(bool(self.log), "log", "a log file path is required")
        check(not self.compose or self.inference.backend != "remote", "compose", "a remote server's composition is set where it runs (mixpolicy serve compose=...)")
        check_composition(self.compose, self.compose_weights)
        real = self.robot.type == "lerobot"
        check(not real or bool(self.safety.action_low), "safety.action_low", "a real robot needs local bounds: set safety.action_low and safety.action_high")
        check(not real or bool(self.safety.max_delta), "safety.max_delta", "a real robot needs a local per-step limit: set safety.max_delta")
        if self.robot.type == "sim_metaworld" and self.robot.tasks:
            from mixpolicy.envs.metaworld_env import check_task_names

            check_task_names(self.robot.tasks)


def make_client(cfg: InferenceConfig, checkpoint: str, compose: list[str] = (), compose_weights: list[float] = ()) -> PolicyClient:
    """The inference backend; ``compose`` / ``compose_weights``: more checkpoints denoising with ``checkpoint``."""
    if cfg.backend == "remote":
        from mixpolicy.deploy.remote import RemotePolicy

        return RemotePolicy(
            cfg.url, token=os.environ.get(cfg.token_env) or None, timeout_s=cfg.timeout_s,
            ca_file=cfg.ca_file or None, allow_cleartext=cfg.allow_cleartext,
        )  # fmt: skip
    if cfg.backend == "process":
        from mixpolicy.deploy.subprocess_backend import SubprocessPolicy
        from mixpolicy.policies.checkpoint import read_checkpoint_meta

        for path in (checkpoint, *compose):
            read_checkpoint_meta(path)  # a clear error before starting a process
        return SubprocessPolicy(
            checkpoint, cfg.rti, cfg.device, cfg.num_threads, cfg.seed, timeout_s=cfg.timeout_s,
            execution=cfg.execution, adaptive_ratio=cfg.adaptive_ratio, compose=list(compose), compose_weights=list(compose_weights),
        )  # fmt: skip
    from mixpolicy.deploy.local import load_local_policy

    return load_local_policy(checkpoint, cfg.rti, cfg.device, cfg.num_threads, cfg.seed, cfg.execution, cfg.adaptive_ratio, compose, compose_weights)


class CycleLog:
    """JSON-lines run log, appended between episodes."""

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "w")
        self._write({"type": "header", "format": LOG_FORMAT, "columns": list(CYCLE_COLUMNS), **header})

    def _write(self, obj: dict[str, Any]) -> None:
        self._f.write(json.dumps(obj, allow_nan=False, default=_json_default) + "\n")

    def cycles(self, rows: list[tuple]) -> None:
        for r in rows:
            self._write({"type": "cycle", "v": [None if isinstance(x, float) and math.isnan(x) else x for x in r]})
        self._f.flush()

    def episode(self, result: EpisodeResult) -> None:
        self._write({"type": "episode", **result.to_json()})
        self._f.flush()

    def event(self, **kw) -> None:
        self._write({"type": "event", **kw})
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _json_default(x):
    import numpy as np

    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(type(x).__name__)


def _robots(cfg: DeployConfig, spec, shape_meta: dict[str, Any] | None = None):
    """(task name, task index, robot factory) per task."""
    if cfg.robot.type == "sim_metaworld":
        from mixpolicy.deploy.robots import SimulatedMetaWorldRobot

        tasks = cfg.robot.tasks or spec.tasks
        if not tasks:
            raise UserError("the policy records no tasks; pass robot.tasks=[...]")
        return [(t, spec.task_index(t), lambda t=t: SimulatedMetaWorldRobot(t, cfg.loop.control_hz, cfg.robot.max_episode_steps)) for t in tasks]
    from mixpolicy.deploy.lerobot_robot import make_lerobot_robot

    def make():
        robot = make_lerobot_robot(cfg.robot, spec, cfg.loop.control_hz)
        if shape_meta is not None:  # before connecting: a mismatch never moves the arm
            robot.check_checkpoint(shape_meta, cfg.loop.control_hz)
        return robot

    task = cfg.robot.tasks[0] if cfg.robot.tasks else (spec.tasks[0] if spec.tasks else "")
    return [(task, spec.task_index(task) if task else 0, make)]


def checkpoint_shape_meta(cfg: DeployConfig, client: PolicyClient) -> dict[str, Any] | None:
    """The checkpoint's shape_meta (fps, shapes, feature names), wherever this process can read it."""
    policy = getattr(client, "policy", None)  # backend=thread
    if getattr(policy, "shape_meta", None) is not None:
        return policy.shape_meta.to_json()
    if cfg.checkpoint:  # backend=process, or a local copy of a remote server's checkpoint
        from mixpolicy.policies.checkpoint import read_checkpoint_meta

        return read_checkpoint_meta(cfg.checkpoint).get("shape_meta")
    return client.spec.extra.get("shape_meta")  # a server that sends it


def deploy(cfg: DeployConfig, client: PolicyClient | None = None) -> dict[str, Any]:
    """Run every episode; returns the summary (also written to the log's folder)."""
    from tqdm.auto import tqdm

    from mixpolicy.deploy.report import summarize

    log_path = Path(cfg.log)
    if log_path.exists() and not cfg.overwrite:
        raise UserError(f"log file {log_path} exists (pass overwrite=true to replace it)")
    own_client = client is None
    client = client or make_client(cfg.inference, cfg.checkpoint, cfg.compose, cfg.compose_weights)
    spec = client.spec
    log = CycleLog(log_path, {"config": to_dict(cfg), "spec": spec.to_json(), "dt": 1.0 / cfg.loop.control_hz, "started": time.time()})
    results: list[EpisodeResult] = []
    stopped: str | None = None
    try:
        shape_meta = checkpoint_shape_meta(cfg, client) if cfg.robot.type == "lerobot" else None
        if cfg.robot.type == "lerobot" and shape_meta is None:
            log.event(kind="note", message="the checkpoint was not compared with the robot: pass checkpoint= (a local copy) to compare fps, state and image sizes")
        plan = _robots(cfg, spec, shape_meta)
        total = len(plan) * cfg.robot.episodes_per_task
        bar = tqdm(total=total, desc="deploy", unit="ep", disable=not cfg.progress, dynamic_ncols=True)
        loop: ControlLoop | None = None
        for task_name, task_index, make_robot in plan:
            robot = make_robot()
            robot.connect()
            clean = False  # an exception (a second Ctrl-C) leaves the motors holding, as a fault does
            try:
                loop = ControlLoop(robot, client, cfg.loop, cfg.safety) if loop is None else loop.rebind(robot)
                rt = RealtimeSettings(cfg.loop.switch_interval_us / 1e6, cfg.loop.gc_freeze, cfg.loop.fifo_priority)
                with loop.sigint_guard(), rt:
                    for note in rt.notes:
                        log.event(kind="note", message=note)
                    for i in range(cfg.robot.episodes_per_task):
                        seed = cfg.robot.seed + i
                        result = loop.run_episode(task_name, task_index, seed)
                        results.append(result)
                        log.cycles(loop.rows)
                        loop.rows.clear()
                        log.episode(result)
                        bar.update(1)
                        if result.fault is not None:
                            stopped = result.fault
                            log.event(kind="fault", fault=result.fault, detail=result.fault_detail, episode=result.episode, hold_error=result.hold_error)
                            break
                clean = stopped is None
            finally:
                keep_torque = not clean and not cfg.robot.torque_off_on_fault
                if cfg.robot.type == "lerobot":  # a simulator has no torque to keep
                    log.event(kind="disconnect", keep_torque=keep_torque)
                robot.disconnect(keep_torque=keep_torque)
            if stopped:
                break
        bar.close()
        if loop is not None:
            loop.close()
    finally:
        log.close()
        if own_client:
            client.close()
    summary = summarize(log_path)
    (log_path.with_suffix(".summary.json")).write_text(json.dumps(summary, indent=2))
    summary["stopped"] = stopped
    return summary
