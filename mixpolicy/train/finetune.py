"""Starting a run from a trained checkpoint (``init_from``) and freezing parts of the policy.

``init_from`` loads weights into a freshly built policy of the same architecture: the
checkpoint's EMA weights (``init_from_weights=ema``, what its ``model.safetensors`` holds)
or its raw weights (``raw``, from its training state). Without any ``policy.*`` option
the checkpoint's own policy config is used. The normalizer is fitted on the new data
unless ``init_keep_normalizer=true``. The task vocabulary is the checkpoint's, extended by
the new data's other tasks: old tasks keep their embedding rows, new ones get fresh rows.
Only the optimizer, scheduler and EMA start over; ``resume`` is what continues a run.

``add_experts=N`` (continual learning, MoDE networks): every block gets N new experts and
router outputs for them, the new tasks new embedding rows; the old tasks are routed to
the old experts only (``network.task_experts``), the new ones to all. Only the new
experts, their router outputs and the new tasks' embedding rows train, and the
checkpoint's normalizer is kept, so the old tasks' actions stay bit-identical.

``distill_from=<checkpoint>`` trains a few-step student of a trained edm or flow policy
(:mod:`mixpolicy.policies.distill`): it starts from the teacher's weights (unless
``init_from`` names others of the same architecture), keeps its normalizer and samples in
``distill_steps`` evaluations by default.
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


def start_checkpoint(cfg: TrainConfig, resume_dir: Path | None) -> Path | None:
    """The checkpoint a fresh run starts from (None when resuming or from scratch); the run's
    policy config becomes the one it builds (a distillation student samples in ``distill_steps``)."""
    if cfg.distill_from and not cfg.init_from:
        cfg.init_from = cfg.distill_from  # the student starts from the teacher's weights
    if not cfg.init_from or resume_dir is not None:
        return None
    init_dir = init_checkpoint(cfg.init_from)
    cfg.policy = init_policy_config(cfg, init_dir)
    if cfg.distill_from:
        cfg.policy = student_config(cfg.policy, cfg.distill_steps)
    return init_dir


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


def run_policy_config(cfg: TrainConfig, tasks: list[str]) -> tuple[PolicyConfig, int]:
    """(the policy config a run builds, with frozen routers or added experts, the checkpoint's task count)."""
    policy_cfg = with_frozen_routers(cfg.policy) if cfg.freeze_routers else cfg.policy
    if not cfg.add_experts:
        return policy_cfg, 0
    n_old_tasks = len(checkpoint_tasks(init_checkpoint(cfg.init_from))[0])
    return with_added_experts(policy_cfg, cfg.add_experts, n_old_tasks, len(tasks)), n_old_tasks


def initialize(policy: torch.nn.Module, cfg: TrainConfig, init_dir: Path | None, n_old_tasks: int) -> None:
    """The checkpoint's weights (when starting from one) and the run's frozen parts."""
    if init_dir is not None:
        fresh = added_stage_keys(policy) if cfg.add_experts else set()
        keep = cfg.init_keep_normalizer or cfg.add_experts > 0 or bool(cfg.distill_from)
        load_init_weights(policy, init_dir, cfg.init_from_weights, keep, fresh)
    if cfg.freeze_encoder:
        freeze_encoder(policy)
    if cfg.add_experts:
        train_only_added_experts(policy, n_old_tasks)


def student_config(policy_cfg: PolicyConfig, steps: int) -> PolicyConfig:
    """A distillation student's config: the teacher's, sampling in ``steps`` evaluations by default."""
    obj = policy_cfg.objective
    if obj.type == "shortcut":
        raise UserError("distill_from: the teacher's shortcut objective already samples in few steps; distil an edm or flow policy")
    if obj.type not in ("edm", "flow"):
        raise UserError(f"distill_from: distillation needs a teacher with a continuous deterministic sampler (edm or flow); this one is {obj.type!r}")
    return replace(policy_cfg, objective=replace(obj, num_inference_steps=steps))


def attach_teacher(policy: torch.nn.Module, distill_from: str, first_share: float, device) -> None:
    """Load the frozen teacher of a distillation run and hand it to the student's loss."""
    from mixpolicy.policies.checkpoint import load_policy
    from mixpolicy.policies.distill import Teacher

    teacher = Teacher(load_policy(init_checkpoint(distill_from), device=device)[0], first_share)
    teacher.check_student(policy)
    policy.teacher = teacher


def with_added_experts(policy_cfg: PolicyConfig, n: int, n_old_tasks: int, n_tasks: int) -> PolicyConfig:
    """``policy_cfg`` with ``n`` more experts per block, reachable by the tasks past the first ``n_old_tasks``."""
    net = policy_cfg.network
    if net.type != "mode":
        raise UserError(f"add_experts needs a policy with experts (mode, mode_moh); this one is {policy_cfg.type!r}")
    if n_tasks <= n_old_tasks:
        raise UserError(f"add_experts={n}: the dataset has no task the checkpoint lacks (it knows {n_old_tasks}); add experts for new tasks")
    if net.task_experts and len(net.task_experts) != n_old_tasks:
        raise UserError(f"the checkpoint's network.task_experts has {len(net.task_experts)} entries for {n_old_tasks} tasks")
    old = list(net.task_experts) or [net.num_experts] * n_old_tasks
    total = net.num_experts + n
    network = replace(net, num_experts=total, added_experts=[*net.added_experts, n], task_experts=old + [total] * (n_tasks - n_old_tasks))
    return replace(policy_cfg, network=network)


def added_stage_keys(policy: torch.nn.Module) -> set[str]:
    """State-dict keys of the newest added expert stage (fresh, not in the checkpoint)."""
    stage = len(policy.cfg.network.added_experts) - 1
    return {k for k in policy.state_dict() if f".mlp.stages.{stage}." in k}


def train_only_added_experts(policy: torch.nn.Module, n_old_tasks: int) -> int:
    """Freeze everything but the newest expert stage and the new tasks' embedding rows; returns the trainable count."""
    policy.requires_grad_(False)
    stage = len(policy.cfg.network.added_experts) - 1
    for layer in policy.net.moe_layers():
        layer.stages[stage].requires_grad_(True)
    trainable = sum(p.numel() for layer in policy.net.moe_layers() for p in layer.stages[stage].parameters())
    emb = policy.task_embedding
    if isinstance(emb, torch.nn.Embedding):
        emb.weight.requires_grad_(True)
        old = torch.zeros(emb.num_embeddings, 1, dtype=torch.bool, device=emb.weight.device)
        old[:n_old_tasks] = True
        # Old rows get zero gradients: AdamW (no decay on embeddings) leaves them bit-identical.
        emb.weight.register_hook(lambda g: g.masked_fill(old, 0.0))
        trainable += (emb.num_embeddings - n_old_tasks) * emb.embedding_dim
    return trainable


def checkpoint_tasks(ckpt: Path) -> tuple[list[str], dict[str, str]]:
    """(task vocabulary, task descriptions) a checkpoint's policy was built with."""
    shape = read_checkpoint_meta(ckpt)["shape_meta"]
    return list(shape.get("tasks", [])), dict(shape.get("task_descriptions", {}))


def load_init_weights(policy: torch.nn.Module, ckpt: Path, weights: str, keep_normalizer: bool, fresh: set[str] = frozenset()) -> None:
    """Copy the checkpoint's weights into ``policy`` (but the ``fresh`` keys); a one-line error names what does not fit."""
    if weights == "ema":
        state = load_file(str(ckpt / WEIGHTS_FILE))
    else:
        state = raw_weights(read_train_state(ckpt)[0])
    own = policy.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for key, now in own.items():
        if key.startswith(NORMALIZER_PREFIX) and not keep_normalizer or key in fresh:
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
