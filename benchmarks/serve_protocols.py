"""Per-call latency of `mixpolicy serve` over loopback: the native protocol vs `protocol=openpi`.

One checkpoint (a tiny or small Meta-World-shaped policy made here: state 39, action 4,
horizon 8, 4 actions per chunk) is served twice, by two server processes started as
`mixpolicy serve` starts them, one per protocol. Calls alternate between the native client
(mixpolicy's RemotePolicy, a (n_obs_steps, 39) history and shift=4) and the openpi client
(openpi-client's WebsocketClientPolicy, one frame and a prompt; the server's rule gives the
same shift), each first on every other round, so machine noise falls on both alike; every call after the first warm-starts
(RTI k=3), so both do the same compute. A call's time is the client's, from infer to
decoded reply; `compute` is the policy's own time reported in the reply. Without
openpi-client installed the openpi side uses a plain websocket client with the same encoding.

    ../shared/tools/quiet-run -- .venv/bin/python benchmarks/serve_protocols.py --policy small --calls 500
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"tiny": dict(width=32, depth=2, heads=2), "small": dict(width=256, depth=6, heads=4)}


def make_checkpoint(size: str, folder: Path) -> str:
    import torch

    from mixpolicy.datasets.normalizer import Normalizer
    from mixpolicy.policies.checkpoint import save_policy
    from mixpolicy.policies.config import DDPMConfig, PolicyConfig, TransformerConfig
    from mixpolicy.policies.denoising_policy import DenoisingPolicy, ShapeMeta

    torch.manual_seed(0)
    net = TransformerConfig(mlp_ratio=4.0, **SIZES[size])
    cfg = PolicyConfig(
        obs_keys=["state"], n_obs_steps=2, horizon=8, n_action_steps=4, obs_hidden=SIZES[size]["width"],
        network=net, objective=DDPMConfig(num_train_timesteps=100, num_inference_steps=10),
    )  # fmt: skip
    rng = np.random.default_rng(0)
    norm = Normalizer.from_data({"state": rng.normal(size=(64, 39)), "action": rng.uniform(-1, 1, (64, 4))})
    meta = ShapeMeta(obs={"state": [39]}, action_dim=4, tasks=["reach-v3"], task_descriptions={"reach-v3": "reach the goal position"})
    return str(save_policy(DenoisingPolicy(cfg, meta, norm), folder / size))


def start_server(checkpoint: str, protocol: str, threads: int) -> tuple[subprocess.Popen, str]:
    """A `mixpolicy serve` child (config as one JSON line on stdin, as the subprocess backend starts it)."""
    from mixpolicy.deploy.wire import READY_PREFIX

    cfg = {
        "checkpoint": checkpoint, "port": 0, "device": "cpu", "num_threads": threads, "protocol": protocol,
        "rti": {"enabled": True, "k": 3}, "log_level": "warning",
        "openpi": {"obs_map": {"observation/state": "state"}, "reset_after_s": 0.0},
    }  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    env.pop("MIXPOLICY_POLICY_TOKEN", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mixpolicy.deploy.server"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    proc.stdin.write(json.dumps(cfg) + "\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if not line.startswith(READY_PREFIX):
        proc.kill()
        raise SystemExit(f"serve_protocols: the {protocol} server did not start: {line!r}")
    return proc, line[len(READY_PREFIX) :].strip()


class PlainOpenpiClient:
    """openpi's wire format over a plain websocket (when openpi-client is not installed)."""

    def __init__(self, url: str):
        from websockets.sync.client import connect

        from mixpolicy.deploy import openpi_protocol

        self.codec = openpi_protocol
        self.ws = connect(url, compression=None, max_size=None, proxy=None).__enter__()
        self.metadata = self.codec.unpackb(self.ws.recv(timeout=10))

    def infer(self, obs: dict) -> dict:
        self.ws.send(self.codec.packb(obs))
        reply = self.ws.recv(timeout=10)
        if isinstance(reply, str):
            raise RuntimeError(reply)
        return self.codec.unpackb(reply)


