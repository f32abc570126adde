"""Store faults: a second writer, a full disk mid-append, a lost chunk file, fsync order."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr
import zarr.storage._local as zarr_local

from mixpolicy.cli import main
from mixpolicy.datasets import store_io
from mixpolicy.datasets.replay_buffer import LAYOUT_KEY, ReplayBuffer
from mixpolicy.datasets.validate import validate_store
from mixpolicy.errors import UserError
from factories import make_dataset
from test_cli import assert_one_line_error

ROOT = Path(__file__).resolve().parents[1]
HOLD_WRITER = textwrap.dedent(
    """
    import sys
    from mixpolicy.datasets.replay_buffer import ReplayBuffer

    buf = ReplayBuffer.open(sys.argv[1], mode="r+")
    print("writing", flush=True)
    sys.stdin.readline()  # hold the store until told to stop
    """
)
TRY_WRITER = textwrap.dedent(
    """
    import sys
    from mixpolicy.datasets.replay_buffer import ReplayBuffer
    from mixpolicy.errors import UserError

    print(ReplayBuffer.open(sys.argv[1]).n_episodes, flush=True)  # reading is never refused
    try:
        ReplayBuffer.open(sys.argv[1], mode="r+")
    except UserError as exc:
        print(exc)
    else:
        print("opened for writing")
    """
)


def python(script: str, *args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", script, *args], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def episode(n: int = 4, value: float = 1.0) -> dict[str, np.ndarray]:
    return {"state": np.full((n, 6), value, np.float32), "action": np.full((n, 3), value, np.float32)}


# ---------------------------------------------------------------------- item 15: one writer
@pytest.mark.slow
def test_a_second_writer_process_is_refused_and_readers_are_not(tmp_path, capsys):
    path = tmp_path / "d.zarr"
    writer = make_dataset(path, lengths=(3, 2))  # this process writes
    out, err = python(TRY_WRITER, str(path)).communicate(timeout=60)
    lines = out.strip().splitlines()
    assert lines[0] == "2", err
    assert len(lines) == 2 and f"{path} is already open for writing (process {os.getpid()})" in lines[1]
    writer.close()
    out, _ = python(TRY_WRITER, str(path)).communicate(timeout=60)
    assert out.strip().splitlines() == ["2", "opened for writing"]

    holder = python(HOLD_WRITER, str(path), stdin=subprocess.PIPE)  # another process writes
    try:
        assert holder.stdout.readline().strip() == "writing", holder.stderr.read()
        with pytest.raises(UserError, match=rf"already open for writing \(process {holder.pid}\)") as info:
            ReplayBuffer.open(path, mode="r+")
        assert "\n" not in str(info.value)
        with pytest.raises(UserError, match="already open for writing"):
            ReplayBuffer.create(path, ReplayBuffer.open(path).meta, overwrite=True)
        reader = ReplayBuffer.open(path)
        assert reader.n_episodes == 2 and reader.get_episode(1)["state"].shape == (2, 6)
        code = main(["data", "stats", f"path={path}", "write=true", "progress=false"])
        assert_one_line_error(code, capsys.readouterr().err, "already open for writing")
    finally:
        holder.communicate("stop\n", timeout=60)
    again = ReplayBuffer.open(path, mode="r+")  # the lock went with the process
    again.add_episode(episode(), task="task-a")
    assert ReplayBuffer.open(path).n_episodes == 3 and validate_store(path) == []


def test_the_lock_lasts_as_long_as_the_writer(tmp_path):
    path = tmp_path / "d.zarr"
    with make_dataset(path, lengths=(2,)) as writer:
        with pytest.raises(UserError, match="already open for writing"):
            ReplayBuffer.open(path, mode="r+")  # also within one process
        assert writer.writable
    assert not writer.writable
    with pytest.raises(UserError, match="read-only"):
        writer.add_episode(episode())
    second = ReplayBuffer.open(path, mode="r+")
    second.add_episode(episode(), task="x")
    del second  # dropped without close(): the lock goes with the object
    third = ReplayBuffer.open(path, mode="r+")
    assert third.n_episodes == 2 and third.episode_tasks[-1] == "x"
    with pytest.raises(UserError, match="not a readable zarr store"):
        (tmp_path / "plain").mkdir()
        ReplayBuffer.open(tmp_path / "plain", mode="r+")
    assert list((tmp_path / "plain").iterdir()) == []  # no lock file left in a folder that is no store


# ---------------------------------------------------------------------- item 16/17: disk full, retry
class FailingWrites:
    """Makes the ``fail_at``-th zarr file write (or fsync) raise ENOSPC; counts the calls."""

    def __init__(self, monkeypatch, fail_at: int, what: str):
        self.calls, self.fail_at = 0, fail_at
        if what == "write":
            real = zarr_local._put
            monkeypatch.setattr(zarr_local, "_put", lambda *a, **kw: self.step() or real(*a, **kw))
        else:
            real = os.fsync
            monkeypatch.setattr(store_io.os, "fsync", lambda fd: self.step() or real(fd))

    def step(self):
        self.calls += 1
        if self.calls == self.fail_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def count_calls(tmp_path, monkeypatch, what: str) -> int:
    buf = make_dataset(tmp_path / f"count-{what}.zarr", lengths=(3,), tasks=("old task",))
    with monkeypatch.context() as patch:
        fault = FailingWrites(patch, 0, what)
        buf.add_episode(episode(5, 2.0), task="new task", source="new source", seed=7)
    return fault.calls


@pytest.mark.parametrize("what", ["write", "fsync"])
def test_a_full_disk_then_a_retry_leaves_a_consistent_store(tmp_path, monkeypatch, what):
    """Fails each zarr write of one append in turn (fsyncs: at spread points), then retries."""
    n = count_calls(tmp_path, monkeypatch, what)
    assert n > 10  # data, attributes, per-episode metadata and the commit
    for fail_at in range(1, n + 1) if what == "write" else sorted({1, n // 4, n // 2, 3 * n // 4, n - 1, n}):
        path = tmp_path / f"{what}-{fail_at}.zarr"
        buf = make_dataset(path, lengths=(3,), tasks=("old task",))
        with monkeypatch.context() as patch:
            FailingWrites(patch, fail_at, what)
            with pytest.raises(UserError) as info:
                buf.add_episode(episode(5, 2.0), task="new task", source="new source", seed=7)
        assert str(info.value).startswith(f"{path}: writing episode 1 failed (No space left on device)")
        assert "\n" not in str(info.value)
        during = ReplayBuffer.open(path)
        assert during.n_episodes in (1, 2) and validate_store(path) == []
        assert during.episode_tasks[0] == "old task" and set(during.episode_tasks) <= {"old task", "new task"}
        buf.add_episode(episode(5, 2.0), task="new task", source="new source", seed=7)  # the retry
        buf.close()
        after = ReplayBuffer.open(path)
        assert after.n_episodes == 2 and after.episode_tasks == ["old task", "new task"], fail_at
        assert after.meta.tasks == ["old task", "new task"] and after.episode_sources[1] == "new source"
        assert after.episode_seeds.tolist() == [0, 7]
        np.testing.assert_array_equal(after.get_episode(1)["state"], np.full((5, 6), 2.0))
        assert validate_store(path) == []


# ---------------------------------------------------------------------- item 16: fsync order, lost chunks
def test_data_reaches_the_disk_before_episode_ends_commits(tmp_path, monkeypatch):
    path = tmp_path / "d.zarr"
    buf = make_dataset(path, lengths=(2,))
    events: list[tuple[str, str]] = []
    real_put, real_fsync = zarr_local._put, os.fsync
    monkeypatch.setattr(zarr_local, "_put", lambda p, *a, **kw: events.append(("write", str(p))) or real_put(p, *a, **kw))
    monkeypatch.setattr(store_io.os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd))
    buf.add_episode(episode(4))
    commit = events.index(("write", str(path / "meta/episode_ends/c/0")))
    written = {p for kind, p in events[:commit] if kind == "write"} - {str(path / "meta/episode_ends/zarr.json")}  # part of the commit
    synced = {p for kind, p in events[:commit] if kind == "fsync"}
    assert str(path / "data/state/c/0/0") in written and written <= synced
    assert {str(path / "data/state/c/0"), str(path / "data/state"), str(path)} <= synced  # folders too
    assert ("fsync", str(path / "meta/episode_ends/c/0")) in events[commit:]


def test_validate_reports_a_deleted_chunk_file(tmp_path, capsys):
    path = tmp_path / "d.zarr"
    make_dataset(path, lengths=(5, 3, 7)).close()
    np.testing.assert_array_equal(ReplayBuffer.open(path).get_episode(1)["state"][:, 0], [100, 101, 102])
    (path / "data/state/c/0/0").unlink()  # a power loss took the only chunk of data/state
    (path / "meta/episode_task/c/0").unlink()
    problems = validate_store(path)
    assert problems == [
        "meta/episode_task: 1 chunk file(s) under committed rows are missing, first '0' of chunk 0 (rows 0-2); zarr would read them as zeros",
        "data/state: 1 chunk file(s) under committed rows are missing, first '0' of chunk 0 (rows 0-14); zarr would read them as zeros",
    ]
    code = main(["data", "validate", f"path={path}", "progress=false"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 1 and out == [f"{path}: {p}" for p in problems]
    # readers refuse the lost rows instead of returning zeros
    buf = ReplayBuffer.open(path)
    with pytest.raises(UserError, match=r"data/state rows 5-7: chunk file .*data/state/c/0/0 is missing"):
        buf.get_episode(1)
    from mixpolicy.datasets.chunks import RowReader

    reader = RowReader(buf.array("state"))
    assert reader.direct
    with pytest.raises(UserError, match="chunk file is missing"):
        reader.read(np.arange(5, 8))
    np.testing.assert_array_equal(RowReader(buf.array("action")).read(np.arange(5, 8))[:, 0], [100, 101, 102])


def test_stores_that_skip_empty_chunks_are_not_reported(tmp_path):
    """Stores written before every chunk got a file: a missing file may be an all-zero chunk."""
    path = tmp_path / "d.zarr"
    make_dataset(path, lengths=(5,)).close()
    group = zarr.open_group(str(path), mode="r+")
    del group.attrs[LAYOUT_KEY]
    (path / "meta/episode_task/c/0").unlink()  # one task: zarr used to skip this all-zero chunk
    assert validate_store(path) == []
