"""`mixpolicy serve protocol=openpi` at the wire level (no openpi-client needed): metadata on connect,
`__ndarray__` arrays, the observation and prompt mapping, the shift rule, errors as text frames, and the
server's guards (token as Api-Key, Origin, connection cap, message size)."""

import dataclasses
import re
import time

import msgpack
import numpy as np
import pytest
import torch
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from mixpolicy.cli import compose
from mixpolicy.config import ConfigError, from_dict
from mixpolicy.deploy.local import LocalPolicy
from mixpolicy.deploy.openpi_protocol import OpenpiConfig, OpenpiProtocol, packb, unpackb
from mixpolicy.deploy.remote import RemotePolicy
from mixpolicy.deploy.rti import RTIConfig
from mixpolicy.deploy.server import PolicyServer, ServeConfig
from mixpolicy.deploy.wire import WireError
from mixpolicy.errors import UserError
from mixpolicy.policies.denoising_policy import DenoisingPolicy, ShapeMeta
from factories import tiny_policy_config
from test_cli import assert_one_line_error, run_main

RTI = RTIConfig(k=2)
OBS_MAP = {"observation/state": "state"}


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    cfg = tiny_policy_config(horizon=6, n_action_steps=3)
    meta = ShapeMeta(obs={"state": [5]}, action_dim=3, tasks=["a", "b"], task_descriptions={"a": "pick up the cube", "b": "b"})
    return DenoisingPolicy(cfg, meta).eval()


def server_for(policy, cfg=None, **kw):
    spec = LocalPolicy(policy, RTI).spec
    openpi = OpenpiProtocol(cfg or OpenpiConfig(obs_map=OBS_MAP), spec)
    return PolicyServer(lambda: LocalPolicy(policy, RTI, seed=7), openpi=openpi, **kw)


def frame(seed=0):
    return np.random.default_rng(seed).normal(size=5).astype(np.float32)


def request(seed=0, prompt="pick up the cube", **extra):
    return packb({"observation/state": frame(seed), "prompt": prompt, **extra})


def open_ws(server, **kw):
    ws = connect(server.url, proxy=None, compression=None, **kw).__enter__()
    return ws, unpackb(ws.recv(timeout=5))  # the metadata comes first, unasked


def call(ws, data):
    ws.send(data)
    reply = ws.recv(timeout=10)
    return reply if isinstance(reply, str) else unpackb(reply)


