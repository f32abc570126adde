"""pytest plugin for gpu_bench.py's tests phase: outcomes and peak memory as JSON.

Loaded with ``-p gpu_pytest_report`` (benchmarks/gpu on PYTHONPATH); writes the file named by
MIXPOLICY_PYTEST_REPORT after every test, so a run stopped at its budget keeps what finished.
"""

from __future__ import annotations

import json
import os
import resource
import time

_state = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "done": 0, "failures": [], "skips": [], "slowest": []}
_t0 = time.time()


def _peak_memory() -> dict:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"kind": "cuda", "max_allocated_bytes": int(torch.cuda.max_memory_allocated()), "max_reserved_bytes": int(torch.cuda.max_memory_reserved())}
    return {"kind": "cpu", "max_rss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}


def _write() -> None:
    path = os.environ.get("MIXPOLICY_PYTEST_REPORT")
    if not path:
        return
    out = dict(_state, duration_s=time.time() - _t0, peak_memory=_peak_memory())
    out["slowest"] = sorted(_state["slowest"], key=lambda x: -x[1])[:10]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=2)
    os.replace(tmp, path)


def _message(report) -> str:
    text = str(report.longrepr) if report.longrepr is not None else ""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("E ")]
    return (errors[0] if errors else (lines[-1] if lines else ""))[:400]


def pytest_runtest_logreport(report) -> None:
    if report.when == "call" or (report.when == "setup" and not report.passed):
        if report.passed:
            _state["passed"] += 1
        elif report.skipped:
            _state["skipped"] += 1
            _state["skips"].append({"test": report.nodeid, "reason": _message(report)})
        else:
            key = "failed" if report.when == "call" else "errors"
            _state[key] += 1
            _state["failures"].append({"test": report.nodeid, "when": report.when, "message": _message(report)})
        _state["done"] += 1
        _state["slowest"].append([report.nodeid, round(report.duration, 3)])
        _write()
    elif report.when == "teardown" and report.failed:
        _state["errors"] += 1
        _state["failures"].append({"test": report.nodeid, "when": "teardown", "message": _message(report)})
        _write()


def pytest_sessionfinish(session, exitstatus) -> None:
    _state["exit_status"] = int(exitstatus)
    _write()
