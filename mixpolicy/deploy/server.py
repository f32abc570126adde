"""Policy server for remote (GPU) inference and its client: msgpack over a websocket.

Protocol (one msgpack map per websocket binary message, request -> reply):

    {"type": "spec"}                                   -> {"type": "spec", "protocol": 1, "spec": {...}}
    {"type": "reset"}                                  -> {"type": "ok"}
    {"type": "infer", "obs": {key: array}, "task": i,
     "shift": int | None}                              -> {"type": "result", "actions": array,
                                                            "steps": n, "warm": bool, "compute_ms": t,
                                                            "executable": n | None}
    anything malformed                                 -> {"type": "error", "message": "..."}

Each connection gets its own warm-start state over the shared model (forward passes are
serialized). The server binds to loopback unless told otherwise, and a non-loopback
address requires a shared token, sent by clients as ``Authorization: Bearer <token>``.
Messages above ``max_message_bytes`` close the connection (websocket code 1009), idle
connections are closed after ``idle_timeout_s``, and clients time out on every reply.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Callable, Mapping

import numpy as np

from mixpolicy.config import check
from mixpolicy.deploy.client import InferenceResult, LocalPolicy, PolicySpec
from mixpolicy.deploy.rti import RTIConfig, RTISampler
from mixpolicy.deploy.wire import PROTOCOL_VERSION, WireError, packb, unpackb
from mixpolicy.errors import UserError

DEFAULT_TOKEN_ENV = "MIXPOLICY_POLICY_TOKEN"
READY_PREFIX = "mixpolicy serve: listening on "


class RemotePolicyError(RuntimeError):
    """The server answered with an error, or did not answer in time."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ServeConfig:
    """``mixpolicy serve``: a policy server for remote inference."""

    checkpoint: str = ""
    host: str = "127.0.0.1"
    port: int = 8765  # 0: any free port (printed at start)
    token_env: str = DEFAULT_TOKEN_ENV  # environment variable holding the shared token (unset: no auth)
    max_message_mb: float = 8.0
    idle_timeout_s: float = 300.0
    device: str = "auto"
    num_threads: int = 1
    seed: int = 0
    execution: str = ""  # fixed | adaptive for a mixture-of-horizons policy (empty: the policy's own)
    adaptive_ratio: float = 0.0  # 0: the policy's own
    rti: RTIConfig = field(default_factory=RTIConfig)

    def __post_init__(self):
        check(bool(self.checkpoint), "checkpoint", "a checkpoint folder is required (checkpoint=path)")
        check(self.execution in ("", "fixed", "adaptive"), "execution", "must be fixed or adaptive (empty: the policy's own)")
        check(self.adaptive_ratio >= 0, "adaptive_ratio", "must be >= 0 (0: the policy's own)")
        check(0 <= self.port <= 65535, "port", "must be in [0, 65535]")
        check(self.max_message_mb > 0, "max_message_mb", "must be > 0")
        check(self.idle_timeout_s > 0, "idle_timeout_s", "must be > 0")
        check(self.num_threads >= 0, "num_threads", "must be >= 0 (0: all cores)")


