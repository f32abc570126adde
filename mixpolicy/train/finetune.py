"""Starting a run from a trained checkpoint (``init_from``) and freezing parts of the policy.

``init_from`` loads weights into a freshly built policy of the same architecture: the
checkpoint's EMA weights (``init_from_weights=ema``, what its ``model.safetensors`` holds)
or its raw weights (``raw``, from its training state). Without any ``policy.*`` option
the checkpoint's own policy config is used. The normalizer is fitted on the new data
unless ``init_keep_normalizer=true``. The task vocabulary is the checkpoint's, extended by
the new data's other tasks: old tasks keep their embedding rows, new ones get fresh rows.
Only the optimizer, scheduler and EMA start over; ``resume`` is what continues a run.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from mixpolicy.errors import UserError
from mixpolicy.policies.checkpoint import WEIGHTS_FILE, read_checkpoint_meta
from mixpolicy.policies.config import PolicyConfig, policy_config_from_dict
from mixpolicy.train.checkpointing import LAST, raw_weights, read_train_state
from mixpolicy.train.config import TrainConfig, given_options

NORMALIZER_PREFIX = "normalizer."
TASK_ROWS_PREFIX = "task_embedding."  # tensors whose first dimension is the task vocabulary
_SHOWN = 3


def init_checkpoint(init_from: str) -> Path:
    """The checkpoint folder ``init_from`` names (a run folder means its ``checkpoints/last``)."""
    path = Path(init_from)
    if not (path / "config.json").is_file() and (path / "checkpoints" / LAST).is_dir():
        path = path / "checkpoints" / LAST
    read_checkpoint_meta(path)  # a one-line error when it is no checkpoint
    return path


def init_policy_config(cfg: TrainConfig, ckpt: Path) -> PolicyConfig:
    """The checkpoint's policy config when the run gives no policy option, else the run's."""
    if any(k.startswith("policy.") for k in given_options(cfg)):
        return cfg.policy
    return policy_config_from_dict(read_checkpoint_meta(ckpt)["policy"])


def with_frozen_routers(policy_cfg: PolicyConfig) -> PolicyConfig:
    """A copy of ``policy_cfg`` whose policy builds its routers frozen (MoDE networks have routers).

    The run's config keeps its own policy options, so repeating the command on resume matches it.
    """
    if policy_cfg.network.type != "mode":
        raise UserError(f"freeze_routers=true needs a policy with routers (mode, mode_moh); this one is {policy_cfg.type!r}")
    return replace(policy_cfg, network=replace(policy_cfg.network, freeze_router=True))


def checkpoint_tasks(ckpt: Path) -> tuple[list[str], dict[str, str]]:
    """(task vocabulary, task descriptions) a checkpoint's policy was built with."""
    shape = read_checkpoint_meta(ckpt)["shape_meta"]
    return list(shape.get("tasks", [])), dict(shape.get("task_descriptions", {}))


def load_init_weights(policy: torch.nn.Module, ckpt: Path, weights: str, keep_normalizer: bool) -> None:
    """Copy the checkpoint's weights into ``policy``; a one-line error names what does not fit."""
    if weights == "ema":
        state = load_file(str(ckpt / WEIGHTS_FILE))
    else:
        state = raw_weights(read_train_state(ckpt)[0])
    own = policy.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for key, now in own.items():
        if key.startswith(NORMALIZER_PREFIX) and not keep_normalizer:
            continue
        if key not in state:
            problems.append(f"{key} missing from the checkpoint")
            continue
        saved = state[key]
        if saved.shape == now.shape:
            loaded[key] = saved
        elif key.startswith(TASK_ROWS_PREFIX) and saved.shape[1:] == now.shape[1:] and saved.shape[0] < now.shape[0]:
            rows = now.clone()
            rows[: saved.shape[0]] = saved  # old tasks keep their rows; new tasks keep their fresh ones
            loaded[key] = rows
        else:
            problems.append(f"{key} is {list(saved.shape)} in the checkpoint, {list(now.shape)} here")
    problems += [f"{key} is not in this policy" for key in state if key not in own]
    if problems:
        more = f" and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
        raise UserError(
            f"init_from={ckpt}: the weights do not fit the configured policy ({'; '.join(problems[:_SHOWN])}{more}); "
            "init_from needs the same architecture (leave out policy options to use the checkpoint's)"
        )
    policy.load_state_dict(loaded, strict=False)


def freeze_encoder(policy: torch.nn.Module) -> int:
    """Stop training the observation encoders (low-dim and cameras); returns how many parameters froze."""
    parts = [m for m in (policy.obs_encoder, policy.image_encoder) if m is not None]
    for m in parts:
        m.requires_grad_(False)
    return sum(p.numel() for m in parts for p in m.parameters())
