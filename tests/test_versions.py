"""The tested version ranges in pyproject.toml, and LeRobot's pretrained_model/ layout without LeRobot.

The ranges' ends are what the tiers run (README, Compatibility): Python 3.11 with torch 2.14.1
here, Python 3.12 and 3.13 with torch 2.7.1, on numpy 2.2 and (3.12) numpy 1.26
(scripts/test_python.sh). The layout tests build the folder
the LeRobot plugin writes by hand, so mixpolicy's side of it is tested in every run.
"""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from packaging.specifiers import SpecifierSet
from packaging.requirements import Requirement
from packaging.version import Version
from safetensors.torch import save_file

from mixpolicy.errors import UserError
from mixpolicy.policies import lerobot_layout
from mixpolicy.policies.checkpoint import load_policy, read_checkpoint_meta
from mixpolicy.policies.config import policy_config_from_dict
from mixpolicy.policies.denoising_policy import DenoisingPolicy, ShapeMeta

ROOT = Path(__file__).resolve().parents[1]


def project(path: Path = ROOT / "pyproject.toml") -> dict:
    return tomllib.loads(path.read_text())["project"]


def requirement(name: str) -> Requirement:
    reqs = {Requirement(r).name: Requirement(r) for r in project()["dependencies"]}
    return reqs[name]


def test_python_range_is_3_11_to_3_13():
    spec = SpecifierSet(project()["requires-python"])
    assert [v for v in ("3.10", "3.11", "3.12", "3.13", "3.14") if Version(v) in spec] == ["3.11", "3.12", "3.13"]
    assert Version("%d.%d" % sys.version_info[:2]) in spec


@pytest.mark.parametrize(
    "name, inside, outside",
    [
        ("torch", ["2.7.1", "2.11.0", "2.14.1"], ["2.6.0", "2.7.0", "2.14.2", "2.15.0"]),
        ("torchvision", ["0.22.1", "0.26.0", "0.29.1"], ["0.21.0", "0.29.2", "0.30.0"]),
        ("numpy", ["1.26.4", "2.2.6", "2.4.6"], ["1.25.2", "3.0.0"]),
    ],
)
def test_dependency_ranges_end_where_they_were_tested(name, inside, outside):
    spec = requirement(name).specifier
    assert all(Version(v) in spec for v in inside), (name, str(spec))
    assert not any(Version(v) in spec for v in outside), (name, str(spec))


def test_the_installed_torch_is_inside_the_range():
    for module in ("torch", "torchvision"):
        version = Version(__import__(module).__version__.split("+")[0])
        assert version in requirement(module).specifier, (module, version)


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["3.10"], {}, "first argument must be a Python version in pyproject's range (3.11, 3.12, 3.13), got '3.10'"),
        ([], {}, "first argument must be a Python version"),
        (["3.13"], {"NUMPY": "1"}, "NUMPY=1: numpy 1.26 has no wheels for Python 3.13"),
        (["3.12"], {"NUMPY": "3"}, "NUMPY must be 1 or 2, got '3'"),
    ],
)
def test_the_tier_script_refuses_bad_arguments_before_building_anything(tmp_path, args, env, message):
    venv = tmp_path / "venv"
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "test_python.sh"), *args],
        env={**os.environ, "VENV": str(venv), **env}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert not venv.exists()


def test_the_plugin_is_a_lerobot_policy_package():
    plugin = ROOT / "plugins" / "lerobot_policy_mixpolicy"
    meta = project(plugin / "pyproject.toml")
    assert meta["name"].startswith("lerobot_policy_")  # LeRobot imports such distributions by name
    assert (plugin / meta["name"] / "__init__.py").is_file()
    for role in ("configuration", "modeling", "processor"):  # LeRobot's naming convention
        assert (plugin / meta["name"] / f"{role}_mixpolicy.py").is_file()
    assert Version("3.12") in SpecifierSet(meta["requires-python"])