class PolicyServer:
    """Serves ``LocalPolicy`` objects made by ``make_client`` (one per connection)."""

    def __init__(
        self,
        make_client: Callable[[], LocalPolicy],
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        max_message_bytes: int = 8 << 20,
        idle_timeout_s: float = 300.0,
    ):
        from websockets.sync.server import serve

        if not is_loopback(host) and not token:
            raise UserError(f"serving on {host} (not loopback) requires a token (set ${DEFAULT_TOKEN_ENV})")
        self.make_client = make_client
        self.token = token or None
        self.max_message_bytes = int(max_message_bytes)
        self.idle_timeout_s = float(idle_timeout_s)
        try:
            self._server = serve(
                self._handle,
                host,
                port,
                process_request=self._authorize,
                max_size=self.max_message_bytes,
                compression=None,  # small messages; compression only adds latency
                open_timeout=10,
                ping_interval=None,  # clients block in recv with their own timeouts
                server_header=None,
            )
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.host, self.port = self._server.socket.getsockname()[:2]
        self._thread: threading.Thread | None = None
        self.connections = 0

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}"

    def _authorize(self, connection, request):
        if self.token is None:
            return None
        got = request.headers.get("Authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {self.token}".encode()):
            return connection.respond(HTTPStatus.UNAUTHORIZED, "missing or wrong token\n")
        return None

    def _handle(self, ws) -> None:
        from websockets.exceptions import ConnectionClosed

        self.connections += 1
        client = self.make_client()
        try:
            while True:
                try:
                    data = ws.recv(timeout=self.idle_timeout_s)
                except TimeoutError:
                    ws.close(1000, "idle timeout")
                    return
                except ConnectionClosed:
                    return
                try:
                    if not isinstance(data, bytes):
                        raise WireError("expected a binary msgpack message")
                    reply = self.dispatch(client, unpackb(data, self.max_message_bytes))
                except (WireError, UserError, ValueError, KeyError, TypeError) as exc:
                    reply = {"type": "error", "message": str(exc) or type(exc).__name__}
                try:
                    ws.send(packb(reply))
                except ConnectionClosed:
                    return
        finally:
            client.close()

    @staticmethod
    def dispatch(client: LocalPolicy, msg: Any) -> dict[str, Any]:
        if not isinstance(msg, dict) or "type" not in msg:
            raise WireError("a request is a map with a 'type'")
        kind = msg["type"]
        if kind == "spec":
            return {"type": "spec", "protocol": PROTOCOL_VERSION, "spec": client.spec.to_json()}
        if kind == "reset":
            client.reset()
            return {"type": "ok"}
        if kind == "infer":
            obs = msg.get("obs")
            if not isinstance(obs, dict):
                raise WireError("infer needs 'obs': a map of arrays")
            shift = msg.get("shift")
            if shift is not None and (not isinstance(shift, int) or shift < 0):
                raise WireError("'shift' must be a non-negative integer or nil")
            # Non-finite actions are sent as they are: the robot side's safety layer stops on them.
            res = client.infer(obs, int(msg.get("task", 0)), shift)
            return {
                "type": "result",
                "actions": res.actions,
                "steps": res.steps,
                "warm": res.warm,
                "compute_ms": res.compute_ms,
                "executable": res.executable,
            }
        raise WireError(f"unknown request type {kind!r}")

    def start(self) -> "PolicyServer":
        self._thread = threading.Thread(target=self._server.serve_forever, name="policy-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def close(self) -> None:
        self._server.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


class RemotePolicy:
    """Client of a ``PolicyServer``: the same interface as ``LocalPolicy``."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 5.0, max_message_bytes: int = 8 << 20):
        from websockets.exceptions import InvalidHandshake, InvalidStatus
        from websockets.sync.client import connect

        self.url = url
        self.timeout_s = float(timeout_s)
        self.max_message_bytes = int(max_message_bytes)
        headers = {"Authorization": f"Bearer {token}"} if token else None
        try:
            # The context-manager protocol, entered here and left in close().
            self._ws = connect(
                url,
                additional_headers=headers,
                max_size=self.max_message_bytes,
                compression=None,
                open_timeout=self.timeout_s,
                ping_interval=None,
                proxy=None,
            ).__enter__()
        except InvalidStatus as exc:
            code = exc.response.status_code
            what = "the token is missing or wrong" if code == HTTPStatus.UNAUTHORIZED else f"HTTP {code}"
            raise UserError(f"policy server {url} refused the connection: {what}") from None
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise UserError(f"cannot reach policy server {url}: {exc}") from None
        self._lock = threading.Lock()
        reply = self._call({"type": "spec"})
        if reply.get("protocol") != PROTOCOL_VERSION:
            raise UserError(f"policy server {url} speaks protocol {reply.get('protocol')}, this client {PROTOCOL_VERSION}")
        self.spec = PolicySpec.from_json(reply["spec"])

    def _call(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        from websockets.exceptions import ConnectionClosed

        with self._lock:
            try:
                self._ws.send(packb(dict(msg)))
                data = self._ws.recv(timeout=self.timeout_s)
            except TimeoutError:
                raise RemotePolicyError(f"policy server {self.url} did not answer within {self.timeout_s} s") from None
            except ConnectionClosed as exc:
                raise RemotePolicyError(f"policy server {self.url} closed the connection ({exc})") from None
        reply = unpackb(data, self.max_message_bytes)
        if not isinstance(reply, dict):
            raise RemotePolicyError("malformed reply")
        if reply.get("type") == "error":
            raise RemotePolicyError(f"policy server: {reply.get('message')}")
        return reply

    def infer(self, obs: Mapping[str, np.ndarray], task: int = 0, shift: int | None = None) -> InferenceResult:
        msg = {"type": "infer", "obs": {k: np.asarray(v) for k, v in obs.items()}, "task": int(task), "shift": shift}
        r = self._call(msg)
        executable = r.get("executable")
        return InferenceResult(
            actions=np.asarray(r["actions"], np.float32),
            steps=int(r["steps"]),
            warm=bool(r["warm"]),
            compute_ms=float(r["compute_ms"]),
            executable=None if executable is None else int(executable),
        )

    def reset(self) -> None:
        self._call({"type": "reset"})

    def close(self) -> None:
        self._ws.close()


class SubprocessPolicy(RemotePolicy):
    """A policy server in a child process on loopback (its own interpreter and GIL).

    The control loop's process then only waits on a socket while the network runs, which
    keeps its timing independent of the forward pass.
    """

    def __init__(self, checkpoint: str, rti: RTIConfig, device: str = "auto", num_threads: int = 1, seed: int = 0, timeout_s: float = 5.0, start_timeout_s: float = 120.0, execution: str = "", adaptive_ratio: float = 0.0):
        token = secrets.token_hex(16)
        env = dict(os.environ, **{DEFAULT_TOKEN_ENV: token})
        args = [
            sys.executable, "-m", "mixpolicy.cli", "serve", f"checkpoint={checkpoint}", "host=127.0.0.1", "port=0",
            f"device={device}", f"num_threads={num_threads}", f"seed={seed}", f"execution={execution!r}", f"adaptive_ratio={adaptive_ratio}",
            *(f"rti.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in vars(rti).items()),
        ]  # fmt: skip
        # stderr goes to a file: an undrained pipe would block the server once full.
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self._stderr, env=env, text=True)
        url = self._wait_ready(start_timeout_s)
        try:
            super().__init__(url, token=token, timeout_s=timeout_s)
        except BaseException:
            self._stop_process()
            raise

    def _wait_ready(self, timeout_s: float) -> str:
        result: dict[str, str] = {}

        def read():
            for line in self._proc.stdout:
                if line.startswith(READY_PREFIX):
                    result["url"] = line[len(READY_PREFIX) :].strip()
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout_s)
        if "url" not in result:
            self._stderr.flush()
            self._stderr.seek(0)
            err = [ln for ln in self._stderr.read().strip().splitlines() if ln.strip()]
            self._stop_process()
            raise UserError(f"the policy server process did not start: {err[-1] if err else 'no output'}")
        return result["url"]

    def _stop_process(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc.stdout.close()
        self._stderr.close()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._stop_process()


def serve(cfg: ServeConfig) -> None:
    """Run a server until interrupted (the ``mixpolicy serve`` command)."""
    from mixpolicy.policies.checkpoint import load_policy
    from mixpolicy.utils import resolve_device, set_threads

    set_threads(cfg.num_threads)
    policy, _ = load_policy(cfg.checkpoint, device=resolve_device(cfg.device))
    policy.set_execution(cfg.execution or None, cfg.adaptive_ratio or None)
    lock = threading.Lock()
    count = iter(range(1 << 62))

    def make_client() -> LocalPolicy:
        return LocalPolicy(policy, cfg.rti, seed=cfg.seed + next(count), lock=lock)

    RTISampler(policy, cfg.rti)  # validates the RTI settings against the policy before listening
    token = os.environ.get(cfg.token_env) or None
    server = PolicyServer(make_client, cfg.host, cfg.port, token, int(cfg.max_message_mb * (1 << 20)), cfg.idle_timeout_s)
    print(f"{READY_PREFIX}{server.url}", flush=True)
    if token is None:
        print("mixpolicy serve: no token set: any local process may connect", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.close()