def openpi_client(url: str):
    try:
        from openpi_client.websocket_client_policy import WebsocketClientPolicy
    except ImportError:
        return PlainOpenpiClient(url), "plain websocket client (openpi-client not installed)"
    import importlib.metadata as md
    import warnings

    host, port = url.removeprefix("ws://").rsplit(":", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # openpi-client's own connect() call
        return WebsocketClientPolicy(host=host, port=int(port)), f"openpi-client {md.version('openpi-client')}"


def summary(ms: list[float]) -> dict[str, float]:
    q = np.percentile(ms, [50, 90, 99])
    return {"median_ms": float(q[0]), "p90_ms": float(q[1]), "p99_ms": float(q[2]), "mean_ms": statistics.fmean(ms)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", choices=sorted(SIZES), default="small")
    ap.add_argument("--calls", type=int, default=500, help="timed calls per protocol")
    ap.add_argument("--warmup", type=int, default=30, help="untimed calls per protocol first")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    ap.add_argument("--json", default="", help="also write the figures to this file")
    args = ap.parse_args()
    if args.calls < 1 or args.warmup < 1:
        raise SystemExit("serve_protocols: --calls and --warmup must be >= 1")

    from mixpolicy.deploy.remote import RemotePolicy

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(args.policy, Path(tmp))
        procs = []
        try:
            native_proc, native_url = start_server(ckpt, "native", args.threads)
            procs.append(native_proc)
            openpi_proc, openpi_url = start_server(ckpt, "openpi", args.threads)
            procs.append(openpi_proc)
            native = RemotePolicy(native_url, timeout_s=30)
            openpi, openpi_name = openpi_client(openpi_url)
            rng = np.random.default_rng(0)
            times: dict[str, list[float]] = {"native": [], "openpi": []}
            compute: dict[str, list[float]] = {"native": [], "openpi": []}
            for i in range(args.warmup + args.calls):
                state = rng.normal(size=39).astype(np.float32)
                shift = None if i == 0 else 4
                took = {}
                for protocol in ("native", "openpi") if i % 2 == 0 else ("openpi", "native"):  # each goes first half the time
                    t0 = time.perf_counter()
                    if protocol == "native":
                        res = native.infer({"state": np.stack([state, state])}, 0, shift)
                    else:
                        out = openpi.infer({"observation/state": state, "prompt": "reach the goal position"})
                    took[protocol] = 1e3 * (time.perf_counter() - t0)
                assert out["actions"].shape == res.actions.shape == (8, 4)
                assert i == 0 or (res.warm and out["warm"]), "every call after the first warm-starts"
                if i >= args.warmup:
                    for protocol, ms in took.items():
                        times[protocol].append(ms)
                    compute["native"].append(res.compute_ms)
                    compute["openpi"].append(out["policy_timing"]["infer_ms"])
            native.close()
        finally:
            for p in procs:
                p.stdin.close()  # the child exits when its stdin closes
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
    figures = {
        p: {**summary(times[p]), "compute_median_ms": statistics.median(compute[p]),
            "transport_median_ms": statistics.median(np.subtract(times[p], compute[p]))}  # per call: client time - policy time
        for p in times
    }  # fmt: skip
    ratio = figures["openpi"]["median_ms"] / figures["native"]["median_ms"]
    print(f"policy {args.policy} ({SIZES[args.policy]}), cpu, {args.threads} torch thread(s) per server, RTI k=3 of 10 DDPM steps")
    print(f"{args.calls} timed calls per protocol after {args.warmup} warm-up calls, interleaved; openpi side: {openpi_name}")
    print(f"{'protocol':<10}{'median ms':>10}{'p90 ms':>9}{'p99 ms':>9}{'compute ms':>12}{'transport ms':>14}")
    for p, f in figures.items():
        print(f"{p:<10}{f['median_ms']:>10.3f}{f['p90_ms']:>9.3f}{f['p99_ms']:>9.3f}{f['compute_median_ms']:>12.3f}{f['transport_median_ms']:>14.3f}")
    print(f"ratio openpi/native (median per call): {ratio:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"policy": args.policy, "calls": args.calls, "client": openpi_name, "figures": figures, "ratio": ratio}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
