"""Objectives and samplers: EDM, flow matching and DDPM behind one interface."""

import math

import numpy as np
import pytest
import torch

from mixpolicy.policies.config import DDPMConfig, EDMConfig, FlowConfig
from mixpolicy.policies.factory import make_objective
from mixpolicy.policies.objectives import EDMObjective, FlowObjective
from mixpolicy.policies.solvers import evaluate, function_evaluations, sample

CONFIGS = {
    "ddpm": DDPMConfig(num_inference_steps=6),
    "edm": EDMConfig(num_inference_steps=6),
    "edm_heun": EDMConfig(solver="heun", num_inference_steps=6),
    "flow": FlowConfig(num_inference_steps=6),
    "flow_heun": FlowConfig(solver="heun", num_inference_steps=6),
}


def oracle(objective, x0: torch.Tensor, calls: list | None = None):
    """A perfect denoiser for a single known clean sample x0, answering in the objective's
    own output convention from (network input, network level): checks that sampling,
    preconditioning and level maps agree with each other."""
    name = objective.cfg.type

    def denoise(x_in, level, step=None):
        if calls is not None:
            calls.append((step, float(level[0])))
        if name == "edm":
            sigma = torch.exp(level / 250.0).view(-1, 1, 1)
            c_skip, c_out, c_in = objective._precond(sigma)
            x = x_in / c_in
            return (x0 - c_skip * x) / c_out
        if name == "flow":
            t = (level / 1000.0).view(-1, 1, 1)
            return (x_in - x0) / t  # eps - x0 on the straight path
        a = objective.scheduler.alphas_cumprod[level.long()].view(-1, 1, 1)
        return (x_in - a.sqrt() * x0) / (1 - a).sqrt()  # epsilon

    return denoise


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_oracle_denoiser_recovers_the_sample_from_the_prior(name):
    obj = make_objective(CONFIGS[name])
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 5, 3, generator=g) * 1.6 - 0.8
    schedule = obj.schedule()
    calls = []
    out = sample(obj, oracle(obj, x0, calls), obj.prior(x0.shape, g), schedule)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)
    assert len(calls) == function_evaluations(obj, len(schedule))


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("k", [2, 5])
def test_warm_start_at_any_index_uses_true_levels(name, k):
    """RTI-style: noise a guess to schedule[k] with add_noise, run schedule[k:]."""
    obj = make_objective(CONFIGS[name])
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(3, 4, 2, generator=g) - 0.5
    schedule = obj.schedule()
    x_k = obj.add_noise(x0, torch.randn(x0.shape, generator=g), schedule[k])
    calls = []
    out = sample(obj, oracle(obj, x0, calls), x_k, schedule, start=k)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)
    # the network is evaluated at the schedule's own levels, with their step indices
    expected = []
    for i in range(k, len(schedule)):
        expected.append(i)
        if obj.cfg.solver == "heun" and i + 1 < len(schedule):
            expected.append(i + 1)
    assert [c[0] for c in calls] == expected
    levels = obj.network_level(schedule)
    assert [c[1] for c in calls] == pytest.approx([float(levels[i]) for i in expected], rel=1e-6)
    assert len(calls) == function_evaluations(obj, len(schedule), start=k)


def test_flow_add_noise_is_the_straight_path():
    obj = FlowObjective(FlowConfig())
    x0, eps = torch.randn(4, 3, 2), torch.randn(4, 3, 2)
    t = torch.tensor([0.0, 0.3, 0.7, 1.0])
    xt = obj.add_noise(x0, eps, t)
    for i, ti in enumerate(t):
        torch.testing.assert_close(xt[i], ti * eps[i] + (1 - ti) * x0[i])
    torch.testing.assert_close(obj.add_noise(x0, eps, torch.tensor(0.25)), 0.25 * eps + 0.75 * x0)
    assert obj.schedule(4).tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_flow_training_times_follow_the_beta_law():
    obj = FlowObjective(FlowConfig())
    t = obj.sample_level(20000, torch.Generator().manual_seed(0), "cpu")
    assert t.min() >= 0.001 and t.max() <= 1.0
    # Beta(1.5, 1): mean 0.6, P(t < 0.5) = 0.5 ** 1.5
    assert float(t.mean()) == pytest.approx(0.001 + 0.999 * 0.6, abs=0.01)
    assert float((t < 0.5).float().mean()) == pytest.approx(0.5**1.5, abs=0.015)
    again = obj.sample_level(5, torch.Generator().manual_seed(3), "cpu")
    assert torch.equal(again, obj.sample_level(5, torch.Generator().manual_seed(3), "cpu"))


def test_edm_preconditioning_and_training_sigmas():
    obj = EDMObjective(EDMConfig())
    c_skip, c_out, c_in = obj._precond(torch.tensor(0.5))
    assert float(c_skip) == pytest.approx(0.5)
    assert float(c_out) == pytest.approx(0.5 / math.sqrt(2))
    assert float(c_in) == pytest.approx(1 / (0.5 * math.sqrt(2)))
    sigma = obj.sample_level(20000, torch.Generator().manual_seed(0), "cpu")
    assert sigma.min() >= 0.001 and sigma.max() <= 80
    assert float(sigma.median()) == pytest.approx(0.5, rel=0.05)
    # log sigma is logistic with scale 0.5: P(sigma < 0.5 e) = sigmoid(2)
    assert float((sigma < 0.5 * math.e).float().mean()) == pytest.approx(1 / (1 + math.exp(-2)), abs=0.01)
    s = obj.schedule(5)
    assert float(s[0]) == pytest.approx(80) and float(s[-1]) == pytest.approx(0.001)
    ratios = (s[1:] / s[:-1]).numpy()
    assert np.allclose(ratios, ratios[0], rtol=1e-4)  # exponential (log-linear) schedule


def test_edm_loss_is_zero_for_the_exact_preconditioned_target():
    obj = EDMObjective(EDMConfig())
    x0 = torch.rand(8, 4, 3) * 2 - 1
    loss = obj.loss(oracle(obj, x0), x0, torch.Generator().manual_seed(0))
    assert loss.shape == x0.shape and float(loss.max()) < 1e-8


def test_heun_is_more_accurate_than_euler_for_gaussian_data():
    """Data N(0, s^2): the exact flow ODE maps x_1 to s * x_1 (velocity known in closed form)."""
    s = 0.3

    def velocity(x_in, level, step=None):
        t = (level / 1000.0).view(-1, 1, 1)
        var = t**2 + (1 - t) ** 2 * s**2
        return x_in * (t - (1 - t) * s**2) / var

    x1 = torch.randn(64, 1, 1, generator=torch.Generator().manual_seed(0))
    errors = {}
    for solver in ("euler", "heun"):
        obj = FlowObjective(FlowConfig(solver=solver))
        out = sample(obj, velocity, x1.clone(), obj.schedule(10))
        errors[solver] = float((out - s * x1).abs().max())
    assert errors["heun"] < errors["euler"] / 3, errors


def test_evaluate_passes_input_scaling_level_and_step():
    obj = EDMObjective(EDMConfig())
    schedule = obj.schedule(4)
    seen = {}

    def denoise(x_in, level, step=None):
        seen.update(x_in=x_in, level=level, step=step)
        return torch.zeros_like(x_in)

    x = torch.ones(2, 3, 1)
    evaluate(obj, denoise, x, 1, schedule)
    sigma = schedule[1]
    assert seen["step"] == 1
    torch.testing.assert_close(seen["level"], torch.full((2,), 250 * math.log(float(sigma))))
    torch.testing.assert_close(seen["x_in"], x / math.sqrt(float(sigma) ** 2 + 0.25))
