"""Bounded fuzz of the policy server on loopback: every mutated request gets an error reply naming
the problem (shifts past the horizon are clamped and answered), the server stays up, and a valid
request afterwards succeeds."""

import msgpack
import numpy as np
import pytest
import torch
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from mixpolicy.deploy.local import LocalPolicy
from mixpolicy.deploy.remote import RemotePolicy
from mixpolicy.deploy.rti import RTIConfig
from mixpolicy.deploy.server import PolicyServer
from mixpolicy.deploy.wire import MAX_ARRAY_LEN, MAX_MAP_LEN, MAX_STR_LEN, packb, unpackb
from mixpolicy.policies.config import DDPMConfig
from mixpolicy.policies.denoising_policy import DenoisingPolicy
from factories import server_shape_meta, tiny_policy_config

N_MESSAGES = 10_000
MAX_BYTES = 1 << 20
HORIZON = 6


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    cfg = tiny_policy_config(horizon=HORIZON, n_action_steps=3, objective=DDPMConfig(num_train_timesteps=20, num_inference_steps=2))
    return DenoisingPolicy(cfg, server_shape_meta()).eval()


def open_ws(url):
    return connect(url, proxy=None, max_size=None, compression=None).__enter__()


def good_obs():
    return {"state": np.linspace(-1, 1, 10, dtype=np.float32).reshape(2, 5)}


def nd(dtype, shape, data):
    return {"__nd__": True, "dtype": dtype, "shape": shape, "data": data}


BAD_TASKS = [-1, 2, 2**31, 2**63, -(2**63), 2**64 - 1, True, False, 1.5, float("nan"), "0", None, [0], {"a": 1}, b"\x00"]
BAD_SHIFTS = [-1, -(2**63), True, False, 1.5, float("inf"), "2", [1], {"s": 1}, b"\x01"]
CLAMPED_SHIFTS = [HORIZON + 1, 10**6, 2**62, 2**63, 2**64 - 1]
BAD_ARRAYS = [
    np.array(1.0, np.float32),  # 0-d
    np.zeros((2, 5), ">f4"),  # big-endian
    np.zeros((2, 5), np.int32), np.zeros((2, 5), np.int64), np.zeros((2, 5), np.uint8), np.zeros((2, 5), bool),
    np.zeros((3, 5), np.float32), np.zeros((2, 4), np.float32), np.zeros((2, 5, 1), np.float32),
    np.zeros((10,), np.float32), np.zeros((0, 5), np.float32), np.zeros((1, 2, 5), np.float32),
    np.full((2, 5), np.nan, np.float32), np.full((2, 5), -np.inf, np.float64),
]  # fmt: skip
BAD_ENCODED = [
    nd("<c8", [2, 5], b"\0" * 80), nd("|O", [2, 5], b"\0" * 80), nd("V4", [2, 5], b"\0" * 40), nd("<U1", [2, 5], b"\0" * 40),
    nd("f4,f4", [2, 5], b"\0" * 80), nd("(2,)f4", [2, 5], b"\0" * 80), nd("nonsense", [2, 5], b"\0" * 40), nd(7, [2, 5], b"\0" * 40),
    nd("<f4", [2, -5], b"\0" * 40), nd("<f4", [2, True, 5], b"\0" * 40), nd("<f4", [1] * 9, b"\0" * 4),
    nd("<f4", [2, 5], b"\0" * 39), nd("<f4", [2**40, 2**40], b"\0" * 40), nd("<f4", [2, 5], "x" * 40),
    nd("<f4", "2,5", b"\0" * 40), {"__nd__": 1, "dtype": "<f4", "shape": [2, 5], "data": b"\0" * 40},
    {"__nd__": True, "dtype": "<f4", "shape": [2, 5]},
]  # fmt: skip
BAD_OBS = [None, 1, "state", [1, 2], {}, {"other": np.zeros((2, 5), np.float32)}, {"state": [[0.0] * 5] * 2}, {"state": "x"}, {"state": None}]


