"""Experiment tracking: ``metrics.jsonl`` always, tensorboard by default, wandb optionally.

Every record is ``{"kind": "train" | "eval", "step": N, name: value, ...}``; tensorboard
and wandb receive the same values under ``<kind>/<name>``. Resuming a run drops records
logged after the checkpoint it resumes from, so every step appears once.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixpolicy.config import check
from mixpolicy.errors import UserError

if TYPE_CHECKING:
    from mixpolicy.train.distributed import ProcessGroup

METRICS_FILE = "metrics.jsonl"
TRACKING_FILE = "tracking.json"
WANDB_MODES = ("offline", "online")


@dataclass
class TrackingConfig:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "mixpolicy"
    wandb_entity: str = ""
    wandb_mode: str = "offline"
    run_name: str = ""

    def __post_init__(self):
        check(self.wandb_mode in WANDB_MODES, "tracking.wandb_mode", f"must be one of {WANDB_MODES} (offline needs no network; `wandb sync` uploads later)")
        check(bool(self.wandb_project), "tracking.wandb_project", "must not be empty")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; a line cut short by a crash is skipped."""
    records = []
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
    return records


def _truncate_after(path: Path, step: int) -> None:
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


class Tracker:
    """Writes only where ``active`` (the main process); elsewhere every call is a no-op."""

    def __init__(self, out: Path, cfg: TrackingConfig, config: dict[str, Any], resume_step: int | None, active: bool):
        self.active = active
        self.tb = None
        self.wandb_run = None
        self.metrics = None
        if not active:
            return
        out.mkdir(parents=True, exist_ok=True)
        path = out / METRICS_FILE
        if resume_step is not None:
            _truncate_after(path, resume_step)
        self.metrics = open(path, "a")
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("tracking.tensorboard=true needs the tensorboard package (pip install tensorboard)") from None
            # purge_step hides events a killed run wrote after the checkpoint being resumed.
            self.tb = SummaryWriter(str(out / "tb"), purge_step=None if resume_step is None else resume_step + 1)
        if cfg.wandb:
            self.wandb_run = _start_wandb(out, cfg, config)

    def log(self, kind: str, step: int, values: dict[str, float]) -> None:
        if not self.active:
            return
        clean = {k: float(v) for k, v in values.items()}
        self.metrics.write(json.dumps({"kind": kind, "step": step, **clean}) + "\n")
        self.metrics.flush()
        if self.tb is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
            self.tb.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({f"{kind}/{k}": v for k, v in clean.items()}, step=step)

    def video(self, tag: str, frames, step: int, fps: float = 10.0) -> None:
        """An eval rollout in tensorboard: an animated GIF image summary (tensorboard's image
        dashboard plays them; no video encoder is needed)."""
        if self.tb is None or len(frames) == 0:
            return
        import io

        from PIL import Image
        from tensorboard.compat.proto.summary_pb2 import Summary

        buf = io.BytesIO()
        images = [Image.fromarray(f) for f in frames]
        images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        h, w = frames[0].shape[:2]
        image = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=buf.getvalue())
        self.tb._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
        self.tb.flush()

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _start_wandb(out: Path, cfg: TrackingConfig, config: dict[str, Any]):
    try:
        import wandb
    except ImportError:
        raise UserError("tracking.wandb=true needs the wandb package: pip install 'mixpolicy[wandb]'") from None
    # One wandb run per run folder: a resumed run continues the same wandb run.
    state_file = out / TRACKING_FILE
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    run_id = state.get("wandb_run_id") or uuid.uuid4().hex[:12]
    state_file.write_text(json.dumps({**state, "wandb_run_id": run_id}, indent=2))
    try:
        return wandb.init(
            project=cfg.wandb_project,
            entity=cfg.wandb_entity or None,
            name=cfg.run_name or out.resolve().name,
            id=run_id,
            resume="allow",
            dir=str(out),
            mode=cfg.wandb_mode,
            config=config,
        )
    except Exception as exc:  # wandb raises many types (auth, network); report one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"wandb could not start ({first}); tracking.wandb_mode=offline needs no network") from None


class LogInterval:
    """Loss terms and timings accumulated between two log lines."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.grad_norm = 0.0
        self.steps = 0
        self.train_s = 0.0
        self.data_s = 0.0

    def add(self, logs: dict[str, Any]) -> None:
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1

    def reduce(self, group: "ProcessGroup") -> dict[str, float]:
        """Mean of every logged term over micro-batches of all processes; mean gradient norm."""
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for part in group.all_gather_json({"sums": self.sums, "counts": self.counts}):
            for k, v in part["sums"].items():
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + part["counts"][k]
        out = {k: sums[k] / counts[k] for k in sorted(sums)}
        out["grad_norm"] = self.grad_norm / max(1, self.steps)
        return out
