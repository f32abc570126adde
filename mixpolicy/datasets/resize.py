"""Resizing camera frames to a declared size (``mixpolicy data convert ... resize=[H,W]``).

Aspect ratio: the frame is scaled (keeping its aspect) until it covers H x W, then the
centre H x W is cut out: nothing is stretched and no borders are added; when the aspect
differs, the longer side loses equal margins on both ends. Downscaling uses OpenCV's
area interpolation (no aliasing), upscaling bilinear.
"""

from __future__ import annotations

import numpy as np

from mixpolicy.config import check
from mixpolicy.datasets.store_meta import KeySpec, is_image_spec

MIN_SIDE = 8


def check_size(size: list[int], field: str) -> tuple[int, int] | None:
    """``size`` as (H, W), or None when empty (no resizing)."""
    if not size:
        return None
    check(len(size) == 2 and all(int(s) >= MIN_SIDE for s in size), field, f"must be [height, width] with sides >= {MIN_SIDE}, got {list(size)}")
    return int(size[0]), int(size[1])


def cover_size(h: int, w: int, target: tuple[int, int]) -> tuple[int, int]:
    """The (H', W') a (h, w) frame is scaled to before the centre crop: the smallest covering ``target``."""
    th, tw = target
    scale = max(th / h, tw / w)
    return max(th, round(h * scale)), max(tw, round(w * scale))


def resize_frames(frames: np.ndarray, target: tuple[int, int]) -> np.ndarray:
    """(T, h, w, C) uint8 frames -> (T, H, W, C): scaled to cover ``target`` and centre-cropped."""
    import cv2

    t, h, w = frames.shape[:3]
    th, tw = target
    if (h, w) == (th, tw):
        return frames
    rh, rw = cover_size(h, w, target)
    interp = cv2.INTER_AREA if rh <= h and rw <= w else cv2.INTER_LINEAR
    top, left = (rh - th) // 2, (rw - tw) // 2
    out = np.empty((t, th, tw, frames.shape[3]), frames.dtype)
    for i, f in enumerate(frames):
        scaled = cv2.resize(f, (rw, rh), interpolation=interp)
        out[i] = scaled.reshape(rh, rw, -1)[top : top + th, left : left + tw]
    return out


def resize_frame(frame: np.ndarray, target: tuple[int, int] | None) -> np.ndarray:
    """One (h, w, C) frame as :func:`resize_frames` treats it; unchanged when ``target`` is None."""
    return frame if target is None else resize_frames(frame[None], target)[0]


def resized_specs(specs: dict, target: tuple[int, int] | None) -> dict:
    """Store key -> KeySpec with the uint8 camera keys at ``target`` (H, W); others unchanged."""
    if target is None:
        return dict(specs)
    return {k: KeySpec((*target, s.shape[2]), "uint8") if is_image_spec(s.shape, s.dtype) and s.dtype == "uint8" else s for k, s in specs.items()}


def resize_note(target: tuple[int, int] | None) -> str:
    """What a store's ``source`` says about resized frames."""
    return f"; frames resized to {target[0]}x{target[1]} (cover, centre crop)" if target else ""
