"""How observation keys are named, in stores, policies, environments and robots.

Cameras are ``image_<camera>`` (uint8 ``(H, W, 3)`` frames); every other observation key
is low-dim. These helpers are the one place that convention is spelled out.
"""

from __future__ import annotations

IMAGE_PREFIX = "image_"


def is_image_key(key: str) -> bool:
    """True for a camera key (``image_<camera>``)."""
    return key.startswith(IMAGE_PREFIX)


def camera_key(camera: str) -> str:
    """The observation key of ``camera``."""
    return IMAGE_PREFIX + camera


def camera_name(key: str) -> str:
    """The camera a camera key names (``image_front`` -> ``front``)."""
    if not is_image_key(key):
        raise ValueError(f"{key!r} is not a camera key ({IMAGE_PREFIX}<camera>)")
    return key[len(IMAGE_PREFIX) :]
