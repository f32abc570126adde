"""The steps that build a training run, each a function, in the order the trainer calls them.

Random state matters here: the torch seed is set once in :func:`configure_compute`, and
only the policy's construction draws from it, so a run with the same seed starts from the
same weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixpolicy.config import check
from mixpolicy.datasets.assembly import WindowOptions, assemble_training_data
from mixpolicy.datasets.augment import BatchImageAugment, ImageAugmentConfig
from mixpolicy.datasets.normalizer import Normalizer
from mixpolicy.datasets.replay_buffer import UNKNOWN_TASK
from mixpolicy.datasets.selection import EpisodeSelection
from mixpolicy.errors import UserError
from mixpolicy.keys import is_image_key
from mixpolicy.policies.config import PolicyConfig
from mixpolicy.policies.denoising_policy import DenoisingPolicy
from mixpolicy.policies.denoising_policy import TASK_KEY, ShapeMeta, key_offsets
from mixpolicy.train.checkpointing import LAST, TRAIN_STATE_FILE, CheckpointStore
from mixpolicy.train.config import TrainConfig
from mixpolicy.train.distributed import ProcessGroup
from mixpolicy.train.validation import ValidationLoss
from mixpolicy.utils import set_threads


@dataclass
class TrainingData:
    """What the trainer trains on.

    ``windows`` is a ``torch.utils.data.Dataset`` whose items are dicts of tensors
    (observation keys ``(n_obs_steps, ...)``, the action key ``(horizon, action_dim)``,
    ``task``). A :class:`~mixpolicy.datasets.sampler.WindowDataset` gathers whole batches
    (in the training process when ``loader.num_workers == 0``); any other dataset is read
    window by window through a DataLoader. ``val_windows`` (same kind) are the held-out
    episodes' windows, None without a validation split.
    """

    windows: Any
    shape_meta: ShapeMeta
    normalizer: Normalizer
    source: str = ""
    val_windows: Any = None
    storage: str = "memory"  # memory | disk
    stats_source: str = "computed"  # saved | computed


def find_resume_checkpoint(cfg: TrainConfig, out: Path, checkpoints: CheckpointStore) -> Path | None:
    """The checkpoint resume=true continues from (None for a fresh run); refuses a non-empty folder otherwise."""
    if out.exists() and any(out.iterdir()) and not (cfg.resume or cfg.overwrite):
        raise UserError(f"output folder {out} is not empty (pass resume=true to continue or overwrite=true)")
    if not cfg.resume:
        return None
    resume_dir = checkpoints.resolve(LAST)
    if resume_dir is None or not (resume_dir / TRAIN_STATE_FILE).is_file():
        raise UserError(f"nothing to resume in {out}: no {checkpoints.root / LAST / TRAIN_STATE_FILE}")
    return resume_dir


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full fp32. ``auto``: bf16 on GPUs, fp32 on CPUs
    (bf16 autocast was slower on the CPUs measured, see BENCHMARKS.md)."""
    if name == "bf16" or (name == "auto" and device.type == "cuda"):
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("precision=bf16 but this GPU does not support bfloat16; use precision=fp32")
        return torch.bfloat16
    return None


def configure_compute(cfg: TrainConfig, group: ProcessGroup) -> torch.dtype | None:
    """Threads, precision and the torch seed; returns the autocast dtype (None: fp32)."""
    set_threads(cfg.num_threads or group.cores_per_process())
    autocast_dtype = resolve_precision(cfg.precision, group.device)
    if group.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    return autocast_dtype


def build_training_data(
    cfg: TrainConfig,
    offsets: dict[str, range] | None = None,
    base_tasks: list[str] | None = None,
    base_task_descriptions: dict[str, str] | None = None,
) -> TrainingData:
    """Windows for the policy's declared key offsets over the selected episodes of ``cfg.dataset``.

    With ``val_ratio`` the selected episodes split into training and validation ones
    (split by episode and task, fixed by ``seed``).
    """
    split = dict(tasks=list(cfg.tasks), successful_only=cfg.successful_only, max_episodes=cfg.max_episodes, val_ratio=cfg.val_ratio, seed=cfg.seed)
    selection = EpisodeSelection(**split, split="train" if cfg.val_ratio else "all")
    options = WindowOptions(
        storage=cfg.data.storage,
        memory_budget_bytes=int(cfg.data.memory_budget_gb * (1 << 30)),
        normalizer_mode=cfg.normalizer.mode,
        normalizer_modes=dict(cfg.normalizer.modes),
        saved_stats=cfg.normalizer.saved_stats,
    )
    data = assemble_training_data(
        cfg.dataset,
        offsets if offsets is not None else key_offsets(cfg.policy),
        cfg.policy.action_key,
        selection,
        task_key=TASK_KEY,
        base_tasks=base_tasks,
        base_task_descriptions=base_task_descriptions,
        discrete_action_scale=cfg.policy.discrete_action_scale,
        image_keys=[k for k in cfg.policy.obs_keys if is_image_key(k)],
        options=options,
        val_selection=EpisodeSelection(**split, split="val") if cfg.val_ratio else None,
    )
    obs = dict(data.obs_shapes)
    if cfg.data.image_size:  # the policy (and its checkpoint) takes frames of the resized size
        obs.update({k: [*cfg.data.image_size, obs[k][-1]] for k in obs if is_image_key(k)})
    shape_meta = ShapeMeta(
        obs=obs,
        action_dim=data.action_dim,
        tasks=data.tasks,
        discrete_action_dims=data.discrete_action_dims,
        task_descriptions=data.task_descriptions,
        fps=data.fps,
    )
    return TrainingData(
        data.windows, shape_meta, data.normalizer, data.source, data.val_windows, storage=data.storage, stats_source=data.stats_source
    )


