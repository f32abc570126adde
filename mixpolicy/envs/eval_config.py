"""The options of ``mixpolicy eval`` (configs/eval.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mixpolicy.config import check
from mixpolicy.deploy.rti import check_start_noise
from mixpolicy.envs.chunking import MODES
from mixpolicy.envs.perturb import PERTURB_KINDS, check_perturbation
from mixpolicy.envs.registry import ENVIRONMENTS, environment
from mixpolicy.policies.prefix import PREFIX_MODES


@dataclass
class EvalConfig:
    checkpoint: str = ""
    env: str = "metaworld"  # metaworld | pusht (the pusht extra)
    tasks: list[str] = field(default_factory=list)
    episodes_per_task: int = 50
    seed: int = 100_000
    num_envs: int = 25
    max_episode_steps: int = 0  # 0: the environment's own (Meta-World 500, PushT 300)
    num_inference_steps: int = 0
    n_action_steps: int = 0
    execution: str = ""  # "" (the policy's own) | fixed | adaptive (mixture-of-horizons policies)
    adaptive_ratio: float = 0.0  # 0: the policy's own
    device: str = "auto"
    num_threads: int = 0
    video: bool = False
    video_episodes: int = 2
    video_size: int = 224
    image_size: int = 0  # 0: the checkpoint's; else refused unless it is the checkpoint's
    cameras: list[str] = field(default_factory=list)  # empty: the checkpoint's; else refused unless they are the checkpoint's
    rerun: bool = False  # Rerun recordings (.rrd) of the first rerun_episodes episodes per task (the viewer extra)
    rerun_episodes: int = 2
    out: str = ""  # results folder; default: <run>/eval/step_N for a run's checkpoint, else <checkpoint>/eval
    progress: bool = True
    # Composition: more checkpoints that denoise together with `checkpoint` (mixpolicy.policies.compose),
    # with fixed weights (policy 0 first; summing to 1) or, empty, weights chosen per task on validation seeds.
    compose: list[str] = field(default_factory=list)
    compose_weights: list[float] = field(default_factory=list)
    compose_val_episodes: int = 10
    compose_val_seed: int = 900_000
    # Simulated inference delay (control steps between an observation and its chunk) and the
    # real-time inference mode: naive | rti | rtc | rti+rtc (mixpolicy.envs.chunking).
    delay: int = 0
    mode: str = "naive"
    assumed_delay: int = -1  # the frozen prefix rtc assumes (-1: the true delay; set it to study a misestimate)
    rti_k: int = 2  # warm-started solver steps (rti modes)
    rti_start_noise: float | str = "auto"  # where warm starts begin: auto | tail | a noise std (mixpolicy.deploy.rti)
    prefix: str = "guidance"  # rtc: guidance | hard | conditioned
    # Mid-episode perturbation (mixpolicy.envs.perturb): none | goal (the goal jumps) | object (the object is pushed),
    # perturb_distance metres in a direction drawn from the episode seed, just before step perturb_step.
    perturb: str = "none"
    perturb_step: int = 30
    perturb_distance: float = 0.1

    def __post_init__(self):
        check(bool(self.checkpoint), "checkpoint", "a checkpoint folder is required (checkpoint=path)")
        check(self.episodes_per_task >= 1, "episodes_per_task", "must be >= 1")
        check(self.num_envs >= 1, "num_envs", "must be >= 1")
        check(self.env in ENVIRONMENTS, "env", f"unknown env {self.env!r}; choose from {', '.join(ENVIRONMENTS)}")
        cap = environment(self.env).max_episode_steps_cap
        check(self.max_episode_steps >= 0, "max_episode_steps", "must be >= 0 (0: the environment's own)")
        check(not cap or self.max_episode_steps <= cap, "max_episode_steps", f"must be <= {cap} for {self.env}")
        check(self.num_inference_steps >= 0, "num_inference_steps", "must be >= 0 (0: the policy's own)")
        check(self.n_action_steps >= 0, "n_action_steps", "must be >= 0 (0: the policy's own)")
        check(self.execution in ("", "fixed", "adaptive"), "execution", "must be fixed or adaptive (empty: the policy's own)")
        check(self.adaptive_ratio >= 0, "adaptive_ratio", "must be >= 0 (0: the policy's own)")
        check(
            not (self.execution == "adaptive" and self.n_action_steps),
            "n_action_steps",
            "sets a fixed count; adaptive execution chooses the count per chunk (leave n_action_steps=0)",
        )
        check(self.video_episodes >= 0, "video_episodes", "must be >= 0")
        check(self.rerun_episodes >= 0, "rerun_episodes", "must be >= 0")
        n = 1 + len(self.compose)
        check(not self.compose_weights or len(self.compose_weights) == n, "compose_weights", f"needs {n} weights (checkpoint, then compose)")
        check(not self.compose_weights or self.compose, "compose_weights", "weights need compose=[...] checkpoints")
        check(self.compose_val_episodes >= 1, "compose_val_episodes", "must be >= 1")
        check(self.seed >= 0, "seed", "must be >= 0")
        check(self.image_size >= 0, "image_size", "must be >= 0 (0: the checkpoint's)")
        if self.tasks:
            environment(self.env).check_tasks(self.tasks)
        check(self.delay >= 0, "delay", "must be >= 0")
        check(self.mode in MODES, "mode", f"must be one of {', '.join(MODES)}")
        check(self.prefix in PREFIX_MODES, "prefix", f"must be one of {', '.join(PREFIX_MODES)}")
        check(self.rti_k >= 1, "rti_k", "must be >= 1")
        check(check_start_noise(self.rti_start_noise), "rti_start_noise", f"must be auto, tail or a noise std > 0, got {self.rti_start_noise!r}")
        check(self.perturb in PERTURB_KINDS, "perturb", f"must be one of {', '.join(PERTURB_KINDS)}")
        check(self.perturb_step >= 0, "perturb_step", "must be >= 0")
        check(self.perturb_distance > 0, "perturb_distance", "must be > 0 (metres)")
        if self.perturb != "none":
            check_perturbation(self.env, self.perturb, list(self.tasks))
