"""distill_from: a few-step student learns the teacher's sampled result (targets, teacher path, run, errors)."""

from __future__ import annotations

import pytest
import torch

from mixpolicy.cli import main
from mixpolicy.config import from_dict
from mixpolicy.errors import UserError
from mixpolicy.policies.checkpoint import load_policy
from mixpolicy.policies.denoising_policy import WarmStart
from mixpolicy.policies.distill import Teacher
from mixpolicy.policies.objectives import per_sample
from mixpolicy.train.trainer import TrainConfig, Trainer
from factories import make_dataset, make_obs, make_tiny_policy, mode_policy_config, objective_config, tiny_policy_config

EDM_SMALL = dict(network=dict(width=32, depth=1, heads=2), horizon=4, n_action_steps=2, obs_hidden=32, objective=dict(type="edm", num_inference_steps=6))


def _cfg(tmp_path, out, **kw) -> TrainConfig:
    d = dict(dataset=str(tmp_path / "a.zarr"), out_dir=str(tmp_path / out), steps=3, batch_size=8, log_every=1, progress=False, warmup_steps=1, num_threads=1)
    d.update(kw)
    return from_dict(TrainConfig, d)


def _teacher(tmp_path, objective="edm"):
    make_dataset(tmp_path / "a.zarr", lengths=(12, 10, 14))
    policy = {**EDM_SMALL, "objective": {**EDM_SMALL["objective"], "type": objective}}
    Trainer(_cfg(tmp_path, "teacher", policy=policy, steps=20)).run()
    return tmp_path / "teacher" / "checkpoints" / "last"


@pytest.fixture
def teacher_ckpt(tmp_path):
    return _teacher(tmp_path)


@pytest.mark.parametrize("kind", ["edm", "flow"])
def test_the_target_reads_back_as_the_teachers_result(kind):
    """The objective's target built from the teacher's result is read back by the objective as that result."""
    policy = make_tiny_policy(tiny_policy_config(objective=objective_config(kind, num_inference_steps=5)))
    obj = policy.objective
    g = torch.Generator().manual_seed(0)
    x0, teacher_x0 = torch.rand(3, 4, 3, generator=g) * 2 - 1, torch.rand(3, 4, 3, generator=g) * 2 - 1
    level = obj.schedule()[torch.tensor([0, 2, 4])]
    x = obj.add_noise(x0, torch.randn(x0.shape, generator=g), level)
    a, s = obj.coefficients(per_sample(level, x))
    target = obj.target(teacher_x0, (x - a * teacher_x0) / s, x, level)
    read, _ = obj.prediction(target, x, level)
    torch.testing.assert_close(read, teacher_x0, rtol=1e-4, atol=1e-4)


