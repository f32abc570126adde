"""Policy server and clients over loopback: wire format, equivalence, auth, limits, timeouts."""

import time

import msgpack
import numpy as np
import pytest
import torch

from mixpolicy.deploy.local import LocalPolicy
from mixpolicy.deploy.rti import RTIConfig
from mixpolicy.deploy.remote import RemotePolicy, RemotePolicyError
from mixpolicy.deploy.server import PolicyServer
from mixpolicy.deploy.subprocess_backend import SubprocessPolicy
from mixpolicy.deploy.wire import WireError, packb, unpackb
from mixpolicy.errors import UserError
from mixpolicy.policies.denoising_policy import DenoisingPolicy
from factories import server_shape_meta, tiny_policy_config


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    cfg = tiny_policy_config(horizon=6, n_action_steps=3)
    return DenoisingPolicy(cfg, server_shape_meta(discrete_action_dims=[2])).eval()


def obs(seed=0):
    return {"state": np.random.default_rng(seed).normal(size=(2, 5)).astype(np.float32)}


def test_wire_roundtrips_arrays_and_rejects_objects_and_garbage():
    msg = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([True, False]), "n": 3, "s": None}
    back = unpackb(packb(msg))
    np.testing.assert_array_equal(back["a"], msg["a"])
    assert back["a"].dtype == np.float32 and back["b"].dtype == bool and back["n"] == 3 and back["s"] is None
    with pytest.raises(TypeError):
        packb({"x": np.array([object()])})
    forged = msgpack.packb({"__nd__": True, "dtype": "|O", "shape": [1], "data": b"\0" * 8})
    with pytest.raises(WireError, match="not allowed"):
        unpackb(forged)
    with pytest.raises(WireError, match="not a msgpack"):
        unpackb(b"\xc1\xc1\xc1")
    with pytest.raises(WireError, match="exceeds the limit"):
        unpackb(b"\x00" * 100, max_bytes=10)


def test_remote_policy_matches_local_policy_and_keeps_per_connection_state(policy):
    rti = RTIConfig(k=2)
    local = LocalPolicy(policy, rti, seed=3)
    with PolicyServer(lambda: LocalPolicy(policy, rti, seed=3)) as server:
        assert server.url.startswith("ws://127.0.0.1:")
        remote = RemotePolicy(server.url)
        assert remote.spec == local.spec
        for shift in (None, 2, 3):
            a, b = local.infer(obs(), 1, shift), remote.infer(obs(), 1, shift)
            np.testing.assert_allclose(a.actions, b.actions, rtol=1e-6, atol=1e-6)
            assert (a.steps, a.warm) == (b.steps, b.warm)
        other = RemotePolicy(server.url)  # a second robot: its own warm-start state
        assert other.infer(obs(), 0, 2).steps == 4
        remote.reset()
        assert remote.infer(obs(), 0, 2).steps == 4
        with pytest.raises(RemotePolicyError, match="n_obs_steps"):
            remote.infer({"state": np.zeros((5, 5), np.float32)}, 0, None)
        with pytest.raises(RemotePolicyError, match="lacks key"):
            remote.infer({"other": np.zeros((2, 5), np.float32)}, 0, None)
        assert remote.infer(obs(), 0, None).steps == 4  # the connection survives bad requests
        remote.close()
        other.close()


def test_token_auth(policy):
    with PolicyServer(lambda: LocalPolicy(policy), token="s3cret") as server:
        with pytest.raises(UserError, match="token is missing or wrong"):
            RemotePolicy(server.url)
        with pytest.raises(UserError, match="token is missing or wrong"):
            RemotePolicy(server.url, token="guess")
        ok = RemotePolicy(server.url, token="s3cret")
        assert ok.infer(obs(), 0, None).actions.shape == (6, 3)
        ok.close()


def test_non_loopback_needs_a_token(policy):
    with pytest.raises(UserError, match="requires a token"):
        PolicyServer(lambda: LocalPolicy(policy), host="0.0.0.0")


def test_message_size_limit_and_malformed_requests(policy):
    with PolicyServer(lambda: LocalPolicy(policy), max_message_bytes=4096) as server:
        remote = RemotePolicy(server.url)
        with pytest.raises(RemotePolicyError, match="closed the connection"):
            remote.infer({"state": np.zeros((2, 5000), np.float32)}, 0, None)
        remote.close()
        from websockets.sync.client import connect

        with connect(server.url, proxy=None) as ws:
            ws.send(b"\x93garbage")
            assert unpackb(ws.recv(timeout=5))["type"] == "error"
            ws.send(packb({"type": "infer", "obs": obs(), "shift": -1}))
            reply = unpackb(ws.recv(timeout=5))
            assert reply["type"] == "error" and "shift" in reply["message"]


def test_client_times_out_on_a_slow_server(policy):
    class Slow(LocalPolicy):
        def infer(self, *a, **k):
            time.sleep(1.0)
            return super().infer(*a, **k)

    with PolicyServer(lambda: Slow(policy)) as server:
        remote = RemotePolicy(server.url, timeout_s=0.2)
        t = time.perf_counter()
        with pytest.raises(RemotePolicyError, match="did not answer within 0.2 s"):
            remote.infer(obs(), 0, None)
        assert time.perf_counter() - t < 0.9
        remote.close()


def test_unreachable_server_is_a_user_error():
    with pytest.raises(UserError, match="cannot reach policy server"):
        RemotePolicy("ws://127.0.0.1:9", timeout_s=1.0)


@pytest.mark.slow
def test_subprocess_policy_serves_a_checkpoint(policy, tmp_path):
    from mixpolicy.policies.checkpoint import save_policy

    save_policy(policy, tmp_path / "ckpt")
    rti = RTIConfig(k=1)
    client = SubprocessPolicy(str(tmp_path / "ckpt"), rti, device="cpu", seed=4, timeout_s=10)
    try:
        local = LocalPolicy(policy, rti, seed=4)
        for shift in (None, 3):
            a, b = local.infer(obs(), 1, shift), client.infer(obs(), 1, shift)
            np.testing.assert_allclose(a.actions, b.actions, rtol=1e-5, atol=1e-5)
    finally:
        client.close()
    assert client._proc.poll() is not None  # the child process is gone


def test_a_call_carries_its_frozen_prefix_to_the_server(policy):
    """rti.delay=auto: the delay each call sends is the server's frozen prefix; out of range is refused."""
    frozen = []
    rti = RTIConfig(k=2, prefix="hard", delay="auto")

    def make():
        client = LocalPolicy(policy, rti, seed=3)
        conditions = client.sampler.conditions
        client.sampler.conditions = lambda *a: (frozen.append(a[2]), conditions(*a))[1]
        return client

    with PolicyServer(make) as server:
        remote = RemotePolicy(server.url)
        assert remote.spec.extra["rti"]["delay"] == "auto"
        remote.infer(obs(), 0, None)
        remote.infer(obs(), 0, 3, delay=2)
        remote.infer(obs(), 0, 3)
        assert frozen == [None, 2, None]
        with pytest.raises(RemotePolicyError, match=r"'delay' must be an integer in \[0, 6\]"):
            remote.infer(obs(), 0, 3, delay=7)
        remote.close()
