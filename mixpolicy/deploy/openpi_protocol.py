"""openpi's websocket policy protocol, as a mode of ``mixpolicy serve`` (``protocol=openpi``).

What an openpi robot client (``openpi_client.websocket_client_policy.WebsocketClientPolicy``
and the runtimes built on it) expects, and what this module answers:

* on connect the server sends one msgpack map, its metadata (here: the policy's shapes,
  horizon, action range and accepted prompts);
* each request is one msgpack map of observations plus an optional ``"prompt"`` string;
  arrays travel as ``{b"__ndarray__": True, b"data": bytes, b"dtype": str, b"shape": [...]}``;
* the reply is a map with ``"actions"``, the chunk of shape (horizon, action_dim), plus
  ``policy_timing``/``server_timing`` (milliseconds) and mixpolicy's ``steps``/``warm``/
  ``executable`` scalars (openpi's chunk broker slices arrays only, so scalars pass);
* an error is a text frame: the client raises it as ``RuntimeError``; the connection stays
  open for the next request, as in the native protocol;
* the shared token arrives as ``Authorization: Api-Key <token>`` (``Bearer`` is accepted too).

Decoding keeps the native protocol's guarantees: only numeric/bool dtypes, checked shapes
and byte counts, every msgpack length limit set, no extension types, no pickle.

Mapping (``openpi.*`` in ``configs/serve.yaml``):
  * ``obs_map: {openpi key: policy key}``; a policy key not named there is read from the
    key of the same name; ``a/b`` also finds a nested ``{"a": {"b": ...}}``. Images are uint8
    HWC, as the policy takes them, or CHW (transposed here). A frame (the policy's per-step
    shape) is repeated over ``n_obs_steps``; a client may send the whole history instead.
  * the prompt: ``prompt_to_task: {prompt: task}``, else a prompt equal to a task name or its
    description (whitespace and case ignored). A policy without tasks ignores the prompt; a
    single-task policy takes a request without one.

RTI's shift: openpi clients send none. A call within ``reset_after_s`` of the previous
reply, with the same task, warm-starts from the previous chunk shifted by ``shift``
actions (0: the policy's ``n_action_steps``, what openpi's ``ActionChunkBroker`` with
``action_horizon=n_action_steps`` executes between calls). The first call of a connection,
a changed task, or a longer pause (a new episode, a stalled robot) denoises fully.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import msgpack
import numpy as np

from mixpolicy.config import check
from mixpolicy.deploy import wire
from mixpolicy.deploy.backend import PolicySpec
from mixpolicy.deploy.local import LocalPolicy
from mixpolicy.deploy.wire import ALLOWED_KINDS, WireError, decode_array
from mixpolicy.errors import UserError

PROTOCOLS = ("native", "openpi")  # `mixpolicy serve protocol=`
PROMPT_KEY = "prompt"
_ND, _GENERIC = "__ndarray__", "__npgeneric__"  # openpi-client sends these (and the fields) as bytes keys


@dataclass
class OpenpiConfig:
    """``protocol=openpi``: how openpi requests map onto the policy's inputs."""

    obs_map: dict[str, str] = field(default_factory=dict)  # openpi observation key -> policy obs key
    prompt_to_task: dict[str, str] = field(default_factory=dict)  # prompt -> task name
    shift: int = 0  # actions the client executes between calls, RTI's shift (0: the policy's n_action_steps)
    reset_after_s: float = 1.0  # a call later than this after the previous reply denoises fully (0: never)

    def __post_init__(self):
        for name, d in (("obs_map", self.obs_map), ("prompt_to_task", self.prompt_to_task)):
            check(all(isinstance(k, str) and isinstance(v, str) for k, v in d.items()), f"openpi.{name}", "must map strings to strings")
        check(PROMPT_KEY not in self.obs_map, "openpi.obs_map", f"'{PROMPT_KEY}' is the prompt, not an observation")
        check(self.shift >= 0, "openpi.shift", "must be >= 0 (0: the policy's n_action_steps)")
        check(self.reset_after_s >= 0, "openpi.reset_after_s", "must be >= 0 (0: never)")


