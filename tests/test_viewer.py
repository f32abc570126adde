"""Rerun recordings of dataset episodes (`data view out=x.rrd`) and of evaluation rollouts
(`eval rerun=true`), read back with the Rerun SDK. Skipped where rerun-sdk (the viewer extra) is missing,
except the tests of the one-line error without it."""

import sys

import numpy as np
import pytest
import torch

from mixpolicy.cli import main
from mixpolicy.datasets.normalizer import Normalizer
from mixpolicy.datasets.replay_buffer import DatasetMeta, KeySpec, ReplayBuffer
from mixpolicy.policies.checkpoint import save_policy
from mixpolicy.policies.config import EDMConfig, MoHConfig, PolicyConfig, TransformerConfig
from mixpolicy.policies.denoising_policy import DenoisingPolicy, ShapeMeta
from mixpolicy.viewer import INSTALL_HINT

try:
    from rerun.chunk import RrdReader
except ImportError:
    RrdReader = None
needs_rerun = pytest.mark.skipif(RrdReader is None, reason="rerun-sdk is not installed (pip install -e '.[viewer]')")


def read_recording(path) -> dict[str, dict[str, list]]:
    """entity path -> column name -> values over the recording's rows, in step order."""
    rows: dict[str, list[dict]] = {}
    for chunk in RrdReader(str(path)).store().stream():
        batch = chunk.to_record_batch().to_pydict()
        n = chunk.num_rows
        for i in range(n):
            rows.setdefault(chunk.entity_path, []).append({k: v[i] for k, v in batch.items() if k != "rerun.controls.RowId"})
    out = {}
    for entity, items in rows.items():
        items.sort(key=lambda r: r.get("step", -1))
        columns: dict[str, list] = {}
        for r in items:
            for k, v in r.items():
                if v is not None:
                    columns.setdefault(k, []).append(v)
        out[entity] = columns
    return out


def make_store(path, lengths=(6, 9), float_img=False):
    """Episodes with a camera, a 3-dim state and a 2-dim action whose values say where they are."""
    image = KeySpec((16, 16, 3), "float32" if float_img else "uint8")
    meta = DatasetMeta(
        fps=10.0,
        obs_keys=["img" if float_img else "image_top", "state"],
        specs={"img" if float_img else "image_top": image, "state": KeySpec((3,), "float32"), "action": KeySpec((2,), "float32")},
        task_descriptions={"push": "push the block"},
    )
    buf = ReplayBuffer.create(path, meta)
    for e, n in enumerate(lengths):
        t = np.arange(n, dtype=np.float32)
        frames = np.zeros((n, 16, 16, 3), np.float32 if float_img else np.uint8)
        frames[:, 0, 0, 0] = t * 10  # the frame index, readable from the pixels
        state = np.stack([t, t + 100 * e, -t], 1).astype(np.float32)
        action = np.stack([t * 0.5, t + 1000 * e], 1).astype(np.float32)
        buf.add_episode({("img" if float_img else "image_top"): frames, "state": state, "action": action}, task="push", success=e == 1, seed=7 + e)
    return buf


@needs_rerun
def test_data_view_writes_every_camera_state_action_and_outcome(tmp_path, capsys):
    make_store(tmp_path / "d.zarr")
    assert main(["data", "view", str(tmp_path / "d.zarr"), "episode=1", f"out={tmp_path}/ep1.rrd"]) == 0
    assert f"wrote {tmp_path}/ep1.rrd" in capsys.readouterr().out
    rec = read_recording(tmp_path / "ep1.rrd")
    assert {"/camera/image_top", "/state/state", "/action", "/episode", "/outcome/success", "/events"} <= set(rec)
    assert rec["/camera/image_top"]["step"] == list(range(9))  # one frame per step
    assert rec["/action"]["step"] == list(range(9))
    assert rec["/action"]["Scalars:scalars"][4] == [2.0, 1004.0]  # action[4] of episode 1
    assert rec["/state/state"]["Scalars:scalars"][3] == [3.0, 103.0, -3.0]
    assert rec["/state/state"]["time"][3] == np.timedelta64(300, "ms")  # 10 fps
    assert rec["/action"]["SeriesLines:names"] == [["action[0]", "action[1]"]]  # one named series per dim
    assert rec["/outcome/success"]["step"] == [8] and rec["/outcome/success"]["Scalars:scalars"] == [[1.0]]
    assert rec["/events"]["TextLog:text"] == [["episode succeeded (9 steps, task push)"]]
    text = rec["/episode"]["TextDocument:text"][0][0]
    assert "| task | push |" in text and "| seed | 8 |" in text and "push the block" in text


@needs_rerun
def test_data_view_recording_of_float_frames_and_a_failed_episode(tmp_path):
    """Diffusion Policy's PushT `img` is float 0..255: it shows as a uint8 camera."""
    make_store(tmp_path / "p.zarr", float_img=True)
    assert main(["data", "view", str(tmp_path / "p.zarr"), "episode=0", f"out={tmp_path}/p.rrd"]) == 0
    rec = read_recording(tmp_path / "p.rrd")
    assert len(rec["/camera/img"]["step"]) == 6
    assert rec["/outcome/success"]["Scalars:scalars"] == [[0.0]]
    assert rec["/events"]["TextLog:level"] == [["WARN"]]


