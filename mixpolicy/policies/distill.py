"""Few-step students distilled from a trained policy (``mixpolicy train distill_from=<checkpoint>``).

The student has the teacher's architecture and objective and starts from its weights. Each
training sample is moved by the forward process to one level of the teacher's sampling
schedule (the noisiest level for a share ``first_share`` of the batch, else a uniform
draw); the teacher then runs its own sampler from that state to the clean level, through
its one inference path (:meth:`DenoisingPolicy.plan` with a warm start at that index, so
MoDE's expert cache, the mixture of horizons and second-order solvers all apply), and the
student learns to reach the teacher's result in one evaluation: the objective's own
target computed as if the teacher's result were the clean sample. The student is thereby
a consistency function of the teacher's probability-flow ODE on the schedule's levels:
one evaluation from the prior lands where the teacher's full schedule does, and further
steps (or RTI's warm start at a later level) re-noise and land there again.

Deterministic teachers only: a stochastic sampler has no single result to learn.
"""

from __future__ import annotations

from typing import Mapping

import torch

from mixpolicy.errors import UserError
from mixpolicy.policies.denoising_policy import WarmStart
from mixpolicy.policies.objectives import per_sample, randn


class Teacher:
    """A frozen trained policy that solves its own schedule from a given state at a given index."""

    def __init__(self, policy, first_share: float = 0.5):
        if policy.objective.step_conditioned:
            raise UserError(f"distill_from: the teacher's {policy.cfg.objective.type} objective already samples in few steps; distil an edm or flow policy")
        if policy.prefix_conditioned:
            raise UserError("distill_from: the teacher was trained with a clean action prefix (train_delay_max > 0); distil a policy without one")
        self.policy = policy.eval().requires_grad_(False)
        self.schedule = policy.objective.schedule()
        self.first_share = float(first_share)

    def check_student(self, student) -> None:
        """The student must read observations, tasks and actions as the teacher does."""
        t, s = self.policy, student
        for what, a, b in (
            ("objective", t.cfg.objective.type, s.cfg.objective.type),
            ("observation keys", list(t.cfg.obs_keys), list(s.cfg.obs_keys)),
            ("horizon", t.cfg.horizon, s.cfg.horizon),
            ("tasks", list(t.shape_meta.tasks), list(s.shape_meta.tasks)),
            ("action size", t.shape_meta.action_dim, s.shape_meta.action_dim),
        ):
            if a != b:
                raise UserError(f"distill_from: the student's {what} ({b}) differ from the teacher's ({a}); distil on the teacher's data and config")
        ts, ss = t.normalizer.state_dict(), s.normalizer.state_dict()
        if ts.keys() != ss.keys() or any(not torch.equal(ts[k], ss[k].to(ts[k].device)) for k in ts):
            raise UserError("distill_from: the student's normalizer differs from the teacher's (the student keeps the teacher's)")

    def draw_indices(self, n: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """Schedule index per sample: 0 (the prior's level) for ``first_share`` of them, else uniform."""
        dev = generator.device if generator is not None else "cpu"
        idx = torch.randint(0, len(self.schedule), (n,), generator=generator, device=dev)
        first = torch.rand(n, generator=generator, device=dev) < self.first_share
        return torch.where(first, torch.zeros_like(idx), idx).to(device)

    @torch.no_grad()
    def solve(self, obs: Mapping[str, torch.Tensor], x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The teacher's clean chunks (normalized) from states ``x`` at schedule indices ``idx``."""
        out = torch.empty_like(x)
        for i in torch.unique(idx).tolist():
            rows = (idx == i).nonzero().squeeze(1)
            sub = {k: v[rows] for k, v in obs.items() if torch.is_tensor(v) and v.shape[:1] == x.shape[:1]}
            plan = self.policy.plan(sub, warm_start=WarmStart(x[rows], start=int(i), renoise=False))
            out[rows] = plan.normalized.to(out.dtype)
        return out

    def objective_for(self, student_objective, obs: Mapping[str, torch.Tensor]) -> "DistillationTarget":
        return DistillationTarget(student_objective, self, obs)


class DistillationTarget:
    """The student's objective for one batch: its own parameterization, the teacher's result as target."""

    def __init__(self, objective, teacher: Teacher, obs: Mapping[str, torch.Tensor]):
        self.objective, self.teacher, self.obs = objective, teacher, obs

    def __getattr__(self, name):
        return getattr(self.objective, name)

    def loss(self, denoise, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        obj = self.objective
        idx = self.teacher.draw_indices(x0.shape[0], x0.device, generator)
        level = self.teacher.schedule.to(x0.device)[idx]
        x = obj.add_noise(x0, randn(x0.shape, generator, x0.device, x0.dtype), level)
        target_x0 = self.teacher.solve(self.obs, x, idx)
        a, s = obj.coefficients(per_sample(level, x).to(x.dtype))
        noise = (x - a * target_x0) / s  # the noise that puts the teacher's result at x
        pred = denoise(obj.network_input(x, level), obj.network_level(level))
        return (pred.float() - obj.target(target_x0, noise, x, level).float()) ** 2
