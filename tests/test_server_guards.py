"""Policy server guards on loopback: browser origins, connection cap, a client that never reads,
late replies after a timeout, device failures, TLS and cleartext refusals, request checks."""

import logging
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest
import torch
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from mixpolicy.config import from_dict
from mixpolicy.deploy.backend import InferenceResult
from mixpolicy.deploy.local import FairLock, LocalPolicy
from mixpolicy.deploy.remote import RemotePolicy, RemotePolicyError
from mixpolicy.deploy.rti import RTIConfig
from mixpolicy.deploy.server import PolicyServer, ServeConfig, server_tls_context
from mixpolicy.deploy.wire import packb, unpackb
from mixpolicy.errors import UserError
from mixpolicy.policies.denoising_policy import DenoisingPolicy
from factories import server_shape_meta, tiny_policy_config

# The CUDA error type of torch >= 2.8; torch 2.7 raises a plain RuntimeError naming the CUDA error.
AcceleratorError = getattr(torch, "AcceleratorError", RuntimeError)


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    cfg = tiny_policy_config(horizon=6, n_action_steps=3)
    return DenoisingPolicy(cfg, server_shape_meta()).eval()


def obs(value=0.0):
    return {"state": np.full((2, 5), value, np.float32)}


class EchoClient:
    """Answers with a chunk filled with obs['state'][0, 0], after ``delay`` (an Event to wait for, or None)."""

    def __init__(self, spec, lock, delay=None, big_rows=0):
        self.spec, self.lock, self.delay, self.big_rows = spec, lock, delay, big_rows
        self.calls = 0

    def infer(self, o, task, shift):
        self.calls += 1
        if self.delay is not None and self.calls == 1:
            assert self.delay.wait(10)
        rows = self.big_rows if "big" in o else self.spec.horizon
        with self.lock:
            actions = np.full((rows, self.spec.action_dim), float(o["state"][0, 0]), np.float32)
        return InferenceResult(actions=actions, steps=1, warm=False, compute_ms=0.0)

    def reset(self):
        pass

    def close(self):
        pass


def test_browser_origin_gets_403_unless_allowed(policy):
    with PolicyServer(lambda: LocalPolicy(policy), allowed_origins=["https://ok.example"]) as server:
        with pytest.raises(InvalidStatus) as refused:
            connect(server.url, origin="https://evil.example", proxy=None).__enter__()
        assert refused.value.response.status_code == 403
        with connect(server.url, origin="https://ok.example", proxy=None) as ws:
            ws.send(packb({"type": "spec", "id": 1}))
            assert unpackb(ws.recv(timeout=5))["id"] == 1
        remote = RemotePolicy(server.url)  # no Origin header: a robot, not a page
        assert remote.infer(obs(), 0, None).actions.shape == (6, 3)
        remote.close()


def test_connections_past_the_cap_are_refused(policy):
    with PolicyServer(lambda: LocalPolicy(policy), max_connections=2) as server:
        first, second = RemotePolicy(server.url), RemotePolicy(server.url)
        with pytest.raises(UserError, match="refused the connection: HTTP 503: server busy"):
            RemotePolicy(server.url)
        first.close()
        for _ in range(100):  # the server notices the close in its own thread
            if server.active < 2:
                break
            time.sleep(0.05)
        third = RemotePolicy(server.url)
        assert third.infer(obs(), 0, None).actions.shape == (6, 3)
        assert second.infer(obs(), 0, None).actions.shape == (6, 3)
        second.close()
        third.close()


