"""The remote backend: a client of a ``mixpolicy serve`` policy server (msgpack over websocket).

Every request carries an ``id`` that the server echoes: after a timeout the late reply
is recognised and dropped, never taken as the answer to the next call. A non-loopback
server is reached over ``wss://`` (TLS, verified against the system's CAs or
``ca_file``); plain ``ws://`` to another host is refused unless ``allow_cleartext``,
because it carries the token and the robot's action limits unprotected.
"""

from __future__ import annotations

import ssl
import threading
import time
from http import HTTPStatus
from itertools import count
from typing import Any, Mapping
from urllib.parse import urlsplit

import numpy as np

from mixpolicy.deploy.backend import InferenceResult, PolicySpec
from mixpolicy.deploy.wire import PROTOCOL_VERSION, WireError, is_loopback, packb, unpackb
from mixpolicy.errors import UserError


class RemotePolicyError(RuntimeError):
    """The server answered with an error, or did not answer in time."""


def client_tls_context(url: str, ca_file: str, allow_cleartext: bool) -> ssl.SSLContext | None:
    """The TLS context for ``url``, or None for plain ws:// (refused off loopback unless allowed)."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise UserError(f"policy server url {url!r} must be ws://host:port or wss://host:port")
    if parts.scheme == "ws":
        if ca_file:
            raise UserError(f"a CA file is for wss:// urls, not {url}")
        if not is_loopback(parts.hostname) and not allow_cleartext:
            raise UserError(
                f"refusing plain ws:// to {parts.hostname}: the token and the robot's limits would travel in cleartext; "
                "use wss:// (mixpolicy serve tls_cert=... tls_key=...) or an SSH tunnel to a loopback port, "
                "or allow cleartext explicitly"
            )
        return None
    try:
        return ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise UserError(f"cannot read CA file {ca_file}: {exc}") from None


def _refusal(code: int, body: bytes) -> str:
    if code == HTTPStatus.UNAUTHORIZED:
        return "the token is missing or wrong"
    text = body.decode("utf-8", "replace").strip().splitlines()
    return f"HTTP {code}" + (f": {text[0]}" if text else "")


class RemotePolicy:
    """Client of a ``PolicyServer``: the same interface as ``LocalPolicy``."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout_s: float = 5.0,
        max_message_bytes: int = 8 << 20,
        ca_file: str = "",
        allow_cleartext: bool = False,
    ):
        from websockets.exceptions import InvalidHandshake, InvalidStatus
        from websockets.sync.client import connect

        self.url = url
        self.timeout_s = float(timeout_s)
        self.max_message_bytes = int(max_message_bytes)
        tls = client_tls_context(url, ca_file, allow_cleartext)
        headers = {"Authorization": f"Bearer {token}"} if token else None
        try:
            # The context-manager protocol, entered here and left in close().
            self._ws = connect(
                url,
                ssl=tls,
                additional_headers=headers,
                max_size=self.max_message_bytes,
                compression=None,
                open_timeout=self.timeout_s,
                ping_interval=None,
                proxy=None,
            ).__enter__()
        except InvalidStatus as exc:
            raise UserError(f"policy server {url} refused the connection: {_refusal(exc.response.status_code, exc.response.body or b'')}") from None
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise UserError(f"cannot reach policy server {url}: {exc}") from None
        self._lock = threading.Lock()
        self._ids = count(1)
        reply = self._call({"type": "spec"}, first=True)
        if reply.get("protocol") != PROTOCOL_VERSION:
            self.close()
            raise UserError(f"policy server {url} speaks protocol {reply.get('protocol')}, this client {PROTOCOL_VERSION}")
        self.spec = PolicySpec.from_json(reply["spec"])

    def _receive(self, request_id: int, deadline: float, first: bool) -> dict[str, Any]:
        """The reply to ``request_id``; replies to earlier (timed-out) requests are dropped."""
        while True:
            data = self._ws.recv(timeout=max(0.0, deadline - time.monotonic()))
            try:
                reply = unpackb(data, self.max_message_bytes) if isinstance(data, bytes) else None
            except WireError as exc:
                raise RemotePolicyError(f"malformed reply from {self.url}: {exc}") from None
            if not isinstance(reply, dict):
                raise RemotePolicyError(f"malformed reply from {self.url}")
            rid = reply.get("id")
            # An id-less reply: a server too old to echo ids (first call), or an error about a message it could not decode.
            if rid == request_id or (rid is None and (first or reply.get("type") == "error")):
                return reply

    def _call(self, msg: Mapping[str, Any], first: bool = False) -> dict[str, Any]:
        from websockets.exceptions import ConnectionClosed

        with self._lock:
            request_id = next(self._ids)
            try:
                self._ws.send(packb({**msg, "id": request_id}))
                reply = self._receive(request_id, time.monotonic() + self.timeout_s, first)
            except TimeoutError:
                raise RemotePolicyError(f"policy server {self.url} did not answer within {self.timeout_s} s") from None
            except ConnectionClosed as exc:
                raise RemotePolicyError(f"policy server {self.url} closed the connection ({exc})") from None
        if reply.get("type") == "error":
            raise RemotePolicyError(f"policy server: {reply.get('message')}")
        return reply

    def infer(self, obs: Mapping[str, np.ndarray], task: int = 0, shift: int | None = None, delay: int | None = None) -> InferenceResult:
        msg = {"type": "infer", "obs": {k: np.asarray(v) for k, v in obs.items()}, "task": task, "shift": shift}
        r = self._call(msg if delay is None else {**msg, "delay": delay})
        actions, executable = r.get("actions"), r.get("executable")
        shape = (self.spec.horizon, self.spec.action_dim)
        if not isinstance(actions, np.ndarray) or actions.shape != shape or actions.dtype.kind != "f":
            raise RemotePolicyError(f"malformed reply from {self.url}: actions must be a float array of shape {shape}")
        try:
            return InferenceResult(
                actions=actions.astype(np.float32),
                steps=int(r["steps"]),
                warm=bool(r["warm"]),
                compute_ms=float(r["compute_ms"]),
                executable=None if executable is None else int(executable),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RemotePolicyError(f"malformed reply from {self.url}: {exc!r}") from None

    def reset(self) -> None:
        self._call({"type": "reset"})

    def close(self) -> None:
        self._ws.close()