# ---------------------------------------------------------------- LeRobot's pretrained_model/ layout
FIELDS = {
    "n_obs_steps": 2, "horizon": 8, "n_action_steps": 4, "network": "transformer", "head": "single",
    "objective": "flow", "width": 32, "depth": 1, "heads": 2, "num_experts": 4, "top_k": 2, "horizons": [4, 8],
    "num_inference_steps": 3, "task_conditioning": "none", "tasks": [], "crop_size": 76,
    "mixpolicy_overrides": '{"obs_hidden": 32}',
}  # fmt: skip


def lerobot_config(**changes) -> dict:
    cfg = {
        "type": "mixpolicy",
        "input_features": {"observation.state": {"type": "STATE", "shape": [5]}},
        "output_features": {"action": {"type": "ACTION", "shape": [3]}},
        "device": "cpu",
        **FIELDS,
    }
    cfg.update(changes)
    return cfg


def write_pretrained(path: Path, config: dict, prefix: str = "model.") -> DenoisingPolicy:
    torch.manual_seed(0)
    policy = DenoisingPolicy(
        policy_config_from_dict(lerobot_layout.policy_dict(config)), ShapeMeta.from_json(lerobot_layout.shape_meta_dict(config))
    )
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({prefix + k: v.contiguous() for k, v in policy.state_dict().items()}, str(path / "model.safetensors"))
    return policy


def test_a_lerobot_plugin_folder_loads_as_the_same_policy(tmp_path):
    original = write_pretrained(tmp_path / "pm", lerobot_config())
    loaded, meta = load_policy(tmp_path / "pm")
    assert meta["info"]["layout"] == "lerobot" and meta["policy_type"] == "dit"
    assert loaded.cfg.objective.type == "flow" and loaded.cfg.obs_hidden == 32 and loaded.shape_meta.obs == {"state": [5]}
    obs = {"state": torch.randn(2, 2, 5)}
    torch.manual_seed(1)
    want = original.eval().predict_action_chunk(obs)
    torch.manual_seed(1)
    torch.testing.assert_close(loaded.predict_action_chunk(obs), want)


def test_lerobot_names_map_to_mixpolicy_keys():
    config = lerobot_config(
        input_features={
            "observation.state": {"type": "STATE", "shape": [5]},
            "observation.images.wrist": {"type": "VISUAL", "shape": [3, 64, 48]},
            "observation.image": {"type": "VISUAL", "shape": [3, 40, 40]},
        },
        network="mode", head="moh", task_conditioning="embedding", tasks=["a", "b"],
    )  # fmt: skip
    meta = lerobot_layout.checkpoint_meta(config, "x")
    assert meta["policy_type"] == "mode_moh"
    assert meta["policy"]["obs_keys"] == ["state", "image_wrist", "image_image"]
    assert meta["shape_meta"] == {"obs": {"state": [5], "image_wrist": [64, 48, 3], "image_image": [40, 40, 3]}, "action_dim": 3, "tasks": ["a", "b"]}
    policy_config_from_dict(meta["policy"])  # a valid mixpolicy config


@pytest.mark.parametrize(
    "change, message",
    [
        ({"type": "act"}, "policy type 'act'"),
        ({"horizons": 8, "head": "moh"}, "malformed"),
        ({"mixpolicy_overrides": "{not json"}, "not valid JSON"),
        ({"output_features": {}}, "flat 'action'"),
        ({"input_features": {"observation.images.c": {"type": "VISUAL", "shape": [1, 8, 8]}}}, "RGB"),
        ({"horizon": 1 << 30}, "beyond any real policy"),
    ],
)
def test_a_bad_lerobot_config_is_a_one_line_error(tmp_path, change, message):
    (tmp_path / "pm").mkdir()
    (tmp_path / "pm" / "config.json").write_text(json.dumps(lerobot_config(**change)))
    (tmp_path / "pm" / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=message) as err:
        read_checkpoint_meta(tmp_path / "pm")
    assert "\n" not in str(err.value)


def test_lerobot_weights_outside_the_wrapped_model_are_refused(tmp_path):
    write_pretrained(tmp_path / "pm", lerobot_config(), prefix="")
    with pytest.raises(UserError, match="outside the plugin's 'model.' model"):
        load_policy(tmp_path / "pm")
