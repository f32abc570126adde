"""A writer process SIGKILLed at random points never costs a completed episode.

Each round starts a real writer that appends episodes to the same store and reports each
commit; after a random number (2-4) of commits and a random fraction of its episode period the test kills it
with SIGKILL (so kills land inside data writes, metadata writes and the episode_ends commit
alike, however fast or loaded the machine is), reopens the store and checks every committed episode against
the content the writer was told to write. The next round's writer appends after the
survivors, so the store also proves it stays appendable after every crash.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from mixpolicy.datasets.replay_buffer import ReplayBuffer

WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from mixpolicy.datasets.replay_buffer import DatasetMeta, KeySpec, ReplayBuffer

    path = sys.argv[1]
    try:
        buf = ReplayBuffer.open(path, mode="r+")
    except Exception:
        meta = DatasetMeta(specs={
            "state": KeySpec((5,), "float32"),
            "action": KeySpec((2,), "float32"),
            "image": KeySpec((24, 24, 3), "uint8"),
        }, source="crash-test")
        buf = ReplayBuffer.create(path, meta, chunk_rows={"state": 16, "action": 16, "image": 4})
    print("ready", flush=True)
    while True:
        e = buf.n_episodes
        n = 3 + (e * 7) % 11
        t = np.arange(n)
        state = (1000.0 * e + t)[:, None].repeat(5, 1).astype(np.float32)
        action = np.stack([np.full(n, e), t], 1).astype(np.float32)
        image = ((e + t) % 251).astype(np.uint8)[:, None, None, None].repeat(24, 1).repeat(24, 2).repeat(3, 3)
        buf.add_episode({"state": state, "action": action, "image": image}, task=f"task-{e % 3}", success=e % 2 == 0, seed=e)
        print("committed", flush=True)
    """
)


def expected_length(e: int) -> int:
    return 3 + (e * 7) % 11


def check_store(path) -> tuple[int, int]:
    """Checks every committed episode; returns (episodes, rows written past the last commit)."""
    buf = ReplayBuffer.open(path)
    lengths = buf.episode_lengths
    for e in range(buf.n_episodes):
        assert lengths[e] == expected_length(e), (e, lengths[e])
        ep = buf.get_episode(e)
        t = np.arange(lengths[e])
        np.testing.assert_array_equal(ep["state"][:, 0], 1000.0 * e + t)
        np.testing.assert_array_equal(ep["action"][:, 1], t)
        np.testing.assert_array_equal(ep["image"][:, 5, 7, 1], (e + t) % 251)
    assert buf.episode_tasks == [f"task-{e % 3}" for e in range(buf.n_episodes)]
    assert buf.episode_seeds.tolist() == list(range(buf.n_episodes))
    assert buf.episode_success.tolist() == [e % 2 == 0 for e in range(buf.n_episodes)]
    return buf.n_episodes, max(buf.root["data"][k].shape[0] for k in buf.keys) - buf.n_steps


@pytest.mark.slow
def test_sigkilled_writer_leaves_every_completed_episode_intact(tmp_path):
    path = tmp_path / "crash.zarr"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rng = np.random.default_rng(0)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    rounds, committed, torn_rounds, last_uncommitted, deadline = 0, [], 0, 0, time.monotonic() + 60
    while rounds < 25 and time.monotonic() < deadline:
        proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        try:
            assert proc.stdout.readline().strip() == b"ready", proc.stderr.read().decode()
            # wait for 2-4 commits, then kill at a random point of the writer's own episode
            # period (measured between its commits), so kills land inside appends at any speed
            stamps = []
            for _ in range(int(rng.integers(2, 5))):
                assert proc.stdout.readline().strip() == b"committed", proc.stderr.read().decode()
                stamps.append(time.monotonic())
            period = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
            time.sleep(float(rng.uniform(0.0, period)))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
        n, uncommitted = check_store(path)
        # this writer died mid-episode if it left rows past the commit point that the
        # previous writer had not (rows are overwritten by the next append)
        torn_rounds += uncommitted > 0 and (not committed or n > committed[-1] or uncommitted > last_uncommitted)
        last_uncommitted = uncommitted
        assert not committed or n >= committed[-1], "a committed episode disappeared"
        committed.append(n)
        rounds += 1
    print(f"{rounds} SIGKILLed writers, {torn_rounds} killed mid-episode, {committed[-1]} episodes committed")
    assert rounds >= 10
    # the writers made progress across crashes, and some kills landed mid-episode
    assert committed[-1] > rounds
    assert torn_rounds >= 1, f"no kill landed inside an episode in {rounds} rounds"
    buf = ReplayBuffer.open(path)
    assert buf.episode_sources == ["crash-test"] * buf.n_episodes
