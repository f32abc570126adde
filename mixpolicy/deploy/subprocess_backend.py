"""The subprocess backend: a policy server in a child process on loopback (its own interpreter and GIL).

The control loop's process then only waits on a socket while the network runs, which
keeps its timing independent of the forward pass. The child (``python -m
mixpolicy.deploy.server``) reads its whole config as one JSON line on stdin and keeps
stdin open: when this process dies, for any reason, the pipe closes and the child exits.
Its stdout and stderr share one pipe that a thread drains for the child's whole life, so
the child never blocks on a full pipe; the last lines are kept for error messages.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
from collections import deque
from dataclasses import asdict

from mixpolicy.deploy.remote import RemotePolicy
from mixpolicy.deploy.rti import RTIConfig
from mixpolicy.deploy.wire import DEFAULT_TOKEN_ENV, READY_PREFIX
from mixpolicy.errors import UserError

TAIL_LINES = 50


class SubprocessPolicy(RemotePolicy):
    """``mixpolicy serve`` in a child process, and a client of it."""

    def __init__(self, checkpoint: str, rti: RTIConfig, device: str = "auto", num_threads: int = 1, seed: int = 0, timeout_s: float = 5.0, start_timeout_s: float = 120.0, execution: str = "", adaptive_ratio: float = 0.0, log_level: str = "info", compose: list[str] | None = None, compose_weights: list[float] | None = None):
        token = secrets.token_hex(16)
        config = {
            "checkpoint": checkpoint, "host": "127.0.0.1", "port": 0, "token_env": DEFAULT_TOKEN_ENV, "device": device,
            "num_threads": num_threads, "seed": seed, "execution": execution, "adaptive_ratio": adaptive_ratio,
            "rti": asdict(rti), "log_level": log_level, "compose": list(compose or []), "compose_weights": list(compose_weights or []),
        }  # fmt: skip
        env = dict(os.environ, **{DEFAULT_TOKEN_ENV: token})  # the token stays out of the process list
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "mixpolicy.deploy.server"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )
        self.output_tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.output_bytes = 0
        self._ready = threading.Event()
        self._url = ""
        self._drain = threading.Thread(target=self._read_output, name="policy-child-output", daemon=True)
        self._drain.start()
        try:
            self._proc.stdin.write(json.dumps(config) + "\n")
            self._proc.stdin.flush()
        except OSError:
            pass  # the child died at once: reported below with its output
        url = self._wait_ready(start_timeout_s)
        try:
            super().__init__(url, token=token, timeout_s=timeout_s)
        except BaseException:
            self._stop_process()
            raise

    def _read_output(self) -> None:
        """Reads until the child closes its end, so that its writes never block."""
        for line in self._proc.stdout:
            self.output_bytes += len(line)
            if not self._ready.is_set() and line.startswith(READY_PREFIX):
                self._url = line[len(READY_PREFIX) :].strip()
                self._ready.set()
            else:
                self.output_tail.append(line.rstrip("\n"))
        self._ready.set()  # EOF: the child is gone

    def _wait_ready(self, timeout_s: float) -> str:
        self._ready.wait(timeout_s)
        if not self._url:
            self._stop_process()
            lines = [ln for ln in self.output_tail if ln.strip()]
            raise UserError(f"the policy server process did not start: {lines[-1] if lines else 'no output'}")
        return self._url

    def _stop_process(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._drain.join(timeout=5)
        for f in (self._proc.stdin, self._proc.stdout):
            try:
                f.close()
            except OSError:
                pass  # stdin's buffered config to a dead child

    @property
    def pid(self) -> int:
        return self._proc.pid

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._stop_process()
