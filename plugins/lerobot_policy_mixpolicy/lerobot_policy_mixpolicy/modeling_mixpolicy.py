"""A mixpolicy DenoisingPolicy behind LeRobot's policy interface.

LeRobot batches name features its way (``observation.state``, ``observation.images.<cam>``
as float (C, H, W) in [0, 1], ``task`` strings); the wrapper hands the DenoisingPolicy its
keys (``state``, ``image_<cam>`` as uint8 (H, W, 3), task indices). Normalization stays
inside the DenoisingPolicy (built from the dataset stats LeRobot passes), so the saved
``model.safetensors`` is a complete mixpolicy policy under ``model.`` and the processors
only batch and move tensors. At inference LeRobot sends one observation a step; the
wrapper keeps the last ``n_obs_steps`` of them and the actions still to run.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np
import torch
from lerobot.policies.pretrained import PreTrainedPolicy

from mixpolicy.datasets.normalizer import STAT_NAMES, Normalizer
from mixpolicy.errors import UserError
from mixpolicy.policies import lerobot_layout
from mixpolicy.keys import is_image_key
from mixpolicy.policies.config import policy_config_from_dict
from mixpolicy.policies.denoising_policy import TASK_KEY, DenoisingPolicy, ShapeMeta

from lerobot_policy_mixpolicy.configuration_mixpolicy import MixpolicyConfig


def dataset_tasks(dataset_meta: Any) -> list[str]:
    """The dataset's task strings in task-index order (LeRobot keeps them in a table indexed by task)."""
    tasks = getattr(dataset_meta, "tasks", None)
    if tasks is None:
        return []
    return [str(t) for t in tasks.sort_values("task_index").index]


def normalizer_from_stats(stats: dict, layout: dict[str, tuple[str, list[int]]], mode: str) -> Normalizer:
    """mixpolicy's normalizer for the low-dim keys and the action, from LeRobot's dataset stats."""
    names = {k: name for k, (name, _) in layout.items() if not is_image_key(k)}
    names[lerobot_layout.ACTION] = lerobot_layout.ACTION
    per_key = {}
    for key, name in names.items():
        if name not in stats:
            raise UserError(f"the dataset stats have no entry for {name!r}; cannot normalize it")
        per_key[key] = {s: np.asarray(torch.as_tensor(v).cpu(), np.float64) for s, v in stats[name].items() if s in STAT_NAMES}
    return Normalizer.from_stats(per_key, mode)


class MixpolicyPolicy(PreTrainedPolicy):
    config_class = MixpolicyConfig
    name = lerobot_layout.POLICY_TYPE

    def __init__(self, config: MixpolicyConfig, dataset_stats: dict | None = None, dataset_meta: Any = None, **kwargs):
        super().__init__(config)
        config.validate_features()
        if config.task_conditioning != "none" and not config.tasks:
            config.tasks = dataset_tasks(dataset_meta)
            if not config.tasks:
                raise UserError("policy.task_conditioning=embedding needs the dataset's tasks (train on a LeRobot dataset)")
        fields = config.layout_fields()
        self.layout = lerobot_layout.obs_layout(fields)
        cfg = policy_config_from_dict(lerobot_layout.policy_dict(fields))
        shape_meta = ShapeMeta.from_json(lerobot_layout.shape_meta_dict(fields))
        normalizer = normalizer_from_stats(dataset_stats, self.layout, config.normalization) if dataset_stats else None
        self.model = DenoisingPolicy(cfg, shape_meta, normalizer)
        self.reset()

    def get_optim_params(self):
        return self.parameters()

    def reset(self) -> None:
        self._history: deque[dict[str, torch.Tensor]] = deque(maxlen=self.config.n_obs_steps)
        self._actions: deque[torch.Tensor] = deque()

    # ------------------------------------------------------------------ batches
    def _inputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """LeRobot's batch -> the DenoisingPolicy's observation keys (a time axis, if any, kept)."""
        obs = {}
        for key, (name, _) in self.layout.items():
            if name not in batch:
                raise UserError(f"the batch has no {name!r}, which this policy was built for")
            x = batch[name]
            if is_image_key(key):
                if x.dtype != torch.uint8:  # LeRobot's float [0, 1] channel-first frames
                    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
                x = x.movedim(-3, -1)
            obs[key] = x
        if self.model.task_conditioned:
            obs[TASK_KEY] = self._task_indices(batch)
        return obs

    def _task_indices(self, batch: dict[str, Any]) -> torch.Tensor:
        tasks = batch.get("task")
        if tasks is None:
            raise UserError("this policy is task-conditioned: the batch needs its 'task' strings")
        tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        return torch.tensor([self.model.task_index(t) for t in tasks], dtype=torch.long, device=self.model.device)

    def _observe(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Add one step's observation; the history of the last n_obs_steps (the first repeated at the start)."""
        frame = self._inputs(batch)
        task = frame.pop(TASK_KEY, None)
        self._history.append(frame)
        while len(self._history) < self._history.maxlen:
            self._history.appendleft(self._history[0])
        obs = {k: torch.stack([f[k] for f in self._history], dim=1) for k in frame}
        if task is not None:
            obs[TASK_KEY] = task
        return obs

    # ------------------------------------------------------------------ LeRobot interface
    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        inputs = self._inputs(batch)
        inputs[lerobot_layout.ACTION] = batch[lerobot_layout.ACTION]
        return self.model.compute_loss(inputs)

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Any], **kwargs) -> torch.Tensor:
        _no_external_noise(kwargs)
        return self.model.plan(self._observe(batch)).actions

    @torch.no_grad()
    def select_action(self, batch: dict[str, Any], **kwargs) -> torch.Tensor:
        _no_external_noise(kwargs)
        obs = self._observe(batch)
        if not self._actions:
            plan = self.model.plan(obs)
            self._actions.extend(plan.actions[:, : int(plan.executable.min())].unbind(1))
        return self._actions.popleft()


def _no_external_noise(kwargs: dict) -> None:
    if kwargs.get("noise") is not None:
        raise ValueError("the mixpolicy policy draws its own initial noise; it takes no 'noise' argument")