def test_a_client_that_never_reads_delays_no_other_and_is_dropped(policy, caplog):
    spec, lock = LocalPolicy(policy).spec, FairLock()
    with PolicyServer(lambda: EchoClient(spec, lock, big_rows=1 << 18), send_timeout_s=0.5) as server:
        # 16 replies of 3 MB, at most one frame buffered and none read: more than socket buffers hold, so the server's send blocks
        stuck = connect(server.url, proxy=None, max_size=None, max_queue=1, close_timeout=0.1).__enter__()
        with caplog.at_level(logging.WARNING, logger="mixpolicy.serve"):
            for i in range(16):
                stuck.send(packb({"type": "infer", "obs": {**obs(i), "big": np.zeros(1, np.float32)}, "id": i}))
            remote = RemotePolicy(server.url, timeout_s=5.0)
            for i in range(20):
                np.testing.assert_array_equal(remote.infer(obs(i), 0, None).actions, np.full((6, 3), i, np.float32))
            for _ in range(200):
                if server.active == 1:
                    break
                time.sleep(0.05)
        assert server.active == 1  # the reader that never read was closed; the other stays
        assert "could not be sent within 0.5 s" in caplog.text
        assert remote.infer(obs(7), 0, None).actions[0, 0] == 7
        remote.close()
        stuck.close()


def test_a_reply_after_the_timeout_is_never_taken_for_the_next_call(policy):
    spec, release = LocalPolicy(policy).spec, threading.Event()
    with PolicyServer(lambda: EchoClient(spec, FairLock(), delay=release)) as server:
        remote = RemotePolicy(server.url, timeout_s=0.3)
        with pytest.raises(RemotePolicyError, match="did not answer within 0.3 s"):
            remote.infer(obs(1.0), 0, None)
        release.set()  # the late reply (1.0) is sent now, before the next call's
        remote.timeout_s = 5.0
        np.testing.assert_array_equal(remote.infer(obs(2.0), 0, None).actions, np.full((6, 3), 2.0, np.float32))
        np.testing.assert_array_equal(remote.infer(obs(3.0), 0, None).actions, np.full((6, 3), 3.0, np.float32))
        remote.close()


@pytest.mark.parametrize("error", [AcceleratorError("CUDA error: device-side assert triggered"), RuntimeError("CUDA error: an illegal memory access was encountered")])
def test_a_device_failure_answers_with_an_error_and_stops_the_server(policy, error, caplog):
    class Broken(LocalPolicy):
        def infer(self, *a, **k):
            raise error

    server = PolicyServer(lambda: Broken(policy)).start()
    try:
        remote = RemotePolicy(server.url)
        with caplog.at_level(logging.ERROR, logger="mixpolicy.serve"):
            with pytest.raises(RemotePolicyError, match="device failed, the server stops for a restart"):
                remote.infer(obs(), 0, None)
            server._thread.join(10)
        assert not server._thread.is_alive() and "CUDA error" in server.failure
        assert "so that a supervisor restarts the server" in caplog.text
        with pytest.raises(UserError, match="cannot reach policy server"):
            RemotePolicy(server.url, timeout_s=1.0)
    finally:
        server.close()


def test_other_errors_get_an_error_reply_and_the_server_stays_up(policy):
    class Flaky(LocalPolicy):
        def infer(self, o, task=0, shift=None):
            if shift == 1:
                raise ZeroDivisionError("boom")
            return super().infer(o, task, shift)

    with PolicyServer(lambda: Flaky(policy)) as server:
        remote = RemotePolicy(server.url)
        with pytest.raises(RemotePolicyError, match="internal error: ZeroDivisionError: boom"):
            remote.infer(obs(), 0, 1)
        assert remote.infer(obs(), 0, None).actions.shape == (6, 3) and server.failure is None
        remote.close()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test certificate")
