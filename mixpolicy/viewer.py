"""Rerun recordings (``.rrd``) of dataset episodes and evaluation rollouts.

Open one with ``rerun x.rrd`` (the viewer ships with rerun-sdk, the ``viewer`` extra).
Everything is on the ``step`` timeline (and ``time``, in seconds, where the frame rate is
known). Entities:

=====================  =================================================================
``episode``            (static) what the recording is: source, task, seed, length, outcome
``camera/<name>``      an image per step: every camera key (``image_*``, ``img``), or the
                       rendered view of an evaluation
``state/<key>``        one scalar series per dimension of each low-dim observation key
``action``             one series per action dimension (recorded, or executed in eval)
``plan/chunk/<n>``     decision n's predicted chunk as series over the steps its actions
                       would run at, so chunks fan out from the executed action
``plan/executable``    at each decision, how many of the chunk's actions run
``plan/horizon_<h>/<n>``  a mixture-of-horizons policy's horizon-h prediction at decision n
``metrics/<name>``     per-step numbers (PushT: coverage)
``outcome/success``    1 or 0 at the last step
``events``             text markers: success, failure, coverage reached
=====================  =================================================================
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mixpolicy.errors import UserError

INSTALL_HINT = "Rerun recordings need the viewer extra: pip install -e '.[viewer]' (rerun-sdk)"
APPLICATION = "mixpolicy"


def require_rerun():
    """The rerun module, or a UserError naming the extra."""
    try:
        import rerun
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return rerun


def as_rgb8(frames: np.ndarray) -> np.ndarray:
    """uint8 RGB frames from uint8 or float (0..1 or 0..255) ones, grey repeated to RGB."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        x = np.nan_to_num(frames.astype(np.float64))
        frames = np.clip(x * (255.0 if x.max(initial=0) <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if frames.shape[-1] == 1:
        frames = frames.repeat(3, axis=-1)
    return frames


def dim_names(key: str, dims: int, names: list[str] | None = None) -> list[str]:
    return list(names) if names and len(names) == dims else [f"{key}[{d}]" for d in range(dims)]


def markdown_table(fields: Mapping[str, Any]) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in fields.items())])


class Recording:
    """One ``.rrd`` file, streamed as it is logged; :meth:`close` finishes it."""

    def __init__(self, path: str | Path, name: str, fps: float = 0.0):
        rr = require_rerun()
        self.rr = rr
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fps = float(fps)
        self.stream = rr.RecordingStream(APPLICATION, recording_id=name, send_properties=False)
        self.stream.set_log_time_enabled(False)  # the same data gives the same recording
        self.stream.save(str(self.path))
        self.stream.send_recording_name(name)
        self._named: set[str] = set()

    # ------------------------------------------------------------------ time
    def at(self, step: int) -> None:
        self.stream.set_time("step", sequence=int(step))
        if self.fps > 0:
            self.stream.set_time("time", duration=step / self.fps)

    def _indexes(self, steps: np.ndarray) -> list:
        idx = [self.rr.TimeColumn("step", sequence=steps)]
        if self.fps > 0:
            idx.append(self.rr.TimeColumn("time", duration=steps / self.fps))
        return idx

    # ------------------------------------------------------------------ content
    def annotate(self, fields: Mapping[str, Any]) -> None:
        self.stream.log("episode", self.rr.TextDocument(markdown_table(fields), media_type="text/markdown"), static=True)

    def name_series(self, entity: str, names: list[str]) -> None:
        if entity not in self._named:
            self.stream.log(entity, self.rr.SeriesLines(names=names), static=True)
            self._named.add(entity)

    def image(self, entity: str, frame: np.ndarray) -> None:
        """One frame at the current step."""
        self.stream.log(entity, self.rr.Image(as_rgb8(frame)))

    def images(self, entity: str, frames: np.ndarray, start: int = 0) -> None:
        for i, frame in enumerate(as_rgb8(frames)):
            self.at(start + i)
            self.stream.log(entity, self.rr.Image(frame))

    def scalars(self, entity: str, values: np.ndarray, names: list[str] | None = None) -> None:
        """One value per dimension at the current step."""
        values = np.asarray(values, np.float64).reshape(-1)
        self.name_series(entity, dim_names(entity.rsplit("/", 1)[-1], len(values), names))
        self.stream.log(entity, self.rr.Scalars(values))

    def series(self, entity: str, values: np.ndarray, start: int = 0, names: list[str] | None = None) -> None:
        """(T, D) values at steps start, start + 1, ...: D series, sent as columns."""
        values = np.asarray(values, np.float64)
        values = values.reshape(len(values), -1)
        self.name_series(entity, dim_names(entity.rsplit("/", 1)[-1], values.shape[1], names))
        steps = np.arange(start, start + len(values))
        self.stream.send_columns(entity, indexes=self._indexes(steps), columns=self.rr.Scalars.columns(scalars=values))

    def event(self, text: str, level: str = "INFO") -> None:
        self.stream.log("events", self.rr.TextLog(text, level=level))

    def outcome(self, step: int, success: bool, text: str) -> None:
        self.at(step)
        self.stream.log("outcome/success", self.rr.Scalars(float(success)))
        self.event(text, "INFO" if success else "WARN")

    def close(self) -> Path:
        self.stream.flush()
        self.stream.disconnect()
        return self.path