def _normal(text: str) -> str:
    return " ".join(text.split()).casefold()


def _get(d: Mapping, name: str) -> Any:
    return d[name.encode()] if name.encode() in d else d.get(name)


def _lookup(msg: Mapping[str, Any], name: str) -> Any:
    """``msg[name]``, or for ``a/b`` a nested ``msg["a"]["b"]`` (openpi's ALOHA clients nest images)."""
    if name in msg:
        return msg[name]
    node: Any = msg
    for part in name.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _object_hook(d: dict) -> Any:
    if _ND.encode() in d or _ND in d:
        if _get(d, _ND) is not True:
            raise WireError(f"malformed array: {_ND} must be true")
        return decode_array(_get(d, "dtype"), _get(d, "shape"), _get(d, "data"))
    if _GENERIC.encode() in d or _GENERIC in d:  # a numpy scalar
        dtype, value = _get(d, "dtype"), _get(d, "data")
        if not isinstance(dtype, str) or not isinstance(value, (bool, int, float)):
            raise WireError("malformed numpy scalar: needs dtype (str) and data (a number)")
        try:
            kind = np.dtype(dtype).kind
        except (TypeError, ValueError):
            raise WireError(f"malformed numpy scalar: unknown dtype {dtype!r:.40}") from None
        if kind not in ALLOWED_KINDS:
            raise WireError(f"numpy scalar dtype {dtype!r:.40} is not allowed")
        return value
    return d


# openpi's layout: bytes keys, ``__ndarray__`` marker
_default = wire.array_encoder(b"__ndarray__", str.encode)


def packb(obj: Any) -> bytes:
    """openpi's encoding: arrays as ``__ndarray__`` maps with bytes keys."""
    return msgpack.packb(obj, default=_default, use_bin_type=True)


def unpackb(data: bytes, max_bytes: int | None = None) -> Any:
    """Decode an openpi message (``__ndarray__`` maps, str or bytes keys) under the native limits."""
    return wire.unpackb(data, max_bytes, object_hook=_object_hook)


class OpenpiProtocol:
    """The openpi mapping, checked once against the policy; ``open`` starts one connection's session."""

    def __init__(self, cfg: OpenpiConfig, spec: PolicySpec):
        self.cfg = cfg
        self.spec = spec
        unknown = sorted(set(cfg.obs_map.values()) - set(spec.obs_keys))
        if unknown:
            raise UserError(f"openpi.obs_map names {unknown}, which are not observations of this policy ({spec.obs_keys})")
        self.sources = {k: k for k in spec.obs_keys}  # policy key -> openpi key
        for openpi_key, policy_key in cfg.obs_map.items():
            if self.sources[policy_key] != policy_key:
                raise UserError(f"openpi.obs_map maps two keys onto {policy_key!r}")
            self.sources[policy_key] = openpi_key
        tasks = spec.tasks
        bad = sorted(t for t in cfg.prompt_to_task.values() if t not in tasks)
        if bad:
            raise UserError(f"openpi.prompt_to_task names tasks {bad}, not ones this policy was trained on ({', '.join(tasks) or 'none'})")
        descriptions = spec.extra.get("shape_meta", {}).get("task_descriptions", {})
        self.prompts: dict[str, int] = {}  # normalized prompt -> task index; explicit entries win
        for i, task in enumerate(tasks):
            for text in (descriptions.get(task), task):
                if text:
                    self.prompts[_normal(text)] = i
        for prompt, task in cfg.prompt_to_task.items():
            self.prompts[_normal(prompt)] = tasks.index(task)
        self.shift = cfg.shift or spec.n_action_steps

    def task_of(self, prompt: Any) -> int:
        if not self.spec.tasks:
            return 0
        if prompt is None:
            if len(self.spec.tasks) == 1:
                return 0
            raise UserError(f"the request needs a '{PROMPT_KEY}': this policy has {len(self.spec.tasks)} tasks")
        if not isinstance(prompt, str):
            raise UserError(f"'{PROMPT_KEY}' must be a string, got {type(prompt).__name__}")
        task = self.prompts.get(_normal(prompt))
        if task is None:
            raise UserError(
                f"prompt {prompt[:80]!r} names no task of this policy ({', '.join(self.spec.tasks)}); "
                "send a task name or description, or map it with openpi.prompt_to_task"
            )
        return task

    def open(self, ws: Any, client: LocalPolicy) -> "OpenpiSession":
        """The session of a new connection; sends the metadata that openpi clients wait for on connect."""
        session = OpenpiSession(self, client)
        ws.send(session.metadata())
        return session


