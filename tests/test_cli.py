"""CLI behaviour: help, config composition, and one-line errors for bad input."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mixpolicy.cli import compose, main
from mixpolicy.config import from_dict
from mixpolicy.policies.checkpoint import save_policy
from mixpolicy.policies.denoising_policy import DenoisingPolicy
from factories import metaworld_shape_meta, tiny_policy_config


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def run_main(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, pattern):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("mixpolicy: error: ")
    import re

    assert re.search(pattern, lines[0]), lines[0]


def test_help_lists_commands_and_options(capsys):
    code, out, _ = run_main(capsys, "--help")
    assert code == 0 and "quickstart" in out and "collect" in out and "eval" in out
    code, out, _ = run_main(capsys, "train", "--help")
    assert code == 0 and "batch_size" in out and "policy configs" in out and "dit" in out
    code, out, _ = run_main(capsys, "collect", "--help")
    assert code == 0 and "episodes_per_task" in out and "noise_std" in out


def test_cfg_prints_composed_config(capsys):
    code, out, _ = run_main(capsys, "train", "dataset=d.zarr", "policy.network.depth=6", "--cfg")
    assert code == 0 and "depth: 6" in out and "dataset: d.zarr" in out


def test_packaged_yaml_matches_config_dataclasses():
    """Every YAML key is a dataclass field and every field is in the YAML (so all are overridable)."""
    import dataclasses

    from mixpolicy.envs.collect import CollectConfig
    from mixpolicy.envs.evaluate import EvalConfig
    from mixpolicy.train.trainer import TrainConfig
    from mixpolicy.policies.config import PolicyConfig

    def fields(cls):
        return {f.name for f in dataclasses.fields(cls)}

    qs = compose("quickstart", ["train.dataset=x", "eval.checkpoint=y"])
    assert set(qs["collect"]) == fields(CollectConfig)
    assert set(qs["train"]) == fields(TrainConfig)
    assert set(qs["eval"]) == fields(EvalConfig)
    assert set(qs["train"]["policy"]) == fields(PolicyConfig)
    # and they validate
    from_dict(CollectConfig, qs["collect"])
    from_dict(EvalConfig, qs["eval"])
    assert from_dict(TrainConfig, qs["train"]).policy.network.width == 128


def test_pyproject_lists_every_package():
    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "mixpolicy").rglob("__init__.py")}
    assert found | {"mixpolicy.configs"} == listed


def test_unknown_override_key(capsys, tmp_path):
    code, _, err = run_main(capsys, "train", f"dataset={tmp_path}/d.zarr", "foo=1")
    assert_one_line_error(code, err, r"unknown config key 'foo' for `mixpolicy train`")
    code, _, err = run_main(capsys, "train", "dataset=x", "policy.network.widht=3")
    assert_one_line_error(code, err, r"unknown config key 'policy.network.widht'")
    code, _, err = run_main(capsys, "train", "dataset=x", "steps=many")
    assert_one_line_error(code, err, r"'steps': expected an integer")
    code, _, err = run_main(capsys, "train")
    assert_one_line_error(code, err, r"missing required option\(s\) dataset")
    code, _, err = run_main(capsys, "trian")
    assert_one_line_error(code, err, r"unknown command 'trian'")
    code, _, err = run_main(capsys, "train", "--fast")
    assert_one_line_error(code, err, r"unknown flag '--fast'")


def test_quickstart_checks_every_stage_before_collecting(capsys, tmp_path):
    out = tmp_path / "qs"
    code, _, err = run_main(capsys, "quickstart", f"out_dir={out}", "train.policy=mode")
    assert_one_line_error(code, err, r"expected a policy config, got 'mode'; pick one with policy=<name> \(in quickstart: policy@train.policy=<name>\)")
    code, _, err = run_main(capsys, "quickstart", f"out_dir={out}", "eval.episodes_per_task=0")
    assert_one_line_error(code, err, r"'episodes_per_task': must be >= 1")
    assert not out.exists()


def test_unknown_task(capsys, tmp_path):
    code, _, err = run_main(capsys, "collect", "tasks=[reach-v3,pussh-v3]", f"out={tmp_path}/d.zarr")
    assert_one_line_error(code, err, r"unknown Meta-World task 'pussh-v3' \(did you mean 'push-v3'\?\)")
    assert not (tmp_path / "d.zarr").exists()


def test_missing_and_malformed_dataset(capsys, tmp_path):
    code, _, err = run_main(capsys, "train", f"dataset={tmp_path}/none.zarr", f"out_dir={tmp_path}/run")
    assert_one_line_error(code, err, r"dataset not found: .*none\.zarr")
    (tmp_path / "junk.zarr").mkdir()
    (tmp_path / "junk.zarr" / "zarr.json").write_text("{broken")
    code, _, err = run_main(capsys, "train", f"dataset={tmp_path}/junk.zarr", f"out_dir={tmp_path}/run")
    assert_one_line_error(code, err, r"not a readable zarr store")
    (tmp_path / "file.zarr").write_text("hello")
    code, _, err = run_main(capsys, "train", f"dataset={tmp_path}/file.zarr", f"out_dir={tmp_path}/run")
    assert_one_line_error(code, err, r"not a zarr directory")


def test_dataset_without_required_keys_is_left_untouched(capsys, tmp_path, dataset_factory):
    dataset_factory()  # keys: state (6), action (3)
    before = tree_digest(tmp_path / "d.zarr")
    code, _, err = run_main(capsys, "train", f"dataset={tmp_path}/d.zarr", f"out_dir={tmp_path}/run", "policy.obs_keys=[state,image_corner]")
    assert_one_line_error(code, err, r"lacks required key\(s\) \['image_corner'\]")
    assert tree_digest(tmp_path / "d.zarr") == before


def test_collect_refuses_to_overwrite(capsys, tmp_path, dataset_factory):
    dataset_factory()
    before = tree_digest(tmp_path / "d.zarr")
    code, _, err = run_main(capsys, "collect", "tasks=[reach-v3]", "episodes_per_task=1", f"out={tmp_path}/d.zarr")
    assert_one_line_error(code, err, r"already exists")
    assert tree_digest(tmp_path / "d.zarr") == before


def _tiny_ckpt(path, kind="dit"):
    policy = DenoisingPolicy(tiny_policy_config(), metaworld_shape_meta())
    save_policy(policy, path)
    if kind != "dit":
        cfg = json.loads((path / "config.json").read_text())
        cfg["policy_type"] = kind
        cfg["policy"]["type"] = kind
        (path / "config.json").write_text(json.dumps(cfg))


def test_checkpoint_of_another_policy_type(capsys, tmp_path):
    _tiny_ckpt(tmp_path / "ckpt", kind="mode_x")
    code, _, err = run_main(capsys, "eval", f"checkpoint={tmp_path}/ckpt")
    assert_one_line_error(code, err, r"unknown policy type 'mode_x'")
    code, _, err = run_main(capsys, "eval", f"checkpoint={tmp_path}/nothing")
    assert_one_line_error(code, err, r"checkpoint not found")
    code, _, err = run_main(capsys, "eval", f"checkpoint={tmp_path}/ckpt", "tasks=[reach-v9]")
    assert_one_line_error(code, err, r"unknown Meta-World task 'reach-v9'")


def test_resume_rejects_checkpoint_of_another_policy_type(tmp_path, dataset_factory):
    """A run folder whose checkpoint holds another kind of policy (another network part)."""
    from mixpolicy.errors import UserError
    from mixpolicy.train.trainer import TrainConfig, Trainer

    dataset_factory()
    small = dict(network=dict(width=32, depth=1, heads=2), horizon=4, n_action_steps=2, objective=dict(num_train_timesteps=10, num_inference_steps=2))
    run = dict(dataset=str(tmp_path / "d.zarr"), out_dir=str(tmp_path / "run"), steps=2, batch_size=4, progress=False, successful_only=False)
    mode = dict(small, network=dict(small["network"], type="mode"), objective=dict(type="edm", num_inference_steps=2))
    Trainer(from_dict(TrainConfig, {**run, "policy": mode})).run()
    with pytest.raises(UserError, match="holds a 'mode' policy, the config asks for 'dit'"):
        Trainer(from_dict(TrainConfig, {**run, "steps": 4, "resume": True, "policy": small}))


@pytest.mark.slow
def test_subprocess_error_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mixpolicy.cli", "train", f"dataset={tmp_path}/missing.zarr"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"mixpolicy: error: dataset not found: {tmp_path}/missing.zarr"]


def test_train_prints_active_and_total_parameters(tmp_path, capsys, dataset_factory):
    dataset_factory(lengths=(6, 5, 7))
    code = main(
        ["train", f"dataset={tmp_path}/d.zarr", f"out_dir={tmp_path}/run", "steps=2", "batch_size=4", "progress=false", "policy=mode",
         "policy.network.width=32", "policy.network.depth=1", "policy.network.heads=2", "policy.horizon=4", "policy.n_action_steps=2"]
    )
    out = capsys.readouterr().out
    assert code == 0
    import re

    m = re.search(r"policy mode: ([\d.]+)M parameters \(([\d.]+)M active per denoising step\)", out)
    assert m and float(m.group(2)) < float(m.group(1))
    metrics = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "load_balance" in metrics[-1] and "router_z_loss" in metrics[-1]