def mutations(rng: np.random.Generator):
    """Yields (message, kind): every kind but "clamp" (a result) and "oversize" (closes) is an error."""
    base = {"type": "infer", "obs": good_obs(), "task": 1, "shift": 2}
    valid = packb(base)
    kinds = ["task", "shift", "clamp", "array", "encoded", "obs", "truncate", "append", "garbage", "type", "ext", "limits", "id", "nest"]
    for i in range(N_MESSAGES):
        kind = "oversize" if i % 1000 == 999 else kinds[i % len(kinds)]
        pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
        msg = dict(base, id=i)
        if kind == "task":
            yield packb(dict(msg, task=pick(BAD_TASKS))), kind
        elif kind == "shift":
            yield packb(dict(msg, shift=pick(BAD_SHIFTS))), kind
        elif kind == "clamp":
            yield packb(dict(msg, shift=pick(CLAMPED_SHIFTS))), kind
        elif kind == "array":
            yield packb(dict(msg, obs={"state": pick(BAD_ARRAYS)})), kind
        elif kind == "encoded":
            yield packb(dict(msg, obs={"state": pick(BAD_ENCODED)})), kind
        elif kind == "obs":
            yield packb(dict(msg, obs=pick(BAD_OBS))), kind
        elif kind == "truncate":
            yield valid[: int(rng.integers(0, len(valid)))], kind
        elif kind == "append":
            yield valid + bytes(rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8)), kind
        elif kind == "garbage":
            yield pick([b"\xc1", b"\xc1" * 8, b"", b"\xff\xfe", b"\x93garbage", bytes(rng.integers(0, 256, 32, dtype=np.uint8)) + b"\xc1"]), kind
        elif kind == "type":
            yield pick([packb([1, 2]), packb(7), packb(None), packb("infer"), packb({"obs": 1}), packb({"type": 7}), packb({"type": "infer2"}), "text frame"]), kind
        elif kind == "ext":
            yield packb(dict(msg, task=pick([msgpack.ExtType(5, b"xx"), msgpack.Timestamp(1, 0)]))), kind
        elif kind == "limits":
            yield pick([
                packb({"type": "x" * (MAX_STR_LEN + 1)}),
                packb({"type": "infer", "obs": {f"k{j}": 0 for j in range(MAX_MAP_LEN + 1)}}),
                packb({"type": "infer", "task": [0] * (MAX_ARRAY_LEN + 1)}),
            ]), kind  # fmt: skip
        elif kind == "id":
            yield packb(dict(msg, id=pick(["abc", 1.5, True, None, [1]]))), kind
        elif kind == "nest":
            deep = b"\x91" * int(rng.integers(2000, 5000)) + b"\xc0"  # lists nested thousands deep
            yield deep, kind
        else:
            yield b"\x00" * (MAX_BYTES + 1 + int(rng.integers(100))), kind


# what each kind's error message must name
NAMES = {
    "task": ("'task'",), "shift": ("'shift'",), "array": ("obs['state']",), "encoded": ("array",), "obs": ("obs",),
    "truncate": ("msgpack",), "append": ("msgpack",), "garbage": ("msgpack",), "type": ("type", "binary"), "ext": ("ext",),
    "limits": ("exceeds max_",), "id": ("'id'",), "nest": ("msgpack",),
}  # fmt: skip


def test_server_answers_every_mutated_request_with_an_error_and_stays_up(policy):
    with PolicyServer(lambda: LocalPolicy(policy, RTIConfig(k=1)), max_message_bytes=MAX_BYTES) as server:
        ws = open_ws(server.url)
        counts = {"error": 0, "result": 0, "close": 0}
        try:
            for i, (data, kind) in enumerate(mutations(np.random.default_rng(0))):
                ws.send(data)
                if kind == "oversize":
                    with pytest.raises(ConnectionClosed) as closed:
                        ws.recv(timeout=10)
                    assert closed.value.rcvd.code == 1009  # message too big
                    counts["close"] += 1
                    ws = open_ws(server.url)
                    continue
                reply = unpackb(ws.recv(timeout=10))
                if kind == "clamp":
                    assert reply["type"] == "result" and reply["actions"].shape == (HORIZON, 3) and reply["id"] == i
                    counts["result"] += 1
                    continue
                assert reply["type"] == "error", (i, kind, reply)
                assert any(name in reply["message"] for name in NAMES[kind]), (i, kind, reply["message"])
                counts["error"] += 1
        finally:
            ws.close()
        assert sum(counts.values()) == N_MESSAGES and min(counts.values()) > 0
        assert server.failure is None and server._thread.is_alive()
        remote = RemotePolicy(server.url)
        try:
            res = remote.infer(good_obs(), 1, None)
            assert res.actions.shape == (HORIZON, 3) and np.isfinite(res.actions).all() and not res.warm
        finally:
            remote.close()


def test_shift_beyond_the_horizon_is_clamped_to_the_horizon(policy):
    a, b = LocalPolicy(policy, RTIConfig(k=1), seed=5), LocalPolicy(policy, RTIConfig(k=1), seed=5)
    for client in (a, b):
        client.infer(good_obs(), 1, None)
    np.testing.assert_array_equal(a.infer(good_obs(), 1, 2**63).actions, b.infer(good_obs(), 1, HORIZON).actions)
