"""The command table: positional data paths, help for every command, the quickstart's run
folder guard and report, and `data view` videos that decode as h264."""

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from mixpolicy.cli import compose, main, overrides_of
from mixpolicy.commands import COMMANDS
from mixpolicy.datasets.replay_buffer import DatasetMeta, KeySpec, ReplayBuffer

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, pattern):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("mixpolicy: error: ") and re.search(pattern, lines[0]), lines[0]


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode() + (p.read_bytes() if p.is_file() else b""))
    return h.hexdigest()


@pytest.fixture
def store(tmp_path):
    """Two episodes (6 and 4 steps) with an odd-sized camera, state and action, at 10 fps."""
    meta = DatasetMeta(
        fps=10.0,
        obs_keys=["state", "image_cam"],
        action_key="action",
        specs={"state": KeySpec((3,), "float32"), "image_cam": KeySpec((9, 11, 3), "uint8"), "action": KeySpec((2,), "float32")},
    )
    buf = ReplayBuffer.create(tmp_path / "my data.zarr", meta)  # a space in the name, as users have
    rng = np.random.default_rng(0)
    for e, n in enumerate((6, 4)):
        buf.add_episode(
            {
                "state": rng.normal(size=(n, 3)).astype(np.float32),
                "image_cam": np.full((n, 9, 11, 3), 40 * (e + 1), np.uint8),
                "action": rng.normal(size=(n, 2)).astype(np.float32),
            },
            task=f"task-{e}",
            success=True,
        )
    return tmp_path / "my data.zarr"


# ---------------------------------------------------------------------- positional paths
def test_data_commands_take_the_path_positionally(capsys, store):
    for sub, extra in (("info", ["json=true"]), ("validate", ["progress=false"]), ("stats", ["progress=false", "write=false"])):
        by_key = run(capsys, "data", sub, f"path={store}", *extra)
        by_position = run(capsys, "data", sub, store, *extra)
        assert by_key == by_position and by_key[0] == 0, (sub, by_key, by_position)
    assert json.loads(run(capsys, "data", "info", store, "json=true")[1])["episodes"] == 2
    code, out, _ = run(capsys, "data", "view", store, "episode=1", "scale=1")
    assert code == 0 and out.strip() == f"wrote {store.with_suffix('')}_ep1.png"
    code, out, _ = run(capsys, "data", "info", store, "--cfg")
    assert code == 0 and f"path: {store}" in out


def test_convert_takes_src_and_out_positionally(capsys, store, tmp_path):
    code, out, _ = run(capsys, "data", "convert", store, tmp_path / "copy.zarr", "progress=false")
    assert code == 0 and f"to {tmp_path / 'copy.zarr'} (zarr)" in out
    assert ReplayBuffer.open(tmp_path / "copy.zarr").n_episodes == 2
    code, _, err = run(capsys, "data", "convert", store, "progress=false")
    one_line_error(code, err, r"missing required option\(s\) out \(pass them as key=value or as SRC OUT\)")
    code, out, _ = run(capsys, "data", "convert", store, "out=" + str(tmp_path / "other.zarr"), "progress=false")
    assert code == 0 and "other.zarr" in out


