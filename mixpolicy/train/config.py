"""Training run configs, and the config a resumed run continues with.

``resume=true`` continues the run's saved config (``<out_dir>/train_config.json``), not
the command line's. An option counts as given when it differs from the packaged
default (the policy counts as given as a whole when any of its options does, since a
preset is chosen as a group). A given option that differs from the saved value is
refused, all of them listed on one line, unless ``resume_overrides`` names it (a name
covers its sub-options: ``eval`` covers ``eval.every``). A named option takes the
command line's value even when that equals the default (``eval.every=0
resume_overrides=[eval.every]`` turns evaluation off). Options that change only how fast
the same numbers come out (:data:`RUNTIME_KEYS`) apply whenever given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixpolicy.config import check, from_dict, to_dict
from mixpolicy.datasets.assembly import STORAGES
from mixpolicy.datasets.augment import ImageAugmentConfig
from mixpolicy.datasets.normalizer import DEFAULT_MODE, MODES
from mixpolicy.datasets.resize import check_size
from mixpolicy.errors import UserError
from mixpolicy.policies.config import PolicyConfig, policy_config_from_dict
from mixpolicy.train.batches import LoaderConfig
from mixpolicy.train.tracking import TrackingConfig

RUN_CONFIG_FILE = "train_config.json"
PRECISIONS = ("auto", "fp32", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
INIT_WEIGHTS = ("ema", "raw")
RUNTIME_KEYS = (
    "progress",
    "num_threads",
    "loader.num_workers",
    "loader.pin_memory",
    "loader.prefetch_factor",
    "data.storage",
    "data.memory_budget_gb",
)
_RESUME_CONTROL = ("resume", "resume_overrides", "overwrite")


@dataclass
class PeriodicEvalConfig:
    """Closed-loop evaluation of the EMA weights during training; the best step is kept."""

    every: int = 0
    episodes_per_task: int = 10
    tasks: list[str] = field(default_factory=list)
    seed: int = 100_000
    num_envs: int = 10
    max_episode_steps: int = 500
    num_inference_steps: int = 0
    video_episodes: int = 0  # mp4s of the first N episodes per task in eval/step_N/videos, and in tensorboard

    def __post_init__(self):
        check(self.every >= 0, "eval.every", "must be >= 0 (0: no evaluation during training)")
        check(self.video_episodes >= 0, "eval.video_episodes", "must be >= 0")
        check(self.episodes_per_task >= 1, "eval.episodes_per_task", "must be >= 1")
        check(self.num_envs >= 1, "eval.num_envs", "must be >= 1")
        check(1 <= self.max_episode_steps <= 500, "eval.max_episode_steps", "must be in [1, 500]")
        check(self.num_inference_steps >= 0, "eval.num_inference_steps", "must be >= 0 (0: the policy's own)")
        check(self.seed >= 0, "eval.seed", "must be >= 0")
        if self.tasks:
            from mixpolicy.envs.metaworld_env import check_task_names

            check_task_names(self.tasks)


@dataclass
class DataConfig:
    """Where the training windows live (the same windows either way, see ``datasets.assembly``)."""

    storage: str = "auto"  # auto | memory | disk
    memory_budget_gb: float = 4.0  # auto: in memory when the selected rows of the window keys fit, per process
    image_size: list[int] = field(default_factory=list)  # [H, W]: camera frames resized on the device per batch (cover, centre crop)

    def __post_init__(self):
        check_size(self.image_size, "data.image_size")
        check(self.storage in STORAGES, "data.storage", f"must be one of {STORAGES}")
        check(self.memory_budget_gb > 0, "data.memory_budget_gb", "must be > 0")


@dataclass
class NormalizerConfig:
    """How low-dim keys are normalized; the statistics travel in the checkpoint."""

    mode: str = DEFAULT_MODE  # every normalized key (low-dim observations and the action)
    modes: dict[str, str] = field(default_factory=dict)  # key -> mode, for the keys that differ
    saved_stats: bool = True  # the store's saved stats (mixpolicy data stats) when they cover every key

    def __post_init__(self):
        check(self.mode in MODES, "normalizer.mode", f"must be one of {MODES}")
        for key, mode in self.modes.items():
            check(mode in MODES, f"normalizer.modes.{key}", f"must be one of {MODES}")


@dataclass
class TrainConfig:
    dataset: str = ""
    out_dir: str = "runs/train"
    policy: Any = None
    steps: int = 3000
    batch_size: int = 256
    grad_accum_steps: int = 1
    lr: float = 1e-3
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 100
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_power: float = 0.75
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    compile_mode: str = "default"
    num_threads: int = 0
    tasks: list[str] = field(default_factory=list)
    successful_only: bool = True
    max_episodes: int = 0
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    normalizer: NormalizerConfig = field(default_factory=NormalizerConfig)
    augment: ImageAugmentConfig = field(default_factory=ImageAugmentConfig)
    val_ratio: float = 0.0
    val_every: int = 0
    val_windows: int = 1024
    log_every: int = 50
    checkpoint_every: int = 0
    keep_last: int = 3
    eval: PeriodicEvalConfig = field(default_factory=PeriodicEvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    init_from: str = ""
    init_from_weights: str = "ema"
    init_keep_normalizer: bool = False
    freeze_encoder: bool = False
    freeze_routers: bool = False
    add_experts: int = 0
    distill_from: str = ""
    distill_steps: int = 1
    distill_first_share: float = 0.5
    resume: bool = False
    resume_overrides: list[str] = field(default_factory=list)
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        if not isinstance(self.policy, PolicyConfig):
            self.policy = policy_config_from_dict(self.policy or {})
        if not (self.dataset or self.resume):
            raise UserError("missing required option(s) dataset (dataset=path/to/data.zarr; resume=true reads the run's own)")
        check(bool(self.out_dir), "out_dir", "an output folder is required")
        check(self.steps >= 1, "steps", "must be >= 1")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.grad_accum_steps >= 1, "grad_accum_steps", "must be >= 1")
        check(self.batch_size % self.grad_accum_steps == 0, "batch_size", f"must be divisible by grad_accum_steps={self.grad_accum_steps}")
        check(self.lr > 0, "lr", "must be > 0")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "must be two numbers in [0, 1)")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        check(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)")
        check(0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1)")
        check(self.precision in PRECISIONS, "precision", f"must be one of {PRECISIONS}")
        check(self.compile_mode in COMPILE_MODES, "compile_mode", f"must be one of {COMPILE_MODES}")
        check(self.max_episodes >= 0, "max_episodes", "must be >= 0 (0 means all)")
        check(0 <= self.val_ratio < 1, "val_ratio", "must be in [0, 1) (0: no validation split)")
        check(self.val_every >= 0, "val_every", "must be >= 0 (0: no validation loss)")
        check(not self.val_every or self.val_ratio > 0, "val_every", "needs val_ratio > 0 (the episodes to validate on)")
        check(self.val_windows >= 0, "val_windows", "must be >= 0 (0: every validation window)")
        check(self.log_every >= 1, "log_every", "must be >= 1")
        check(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0: only at the end and at evaluations)")
        check(self.keep_last >= 1, "keep_last", "must be >= 1")
        check(self.num_threads >= 0, "num_threads", "must be >= 0 (0: all cores, split between local processes)")
        check(self.init_from_weights in INIT_WEIGHTS, "init_from_weights", f"must be one of {INIT_WEIGHTS}")
        check(not (self.distill_from and self.add_experts), "distill_from", "cannot be combined with add_experts")
        check(self.add_experts >= 0, "add_experts", "must be >= 0 (0: no new experts)")
        check(not self.add_experts or bool(self.init_from), "add_experts", "needs init_from=<checkpoint> (experts are added to a trained policy)")
        check(self.distill_steps >= 1, "distill_steps", "must be >= 1 (the student's sampling steps)")
        check(0 <= self.distill_first_share <= 1, "distill_first_share", "must be in [0, 1]")
        check(not (self.resume and self.overwrite), "resume", "cannot be combined with overwrite=true")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _unflat(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def _defaults() -> dict[str, Any]:
    """The packaged defaults, flattened (configs/train.yaml holds the same values)."""
    return {**_flat(to_dict(TrainConfig(resume=True))), "resume": False}


def given_options(cfg: TrainConfig) -> dict[str, Any]:
    """Flattened options of ``cfg`` that differ from the packaged defaults (the whole policy if any policy option does)."""
    defaults = _defaults()
    current = _flat(to_dict(cfg))
    given = {k: v for k, v in current.items() if k.split(".")[0] != "policy" and defaults.get(k, object()) != v}
    policy = {k: v for k, v in current.items() if k.split(".")[0] == "policy"}
    if any(defaults.get(k, object()) != v for k, v in policy.items()):
        given.update(policy)
    return given


def _named(key: str, names: list[str]) -> bool:
    return any(key == n or key.startswith(n + ".") for n in names)


def _show(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def resume_config(cfg: TrainConfig) -> TrainConfig:
    """The saved config of the run in ``cfg.out_dir`` with the command line's permitted changes."""
    path = Path(cfg.out_dir) / RUN_CONFIG_FILE
    if not path.is_file():
        raise UserError(f"nothing to resume in {cfg.out_dir}: no {path}")
    try:
        saved_dict = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"cannot resume: {path} is not valid JSON ({exc})") from None
    defaults = {k: v for k, v in _defaults().items() if not _named(k, ["policy"])}
    saved = {**defaults, **_flat(saved_dict)}  # a run saved before an option existed had its default
    current = _flat(to_dict(cfg))
    unknown = [n for n in cfg.resume_overrides if not any(_named(k, [n]) for k in current)]
    if unknown:
        raise UserError(f"resume_overrides names unknown option(s) {', '.join(unknown)}")
    given = given_options(cfg)
    saved_kind = policy_config_from_dict(saved_dict.get("policy")).type
    if any(_named(k, ["policy"]) for k in given) and cfg.policy.type != saved_kind:  # no override can make the weights fit
        raise UserError(f"cannot resume: {cfg.out_dir} holds a {saved_kind!r} policy, the config asks for {cfg.policy.type!r}")
    differing = [k for k in given if k not in _RESUME_CONTROL and saved.get(k) != given[k]]
    refused = [k for k in differing if not _named(k, cfg.resume_overrides) and k not in RUNTIME_KEYS]
    if refused:
        listed = ", ".join(f"{k}={_show(given[k])} (saved {_show(saved.get(k))})" for k in refused)
        raise UserError(
            f"resume=true continues the saved config {path}; these options differ from it: {listed} "
            f"(name them in resume_overrides=[{','.join(refused)}] to change them, or leave them out)"
        )
    merged = {k: v for k, v in saved.items() if k not in _RESUME_CONTROL}
    for k, v in current.items():
        if _named(k, cfg.resume_overrides) or (k in RUNTIME_KEYS and k in given):
            merged[k] = v
    merged.update(resume=True, overwrite=False, resume_overrides=list(cfg.resume_overrides))
    return from_dict(TrainConfig, _unflat(merged))
