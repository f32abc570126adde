"""Training at scale: data-parallel equivalence, exact resume after SIGKILL/SIGTERM,
atomic checkpoints with retention and best selection, loaders, tracking and plots."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mixpolicy.cli import main
from mixpolicy.config import from_dict
from mixpolicy.errors import UserError
from mixpolicy.train.batches import StepBatchSampler
from mixpolicy.train.checkpointing import CheckpointStore
from mixpolicy.train.setup import TrainingData, build_training_data
from mixpolicy.train.trainer import TrainConfig, Trainer
from factories import SMALL_POLICY_OVERRIDES, make_small_policy_dict

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = (30, 25, 40, 33)  # episode 1 fails; 103 training windows


def _cfg(tmp_path, **kw) -> TrainConfig:
    d = dict(dataset=str(tmp_path / "d.zarr"), out_dir=str(tmp_path / "run"), steps=6, batch_size=8, log_every=1, progress=False, policy=make_small_policy_dict(), warmup_steps=2, num_threads=1)
    d.update(kw)
    return from_dict(TrainConfig, d)


def _state(run: Path, prefixes=("model.", "ema.", "optim.")) -> dict[str, torch.Tensor]:
    tensors = load_file(str(run / "checkpoints" / "last" / "training_state.safetensors"))
    return {k: v for k, v in tensors.items() if k.startswith(prefixes)}


def _metrics(run: Path, kind="train") -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)
    return env


def _train_args(tmp_path, run: Path, *extra: str) -> list[str]:
    return ["train", f"dataset={tmp_path / 'd.zarr'}", f"out_dir={run}", "batch_size=8", "warmup_steps=2", "num_threads=1", "progress=false", *SMALL_POLICY_OVERRIDES, *extra]


# ---------------------------------------------------------------------- sampling
def test_step_batch_sampler_epochs_shards_and_errors():
    s = StepBatchSampler(n_windows=50, batch_size=8, seed=3)
    assert s.steps_per_epoch == 6 and s.position(13) == (2, 1)
    epoch0 = np.concatenate([s.global_batch(i) for i in range(6)])
    assert len(set(epoch0.tolist())) == 48  # no window twice within an epoch
    assert not np.array_equal(s.global_batch(0), s.global_batch(6))  # reshuffled next epoch
    np.testing.assert_array_equal(s.global_batch(13), StepBatchSampler(50, 8, seed=3).global_batch(13))  # a pure function of the step
    # one process accumulating 4 micro-batches == 4 processes with one each == 2 x 2
    one = StepBatchSampler(50, 8, 3, world_size=1, rank=0, grad_accum_steps=4).micro_batches(5)
    four = [StepBatchSampler(50, 8, 3, world_size=4, rank=r).micro_batches(5)[0] for r in range(4)]
    two = [m for r in range(2) for m in StepBatchSampler(50, 8, 3, world_size=2, rank=r, grad_accum_steps=2).micro_batches(5)]
    for a, b, c in zip(one, four, two):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    assert [len(m) for m in one] == [2, 2, 2, 2]
    with pytest.raises(UserError, match=r"batch_size=8 must be divisible by processes \(3\) x grad_accum_steps \(1\)"):
        StepBatchSampler(50, 8, 0, world_size=3)
    with pytest.raises(UserError, match="batch_size=64 exceeds the 50 training windows"):
        StepBatchSampler(50, 64, 0)


# ---------------------------------------------------------------------- distributed
@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path, dataset_factory):
    """torchrun, 2 CPU processes x 1 micro-batch == 1 process x 2 accumulated micro-batches."""
    dataset_factory(lengths=LENGTHS)
    ddp_run = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mixpolicy.cli",
         *_train_args(tmp_path, ddp_run, "steps=5", "log_every=1")],
        capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stdout and proc.stdout.count("trained 5 steps") == 1  # only rank 0 reports
    Trainer(_cfg(tmp_path, out_dir=str(tmp_path / "one"), steps=5, grad_accum_steps=2)).run()
    ddp, one = _metrics(ddp_run), _metrics(tmp_path / "one")
    assert [r["step"] for r in ddp] == [1, 2, 3, 4, 5]  # one writer: each step logged once
    np.testing.assert_allclose([r["loss"] for r in ddp], [r["loss"] for r in one], rtol=1e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in ddp], [r["grad_norm"] for r in one], rtol=1e-4)
    a, b = _state(ddp_run), _state(tmp_path / "one")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert len(list((ddp_run / "tb").iterdir())) == 1


@pytest.mark.slow
def test_ranks_that_disagree_on_the_config_fail_with_one_clear_line(tmp_path, dataset_factory):
    dataset_factory(lengths=LENGTHS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank, steps in ((0, 6), (1, 8)):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        args = [sys.executable, "-m", "mixpolicy.cli", *_train_args(tmp_path, tmp_path / "run", f"steps={steps}")]
        procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2, err
        assert err.strip().splitlines() == ["mixpolicy: error: ranks disagree on the training config: rank 1 has config.steps=8 (rank 0: 6)"]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------- resume
@pytest.mark.slow
def test_sigkill_mid_run_then_resume_ends_with_the_uninterrupted_parameters(tmp_path, dataset_factory):
    dataset_factory(lengths=LENGTHS)
    run = tmp_path / "killed"
    args = [sys.executable, "-m", "mixpolicy.cli", *_train_args(tmp_path, run, "steps=400", "checkpoint_every=25", "log_every=10", "keep_last=2")]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(), cwd=tmp_path)
    deadline = time.monotonic() + 240
    def last_step() -> int:
        try:
            return int(os.readlink(run / "checkpoints" / "last").removeprefix("step_"))
        except FileNotFoundError:
            return 0

    while last_step() < 50:
        assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    killed_at = last_step()
    assert 50 <= killed_at < 400
    resumed = subprocess.run(args + ["resume=true"], capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at step {killed_at}" in resumed.stdout

    Trainer(_cfg(tmp_path, out_dir=str(tmp_path / "straight"), steps=400, checkpoint_every=25, log_every=10)).run()
    a, b = _state(run), _state(tmp_path / "straight")
    assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    steps = [r["step"] for r in _metrics(run)]
    assert steps == list(range(10, 401, 10))  # records after the checkpoint were dropped, then rewritten once
    losses = [r["loss"] for r in _metrics(run)]
    assert losses == [r["loss"] for r in _metrics(tmp_path / "straight")]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last", "step_00000375", "step_00000400"]


def test_sigterm_checkpoints_at_the_step_boundary_and_resumes_exactly(tmp_path, monkeypatch, dataset_factory):
    dataset_factory(lengths=LENGTHS)
    trainer = Trainer(_cfg(tmp_path, steps=8))
    original = type(trainer.policy).compute_loss
    calls = []

    def compute_loss(self, batch, generator=None):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # preemption in the middle of step 3
        return original(self, batch, generator)

    monkeypatch.setattr(type(trainer.policy), "compute_loss", compute_loss)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    monkeypatch.undo()
    assert os.readlink(tmp_path / "run" / "checkpoints" / "last") == "step_00000003"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
    Trainer(_cfg(tmp_path, steps=8, resume=True)).run()
    Trainer(_cfg(tmp_path, out_dir=str(tmp_path / "straight"), steps=8)).run()
    a, b = _state(tmp_path / "run"), _state(tmp_path / "straight")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_resume_refuses_a_changed_batch_size_or_dataset(tmp_path, dataset_factory):
    dataset_factory(lengths=LENGTHS)
    Trainer(_cfg(tmp_path, steps=2)).run()
    with pytest.raises(UserError, match=r"cannot resume exactly: the run used batch_size=8, now 4"):
        Trainer(_cfg(tmp_path, steps=4, batch_size=4, resume=True, resume_overrides=["steps", "batch_size"]))
    with pytest.raises(UserError, match=r"the run used n_windows=103, now 30"):
        Trainer(_cfg(tmp_path, steps=4, max_episodes=1, resume=True, resume_overrides=["steps", "max_episodes"]))


# ---------------------------------------------------------------------- checkpoints
def test_retention_atomic_writes_and_overwrite(tmp_path, dataset_factory):
    dataset_factory(lengths=LENGTHS)
    Trainer(_cfg(tmp_path, steps=9, checkpoint_every=2, keep_last=2)).run()
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last", "step_00000008", "step_00000009"]
    assert (ckpts / "last" / "model.safetensors").is_file() and (ckpts / "last" / "config.json").is_file()

    # A write that dies half-way leaves `last` on the previous complete checkpoint.
    store = CheckpointStore(ckpts, keep_last=2)

    def dies(path: Path):
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.write(10, dies)
    assert os.readlink(ckpts / "last") == "step_00000009" and not (ckpts / "step_00000010").exists()
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]
    (ckpts / ".tmp-step_00000012-999").mkdir()  # what a SIGKILL during a write leaves
    t = Trainer(_cfg(tmp_path, steps=10, resume=True, resume_overrides=["steps"]))
    t.run()
    assert not (ckpts / ".tmp-step_00000012-999").exists()
    assert t.step == 10 and os.readlink(ckpts / "last") == "step_00000010"

    (tmp_path / "run" / "notes.txt").write_text("mine")
    Trainer(_cfg(tmp_path, steps=2, overwrite=True)).run()
    assert sorted(p.name for p in ckpts.iterdir()) == ["last", "step_00000002"]
    assert [r["step"] for r in _metrics(tmp_path / "run")] == [1, 2]
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"  # only run artifacts are cleared


def test_best_checkpoint_follows_evaluation_success_and_plots(tmp_path, monkeypatch, capsys, dataset_factory):
    dataset_factory(lengths=LENGTHS)
    scores = iter([0.2, 0.6, 0.4])

    def fake_evaluate(self):
        s = next(scores)
        return {"step": self.step, "average_success": s, "wilson95": [s / 2, (1 + s) / 2], "tasks": {"task-a": {"success_rate": s}, "task-b": {"success_rate": 1 - s}}}

    monkeypatch.setattr(Trainer, "evaluate", fake_evaluate)
    res = Trainer(_cfg(tmp_path, steps=6, keep_last=1, **{"eval": {"every": 2}})).run()
    ckpts = tmp_path / "run" / "checkpoints"
    assert os.readlink(ckpts / "best") == "step_00000004" and os.readlink(ckpts / "last") == "step_00000006"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best", "last", "step_00000004", "step_00000006"]
    assert res["best_success"] == 0.6 and res["best_checkpoint"].endswith("step_00000004")
    assert json.loads((ckpts / "best" / "eval.json").read_text())["average_success"] == 0.6
    evals = _metrics(tmp_path / "run", "eval")
    assert [(r["step"], r["average_success"], r["success/task-b"]) for r in evals] == [(2, 0.2, 0.8), (4, 0.6, 0.4), (6, 0.4, 0.6)]

    # a second run to overlay; then the PNG curves
    monkeypatch.setattr(Trainer, "evaluate", lambda self: {"step": self.step, "average_success": 0.5, "wilson95": [0.3, 0.7], "tasks": {}})
    Trainer(_cfg(tmp_path, out_dir=str(tmp_path / "other"), steps=4, **{"eval": {"every": 4}})).run()
    code = main(["plot", f"run={tmp_path / 'run'}", f"compare=[{tmp_path / 'other'}]", "smoothing=0.5", "dpi=50"])
    assert code == 0 and "wrote loss.png, success.png, lr.png, optimization.png" in capsys.readouterr().out
    import matplotlib.image

    for name in ("loss.png", "success.png", "lr.png", "optimization.png"):
        img = matplotlib.image.imread(tmp_path / "run" / "plots" / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.std() > 0.01, name
    assert main(["plot", f"run={tmp_path / 'nope'}"]) == 2
    assert capsys.readouterr().err.strip() == f"mixpolicy: error: run folder not found: {tmp_path / 'nope'}"


@pytest.mark.slow
def test_periodic_closed_loop_evaluation_on_metaworld(tmp_path, dataset_factory):
    dataset_factory(lengths=(20, 20, 20), state_dim=39, action_dim=4, tasks=("reach-v3",))
    ev = {"every": 3, "episodes_per_task": 2, "num_envs": 2, "max_episode_steps": 6}
    res = Trainer(_cfg(tmp_path, steps=3, **{"eval": ev})).run()
    summary = json.loads((tmp_path / "run" / "checkpoints" / "step_00000003" / "eval.json").read_text())
    assert summary["tasks"]["reach-v3"]["episodes"] == 2 and summary["step"] == 3
    assert res["best_checkpoint"] is not None and 0 <= res["best_success"] <= 1
    with pytest.raises(UserError, match="not one this policy was trained on"):
        Trainer(_cfg(tmp_path, out_dir=str(tmp_path / "x"), **{"eval": {**ev, "tasks": ["push-v3"]}}))


# ---------------------------------------------------------------------- loading, precision
class _PlainWindows(torch.utils.data.Dataset):
    """A dataset with only __getitem__ (as a disk-backed dataset would be)."""

    def __init__(self, windows):
        self.windows = windows

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        return self.windows[i]


class _AugmentedWindows(_PlainWindows):
    """Random augmentation inside the dataset, from torch's and numpy's global streams."""

    def __getitem__(self, i):
        item = dict(self.windows[i])
        item["state"] = item["state"] + 0.05 * torch.rand(item["state"].shape) + float(np.random.normal(0, 0.05))
        return item


def test_dataloader_workers_and_plain_datasets_train_identically(tmp_path, dataset_factory):
    dataset_factory(lengths=LENGTHS)
    Trainer(_cfg(tmp_path, out_dir=str(tmp_path / "gather"), steps=4)).run()
    Trainer(_cfg(tmp_path, out_dir=str(tmp_path / "workers"), steps=4, loader={"num_workers": 2, "prefetch_factor": 2})).run()
    cfg = _cfg(tmp_path, out_dir=str(tmp_path / "plain"), steps=4)
    base = build_training_data(cfg, {"state": range(-1, 1), "action": range(0, 4)})
    Trainer(cfg, data=TrainingData(_PlainWindows(base.windows), base.shape_meta, base.normalizer)).run()
    ref = _state(tmp_path / "gather")
    for other in ("workers", "plain"):
        got = _state(tmp_path / other)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=f"{other}: {k}")

    # Augmentation inside a dataset: the same draws in the training process, in 2 workers,
    # and in a run interrupted after step 2 and resumed.
    augmented = TrainingData(_AugmentedWindows(base.windows), base.shape_meta, base.normalizer)

    def run(name, steps=4, until=None, **kw):
        return Trainer(_cfg(tmp_path, out_dir=str(tmp_path / name), steps=steps, **kw), data=augmented).run(until=until)

    run("aug")
    run("aug_workers", loader={"num_workers": 2, "prefetch_factor": 2})
    run("aug_resumed", until=2)
    run("aug_resumed", resume=True, loader={"num_workers": 1})
    ref = _state(tmp_path / "aug")
    assert not torch.equal(ref["model.net.action_in.weight"], _state(tmp_path / "plain")["model.net.action_in.weight"])
    for other in ("aug_workers", "aug_resumed"):
        got = _state(tmp_path / other)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=f"{other}: {k}")


def test_bf16_autocast_on_cpu_trains_and_changes_the_numerics(tmp_path, dataset_factory):
    dataset_factory(lengths=LENGTHS)
    Trainer(_cfg(tmp_path, out_dir=str(tmp_path / "fp32"), steps=3)).run()
    Trainer(_cfg(tmp_path, out_dir=str(tmp_path / "bf16"), steps=3, precision="bf16")).run()
    fp32, bf16 = _metrics(tmp_path / "fp32"), _metrics(tmp_path / "bf16")
    assert all(np.isfinite(r["loss"]) for r in bf16)
    assert bf16[0]["loss"] != fp32[0]["loss"]
    assert bf16[0]["loss"] == pytest.approx(fp32[0]["loss"], rel=0.05)


# ---------------------------------------------------------------------- tracking, config
def test_wandb_offline_run_is_continued_on_resume(tmp_path, dataset_factory):
    pytest.importorskip("wandb")
    dataset_factory(lengths=LENGTHS)
    tracking = {"wandb": True, "wandb_mode": "offline", "tensorboard": False}
    Trainer(_cfg(tmp_path, steps=2, tracking=tracking)).run()
    run_id = json.loads((tmp_path / "run" / "tracking.json").read_text())["wandb_run_id"]
    Trainer(_cfg(tmp_path, steps=3, tracking=tracking, resume=True, resume_overrides=["steps"])).run()
    assert json.loads((tmp_path / "run" / "tracking.json").read_text())["wandb_run_id"] == run_id
    offline = sorted((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert offline and all(list(d.glob("*.wandb")) for d in offline)
    assert not (tmp_path / "run" / "tb").exists()


def test_train_and_plot_yaml_match_their_dataclasses():
    import dataclasses

    from mixpolicy.cli import compose
    from mixpolicy.train.plot import PlotConfig

    train = compose("train", ["dataset=x"])
    for key, cls in (("loader", "LoaderConfig"), ("eval", "PeriodicEvalConfig"), ("tracking", "TrackingConfig")):
        field_type = {f.name: f for f in dataclasses.fields(TrainConfig)}[key].default_factory
        assert set(train[key]) == {f.name for f in dataclasses.fields(field_type)}, cls
    plot = compose("plot", ["run=x"])
    assert set(plot) == {f.name for f in dataclasses.fields(PlotConfig)}
    from_dict(PlotConfig, plot)
    with pytest.raises(UserError, match="'eval.every': must be >= 0"):
        _cfg(Path("/tmp"), **{"eval": {"every": -1}})
    with pytest.raises(UserError, match="'tracking.wandb_mode': must be one of"):
        _cfg(Path("/tmp"), tracking={"wandb_mode": "cloud"})
    with pytest.raises(UserError, match="'batch_size': must be divisible by grad_accum_steps=3"):
        _cfg(Path("/tmp"), grad_accum_steps=3)


def test_buffer_sync_option_fits_the_installed_and_older_torch():
    from mixpolicy.train.setup import no_buffer_sync

    class OldDDP:  # torch before 2.13: no forward_sync_buffers
        def __init__(self, module, broadcast_buffers=True):
            pass

    class NewDDP:
        def __init__(self, module, broadcast_buffers=True, forward_sync_buffers=True):
            pass

    assert no_buffer_sync(OldDDP) == {"broadcast_buffers": False}
    assert no_buffer_sync(NewDDP) == {"forward_sync_buffers": False}
