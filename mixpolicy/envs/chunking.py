"""How evaluation turns chunks into actions under a simulated inference delay, and the
real-time inference modes (naive, RTI warm start, real-time chunking, both).

With ``delay`` d > 0 (at most the actions executed per chunk) an environment asks for
its next chunk when d actions are left in its queue; the chunk, planned from that observation, arrives after those d actions ran, and its
first d actions (already in the past) are dropped. Time is counted in control steps, not on
a clock, so runs are deterministic. The first chunk of an episode is awaited (no step
passes), as the real-time loop holds before it. With d = 0 this is plain receding-horizon
execution.

Modes: ``naive`` plans every chunk from the prior; ``rti`` warm-starts from the previous
chunk shifted by the steps since its observation (the last ``rti_k`` solver steps run);
``rtc`` ties the first ``assumed_delay`` actions of the new chunk to that shifted chunk
(``prefix``: guidance, hard or conditioned; :mod:`mixpolicy.policies.prefix`); ``rti+rtc``
does both. Every chunk switch records the seam jump: the L2 distance between the last
action of the old chunk and the first of the new one.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from mixpolicy.deploy.rti import chunk_conditions, start_noise_std, warm_schedule_steps
from mixpolicy.errors import UserError
from mixpolicy.policies.prefix import PREFIX_MODES

MODES = ("naive", "rti", "rtc", "rti+rtc")


@dataclass
class SlotChunks:
    """One environment's chunk state within an episode."""

    prev: torch.Tensor | None = None  # the last chunk, normalized (H, A)
    obs_step: int = 0  # the step of the observation it was planned from
    incoming: np.ndarray | None = None  # actions waiting to arrive
    last_action: np.ndarray | None = None
    seams: list[float] = field(default_factory=list)


class ChunkPlanner:
    def __init__(self, policy, mode: str = "naive", delay: int = 0, assumed_delay: int | None = None,
                 rti_k: int = 2, prefix: str = "guidance", num_steps: int | None = None,
                 rti_start_noise: float | str = "auto"):  # fmt: skip
        if mode not in MODES:
            raise UserError(f"inference mode {mode!r}; choose from {', '.join(MODES)}")
        if prefix not in PREFIX_MODES:
            raise UserError(f"prefix {prefix!r}; choose from {', '.join(PREFIX_MODES)}")
        self.policy, self.mode, self.delay = policy, mode, int(delay)
        self.assumed = self.delay if assumed_delay is None or assumed_delay < 0 else int(assumed_delay)
        self.prefix_mode = prefix
        self.schedule_steps = num_steps or policy.cfg.objective.num_inference_steps
        # Warm starts run the last rti_k steps of their own schedule (rti_start_noise picks it).
        self.warm_steps = self.schedule_steps
        if "rti" in mode:
            if rti_k < 1:
                raise UserError(f"rti_k={rti_k} must be >= 1")
            self.warm_steps = warm_schedule_steps(policy.objective, rti_k, self.schedule_steps, rti_start_noise)
        self.start = self.warm_steps - rti_k
        if "rti" in mode and not 0 <= self.start < self.warm_steps:
            raise UserError(f"rti_k={rti_k} must be in [1, {self.schedule_steps}] (the sampling steps)")
        if "rtc" in mode and prefix == "conditioned" and not policy.prefix_conditioned:
            raise UserError("prefix=conditioned needs a policy trained with policy.train_delay_max > 0")

    def warm_info(self) -> dict:
        """Where warm starts begin (for results): their schedule length and first noise std."""
        if "rti" not in self.mode:
            return {}
        std = start_noise_std(self.policy.objective, self.warm_steps, self.warm_steps - self.start)
        return {"rti_schedule_steps": self.warm_steps, "rti_start_noise_std": std}

    def reset(self, slot) -> None:
        slot.chunks = SlotChunks()

    def wants_chunk(self, slot) -> bool:
        return slot.chunks.incoming is None and len(slot.queue) <= (self.delay if slot.chunks.prev is not None else 0)

    def plan(self, slots, obs, generator):
        """(raw chunks (B, H, A), executable (B,), normalized (B, H, A)) for ``slots``, planned
        in groups (warm-startable or not) and returned in the slots' order."""
        warm = [i for i, s in enumerate(slots) if s.chunks.prev is not None and self.mode != "naive"]
        cold = [i for i in range(len(slots)) if i not in warm]
        out: list = [None] * len(slots)
        for group, is_warm in ((cold, False), (warm, True)):
            if not group:
                continue
            sub = obs if len(group) == len(slots) else {k: v[group] for k, v in obs.items()}
            kw = {}
            if is_warm:
                prev = torch.stack([slots[i].chunks.prev for i in group])
                shift = torch.tensor([slots[i].steps - slots[i].chunks.obs_step for i in group])
                start = self.start if "rti" in self.mode else None
                prefix = self.prefix_mode if "rtc" in self.mode else "none"
                kw["warm_start"], kw["prefix"] = chunk_conditions(prev, shift, start, True, prefix, self.assumed, num_steps=self.warm_steps)
            plan = self.policy.plan(sub, generator, num_steps=self.schedule_steps, **kw)
            for j, i in enumerate(group):
                out[i] = (plan.actions[j].cpu().numpy(), int(plan.executable[j]), plan.normalized[j])
        return out

    def accept(self, slot, chunk: np.ndarray, n: int, normalized: torch.Tensor) -> None:
        """Queue a planned chunk: now when nothing is queued, else on arrival after ``delay`` steps."""
        c = slot.chunks
        first = c.prev is None
        c.prev, c.obs_step = normalized, slot.steps
        offset = 0 if first else self.delay
        actions = chunk[offset : offset + n]
        if not len(slot.queue):
            self._switch(slot, actions)
        else:
            c.incoming = actions

    def next_action(self, slot) -> np.ndarray:
        c = slot.chunks
        if not slot.queue and c.incoming is not None:
            self._switch(slot, c.incoming)
            c.incoming = None
        action = slot.queue.popleft()
        c.last_action = action
        return action

    def _switch(self, slot, actions: np.ndarray) -> None:
        c = slot.chunks
        if c.last_action is not None and len(actions):
            c.seams.append(float(np.linalg.norm(np.asarray(actions[0]) - c.last_action)))
        slot.queue = deque(actions)

    @staticmethod
    def seam_summary(slot) -> dict[str, float]:
        seams = slot.chunks.seams
        return {"seam_jump_mean": float(np.mean(seams)) if seams else 0.0, "seam_jump_max": float(max(seams, default=0.0))}