def test_wss_with_a_verified_certificate(policy, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    with PolicyServer(lambda: LocalPolicy(policy), token="s3cret", tls=server_tls_context(str(cert), str(key))) as server:
        assert server.url.startswith("wss://127.0.0.1:")
        remote = RemotePolicy(server.url, token="s3cret", ca_file=str(cert))
        assert remote.infer(obs(), 1, None).actions.shape == (6, 3)
        remote.close()
        with pytest.raises(UserError, match="CERTIFICATE_VERIFY_FAILED"):
            RemotePolicy(server.url, token="s3cret", timeout_s=2.0)  # the system CAs do not know it
        with pytest.raises(UserError, match="cannot reach"):
            RemotePolicy(server.url.replace("wss://", "ws://"), token="s3cret", timeout_s=2.0)
    with pytest.raises(UserError, match="cannot load TLS certificate"):
        server_tls_context(str(tmp_path / "missing.pem"), str(key))
    with pytest.raises(UserError, match="cannot read CA file"):
        RemotePolicy("wss://127.0.0.1:9", ca_file=str(tmp_path / "missing.pem"))


def test_cleartext_off_loopback_needs_an_explicit_opt_in(policy):
    # Both refusals happen before any socket is opened.
    with pytest.raises(UserError, match="refusing plain ws:// to 192.0.2.7"):
        RemotePolicy("ws://192.0.2.7:8765", token="s3cret")
    with pytest.raises(UserError, match="without TLS sends the token in cleartext"):
        PolicyServer(lambda: LocalPolicy(policy), host="0.0.0.0", token="s3cret")
    with pytest.raises(UserError, match="must be ws://host:port or wss://host:port"):
        RemotePolicy("http://127.0.0.1:8765")
    with pytest.raises(UserError, match="tls_cert and tls_key go together"):
        from_dict(ServeConfig, {"checkpoint": "x", "tls_cert": "c.pem"})
    with pytest.raises(UserError, match="'host': a non-loopback host needs tls_cert and tls_key"):
        from_dict(ServeConfig, {"checkpoint": "x", "host": "0.0.0.0"})
    from_dict(ServeConfig, {"checkpoint": "x", "host": "0.0.0.0", "allow_cleartext": True})


def test_local_policy_checks_every_request_against_the_checkpoint(policy):
    client = LocalPolicy(policy, RTIConfig(k=1))
    for task, match in ((True, "integer index, got bool"), (2, "out of range: this policy has 2"), (-1, "out of range"), (1.0, "got float")):
        with pytest.raises(UserError, match=match):
            client.infer(obs(), task, None)
    for shift, match in ((True, "'shift'"), (-3, "'shift'"), (2.0, "'shift'")):
        with pytest.raises(UserError, match=match):
            client.infer(obs(), 0, shift)
    bad = {
        "dtype >f4": np.zeros((2, 5), ">f4"), "dtype <i4": np.zeros((2, 5), np.int32), "shape ()": np.array(0.0, np.float32),
        "shape (2, 6)": np.zeros((2, 6), np.float32), "non-finite": np.full((2, 5), np.nan, np.float32), "must be an array": [[0.0] * 5] * 2,
    }  # fmt: skip
    for match, x in bad.items():
        with pytest.raises(UserError, match=match.replace("(", r"\(").replace(")", r"\)")):
            client.infer({"state": x}, 0, None)
    assert client.infer({"state": np.zeros((2, 5), np.float64)}, np.int64(1), np.int64(2)).actions.shape == (6, 3)


def test_serve_exits_for_a_restart_after_a_device_failure(policy, monkeypatch, capsys):
    import mixpolicy.deploy.server as server_module

    class Broken(LocalPolicy):
        def infer(self, *a, **k):
            raise AcceleratorError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(server_module, "load_inference_policy", lambda *a: policy)
    monkeypatch.setattr(server_module, "LocalPolicy", Broken)
    exit_code = []

    def run():
        try:
            server_module.serve(ServeConfig(checkpoint="unused", port=0, log_level="warning"))
        except SystemExit as exc:
            exit_code.append(exc.code)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    out = ""
    for _ in range(200):
        out += capsys.readouterr().out
        if server_module.READY_PREFIX in out:
            break
        time.sleep(0.05)
    remote = RemotePolicy(out.split(server_module.READY_PREFIX)[1].split()[0])
    with pytest.raises(RemotePolicyError, match="device failed"):
        remote.infer(obs(), 0, None)
    thread.join(10)
    assert exit_code == [server_module.EXIT_DEVICE_FAILED] == [75]


def test_the_model_lock_is_granted_in_arrival_order():
    lock, order, threads = FairLock(), [], []

    def take(i):
        with lock:
            order.append(i)

    with lock:
        for i in range(4):
            threads.append(threading.Thread(target=take, args=(i,)))
            threads[-1].start()
            while len(lock._waiting) < i + 1:  # thread i queues before thread i + 1 starts
                time.sleep(0.001)
    for t in threads:
        t.join(5)
    assert order == [0, 1, 2, 3]