def build_augment(cfg: ImageAugmentConfig, policy_cfg: PolicyConfig, image_size: list[int] | None = None) -> BatchImageAugment | None:
    """The on-device augmentation of training batches' camera keys (after the resize to
    ``data.image_size``, when given), or None when neither is set.

    Evaluation and deployment feed whole frames and the image encoder centre-crops them to
    ``policy.image_encoder.crop_size``; so a random crop here must be to that same size
    (the encoder's own crop then leaves the already cropped frames as they are).
    """
    augment = BatchImageAugment(cfg, resize=tuple(image_size) if image_size else None)
    if not augment.active:
        return None
    what = "augment" if BatchImageAugment(cfg).active else "data.image_size"
    check(any(is_image_key(k) for k in policy_cfg.obs_keys), what, "is set but policy.obs_keys has no image_<camera> key")
    crop = policy_cfg.image_encoder.crop_size
    check(
        not cfg.crop_size or cfg.crop_size == crop,
        "augment.crop_size",
        f"{cfg.crop_size} contradicts policy.image_encoder.crop_size={crop}, the centre crop evaluation applies; "
        f"set both to the same size (or augment.crop_size=0 to let the encoder crop)",
    )
    return augment


def build_validation(cfg: TrainConfig, data: TrainingData) -> ValidationLoss | None:
    """The validation loss every ``val_every`` steps, or None."""
    if not cfg.val_every:
        return None
    if data.val_windows is None or len(data.val_windows) == 0:
        raise UserError("val_every > 0 but the training data has no validation windows (set val_ratio > 0)")
    resize = None
    if cfg.data.image_size:  # validation frames at the size the policy trains on (no augmentation)
        resizer = BatchImageAugment(resize=tuple(cfg.data.image_size)).eval()
        image_keys = [k for k in cfg.policy.obs_keys if is_image_key(k)]

        def resize(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {**batch, **{k: resizer.frames(batch[k]) for k in image_keys}}

    return ValidationLoss(data.val_windows, cfg.val_windows, cfg.batch_size, cfg.seed, transform=resize)


def build_policy(policy_cfg: PolicyConfig, data: TrainingData) -> nn.Module:
    """The one place training builds a policy."""
    return DenoisingPolicy(policy_cfg, data.shape_meta, data.normalizer)


def eval_tasks(cfg: TrainConfig, policy: nn.Module) -> list[str]:
    """The tasks periodic evaluation runs, checked now rather than at the first evaluation."""
    tasks = cfg.eval.tasks or list(policy.shape_meta.tasks)
    if not tasks or UNKNOWN_TASK in tasks:
        raise UserError("eval.every > 0 but the dataset records no Meta-World tasks; set eval.tasks=[...]")
    if policy.task_conditioned:
        for t in tasks:
            policy.task_index(t)  # a task the policy never saw fails here
    return tasks


def lr_lambda(warmup: int, total: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def build_optimizer(policy: nn.Module, cfg: TrainConfig):
    """AdamW (no weight decay on biases, norms, embeddings, positions) and the warmup-cosine schedule.

    Frozen parameters stay in the groups: they never get a gradient, so AdamW skips them.
    """
    decay, no_decay = [], []
    for name, p in policy.named_parameters():
        (no_decay if p.ndim < 2 or "embed" in name or name.endswith(".pos") else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=tuple(cfg.betas),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
    return optimizer, scheduler


def build_ema(policy: nn.Module, cfg: TrainConfig):
    from diffusers.training_utils import EMAModel

    return EMAModel(policy.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=cfg.ema_power)


def compile_network(policy: nn.Module, cfg: TrainConfig) -> None:
    policy.net.compile(mode=cfg.compile_mode)  # in place: parameter names and checkpoints are unchanged


class LossModule(nn.Module):
    """``forward`` = the policy's ``compute_loss``, so DistributedDataParallel's hooks see it."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, batch: dict[str, torch.Tensor]):
        return self.policy.compute_loss(batch)


def wrap_for_processes(policy: nn.Module, group: ProcessGroup) -> nn.Module:
    """The module the loop calls: the loss, inside DistributedDataParallel when several processes train."""
    loss_module: nn.Module = LossModule(policy)
    if not group.distributed:
        return loss_module
    from torch.nn.parallel import DistributedDataParallel

    # A mixture policy may leave an expert without samples in a step: only then must
    # DDP search the graph for unused parameters. Buffers (normalizer statistics)
    # never change, so they are synchronized once at construction, not every forward.
    return DistributedDataParallel(
        loss_module,
        device_ids=[group.device.index] if group.device.type == "cuda" else None,
        find_unused_parameters=policy.skips_parameters,
        gradient_as_bucket_view=True,
        **no_buffer_sync(DistributedDataParallel),
    )


def no_buffer_sync(ddp_class) -> dict[str, bool]:
    """The DDP option that skips buffer broadcasts on every forward: ``forward_sync_buffers``
    where torch has it (2.13 and later), ``broadcast_buffers`` before."""
    import inspect

    params = inspect.signature(ddp_class.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
