"""Evaluation results live under the run folder by step (<run>/eval/step_N/), so pruning
old checkpoints and resuming never delete them."""

from __future__ import annotations

import json
import os

import pytest

from mixpolicy.cli import main
from mixpolicy.envs.evaluate import results_folder
from factories import SMALL_POLICY_OVERRIDES


def test_results_folder_by_step_for_run_checkpoints(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "step_00000004").mkdir(parents=True)
    os.symlink("step_00000004", ckpts / "last")
    assert results_folder(ckpts / "last") == tmp_path / "run" / "eval" / "step_00000004"
    assert results_folder(ckpts / "step_00000004") == tmp_path / "run" / "eval" / "step_00000004"
    assert results_folder(tmp_path / "exported") == tmp_path / "exported" / "eval"  # not a run's checkpoint
    assert results_folder(ckpts / "last", out=str(tmp_path / "mine")) == tmp_path / "mine"


@pytest.mark.slow
def test_eval_results_survive_checkpoint_pruning(tmp_path, capsys, dataset_factory):
    dataset_factory(lengths=(12, 12, 12), state_dim=39, action_dim=4, tasks=("reach-v3",))
    run = tmp_path / "run"
    train = ["train", f"dataset={tmp_path / 'd.zarr'}", f"out_dir={run}", "batch_size=4", "warmup_steps=1", "progress=false", "keep_last=1", *SMALL_POLICY_OVERRIDES]
    assert main([*train, "steps=2"]) == 0
    assert main(["eval", f"checkpoint={run / 'checkpoints' / 'last'}", "episodes_per_task=1", "num_envs=1", "max_episode_steps=4", "progress=false", "seed=7"]) == 0
    results = run / "eval" / "step_00000002" / "results.json"
    assert f"results in {results}" in capsys.readouterr().out
    saved = json.loads(results.read_text())
    assert saved["tasks"]["reach-v3"]["seeds"] == [7] and not (run / "checkpoints" / "step_00000002" / "eval").exists()

    # two more steps with keep_last=1: step 2's checkpoint is pruned, its results stay
    assert main([*train, "steps=4", "resume=true", "resume_overrides=[steps]"]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last", "step_00000004"]
    assert json.loads(results.read_text()) == saved


@pytest.mark.slow
def test_periodic_evaluation_writes_results_under_the_run_by_step(tmp_path, dataset_factory):
    dataset_factory(lengths=(12, 12, 12), state_dim=39, action_dim=4, tasks=("reach-v3",))
    run = tmp_path / "run"
    args = ["train", f"dataset={tmp_path / 'd.zarr'}", f"out_dir={run}", "batch_size=4", "warmup_steps=1", "progress=false", "steps=2", *SMALL_POLICY_OVERRIDES]
    assert main([*args, "eval.every=2", "eval.episodes_per_task=2", "eval.num_envs=2", "eval.max_episode_steps=4"]) == 0
    res = json.loads((run / "eval" / "step_00000002" / "results.json").read_text())
    assert res["step"] == 2 and res["tasks"]["reach-v3"]["episodes"] == 2 and res["config"]["episodes_per_task"] == 2
    summary = json.loads((run / "checkpoints" / "step_00000002" / "eval.json").read_text())  # the score best-selection reads
    assert summary["average_success"] == res["average_success"] and summary["results_file"] == str(run / "eval" / "step_00000002" / "results.json")
    # overwrite=true starts the run over; earlier results stay where they are
    assert main([*args, "overwrite=true"]) == 0
    assert (run / "eval" / "step_00000002" / "results.json").is_file()


@pytest.mark.slow
def test_periodic_eval_videos_reach_tensorboard(tmp_path):
    """eval.video_episodes writes mp4s beside the results and a GIF image summary per video."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mixpolicy.config import from_dict
    from mixpolicy.train.trainer import TrainConfig, Trainer
    from factories import make_dataset, make_small_policy_dict

    make_dataset(tmp_path / "d.zarr", lengths=(12, 10, 11), state_dim=39, action_dim=4, tasks=("reach-v3",))
    cfg = from_dict(TrainConfig, dict(dataset=str(tmp_path / "d.zarr"), out_dir=str(tmp_path / "run"), steps=2, batch_size=4, progress=False,
                                      successful_only=False, policy=make_small_policy_dict(),
                                      eval=dict(every=2, episodes_per_task=1, num_envs=1, max_episode_steps=6, video_episodes=1)))  # fmt: skip
    Trainer(cfg).run()
    videos = list((tmp_path / "run" / "eval").glob("step_*/videos/*.mp4"))
    assert len(videos) == 1
    acc = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()["images"]
    assert tags == [f"eval/{videos[0].stem}"]
    image = acc.Images(tags[0])[0]
    assert image.step == 2 and image.encoded_image_string[:6] in (b"GIF87a", b"GIF89a")
