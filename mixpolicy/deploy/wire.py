"""msgpack wire format for the policy server: plain types plus numpy arrays, no pickle.

An array travels as a map ``{"__nd__": True, "dtype": "<f4", "shape": [...], "data": bytes}``;
only numeric and bool dtypes are accepted, so decoding never builds arbitrary objects.
Decoding sets every msgpack length limit explicitly and refuses extension types, so a
message cannot make the decoder allocate more than the message itself.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable

import msgpack
import numpy as np

PROTOCOL_VERSION = 2  # 2: requests carry an "id" that the reply echoes
DEFAULT_TOKEN_ENV = "MIXPOLICY_POLICY_TOKEN"
READY_PREFIX = "mixpolicy serve: listening on "
_ND = "__nd__"
ALLOWED_KINDS = frozenset("biuf")  # bool, signed, unsigned, float
MAX_NDIM = 8
MAX_STR_LEN = 1 << 16  # keys, request types, error messages, task names
MAX_ARRAY_LEN = 1 << 16  # shapes, the spec's per-dim lists
MAX_MAP_LEN = 1 << 10  # observation keys, spec fields


class WireError(ValueError):
    """A message that does not decode to the protocol's types."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def array_encoder(marker: Any, key: Callable[[str], Any] = str) -> Callable[[Any], Any]:
    """msgpack ``default`` hook: numeric arrays as ``{marker: True, dtype, shape, data}`` maps
    (field names through ``key``), numpy scalars as Python numbers; anything else refused."""

    def default(obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            if obj.dtype.kind not in ALLOWED_KINDS:
                raise TypeError(f"arrays of dtype {obj.dtype} cannot be sent")
            arr = np.ascontiguousarray(obj)
            return {marker: True, key("dtype"): arr.dtype.str, key("shape"): list(arr.shape), key("data"): arr.tobytes()}
        if isinstance(obj, np.generic):
            return obj.item()
        raise TypeError(f"cannot encode {type(obj).__name__}")

    return default


_default = array_encoder(_ND)


def decode_array(dtype_str: Any, shape: Any, data: Any) -> np.ndarray:
    """A read-only array from its wire fields, checked: numeric/bool dtype, at most MAX_NDIM sizes, exact byte count."""
    if not isinstance(dtype_str, str) or not isinstance(shape, list) or not isinstance(data, bytes):
        raise WireError("malformed array: needs dtype (str), shape (list) and data (bytes)")
    if len(shape) > MAX_NDIM or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise WireError(f"malformed array: shape {shape!r} is not a list of at most {MAX_NDIM} sizes >= 0")
    try:
        dtype = np.dtype(dtype_str)
    except (TypeError, ValueError):
        raise WireError(f"malformed array: unknown dtype {dtype_str!r}") from None
    if dtype.kind not in ALLOWED_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise WireError(f"array dtype {dtype_str!r} is not allowed")
    if int(np.prod(shape, dtype=np.float64)) * dtype.itemsize != len(data):
        raise WireError(f"malformed array: {len(data)} bytes do not hold shape {shape} of {dtype_str}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _object_hook(d: dict) -> Any:
    if _ND in d:
        if d[_ND] is not True:
            raise WireError(f"malformed array: {_ND} must be true")
        return decode_array(d.get("dtype"), d.get("shape"), d.get("data"))
    return d


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_default, use_bin_type=True)


def unpackb(data: bytes, max_bytes: int | None = None, object_hook: Callable[[dict], Any] = _object_hook) -> Any:
    """Decode one message with every msgpack limit set; ``object_hook`` turns array maps into arrays."""
    if max_bytes is not None and len(data) > max_bytes:
        raise WireError(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        return msgpack.unpackb(
            data,
            object_hook=object_hook,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_STR_LEN,
            max_bin_len=len(data),
            max_array_len=MAX_ARRAY_LEN,
            max_map_len=MAX_MAP_LEN,
            max_ext_len=0,  # no extension types (timestamps included)
        )
    except WireError:
        raise
    except Exception as exc:  # msgpack raises several types for garbage input
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise WireError(f"not a msgpack message ({detail})") from None
