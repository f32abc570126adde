"""msgpack wire format for the policy server: plain types plus numpy arrays, no pickle.

An array travels as a map ``{"__nd__": True, "dtype": "<f4", "shape": [...], "data": bytes}``;
only numeric and bool dtypes are accepted, so decoding never builds arbitrary objects.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
_ND = "__nd__"
_ALLOWED_KINDS = frozenset("biuf")  # bool, signed, unsigned, float


class WireError(ValueError):
    """A message that does not decode to the protocol's types."""


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _ALLOWED_KINDS:
            raise TypeError(f"arrays of dtype {obj.dtype} cannot be sent")
        arr = np.ascontiguousarray(obj)
        return {_ND: True, "dtype": arr.dtype.str, "shape": list(arr.shape), "data": arr.tobytes()}
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _object_hook(d: dict) -> Any:
    if d.get(_ND) is True:
        try:
            dtype = np.dtype(d["dtype"])
            shape = tuple(int(s) for s in d["shape"])
            if dtype.kind not in _ALLOWED_KINDS:
                raise WireError(f"array dtype {dtype} is not allowed")
            arr = np.frombuffer(d["data"], dtype=dtype)
            return arr.reshape(shape)
        except (KeyError, TypeError, ValueError) as exc:
            raise WireError(f"malformed array: {exc}") from None
    return d


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_default, use_bin_type=True)


def unpackb(data: bytes, max_bytes: int | None = None) -> Any:
    if max_bytes is not None and len(data) > max_bytes:
        raise WireError(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        return msgpack.unpackb(data, object_hook=_object_hook, raw=False, strict_map_key=True)
    except WireError:
        raise
    except Exception as exc:  # msgpack raises several types for garbage input
        raise WireError(f"not a msgpack message ({type(exc).__name__}: {exc})") from None
