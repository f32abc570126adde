"""Policy server for remote (GPU) inference: msgpack over a websocket.

Protocol (one msgpack map per websocket binary message, request -> reply; every
request may carry an integer "id", which its reply echoes):

    {"type": "spec"}                                   -> {"type": "spec", "protocol": 2, "spec": {...}}
    {"type": "reset"}                                  -> {"type": "ok"}
    {"type": "infer", "obs": {key: array}, "task": i,
     "shift": int | None, "delay": int | None}         -> {"type": "result", "actions": array,
                                                            "steps": n, "warm": bool, "compute_ms": t,
                                                            "executable": n | None}
    anything malformed                                 -> {"type": "error", "message": "..."}

Each connection gets its own warm-start state over the shared model; forward passes are
serialized in arrival order. Every request is checked before it reaches the network
(task index, shift, each observation's dtype and shape); a device failure (a CUDA error
leaves the device unusable) answers with an error and stops the server, and ``serve``
exits with ``EXIT_DEVICE_FAILED`` so that a supervisor restarts it. ``protocol=openpi``
speaks openpi's policy protocol instead (``openpi_protocol``). Both protocols are guarded:
loopback unless told otherwise; a non-loopback address needs a shared token
(``Authorization: Bearer <token>``, or openpi's ``Api-Key <token>``) and TLS (``tls_cert``/
``tls_key``) unless ``allow_cleartext``; requests with a browser ``Origin`` header get 403
unless the origin is listed; at most ``max_connections`` clients (others get 503); messages
above ``max_message_bytes`` close the connection (code 1009); a reply that cannot be sent
within ``send_timeout_s`` (a client that does not read) closes that connection; idle
connections close after ``idle_timeout_s``.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import socket
import ssl
import struct
import sys
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Callable

import numpy as np
import torch

from mixpolicy.config import check
from mixpolicy.deploy.local import FairLock, LocalPolicy, check_composition, check_shift, check_task, delay_kwarg, is_integer, load_inference_policy, policy_spec
from mixpolicy.deploy.openpi_protocol import PROTOCOLS, OpenpiConfig, OpenpiProtocol, OpenpiSession
from mixpolicy.deploy.rti import RTIConfig, RTISampler
from mixpolicy.deploy.wire import DEFAULT_TOKEN_ENV, PROTOCOL_VERSION, READY_PREFIX, WireError, is_loopback, packb, unpackb
from mixpolicy.errors import UserError

__all__ = ["PolicyServer", "ServeConfig", "serve"]

EXIT_DEVICE_FAILED = 75  # EX_TEMPFAIL: restart me
LOG_LEVELS = ("debug", "info", "warning", "error")
log = logging.getLogger("mixpolicy.serve")


@dataclass
class ServeConfig:
    """``mixpolicy serve``: a policy server for remote inference."""

    checkpoint: str = ""
    compose: list[str] = field(default_factory=list)  # more checkpoints denoising with `checkpoint` (as eval compose=)
    compose_weights: list[float] = field(default_factory=list)  # with compose: one per policy, checkpoint's first
    protocol: str = "native"  # native | openpi (openpi-client's websocket protocol, see openpi_protocol)
    host: str = "127.0.0.1"
    port: int = 8765  # 0: any free port (printed at start)
    token_env: str = DEFAULT_TOKEN_ENV  # environment variable holding the shared token (unset: no auth)
    tls_cert: str = ""  # PEM certificate chain: serve wss:// (required off loopback unless allow_cleartext)
    tls_key: str = ""  # PEM private key of tls_cert
    allow_cleartext: bool = False  # permit ws:// on a non-loopback address (token in cleartext)
    allowed_origins: list[str] = field(default_factory=list)  # browser Origin values to accept (empty: none)
    max_connections: int = 8
    send_timeout_s: float = 5.0  # close a connection whose reply cannot be sent this long
    max_message_mb: float = 8.0
    idle_timeout_s: float = 300.0
    log_level: str = "info"  # debug also logs every rejected request
    device: str = "auto"
    num_threads: int = 1
    seed: int = 0
    execution: str = ""  # fixed | adaptive for a mixture-of-horizons policy (empty: the policy's own)
    adaptive_ratio: float = 0.0  # 0: the policy's own
    rti: RTIConfig = field(default_factory=RTIConfig)
    openpi: OpenpiConfig = field(default_factory=OpenpiConfig)  # protocol=openpi: observation and prompt mapping

    def __post_init__(self):
        check(bool(self.checkpoint), "checkpoint", "a checkpoint folder is required (checkpoint=path)")
        check(self.protocol in PROTOCOLS, "protocol", f"must be one of {PROTOCOLS}")
        check_composition(self.compose, self.compose_weights)
        check(self.execution in ("", "fixed", "adaptive"), "execution", "must be fixed or adaptive (empty: the policy's own)")
        check(self.adaptive_ratio >= 0, "adaptive_ratio", "must be >= 0 (0: the policy's own)")
        check(0 <= self.port <= 65535, "port", "must be in [0, 65535]")
        for name in ("max_message_mb", "idle_timeout_s", "send_timeout_s"):
            check(getattr(self, name) > 0, name, "must be > 0")
        check(self.max_connections >= 1, "max_connections", "must be >= 1")
        check(self.num_threads >= 0, "num_threads", "must be >= 0 (0: all cores)")
        check(bool(self.tls_cert) == bool(self.tls_key), "tls_cert", "tls_cert and tls_key go together")
        check(self.log_level in LOG_LEVELS, "log_level", f"must be one of {LOG_LEVELS}")
        # checked again by PolicyServer; here it fails before the checkpoint loads
        check(is_loopback(self.host) or bool(self.tls_cert) or self.allow_cleartext, "host", "a non-loopback host needs tls_cert and tls_key (or allow_cleartext=true; or serve on 127.0.0.1 behind an SSH tunnel)")


def server_tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise UserError(f"cannot load TLS certificate {cert} / key {key}: {exc}") from None
    return ctx


# torch.AcceleratorError exists from torch 2.8; earlier releases raise a RuntimeError naming the CUDA error.
ACCELERATOR_ERRORS = tuple(e for e in (getattr(torch, "AcceleratorError", None),) if e is not None)


def is_device_failure(exc: BaseException) -> bool:
    """A CUDA error: the context is unusable afterwards, so only a new process recovers."""
    return isinstance(exc, ACCELERATOR_ERRORS) or (isinstance(exc, RuntimeError) and "CUDA error" in str(exc))


def _set_send_timeout(sock: socket.socket, seconds: float) -> None:
    # SO_SNDTIMEO bounds a blocking send without touching the receive side, which the
    # websocket library reads from another thread.
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", whole, int((seconds - whole) * 1e6)))


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
        max_connections: int = 8,
        send_timeout_s: float = 5.0,
        allowed_origins: list[str] | tuple[str, ...] = (),
        tls: ssl.SSLContext | None = None,
        allow_cleartext: bool = False,
        openpi: OpenpiProtocol | None = None,  # speak openpi's protocol instead of the native one
    ):
        from websockets.sync.server import serve

        if not is_loopback(host) and not token:
            raise UserError(f"serving on {host} (not loopback) requires a token (set ${DEFAULT_TOKEN_ENV})")
        if not is_loopback(host) and tls is None and not allow_cleartext:
            raise UserError(
                f"serving on {host} (not loopback) without TLS sends the token in cleartext: set tls_cert and tls_key, "
                "or serve on 127.0.0.1 behind an SSH tunnel, or set allow_cleartext=true"
            )
        self.make_client = make_client
        self.token = token or None
        self.max_message_bytes = int(max_message_bytes)
        self.idle_timeout_s = float(idle_timeout_s)
        self.max_connections = int(max_connections)
        self.send_timeout_s = float(send_timeout_s)
        self.allowed_origins = frozenset(allowed_origins)
        self.tls = tls
        self.openpi = openpi
        self.failure: str | None = None  # set when a device failure stopped the server
        self._stopping = False
        self._count_lock = threading.Lock()
        self.active = 0  # open connections
        self.connections = 0  # connections served so far
        try:
            self._server = serve(
                self._handle,
                host,
                port,
                ssl=tls,
                process_request=self._admit,
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

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'wss' if self.tls else 'ws'}://{host}:{self.port}"

    def _admit(self, connection, request):
        """Refuse, before the websocket opens: browser pages, a wrong token, one client too many."""
        peer = connection.remote_address
        origin = request.headers.get("Origin")
        if origin is not None and origin not in self.allowed_origins:
            log.warning("refused %s: browser origin %r not allowed", peer, origin)
            return connection.respond(HTTPStatus.FORBIDDEN, f"origin {origin} is not allowed\n")
        if self.openpi is not None and request.path == "/healthz":  # openpi servers answer health checks
            return connection.respond(HTTPStatus.OK, "OK\n")
        if self.token is not None:
            got, schemes = request.headers.get("Authorization", "").encode(), ("Bearer", "Api-Key") if self.openpi else ("Bearer",)
            if not any([hmac.compare_digest(got, f"{s} {self.token}".encode()) for s in schemes]):  # each compared, no early exit
                log.warning("refused %s: missing or wrong token", peer)
                return connection.respond(HTTPStatus.UNAUTHORIZED, "missing or wrong token\n")
        if self.active >= self.max_connections:
            log.warning("refused %s: %d connections open (max_connections)", peer, self.active)
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, f"server busy: {self.max_connections} connections open\n")
        return None

    def _handle(self, ws) -> None:
        from websockets.exceptions import ConnectionClosed

        peer = ws.remote_address  # read now: the socket may be gone when it is logged
        with self._count_lock:
            self.active += 1
            self.connections += 1
            over = self.active > self.max_connections  # two handshakes raced past _admit
        try:
            if over:
                ws.close(1013, "server busy")
                return
            _set_send_timeout(ws.socket, self.send_timeout_s)
            log.info("connection from %s", peer)
            self._serve_connection(ws, self.make_client(), peer)
        except ConnectionClosed as exc:
            if isinstance(exc.__cause__, (BlockingIOError, TimeoutError, ssl.SSLWantWriteError)):
                log.warning("closed %s: a reply could not be sent within %.1f s (the client does not read)", peer, self.send_timeout_s)
        finally:
            with self._count_lock:
                self.active -= 1

    def _serve_connection(self, ws, client, peer) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            session = self.openpi.open(ws, client) if self.openpi is not None else None  # sends openpi's metadata
            while self.failure is None:
                try:
                    data = ws.recv(timeout=self.idle_timeout_s)
                except TimeoutError:
                    ws.close(1000, "idle timeout")
                    return
                except ConnectionClosed:
                    return
                ws.send(packb(self.answer(client, data, peer)) if session is None else self.answer_openpi(session, data, peer))
        finally:
            client.close()
            if self.failure is not None:
                self._stop_after_failure()

    def answer(self, client: LocalPolicy, data: Any, peer: Any = None) -> dict[str, Any]:
        """The reply to one message; never raises, whatever the message holds."""
        request_id = None

        def reply_to_request() -> dict[str, Any]:
            nonlocal request_id
            if not isinstance(data, bytes):
                raise WireError("expected a binary msgpack message")
            msg = unpackb(data, self.max_message_bytes)
            if isinstance(msg, dict) and "id" in msg:
                request_id = msg["id"]
                if not is_integer(request_id):
                    request_id = None
                    raise WireError("'id' must be an integer")
            return self.dispatch(client, msg)

        reply, error = self._guarded(reply_to_request, peer)
        reply = reply if error is None else {"type": "error", "message": error}
        if request_id is not None:
            reply["id"] = request_id
        return reply

    def answer_openpi(self, session: OpenpiSession, data: Any, peer: Any = None) -> bytes | str:
        reply, error = self._guarded(lambda: session.answer(data, self.max_message_bytes), peer)
        return reply if error is None else f"mixpolicy serve: {error}"  # a text frame: openpi clients raise it

    def _guarded(self, make_reply: Callable[[], Any], peer: Any) -> tuple[Any, str | None]:
        """(reply, None), or (None, the error message) when the request fails: bad input, a device failure, a bug."""
        try:
            return make_reply(), None
        except (WireError, UserError, ValueError, KeyError, TypeError) as exc:
            log.debug("rejected a request from %s: %s", peer, exc)
            return None, str(exc) or type(exc).__name__
        except Exception as exc:
            if is_device_failure(exc):
                self._fail(f"device failure: {exc}")
                return None, f"policy server device failed, the server stops for a restart: {exc}"
            log.warning("internal error answering %s", peer, exc_info=True)
            return None, f"internal error: {type(exc).__name__}: {exc}"

    def _fail(self, why: str) -> None:
        log.error("%s; stopping (exit %d) so that a supervisor restarts the server", why, EXIT_DEVICE_FAILED)
        self.failure = why  # the connection stops after sending its error reply

    def _stop_after_failure(self) -> None:
        with self._count_lock:
            if self._stopping:
                return
            self._stopping = True
        # shutdown() waits for every handler, this one included: run it elsewhere.
        threading.Thread(target=self._server.shutdown, name="policy-server-stop", daemon=True).start()

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
            if not isinstance(obs, dict) or not all(isinstance(v, np.ndarray) for v in obs.values()):
                raise WireError("infer needs 'obs': a map of arrays")
            task = check_task(msg.get("task", 0), client.spec)
            shift = check_shift(msg.get("shift"), client.spec)
            # Non-finite actions are sent as they are: the robot side's safety layer stops on them.
            res = client.infer(obs, task, shift, **delay_kwarg(msg.get("delay"), client.spec))
            return {
                "type": "result", "actions": res.actions, "steps": res.steps, "warm": res.warm,
                "compute_ms": res.compute_ms, "executable": res.executable,
            }  # fmt: skip
        raise WireError(f"unknown request type {kind!r:.40}")

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

    __enter__ = start

    def __exit__(self, *exc):
        self.close()


def serve(cfg: ServeConfig) -> None:
    """Run a server until interrupted (the ``mixpolicy serve`` command)."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="mixpolicy serve: %(levelname)s %(message)s")
    log.setLevel(cfg.log_level.upper())  # the websocket library's own debug output is per frame: kept at warning
    policy = load_inference_policy(cfg.checkpoint, cfg.device, cfg.num_threads, cfg.execution, cfg.adaptive_ratio, cfg.compose, cfg.compose_weights)
    lock = FairLock()
    count = iter(range(1 << 62))

    def make_client() -> LocalPolicy:
        return LocalPolicy(policy, cfg.rti, seed=cfg.seed + next(count), lock=lock)

    spec = policy_spec(policy, RTISampler(policy, cfg.rti))  # validates the RTI settings before listening
    openpi = OpenpiProtocol(cfg.openpi, spec) if cfg.protocol == "openpi" else None
    token = os.environ.get(cfg.token_env) or None
    tls = server_tls_context(cfg.tls_cert, cfg.tls_key) if cfg.tls_cert else None
    server = PolicyServer(
        make_client, cfg.host, cfg.port, token, int(cfg.max_message_mb * (1 << 20)), cfg.idle_timeout_s,
        cfg.max_connections, cfg.send_timeout_s, cfg.allowed_origins, tls, cfg.allow_cleartext, openpi,
    )  # fmt: skip
    print(f"{READY_PREFIX}{server.url}", flush=True)
    if token is None:
        log.warning("no token set: any local process may connect")
    try:
        server.serve_forever()
    finally:
        server.close()
    if server.failure is not None:
        raise SystemExit(EXIT_DEVICE_FAILED)


def serve_child() -> None:
    """``python -m mixpolicy.deploy.server``: the subprocess backend's child (config: one JSON line on stdin)."""
    from mixpolicy.config import from_dict

    line = sys.stdin.readline()

    def exit_with_parent():
        sys.stdin.read()  # returns at EOF: the parent closed the pipe or died
        os._exit(0)

    threading.Thread(target=exit_with_parent, name="parent-watchdog", daemon=True).start()
    try:
        serve(from_dict(ServeConfig, json.loads(line)))
    except (UserError, ValueError) as exc:
        print(f"mixpolicy serve: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    serve_child()