def test_paths_that_look_like_values_or_hold_quotes_stay_paths(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("123", "null", "true", "it's [a,b]:x.zarr", "back\\slash\\"):
        assert compose("data/info", overrides_of("data/info", [name]))["path"] == name
    code, _, err = run(capsys, "data", "info", "123")
    one_line_error(code, err, r"not found: 123$")  # a missing store named 123, not the number 123


def test_bad_positional_arguments_are_one_line_errors(capsys, store):
    code, _, err = run(capsys, "data", "info", store, "extra.zarr")
    one_line_error(code, err, r"unexpected argument 'extra\.zarr' for `mixpolicy data info`; it takes PATH, then key=value options")
    code, _, err = run(capsys, "data", "info", store, f"path={store}")
    one_line_error(code, err, r"path given twice: as PATH and as path=")
    code, _, err = run(capsys, "train", "data.zarr")
    one_line_error(code, err, r"unexpected argument 'data\.zarr' for `mixpolicy train`; options are key=value")
    code, _, err = run(capsys, "tasks", "all=true")
    one_line_error(code, err, r"`mixpolicy tasks` takes no options")
    code, _, err = run(capsys, "data", "show", store)
    one_line_error(code, err, r"unknown data command 'show'; choose from info, validate, stats, convert, view")


def test_help_shows_positional_arguments_and_where_commands_write(capsys):
    code, out, _ = run(capsys, "data", "--help")
    assert code == 0 and re.search(r"info PATH\s+keys", out) and re.search(r"convert SRC OUT\s+LeRobot", out)
    code, out, _ = run(capsys, "data", "info", "--help")
    assert code == 0 and out.startswith("usage: mixpolicy data info [PATH] [key=value ...]") and "PATH is the same as path=PATH" in out
    code, out, _ = run(capsys, "data", "convert", "--help")
    assert code == 0 and out.startswith("usage: mixpolicy data convert [SRC [OUT]] [key=value ...]")
    for name in COMMANDS:
        code, out, _ = run(capsys, *name.split("/"), "--help")
        assert code == 0 and "\nwrites: " in out, name
    code, out, _ = run(capsys, "--help")
    assert code == 0 and all(f"\n  {name.split('/')[0]} " in out for name in COMMANDS)


def test_every_command_has_its_yaml_and_a_runner():
    for name, cmd in COMMANDS.items():
        assert cmd.run, name
        if cmd.config:
            assert (ROOT / "configs" / f"{cmd.config_name or name}.yaml").is_file(), name
    assert len((ROOT / "mixpolicy" / "cli.py").read_text().splitlines()) < 200


def test_readme_command_table_lists_every_command_and_where_it_writes():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Command line") :]
    section = section[: section.index("\n## ", 3)]
    rows = [line for line in section.splitlines() if line.startswith("| `mixpolicy ")]
    for top in dict.fromkeys(name.split("/")[0] for name in COMMANDS):
        row = [r for r in rows if r.startswith(f"| `mixpolicy {top}")]
        assert len(row) == 1, top
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", row[0])[1:-1]]
        assert len(cells) == 3 and cells[2], row[0]  # command | what it does | where it writes


# ---------------------------------------------------------------------- data view video
def test_data_view_writes_an_h264_mp4(capsys, store, tmp_path):
    av = pytest.importorskip("av")
    code, out, _ = run(capsys, "data", "view", store, "episode=0", f"out={tmp_path}/ep0.mp4", "scale=1")
    assert code == 0 and out.strip() == f"wrote {tmp_path}/ep0.mp4"
    with av.open(str(tmp_path / "ep0.mp4")) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert stream.average_rate == 10
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert len(frames) == 6 and frames[0].shape == (10, 12, 3)  # 9 x 11 padded to even
    assert abs(int(frames[3][4, 5, 0]) - 40) <= 3
    code, _, _ = run(capsys, "data", "view", store, "episode=1", f"out={tmp_path}/ep1.mp4", "fps=25")
    with av.open(str(tmp_path / "ep1.mp4")) as container:
        stream = container.streams.video[0]
        assert code == 0 and stream.average_rate == 25 and stream.codec_context.width == 22  # scale=2
        assert sum(1 for _ in container.decode(stream)) == 4


# ---------------------------------------------------------------------- quickstart
def test_quickstart_overwrite_defaults_to_false_and_reaches_collect_and_train(capsys, tmp_path):
    code, out, _ = run(capsys, "quickstart", f"out_dir={tmp_path}/qs", "--cfg")
    assert code == 0 and re.search(r"(?m)^overwrite: false$", out) and out.count("overwrite: false") == 3
    code, out, _ = run(capsys, "quickstart", f"out_dir={tmp_path}/qs", "overwrite=true", "--cfg")
    assert code == 0 and out.count("overwrite: true") == 3
    code, _, err = run(capsys, "quickstart", f"out_dir={tmp_path}/qs", "overwrite=maybe")
    one_line_error(code, err, r"'overwrite': expected true/false")


def _fake_stages(monkeypatch, calls):
    def collect(cfg):
        calls.append(("collect", cfg.out, cfg.overwrite))
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        return {"episodes": 3, "steps": 30, "path": cfg.out, "seconds": 0.1}

    def train(cfg):
        calls.append(("train", cfg.out_dir, cfg.overwrite))
        return {"steps": cfg.steps, "trained_steps": cfg.steps, "seconds": 0.5, "checkpoint": f"{cfg.out_dir}/checkpoints/step_2", "params": 1000}

    def evaluate(cfg):
        calls.append(("eval", cfg.checkpoint, cfg.out))
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        return {"average_success": 0.5, "tasks": {"reach-v3": {"success_rate": 0.5}}, "results_file": f"{cfg.out}/results.json"}

    for name, fn in (("collect", collect), ("train", train), ("eval", evaluate)):
        monkeypatch.setitem(COMMANDS, name, dataclasses.replace(COMMANDS[name], run=fn, report=None))


def test_quickstart_refuses_an_existing_run_folder_and_reports_where_everything_went(capsys, tmp_path, monkeypatch):
    calls = []
    _fake_stages(monkeypatch, calls)
    qs = tmp_path / "qs"
    args = ["quickstart", f"out_dir={qs}", "collect.tasks=[reach-v3]", "train.steps=2", "eval.episodes_per_task=1"]
    code, out, _ = run(capsys, *args)
    assert code == 0, out
    assert [c[0] for c in calls] == ["collect", "train", "eval"] and calls[0][2] is False and calls[1][2] is False
    assert f"  dataset      {qs}/data.zarr\n" in out and f"  run folder   {qs}/train\n" in out
    assert f"  checkpoint   {qs}/train/checkpoints/step_2\n" in out and f"  eval results {qs}/eval/results.json\n" in out
    summary = json.loads((qs / "quickstart_summary.json").read_text())
    assert summary["average_success"] == 0.5 and summary["train_steps_per_s"] == 4.0 and summary["cpu"]
    assert "at 4.00 steps/s" in out and f"on {summary['cpu']}, " in out
    assert f"  summary      {qs}/quickstart_summary.json" in out

    before, calls[:] = digest(qs), []
    code, _, err = run(capsys, *args)
    one_line_error(code, err, rf"run folder {re.escape(str(qs))} already exists \(pass overwrite=true to replace it")
    assert calls == [] and digest(qs) == before

    code, out, _ = run(capsys, *args, "overwrite=true")
    assert code == 0 and [c[2] for c in calls[:2]] == [True, True]
    (tmp_path / "empty").mkdir()  # an empty folder made beforehand is no run to protect
    assert run(capsys, "quickstart", f"out_dir={tmp_path}/empty", "train.steps=2")[0] == 0