def test_teacher_solves_each_row_from_its_own_index():
    """Rows at different schedule indices each get the teacher's own warm-started sampling (MoDE, expert cache)."""
    policy = make_tiny_policy(mode_policy_config(objective="edm", num_inference_steps=5), seed=1)
    teacher = Teacher(policy)
    obs = make_obs(b=4)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 4, 3, generator=g)
    idx = torch.tensor([0, 3, 0, 4])
    got = teacher.solve(obs, x, idx)
    for r in range(4):
        one = {k: v[r : r + 1] for k, v in obs.items()}
        want = policy.plan(one, warm_start=WarmStart(x[r : r + 1], start=int(idx[r]), renoise=False)).normalized
        torch.testing.assert_close(got[r : r + 1], want, rtol=1e-5, atol=1e-6)
    # From the prior's level the teacher's result is its cold sample of the same draw.
    prior = policy.objective.prior((4, 4, 3), torch.Generator().manual_seed(5))
    cold = policy.plan(obs, torch.Generator().manual_seed(5)).normalized
    torch.testing.assert_close(teacher.solve(obs, prior, torch.zeros(4, dtype=torch.long)), cold, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("objective", ["edm", "flow"])
def test_distilled_student_reaches_the_teacher_in_one_step(tmp_path, objective):
    """From the command line: the student samples in 1 step by default, keeps the teacher's normalizer,
    and its 1-step chunks land nearer the teacher's 6-step chunks than the teacher's own 1-step ones."""
    teacher_ckpt = _teacher(tmp_path, objective)
    code = main([
        "train", f"dataset={tmp_path / 'a.zarr'}", f"out_dir={tmp_path / 'student'}", f"distill_from={teacher_ckpt}",
        "steps=150", "batch_size=16", "lr=3e-3", "warmup_steps=5", "progress=false", "num_threads=1",
    ])  # fmt: skip
    assert code == 0
    teacher, _ = load_policy(teacher_ckpt)
    student, meta = load_policy(tmp_path / "student" / "checkpoints" / "last")
    assert meta["policy"]["objective"]["num_inference_steps"] == 1 and teacher.cfg.objective.num_inference_steps == 6
    for k, v in teacher.normalizer.state_dict().items():
        torch.testing.assert_close(student.normalizer.state_dict()[k], v, rtol=0, atol=0)
    obs = make_obs(b=64, seed=2)
    obs["state"][..., 0] = torch.randint(0, 12, (64, 1)).float()  # states like the store's
    full = teacher.plan(obs, torch.Generator().manual_seed(0)).normalized
    one_teacher = teacher.plan(obs, torch.Generator().manual_seed(0), num_steps=1).normalized
    one_student = student.plan(obs, torch.Generator().manual_seed(0)).normalized
    err_teacher, err_student = (one_teacher - full).pow(2).mean(), (one_student - full).pow(2).mean()
    assert err_student < 0.5 * err_teacher, (float(err_student), float(err_teacher))


def test_distillation_refuses_what_it_cannot_distil(tmp_path, teacher_ckpt, capsys):
    ddpm = tmp_path / "ddpm"
    Trainer(_cfg(tmp_path, "ddpm", policy={**EDM_SMALL, "objective": dict(num_train_timesteps=10, num_inference_steps=2)})).run()
    with pytest.raises(UserError, match="needs a teacher with a continuous deterministic sampler .* 'ddpm'"):
        Trainer(_cfg(tmp_path, "s1", distill_from=str(ddpm)))
    shortcut = tmp_path / "shortcut"
    Trainer(_cfg(tmp_path, "shortcut", policy={**EDM_SMALL, "objective": dict(type="shortcut", max_inference_steps=8)})).run()
    with pytest.raises(UserError, match="already samples in few steps"):
        Trainer(_cfg(tmp_path, "s2", distill_from=str(shortcut)))
    code = main(["train", f"dataset={tmp_path / 'a.zarr'}", f"out_dir={tmp_path / 's3'}", f"distill_from={teacher_ckpt}", "add_experts=2", "progress=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "distill_from" in err[0] and "add_experts" in err[0]
    code = main(["train", f"dataset={tmp_path / 'a.zarr'}", f"out_dir={tmp_path / 's4'}", f"distill_from={tmp_path / 'missing'}", "progress=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "missing" in err[0]


def test_a_mixture_of_horizons_student_trains_through_the_teacher():
    """The MoH head scores its stacked predictions against the teacher's result; gradients reach the gate."""
    from mixpolicy.policies.config import MoHConfig

    cfg = tiny_policy_config(horizon=4, head=MoHConfig(horizons=[2, 4]), objective=objective_config("edm", num_inference_steps=4))
    teacher, student = make_tiny_policy(cfg, seed=0), make_tiny_policy(cfg, seed=1)
    student.teacher = Teacher(teacher)
    student.teacher.check_student(student)
    batch = {**make_obs(b=6), "action": torch.rand(6, 4, 3) * 2 - 1}
    torch.manual_seed(0)
    loss, logs = student.compute_loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and logs["denoise_loss"] > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in student.named_parameters() if "gate" in n)
    student.teacher = None
    torch.manual_seed(0)
    plain, _ = student.compute_loss(batch)
    assert not torch.isclose(plain, loss)  # the same draws, another target
