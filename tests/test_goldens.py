"""Policy outputs equal those recorded before the policy was rebuilt from parts.

tests/goldens/presets.safetensors holds, per preset, fixed weights and the outputs of
tests/golden_cases.golden_outputs recorded on commit 0871273. Rebuilding the policy must
keep every output within 1e-6, and bit-identical where the arithmetic did not change:
adaptive lengths, training losses, and every DDPM/DDIM output (the shared first-order
solver step computes DDIM's update in the same order of operations). Bit identity holds only
on the kind of CPU kernels the goldens were recorded with (AVX-512); on another (an AVX2-only
CPU picks other vectorized kernels) float outputs are held to 1e-5 instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from golden_cases import PRESETS, build_preset, golden_outputs
from mixpolicy.policies.checkpoint import upgrade_legacy_state

GOLDENS = Path(__file__).parent / "goldens"
RECORDED_CPU_CAPABILITY = "AVX512"
SAME_KERNELS = torch.backends.cpu.get_cpu_capability() == RECORDED_CPU_CAPABILITY


@pytest.fixture(scope="module")
def goldens():
    return load_file(str(GOLDENS / "presets.safetensors")), json.loads((GOLDENS / "presets.json").read_text())


@pytest.mark.parametrize("name", PRESETS)
def test_preset_outputs_match_goldens(goldens, name):
    tensors, index = goldens
    policy = build_preset(name)
    prefix = f"{name}/weights/"
    state = upgrade_legacy_state({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    policy.load_state_dict(state, strict=True)
    outs = golden_outputs(policy)
    assert sorted(outs) == index[name]
    for key, value in outs.items():
        expected = tensors[f"{name}/out/{key}"]
        assert value.shape == expected.shape, key
        if key == "moh_adaptive_lengths" or (SAME_KERNELS and (key == "loss" or policy.cfg.objective.type == "ddpm")):
            assert torch.equal(value, expected), f"{name}: {key}"
        else:
            atol = 1e-6 if SAME_KERNELS else 1e-5
            torch.testing.assert_close(value, expected, rtol=0, atol=atol, msg=f"{name}: {key}")
