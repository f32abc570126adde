"""resume=true continues the run's saved config; differing options need resume_overrides."""

from __future__ import annotations

import json

import pytest

from mixpolicy.cli import main
from mixpolicy.config import from_dict
from mixpolicy.errors import UserError
from mixpolicy.train.trainer import TrainConfig, Trainer
from factories import SMALL_POLICY_OVERRIDES, make_dataset


def _first_run(tmp_path, *extra: str) -> list[str]:
    make_dataset(tmp_path / "d.zarr", lengths=(8, 7, 9))
    args = ["train", f"dataset={tmp_path / 'd.zarr'}", f"out_dir={tmp_path / 'run'}", "steps=4", "batch_size=4", "warmup_steps=1", "progress=false", *SMALL_POLICY_OVERRIDES]
    assert main([*args, *extra]) == 0
    return args


def _saved(tmp_path) -> dict:
    return json.loads((tmp_path / "run" / "train_config.json").read_text())


def test_resume_refuses_a_differing_option_in_one_line_and_accepts_it_when_named(tmp_path, capsys):
    args = _first_run(tmp_path)
    capsys.readouterr()
    assert main([*args, "resume=true", "steps=6", "lr=0.01"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "steps=6 (saved 4), lr=0.01 (saved 0.001)" in err[0] and "resume_overrides=[steps,lr]" in err[0]
    assert _saved(tmp_path)["steps"] == 4  # nothing was written

    assert main([*args, "resume=true", "steps=6", "resume_overrides=[steps]"]) == 0
    assert "resuming at step 4" in capsys.readouterr().out
    saved = _saved(tmp_path)
    assert saved["steps"] == 6 and saved["lr"] == 0.001 and saved["resume"] is True


def test_resume_restores_the_saved_config_without_repeating_it(tmp_path, capsys):
    _first_run(tmp_path, "checkpoint_every=1", "keep_last=1", "log_every=2", "tracking.tensorboard=false", "eval.episodes_per_task=3")
    # only the run folder and the change: dataset, policy and every other option come from the run
    assert main(["train", f"out_dir={tmp_path / 'run'}", "resume=true", "steps=6", "resume_overrides=[steps]", "progress=false"]) == 0
    saved = _saved(tmp_path)
    assert saved["checkpoint_every"] == 1 and saved["keep_last"] == 1 and saved["log_every"] == 2
    assert saved["eval"]["episodes_per_task"] == 3 and saved["tracking"]["tensorboard"] is False
    assert saved["policy"]["network"]["width"] == 32 and saved["dataset"] == str(tmp_path / "d.zarr")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["last", "step_00000006"]  # keep_last=1 held
    assert not (tmp_path / "run" / "tb").exists()
    assert [r["step"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())] == [2, 4, 6]


def test_restored_eval_options_and_turning_one_off_by_name(tmp_path, monkeypatch, dataset_factory):
    dataset_factory(lengths=(8, 7, 9))
    monkeypatch.setattr(Trainer, "evaluate", lambda self: {"step": self.step, "average_success": 0.5, "wilson95": [0.3, 0.7], "tasks": {}})
    base = dict(dataset=str(tmp_path / "d.zarr"), out_dir=str(tmp_path / "run"), batch_size=4, progress=False, warmup_steps=1,
                policy=dict(network=dict(width=32, depth=1, heads=2), horizon=4, n_action_steps=2, objective=dict(num_train_timesteps=10, num_inference_steps=2)))
    Trainer(from_dict(TrainConfig, {**base, "steps": 4, "eval": {"every": 2}, "checkpoint_every": 1, "keep_last": 2})).run()
    t = Trainer(from_dict(TrainConfig, {"out_dir": str(tmp_path / "run"), "resume": True, "steps": 6, "resume_overrides": ["steps"]}))
    assert (t.cfg.eval.every, t.cfg.checkpoint_every, t.cfg.keep_last, t.cfg.batch_size) == (2, 1, 2, 4)
    t.run()
    evals = [r["step"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    assert evals == [2, 4, 6]
    # an option equal to its default takes effect only when named
    t = Trainer(from_dict(TrainConfig, {"out_dir": str(tmp_path / "run"), "resume": True, "steps": 8, "eval": {"every": 0}, "resume_overrides": ["steps", "eval.every"]}))
    assert t.cfg.eval.every == 0 and t.cfg.checkpoint_every == 1


def test_resume_override_names_are_checked_and_runtime_options_apply(tmp_path):
    args = _first_run(tmp_path)
    with pytest.raises(UserError, match="resume_overrides names unknown option.s. stepz"):
        Trainer(from_dict(TrainConfig, {"out_dir": str(tmp_path / "run"), "resume": True, "resume_overrides": ["stepz"]}))
    # how the numbers are computed (threads, loader workers) may change without naming it
    t = Trainer(from_dict(TrainConfig, {"out_dir": str(tmp_path / "run"), "resume": True, "num_threads": 1, "loader": {"num_workers": 1}}))
    assert t.cfg.num_threads == 1 and t.cfg.loader.num_workers == 1 and t.step == 4
    assert args  # the first run's command line is what a user would repeat


def test_packaged_train_yaml_holds_the_dataclass_defaults():
    """What counts as given on the command line is what differs from these defaults."""
    from mixpolicy.cli import compose
    from mixpolicy.config import to_dict

    assert to_dict(from_dict(TrainConfig, {**compose("train", []), "resume": True})) == {**to_dict(TrainConfig(resume=True))}
    assert compose("train", [])["resume_overrides"] == [] and compose("train", [])["dataset"] == ""
