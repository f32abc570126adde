"""benchmarks/gpu/run.sh in its quick CPU mode: every phase runs and reports numbers, so the
script prepared for a GPU machine cannot rot between the rare runs there."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "gpu" / "run.sh"
PHASES = ["tests", "train", "latency", "deploy", "ddp"]


def _run(tmp_path, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHON=sys.executable, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run(["bash", str(RUN), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.mark.slow
def test_quick_cpu_run_reports_every_phase_with_numbers(tmp_path):
    out = tmp_path / "gpu.json"
    proc = _run(tmp_path, "--device", "cpu", "--quick", "--no-install", "--out", str(out))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    r = json.loads(out.read_text())
    assert r["mode"] == "quick" and r["machine"]["device"] == "cpu" and r["install"]["wheels"] is False
    assert r["statuses"] == {p: "ok" for p in PHASES}
    for name, phase in r["phases"].items():
        assert _number(phase["elapsed_s"]) and phase["elapsed_s"] <= phase["budget_s"] + 10, name
        assert phase["peak_memory"]["kind"] == "cpu" and phase["peak_memory"]["max_rss_bytes"] > 0, name
    assert r["peak_memory_by_phase"].keys() == set(PHASES)
    assert _number(r["total_s"])

    tests = r["phases"]["tests"]["results"]
    assert tests["passed"] >= 9 and tests["failed"] == tests["errors"] == 0 and tests["exit_code"] == 0

    train = r["phases"]["train"]["results"]["sizes"]["tiny"]
    assert set(train["variants"]) == {"fp32_eager", "bf16_eager", "bf16_compile", "fp32_compile"}
    for name, v in train["variants"].items():
        assert _number(v["steps_per_s"]) and v["steps_per_s"] > 0 and v["finite"], name
        assert v["samples_per_s"] == pytest.approx(16 * v["steps_per_s"]) and v["params"] > 0
    assert train["variants"]["bf16_compile"]["compile"] == "eager backend (quick mode on cpu)"

    latency = r["phases"]["latency"]["results"]["sizes"]["tiny"]
    assert latency["params_mode_active"] < latency["params_mode_total"]
    evaluations = {"full_10": 10, "rti_k1": 1, "rti_k2": 2, "mode_cached": 10, "mode_uncached": 10}
    for batch in ("batch_1", "batch_32"):
        timed = latency["fp32"][batch]
        assert {k: timed[k]["network_evaluations"] for k in evaluations} == evaluations
        assert all(_number(timed[k]["median_ms"]) and timed[k]["median_ms"] > 0 for k in evaluations)
        assert all(_number(x) for x in timed["ratios"].values())

    deploy = r["phases"]["deploy"]["results"]
    assert (deploy["ticks"], deploy["end"], deploy["fault"], deploy["backend"]) == (50, "max_ticks", None, "process")
    assert 0 < deploy["cycles"] <= 50 and deploy["commands_received"] == deploy["cycles"]  # a loaded CPU may skip ticks
    assert _number(deploy["jitter_ms"]["p99"]) and _number(deploy["warm_latency_ms"]["p50"])
    assert isinstance(deploy["missed_deadlines"], int) and deploy["policy_calls"] >= 2

    ddp = r["phases"]["ddp"]["results"]
    assert (ddp["backend"], ddp["world_size"], ddp["ddp_wrapped"], ddp["steps"]) == ("gloo", 1, True, 6)
    assert _number(ddp["steps_per_s"]) and _number(ddp["final_loss"])


@pytest.mark.slow
def test_isolated_phase_budget_skip_and_missing_wheels(tmp_path):
    out = tmp_path / "r.json"
    # The whole run's budget leaves too little for the tests phase: skipped with a note;
    # latency runs in its own process (the GPU run's default).
    proc = _run(tmp_path, "--device", "cpu", "--quick", "--no-install", "--isolate", "yes", "--budget-s", "80", "--phases", "tests", "latency", "--out", str(out))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    r = json.loads(out.read_text())
    assert r["statuses"] == {"tests": "skipped", "latency": "ok"} and r["isolated_phases"] is True
    assert "skipped:" in r["phases"]["tests"]["notes"][0]
    assert r["phases"]["latency"]["results"]["sizes"]["tiny"]["fp32"]["batch_1"]["rti_k1"]["network_evaluations"] == 1

    no_wheels = _run(tmp_path, "--device", "cpu", "--wheels", str(tmp_path / "none"), "--out", str(out))
    assert no_wheels.returncode == 2
    assert no_wheels.stderr.strip().splitlines() == [
        f"run.sh: error: no wheels in {tmp_path / 'none'}: run benchmarks/gpu/prepare.sh where the index is reachable, or pass --no-install"
    ]
