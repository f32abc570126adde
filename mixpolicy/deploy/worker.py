"""Inference in a worker thread, so the control loop never waits for the policy.

The loop submits a request (observation history, the tick it was taken at, RTI's shift)
when the worker is idle and polls for the result every cycle. The worker measures each
call's latency (submit to result, transport included) and keeps an estimate for deciding
when to start the next call: the 90th percentile of recent warm calls. The worker's first
call is cold (allocations, lazy initialization) and never enters the estimate.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from mixpolicy.deploy.backend import InferenceResult, PolicyClient


@dataclass
class Request:
    obs: Mapping[str, np.ndarray]
    task: int
    obs_tick: int
    shift: int | None
    episode: int
    delay: int | None = None  # the frozen prefix of a real-time-chunking call (None: the policy's rti.delay)
    submitted: float = 0.0


@dataclass
class Reply:
    request: Request
    result: InferenceResult | None
    error: str | None
    latency_s: float


class LatencyEstimator:
    """Recent latencies per kind (full or warm call), first (cold) call ignored."""

    def __init__(self, window: int = 50, initial_s: float = 0.05, quantile: float = 0.9):
        self.window = window
        self.initial_s = initial_s
        self.quantile = quantile
        self.samples = {True: collections.deque(maxlen=window), False: collections.deque(maxlen=window)}
        self.seen = 0
        self.cold_s: float | None = None

    def add(self, latency_s: float, warm: bool) -> None:
        self.seen += 1
        if self.seen == 1:
            self.cold_s = latency_s
            return
        self.samples[warm].append(latency_s)

    def estimate(self, warm: bool) -> float:
        s = self.samples[warm] or self.samples[not warm]
        if not s:
            return self.initial_s
        return float(np.quantile(np.fromiter(s, float), self.quantile))


class InferenceWorker:
    def __init__(self, client: PolicyClient, initial_latency_s: float = 0.05, delay: LatencyEstimator | None = None):
        self.client = client
        self.latency = LatencyEstimator(initial_s=initial_latency_s)
        self.delay = delay  # a second estimator fed with the same calls (the frozen-prefix estimate)
        self._inbox: queue.Queue[Request | None] = queue.Queue(maxsize=1)
        self._replies: queue.Queue[Reply] = queue.Queue()
        self._busy = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inference-worker", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._busy.is_set()

    def submit(self, request: Request) -> bool:
        if self._busy.is_set():
            return False
        self._busy.set()
        request.submitted = time.perf_counter()
        self._inbox.put_nowait(request)
        return True

    def poll(self) -> Reply | None:
        try:
            return self._replies.get_nowait()
        except queue.Empty:
            return None

    def wait(self, timeout: float | None = None) -> Reply | None:
        try:
            return self._replies.get(timeout=timeout)
        except queue.Empty:
            return None

    def record(self, latency_s: float, warm: bool) -> None:
        self.latency.add(latency_s, warm)
        if self.delay is not None:
            self.delay.add(latency_s, warm)

    def _run(self) -> None:
        while True:
            req = self._inbox.get()
            if req is None:
                return
            result, error = None, None
            try:
                extra = {} if req.delay is None else {"delay": req.delay}
                result = self.client.infer(req.obs, req.task, req.shift, **extra)
            except Exception as exc:  # reported to the loop, which stops safely
                error = f"{type(exc).__name__}: {exc}"
            latency = time.perf_counter() - req.submitted
            if result is not None:
                self.record(latency, result.warm)
            self._replies.put(Reply(req, result, error, latency))
            self._busy.clear()

    def close(self, timeout: float = 5.0) -> None:
        try:
            self._inbox.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
