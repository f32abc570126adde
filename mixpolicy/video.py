"""The one mp4 writer: h264 in yuv420p through PyAV, which browsers, tensorboard and wandb play.

``write_video(path, frames, fps)`` writes a whole clip; :class:`VideoWriter` appends clips
to one file (the LeRobot exporter writes an episode at a time). yuv420p stores colour at
half resolution, so odd frame sizes are padded to even ones by repeating the last row/column.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Iterable

import numpy as np

from mixpolicy.errors import UserError

CODEC = "libx264"
PIXEL_FORMAT = "yuv420p"


def _av():
    try:
        import av
    except ImportError as exc:
        raise UserError("writing mp4 needs PyAV (pip install 'av>=12')") from exc
    return av


def even_size(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) frames padded at the bottom/right to even H and W (edge pixels repeated)."""
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if not (pad_h or pad_w):
        return frames
    return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    return frames


class VideoWriter:
    """An h264 yuv420p mp4 opened on the first frames; ``options`` go to the encoder (e.g. crf, g)."""

    def __init__(self, path: str | Path, fps: float, options: dict[str, str] | None = None):
        if not fps > 0:
            raise UserError(f"video frame rate must be > 0, got {fps}")
        self.path = Path(path)
        self.rate = Fraction(fps).limit_denominator(1001)
        self.options = dict(options or {})
        self.size: tuple[int, int] | None = None  # (H, W) of the frames given, before padding
        self.frames_written = 0
        self._container = self._stream = None

    def _open(self, height: int, width: int) -> None:
        av = _av()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self.path), mode="w")
        self._stream = self._container.add_stream(CODEC, rate=self.rate)
        self._stream.width, self._stream.height = width + width % 2, height + height % 2
        self._stream.pix_fmt = PIXEL_FORMAT
        self._stream.options = self.options
        self.size = (height, width)

    def write(self, frames: Iterable[np.ndarray] | np.ndarray) -> None:
        frames = _check_frames(np.asarray(frames))
        if self._container is None:
            self._open(*frames.shape[1:3])
        elif frames.shape[1:3] != self.size:
            raise ValueError(f"frame size {frames.shape[1:3]} differs from the video's {self.size}")
        av = _av()
        for f in even_size(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            frame.pts = self.frames_written
            self._container.mux(self._stream.encode(frame))
            self.frames_written += 1

    def close(self) -> None:
        if self._container is None:
            return
        self._container.mux(self._stream.encode())  # flush the encoder
        self._container.close()
        self._container = None

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_video(path: str | Path, frames: np.ndarray | list[np.ndarray], fps: float, options: dict[str, str] | None = None) -> Path:
    """Write uint8 (T, H, W, 3) RGB frames to an h264 yuv420p mp4 at ``fps``; returns the path."""
    if isinstance(frames, list) and not frames:
        raise ValueError("no frames to write")
    frames = _check_frames(np.stack(frames) if isinstance(frames, list) else frames)
    if len(frames) == 0:
        raise ValueError("no frames to write")
    with VideoWriter(path, fps, options) as writer:
        writer.write(frames)
    return Path(path)


def read_video(path: str | Path, max_frames: int = 0) -> np.ndarray:
    """uint8 (T, H, W, 3) RGB frames of a video file (the first ``max_frames`` when > 0)."""
    av = _av()
    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if max_frames and len(frames) >= max_frames:
                break
    if not frames:
        raise UserError(f"{path}: no video frames")
    return np.stack(frames)