class RolloutRecorder:
    """The recording of one evaluation episode, fed step by step by the evaluation loop."""

    def __init__(self, path: Path, fields: Mapping[str, Any], action_names: list[str] | None = None, fps: float = 0.0):
        self.rec = Recording(path, name=Path(path).stem, fps=fps)
        self.rec.annotate(fields)
        self.action_names = action_names
        self.decisions = 0
        self.marked: set[str] = set()

    def observe(self, step: int, obs: Mapping[str, np.ndarray], frame: np.ndarray | None = None) -> None:
        """The observation seen at ``step`` (and the rendered frame, when the policy has no camera)."""
        self.rec.at(step)
        cameras = 0
        for key, value in obs.items():
            value = np.asarray(value)
            if value.ndim == 3 and value.shape[-1] in (1, 3):
                self.rec.image(f"camera/{key}", value)
                cameras += 1
            else:
                self.rec.scalars(f"state/{key}", value)
        if frame is not None and not cameras:
            self.rec.image("camera/render", frame)

    def decision(self, step: int, chunk: np.ndarray, executable: int, horizons: Mapping[int, np.ndarray] | None = None) -> None:
        """A policy call at ``step``: its (H, A) chunk, how much of it runs, per-horizon predictions."""
        n = self.decisions
        self.decisions += 1
        self.rec.series(f"plan/chunk/{n:04d}", chunk, start=step, names=self.action_names)
        for h, pred in (horizons or {}).items():
            self.rec.series(f"plan/horizon_{h}/{n:04d}", pred[:h], start=step, names=self.action_names)
        self.rec.at(step)
        self.rec.scalars("plan/executable", np.array([executable]), names=["executable"])

    def act(self, step: int, action: np.ndarray, metrics: Mapping[str, float], marks: Mapping[str, float] | None = None) -> None:
        """The action executed at ``step`` and the per-step metrics after it; ``marks`` puts an
        event the first time a metric reaches its value (PushT: the success coverage)."""
        self.rec.at(step)
        self.rec.scalars("action", action, names=self.action_names)
        for name, value in metrics.items():
            self.rec.scalars(f"metrics/{name}", np.array([value]), names=[name])
            threshold = (marks or {}).get(name)
            if threshold is not None and value >= threshold and name not in self.marked:
                self.marked.add(name)
                self.rec.event(f"{name} reached {threshold:g} ({value:.3f})")

    def finish(self, step: int, success: bool, summary: str) -> Path:
        self.rec.outcome(step, success, summary)
        return self.rec.close()