def test_recordings_without_rerun_fail_with_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    make_store(tmp_path / "d.zarr")
    monkeypatch.setitem(sys.modules, "rerun", None)  # import rerun raises ImportError
    assert main(["data", "view", str(tmp_path / "d.zarr"), f"out={tmp_path}/x.rrd"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"mixpolicy: error: {INSTALL_HINT}" and "viewer" in err
    assert not (tmp_path / "x.rrd").exists()
    _moh_checkpoint(tmp_path)
    assert main(["eval", f"checkpoint={tmp_path}/ckpt", "rerun=true", "episodes_per_task=1", "device=cpu"]) == 2
    assert capsys.readouterr().err.strip() == f"mixpolicy: error: {INSTALL_HINT}"
    assert main(["data", "view", str(tmp_path / "d.zarr"), f"out={tmp_path}/x.gif"]) == 2
    assert "must end in .png, .mp4 or .rrd" in capsys.readouterr().err


def _moh_checkpoint(tmp_path, horizons=(2, 4)):
    torch.manual_seed(0)
    cfg = PolicyConfig(
        obs_keys=["state"], horizon=horizons[-1], n_action_steps=2, obs_hidden=32,
        network=TransformerConfig(width=32, depth=1, heads=2, mlp_ratio=2.0),
        objective=EDMConfig(num_inference_steps=3),
        head=MoHConfig(horizons=list(horizons)),
    )  # fmt: skip
    rng = np.random.default_rng(0)
    norm = Normalizer.from_data({"state": rng.normal(size=(20, 39)), "action": rng.uniform(-1, 1, (20, 4))})
    policy = DenoisingPolicy(cfg, ShapeMeta(obs={"state": [39]}, action_dim=4, tasks=["reach-v3"], fps=80.0), norm)
    return save_policy(policy, tmp_path / "ckpt"), policy


@needs_rerun
def test_eval_recording_of_a_mixture_of_horizons_rollout(tmp_path, capsys):
    _moh_checkpoint(tmp_path)
    args = ["eval", f"checkpoint={tmp_path}/ckpt", "episodes_per_task=3", "num_envs=2", "max_episode_steps=5", "device=cpu"]
    assert main([*args, "rerun=true", "rerun_episodes=2", "video_size=32", "progress=false", f"out={tmp_path}/ev"]) == 0
    files = sorted(p.name for p in (tmp_path / "ev" / "rerun").iterdir())
    assert files == ["reach-v3_seed100000.rrd", "reach-v3_seed100001.rrd"]  # the first rerun_episodes only
    rec = read_recording(tmp_path / "ev" / "rerun" / "reach-v3_seed100000.rrd")
    # 5 steps with 2 actions per chunk: decisions at steps 0, 2, 4
    assert [e for e in rec if e.startswith("/plan/chunk/")] == ["/plan/chunk/0000", "/plan/chunk/0001", "/plan/chunk/0002"]
    assert rec["/plan/executable"]["step"] == [0, 2, 4] and rec["/plan/executable"]["Scalars:scalars"] == [[2.0]] * 3
    chunk = rec["/plan/chunk/0001"]
    assert chunk["step"] == [2, 3, 4, 5] and all(len(v) == 4 for v in chunk["Scalars:scalars"])
    for h in (2, 4):  # each horizon's prediction covers its own prefix
        assert rec[f"/plan/horizon_{h}/0001"]["step"] == list(range(2, 2 + h))
    # the executed actions are the chunks' first two actions
    assert rec["/action"]["step"] == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(rec["/action"]["Scalars:scalars"][3], chunk["Scalars:scalars"][1], rtol=1e-6)
    # the corner camera (rendered for the recording) before and after every step
    assert rec["/camera/image_corner"]["step"] == [0, 1, 2, 3, 4, 5]
    assert len(rec["/state/state"]["Scalars:scalars"][0]) == 39
    assert rec["/outcome/success"]["step"] == [5] and rec["/outcome/success"]["Scalars:scalars"] == [[0.0]]
    assert "| task | reach-v3 |" in rec["/episode"]["TextDocument:text"][0][0]
    # the per-horizon predictions agree with the fused chunk where one horizon covers an index alone
    np.testing.assert_allclose(rec["/plan/horizon_4/0001"]["Scalars:scalars"][3], chunk["Scalars:scalars"][3], rtol=1e-4, atol=1e-5)


def test_moh_capture_hook_is_off_unless_recording(tmp_path):
    from mixpolicy.envs.evaluate import evaluate_policy

    _, policy = _moh_checkpoint(tmp_path)
    evaluate_policy(policy, ["reach-v3"], episodes_per_task=1, num_envs=1, max_episode_steps=2, progress=False)
    assert policy.head.capture_horizon_predictions is False and policy.head.last_horizon_predictions is None
    policy.head.capture_horizon_predictions = True
    obs = {"state": torch.zeros(3, 2, 39), "task": torch.zeros(3, dtype=torch.long)}
    policy.plan(obs, torch.Generator().manual_seed(0))
    preds = policy.head.last_horizon_predictions
    assert preds.shape == (2, 3, 4, 4) and bool((preds[0, :, 2:] == 0).all())  # zero past horizon 2