class OpenpiSession:
    """One openpi connection: its own warm-start state (the client's) and the shift rule."""

    def __init__(self, protocol: OpenpiProtocol, client: LocalPolicy):
        self.protocol = protocol
        self.client = client
        self.last_task: int | None = None
        self.last_reply = 0.0  # monotonic time of the previous reply

    def metadata(self) -> bytes:
        spec, p = self.client.spec, self.protocol
        observations = {
            p.sources[k]: {"shape": list(shape[1:]), "dtype": [d.str for d in dtypes]}
            for k, (shape, dtypes) in self.client.obs_schema.items()
        }
        return packb({
            "server": "mixpolicy", "protocol": "openpi", "policy_type": spec.policy_type,
            "observations": observations, "n_obs_steps": spec.n_obs_steps,
            "action_horizon": spec.horizon, "action_dim": spec.action_dim, "n_action_steps": spec.n_action_steps,
            "action_low": spec.action_low, "action_high": spec.action_high, "tasks": spec.tasks,
            "prompts": sorted(p.cfg.prompt_to_task), "shift": p.shift, "reset_after_s": p.cfg.reset_after_s,
        })  # fmt: skip

    def observations(self, msg: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The policy's observation history from the request's keys (each checked under its openpi name)."""
        out = {}
        for key, (shape, dtypes) in self.client.obs_schema.items():
            name = self.protocol.sources[key]
            x = _lookup(msg, name)
            if x is None:
                raise UserError(f"observation lacks key {name!r} (this server needs {sorted(self.protocol.sources.values())})")
            if not isinstance(x, np.ndarray):
                raise UserError(f"{name!r} must be an array, got {type(x).__name__}")
            frame = shape[1:]
            if len(frame) == 3 and x.ndim in (3, 4) and x.shape[-3:] == (frame[2], frame[0], frame[1]) != frame:
                x = np.moveaxis(x, -3, -1)  # a channel-first image (openpi's ALOHA runtime sends CHW)
            if x.shape == frame:
                x = np.broadcast_to(x, shape)  # one frame: repeated over the history
            elif x.shape != shape:
                raise UserError(f"{name!r} has shape {x.shape}, the policy needs {shape[1:]} (or a history {shape})")
            if x.dtype not in dtypes:
                raise UserError(f"{name!r} has dtype {x.dtype.str}, the policy takes {' or '.join(d.str for d in dtypes)}")
            out[key] = x
        return out

    def answer(self, data: Any, max_bytes: int | None = None) -> bytes:
        if not isinstance(data, bytes):
            raise WireError("expected a binary msgpack message")
        msg = unpackb(data, max_bytes)
        if not isinstance(msg, dict) or not all(isinstance(k, str) for k in msg):
            raise WireError("a request is a map of observations with string keys")
        task = self.protocol.task_of(msg.get(PROMPT_KEY))
        obs = self.observations(msg)
        t0 = time.monotonic()
        stale = self.protocol.cfg.reset_after_s > 0 and t0 - self.last_reply > self.protocol.cfg.reset_after_s
        shift = None if self.last_task != task or stale else self.protocol.shift
        res = self.client.infer(obs, task, shift)
        self.last_task = task
        reply = packb({
            "actions": res.actions,
            "policy_timing": {"infer_ms": res.compute_ms},
            "server_timing": {"infer_ms": 1e3 * (time.monotonic() - t0)},
            "steps": res.steps, "warm": res.warm, "executable": res.executable,
        })  # fmt: skip
        self.last_reply = time.monotonic()
        return reply

