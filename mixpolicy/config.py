"""Validated config dataclasses built from plain dicts (hydra/OmegaConf output or JSON).

Every config is a dataclass whose ``__post_init__`` checks its values and raises
:class:`ConfigError` naming the field. :func:`from_dict` builds one from a mapping,
rejecting unknown keys and converting nested dataclasses and lists.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping, TypeVar

from mixpolicy.errors import UserError

T = TypeVar("T")


class ConfigError(UserError):
    """A config value is missing, unknown or out of range; the message names the field."""


def check(cond: bool, field: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"config field '{field}': {message}")


# Config parts chosen by a ``type`` field: base dataclass -> {type name: dataclass}.
# A field annotated with a base class is built as the variant its ``type`` names.
VARIANTS: dict[type, dict[str, type]] = {}


def register_variant(base: type, name: str, cls: type) -> None:
    """Make ``cls`` the config dataclass of ``type: name`` wherever ``base`` is expected."""
    VARIANTS.setdefault(base, {})[name] = cls


def variant_class(base: type, data: Mapping[str, Any], path: str) -> type:
    choices = VARIANTS[base]
    name = data.get("type", base.type if isinstance(getattr(base, "type", None), str) else None)
    if name not in choices:
        raise ConfigError(f"config field '{path}.type': unknown {path.rsplit('.', 1)[-1]} type {name!r}; choose from {sorted(choices)}")
    return choices[name]


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        if origin in (typing.Union, types.UnionType) and type(None) in args:
            return None
        if tp is Any:
            return None
        raise ConfigError(f"config field '{path}': must not be null")
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        for alt in non_none[:-1]:  # e.g. int | str: "auto" is not an integer, so it is taken as a string
            try:
                return _convert(alt, value, path)
            except ConfigError:
                pass
        return _convert(non_none[-1], value, path)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"config field '{path}': expected a mapping, got {value!r}")
        if tp in VARIANTS:
            tp = variant_class(tp, value, path)
        return from_dict(tp, value, prefix=path + ".")
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise ConfigError(f"config field '{path}': expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config field '{path}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config field '{path}': expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config field '{path}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config field '{path}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"config field '{path}': expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: Mapping[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad types raise ConfigError."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} "
            + ", ".join(f"'{prefix}{k}'" for k in unknown)
            + f" (valid: {', '.join(sorted(names))})"
        )
    kwargs = {k: _convert(hints[k], v, prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from None


def to_dict(cfg: Any) -> dict:
    """Plain JSON-able dict of a config dataclass (tuples become lists)."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)