def test_openpi_arrays_use_bytes_keys_and_decode_checked():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    raw = msgpack.unpackb(packb({"a": x}), raw=False)
    assert set(raw["a"]) == {b"__ndarray__", b"data", b"dtype", b"shape"}  # what openpi-client's unpacker looks for
    assert raw["a"][b"dtype"] == "<f4" and raw["a"][b"shape"] == [2, 3]
    back = unpackb(packb({"a": x, "b": np.array([True]), "n": np.int64(3)}))
    np.testing.assert_array_equal(back["a"], x)
    assert back["a"].dtype == np.float32 and back["b"].dtype == bool and back["n"] == 3
    # openpi-client's own layout: bytes keys, shape a tuple; a numpy scalar as __npgeneric__; str keys accepted too
    client_style = msgpack.packb({b"__ndarray__": True, b"data": x.tobytes(), b"dtype": "<f4", b"shape": (2, 3)})
    np.testing.assert_array_equal(unpackb(client_style), x)
    assert unpackb(msgpack.packb({b"__npgeneric__": True, b"data": 2.5, b"dtype": "<f8"})) == 2.5
    np.testing.assert_array_equal(unpackb(msgpack.packb({"__ndarray__": True, "data": x.tobytes(), "dtype": "<f4", "shape": [6]})), x.ravel())
    bad = {
        "not allowed": {b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": "|O", b"shape": [1]},
        "do not hold": {b"__ndarray__": True, b"data": b"\0" * 7, b"dtype": "<f4", b"shape": [2]},
        "must be true": {b"__ndarray__": 1, b"data": b"", b"dtype": "<f4", b"shape": [0]},
        "unknown dtype": {b"__ndarray__": True, b"data": b"", b"dtype": "zz", b"shape": [0]},
        "at most 8": {b"__ndarray__": True, b"data": b"", b"dtype": "<f4", b"shape": [0] * 9},
        "scalar dtype": {b"__npgeneric__": True, b"data": 1, b"dtype": "|O"},
    }
    for message, forged in bad.items():
        with pytest.raises(WireError, match=message):
            unpackb(msgpack.packb(forged))
    with pytest.raises(WireError, match="not a msgpack"):
        unpackb(msgpack.packb({"t": msgpack.Timestamp(1)}))  # extension types are refused
    with pytest.raises(WireError, match="exceeds the limit"):
        unpackb(b"\x00" * 100, max_bytes=10)
    with pytest.raises(TypeError):
        packb({"x": np.array([object()])})


def test_metadata_on_connect_and_replies_match_the_local_policy(policy):
    local = LocalPolicy(policy, RTI, seed=7)
    with server_for(policy, OpenpiConfig(obs_map=OBS_MAP, reset_after_s=30.0)) as server:
        ws, meta = open_ws(server)
        assert meta["server"] == "mixpolicy" and meta["protocol"] == "openpi"
        assert meta["observations"] == {"observation/state": {"shape": [5], "dtype": ["<f2", "<f4", "<f8"]}}
        assert (meta["action_horizon"], meta["action_dim"], meta["n_action_steps"], meta["shift"]) == (6, 3, 3, 3)
        assert meta["tasks"] == ["a", "b"]
        # one frame is repeated over n_obs_steps=2; the second call warm-starts with shift = n_action_steps
        hist = lambda s: {"state": np.stack([frame(s)] * 2)}  # noqa: E731
        for seed, shift, task in ((0, None, 0), (1, 3, 0), (2, None, 1), (3, 3, 1)):
            prompt = "pick up the cube" if task == 0 else "B"  # a description, or a task name (case ignored)
            reply = call(ws, request(seed, prompt))
            want = local.infer(hist(seed), task, shift)
            assert reply["actions"].shape == (6, 3) and reply["actions"].dtype == np.float32
            np.testing.assert_allclose(reply["actions"], want.actions, rtol=1e-6, atol=1e-6)
            assert (reply["steps"], reply["warm"]) == (want.steps, want.warm) == ((4, False) if shift is None else (2, True))
            assert reply["policy_timing"]["infer_ms"] > 0 and reply["server_timing"]["infer_ms"] >= reply["policy_timing"]["infer_ms"]
        # a whole history (n_obs_steps, ...) is taken as it is
        h = np.stack([frame(8), frame(9)])
        reply = call(ws, packb({"observation/state": h, "prompt": "B"}))
        np.testing.assert_allclose(reply["actions"], local.infer({"state": h}, 1, 3).actions, rtol=1e-6, atol=1e-6)
        ws.close()
        other, _ = open_ws(server)  # a new connection starts cold, whatever the first did
        assert call(other, request(4, "B"))["warm"] is False
        other.close()


def test_a_pause_longer_than_reset_after_s_denoises_fully(policy):
    with server_for(policy, OpenpiConfig(obs_map=OBS_MAP, reset_after_s=0.3, shift=1)) as server:
        ws, meta = open_ws(server)
        assert meta["shift"] == 1
        assert [call(ws, request(i))["warm"] for i in range(3)] == [False, True, True]
        time.sleep(0.4)
        assert [call(ws, request(i))["warm"] for i in range(2)] == [False, True]
        ws.close()


def test_prompt_mapping_nested_keys_and_configuration_errors(policy):
    cfg = OpenpiConfig(obs_map={"observation/joints": "state"}, prompt_to_task={"Grab it": "b"})
    with server_for(policy, cfg) as server:
        ws, meta = open_ws(server)
        assert meta["prompts"] == ["Grab it"] and list(meta["observations"]) == ["observation/joints"]
        nested = packb({"observation": {"joints": frame()}, "prompt": "grab  it"})  # a/b finds nested maps too
        assert call(ws, nested)["actions"].shape == (6, 3)
        ws.close()
    spec = LocalPolicy(policy).spec
    with pytest.raises(UserError, match=r"not observations of this policy \(\['state'\]\)"):
        OpenpiProtocol(OpenpiConfig(obs_map={"observation/image": "image_front"}), spec)
    with pytest.raises(UserError, match="not ones this policy was trained on"):
        OpenpiProtocol(OpenpiConfig(prompt_to_task={"go": "c"}), spec)
    with pytest.raises(UserError, match="two keys onto 'state'"):
        OpenpiProtocol(OpenpiConfig(obs_map={"x": "state", "y": "state"}), spec)
    with pytest.raises(ConfigError, match="openpi.shift"):
        OpenpiConfig(shift=-1)
    with pytest.raises(ConfigError, match="openpi.obs_map"):
        OpenpiConfig(obs_map={"prompt": "state"})
    with pytest.raises(ConfigError, match="'protocol'"):
        ServeConfig(checkpoint="x", protocol="grpc")


def test_bad_payloads_get_a_text_error_and_the_connection_survives(policy):
    with server_for(policy, max_message_bytes=4096) as server:
        ws, _ = open_ws(server)
        cases = {
            b"\xc1\xc1": "not a msgpack message",
            "a text frame": "expected a binary msgpack message",
            packb([1, 2]): "a map of observations",
            packb({"prompt": "pick up the cube"}): "lacks key 'observation/state'",
            packb({"observation/state": [1.0] * 5, "prompt": "a"}): "'observation/state' must be an array",
            packb({"observation/state": np.zeros(4, np.float32), "prompt": "a"}): r"shape \(4,\), the policy needs \(5,\) \(or a history \(2, 5\)\)",
            packb({"observation/state": np.zeros(5, np.int32), "prompt": "a"}): "dtype <i4",
            packb({"observation/state": np.full(5, np.nan, np.float32), "prompt": "a"}): "non-finite",
            request(prompt="fly to the moon"): "names no task of this policy",
            packb({"observation/state": frame()}): "needs a 'prompt'",
            request(prompt=3): "'prompt' must be a string",
        }
        for data, message in cases.items():
            reply = call(ws, data)
            assert isinstance(reply, str) and reply.startswith("mixpolicy serve: "), reply
            assert len(reply.splitlines()) == 1
            assert re.search(message, reply), (message, reply)
        assert call(ws, request())["actions"].shape == (6, 3)  # still served
        ws.send(packb({"observation/state": np.zeros(5000, np.float32)}))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
        assert closed.value.rcvd.code == 1009  # over max_message_bytes: closed, as in the native protocol
        assert call(open_ws(server)[0], request())["actions"].shape == (6, 3)


def test_token_as_api_key_origin_cap_and_health_check(policy):
    with server_for(policy, token="s3cret", max_connections=1, allowed_origins=["https://ok.example"]) as server:
        for headers in (None, {"Authorization": "Api-Key guess"}, {"Authorization": "s3cret"}):
            with pytest.raises(InvalidStatus) as refused:
                open_ws(server, additional_headers=headers)
            assert refused.value.response.status_code == 401
        with pytest.raises(InvalidStatus) as refused:
            open_ws(server, additional_headers={"Authorization": "Api-Key s3cret"}, origin="https://evil.example")
        assert refused.value.response.status_code == 403
        ws, meta = open_ws(server, additional_headers={"Authorization": "Api-Key s3cret"})
        assert meta["server"] == "mixpolicy"
        with pytest.raises(InvalidStatus) as refused:
            open_ws(server, additional_headers={"Authorization": "Bearer s3cret"})
        assert refused.value.response.status_code == 503  # the token is right, the one connection is taken
        ws.close()
        for _ in range(100):
            if server.active == 0:
                break
            time.sleep(0.05)
        ws, _ = open_ws(server, additional_headers={"Authorization": "Bearer s3cret"})
        assert call(ws, request())["actions"].shape == (6, 3)
        ws.close()
        import urllib.request

        with urllib.request.urlopen(server.url.replace("ws://", "http://") + "/healthz", timeout=5) as health:
            assert health.status == 200 and health.read() == b"OK\n"
    with server_for(policy) as server, pytest.raises(UserError, match="speaks protocol openpi, this client 2"):
        RemotePolicy(server.url)  # the native client, told plainly
    with PolicyServer(lambda: LocalPolicy(policy), token="s3cret") as native:  # the native protocol keeps Bearer only
        with pytest.raises(InvalidStatus) as refused:
            connect(native.url, proxy=None, additional_headers={"Authorization": "Api-Key s3cret"}).__enter__()
        assert refused.value.response.status_code == 401


def test_serve_yaml_and_cli_know_the_protocol(policy, capsys, tmp_path):
    s = compose("serve", ["checkpoint=x", "protocol=openpi", "+openpi.obs_map={observation/state: state}", "openpi.shift=2"])
    assert set(s["openpi"]) == {f.name for f in dataclasses.fields(OpenpiConfig)}
    cfg = from_dict(ServeConfig, s)
    assert cfg.protocol == "openpi" and cfg.openpi.obs_map == OBS_MAP and cfg.openpi.shift == 2
    assert from_dict(ServeConfig, compose("serve", ["checkpoint=x"])).protocol == "native"  # the default
    code, _, err = run_main(capsys, "serve", "checkpoint=x", "protocol=grpc")
    assert_one_line_error(code, err, "protocol")
    code, _, err = run_main(capsys, "serve", "checkpoint=x", "openpi.reset_after_s=-1")
    assert_one_line_error(code, err, "openpi.reset_after_s")
    from mixpolicy.policies.checkpoint import save_policy

    ckpt = save_policy(policy, tmp_path / "ckpt")  # a mapping that does not fit the checkpoint fails before listening
    code, _, err = run_main(capsys, "serve", f"checkpoint={ckpt}", "device=cpu", "protocol=openpi", "+openpi.obs_map={observation/image: image_front}")
    assert_one_line_error(code, err, r"openpi.obs_map names \['image_front'\]")


def test_a_device_failure_reaches_the_openpi_client_and_stops_the_server(policy):
    class Broken(LocalPolicy):
        def infer(self, *a, **k):
            raise RuntimeError("CUDA error: device-side assert triggered")  # torch.AcceleratorError exists from torch 2.8 only

    openpi = OpenpiProtocol(OpenpiConfig(obs_map=OBS_MAP), LocalPolicy(policy).spec)
    server = PolicyServer(lambda: Broken(policy), openpi=openpi).start()
    try:
        ws, _ = open_ws(server)
        reply = call(ws, request())
        assert isinstance(reply, str) and "device failed, the server stops for a restart" in reply
        server._thread.join(10)
        assert not server._thread.is_alive() and "CUDA error" in server.failure
    finally:
        server.close()


def test_a_never_reading_openpi_client_is_dropped_and_delays_no_other(policy):
    class Big(LocalPolicy):
        def infer(self, o, task=0, shift=None):
            res = super().infer(o, task, shift)
            return dataclasses.replace(res, actions=np.zeros((1 << 18, 3), np.float32))  # 3 MB replies

    openpi = OpenpiProtocol(OpenpiConfig(obs_map=OBS_MAP), LocalPolicy(policy).spec)
    with PolicyServer(lambda: Big(policy), openpi=openpi, send_timeout_s=0.5) as server:
        stuck, _ = open_ws(server, max_size=None, max_queue=1, close_timeout=0.1)
        for i in range(16):  # 48 MB of replies, none read: more than socket buffers hold
            stuck.send(request(i))
        ws, _ = open_ws(server, max_size=None)
        t = time.perf_counter()
        assert call(ws, request())["actions"].shape == (1 << 18, 3)
        assert time.perf_counter() - t < 5
        for _ in range(100):
            if server.active == 1:
                break
            time.sleep(0.1)
        assert server.active == 1  # the stuck connection was closed
        ws.close()
        stuck.close()


def test_an_image_policy_takes_openpi_images_hwc_or_chw():
    from mixpolicy.datasets.normalizer import Normalizer
    from mixpolicy.policies.config import policy_config_from_dict

    torch.manual_seed(0)
    data = {"obs_keys": ["proprio", "image_front"], "horizon": 4, "n_action_steps": 2, "obs_hidden": 32,
            "network": {"width": 32, "depth": 1, "heads": 2}, "image_encoder": {"crop_size": 36, "num_keypoints": 8},
            "objective": {"type": "ddpm", "num_train_timesteps": 20, "num_inference_steps": 3}}  # fmt: skip
    norm = Normalizer.from_data({"proprio": np.random.default_rng(0).normal(size=(20, 4)), "action": np.random.default_rng(1).uniform(-1, 1, (20, 3))})
    meta = ShapeMeta(obs={"proprio": [4], "image_front": [40, 40, 3]}, action_dim=3)
    image_policy = DenoisingPolicy(policy_config_from_dict(data), meta, norm).eval()
    cfg = OpenpiConfig(obs_map={"observation/state": "proprio", "observation/image": "image_front"})
    rng = np.random.default_rng(0)
    state, image = rng.normal(size=4).astype(np.float32), rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    want = LocalPolicy(image_policy, RTI, seed=7).infer({"proprio": np.stack([state] * 2), "image_front": np.stack([image] * 2)})
    with server_for(image_policy, cfg) as server:
        for sent in (image, np.ascontiguousarray(image.transpose(2, 0, 1))):  # HWC, then CHW
            ws, meta_ = open_ws(server)  # a fresh connection: the same seed, a cold call
            assert meta_["observations"]["observation/image"] == {"shape": [40, 40, 3], "dtype": ["|u1"]}
            reply = call(ws, packb({"observation/state": state, "observation/image": sent, "prompt": "anything"}))
            np.testing.assert_allclose(reply["actions"], want.actions, rtol=1e-5, atol=1e-6)
            assert "dtype <f4" in call(ws, packb({"observation/state": state, "observation/image": sent.astype(np.float32)}))
            ws.close()
