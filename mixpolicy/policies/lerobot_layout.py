"""LeRobot's ``pretrained_model/`` layout, as mixpolicy's LeRobot policy plugin writes it.

The plugin (``plugins/lerobot_policy_mixpolicy``) trains under ``lerobot-train`` and saves
LeRobot's layout: ``config.json`` with ``"type": "mixpolicy"``, LeRobot's feature
declarations and the plugin's fields; ``model.safetensors`` with the wrapped
DenoisingPolicy's tensors under ``model.`` (its normalizer included); LeRobot's processor
files. This module maps that config to mixpolicy's checkpoint meta (a policy config and a
shape meta), so :func:`mixpolicy.policies.checkpoint.load_policy` builds and checks such a
folder as any mixpolicy checkpoint. It imports nothing of LeRobot; the plugin builds its
policy with the same functions, so training and loading share one mapping.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

from mixpolicy.datasets.lerobot_common import to_store_key
from mixpolicy.errors import UserError
from mixpolicy.keys import camera_key
from mixpolicy.policies.config import policy_kind

POLICY_TYPE = "mixpolicy"  # the name the plugin registers with LeRobot (--policy.type=mixpolicy)
LAYOUT = "lerobot"  # info.layout of the meta this module returns
WEIGHTS_PREFIX = "model."  # the plugin holds the DenoisingPolicy as its ``model`` attribute
ACTION = "action"
OBS_TYPES = ("STATE", "ENV", "VISUAL")
# The plugin's fields this mapping reads (all in every config.json LeRobot writes for it).
FIELDS = (
    "n_obs_steps", "horizon", "n_action_steps", "network", "head", "objective", "width", "depth", "heads",
    "num_experts", "top_k", "horizons", "num_inference_steps", "task_conditioning", "tasks", "crop_size",
    "mixpolicy_overrides",
)


def is_lerobot_config(meta: Mapping[str, Any]) -> bool:
    """True for a LeRobot policy config (a ``type`` tag, no mixpolicy ``policy`` object)."""
    return isinstance(meta.get("type"), str) and "policy" not in meta


def obs_key(name: str, feature_type: str) -> str:
    """The mixpolicy observation key of a LeRobot input feature: cameras become ``image_<name>``."""
    if feature_type == "VISUAL":
        rest = name[len("observation.") :] if name.startswith("observation.") else name
        rest = rest[len("images.") :] if rest.startswith("images.") else rest
        return camera_key(rest.replace(".", "_"))
    return to_store_key(name)


def _features(raw: Any, what: str) -> dict[str, tuple[str, list[int]]]:
    if not isinstance(raw, Mapping):
        raise UserError(f"LeRobot config: {what} is not an object of features")
    out = {}
    for name, ft in raw.items():
        try:
            out[str(name)] = (str(ft["type"]), [int(s) for s in ft["shape"]])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"LeRobot config: {what}.{name} needs a 'type' and an integer 'shape'") from None
    return out


def _merge(base: dict, extra: Mapping) -> dict:
    for k, v in extra.items():
        base[k] = _merge(dict(base.get(k) or {}), v) if isinstance(v, Mapping) and isinstance(base.get(k), Mapping) else v
    return base


def obs_layout(fields: Mapping[str, Any]) -> dict[str, tuple[str, list[int]]]:
    """mixpolicy observation key -> (LeRobot feature name, mixpolicy shape), in input order.

    LeRobot declares cameras channel-first (C, H, W); mixpolicy takes (H, W, 3).
    """
    layout = {}
    for name, (ftype, shape) in _features(fields.get("input_features"), "input_features").items():
        if ftype not in OBS_TYPES:
            continue
        if ftype == "VISUAL":
            if len(shape) != 3 or shape[0] != 3:
                raise UserError(f"LeRobot config: camera {name} has shape {shape}; mixpolicy takes RGB (3, H, W) cameras")
            shape = [shape[1], shape[2], 3]
        elif len(shape) != 1:
            raise UserError(f"LeRobot config: {name} has shape {shape}; mixpolicy takes flat (D,) state features")
        key = obs_key(name, ftype)
        if key in layout:
            raise UserError(f"LeRobot config: {name} and {layout[key][0]} both map to the observation key {key!r}")
        layout[key] = (name, shape)
    if not layout:
        raise UserError("LeRobot config: input_features hold no state, environment or camera feature")
    return layout


def action_dim(fields: Mapping[str, Any]) -> int:
    outputs = _features(fields.get("output_features"), "output_features")
    if ACTION not in outputs or len(outputs[ACTION][1]) != 1:
        raise UserError(f"LeRobot config: output_features needs a flat {ACTION!r} feature (got {sorted(outputs)})")
    return outputs[ACTION][1][0]


def policy_dict(fields: Mapping[str, Any], obs_keys: list[str] | None = None) -> dict[str, Any]:
    """The mixpolicy policy config (as a dict) that the plugin's fields describe.

    ``obs_keys`` stands in for the keys of ``input_features`` (to validate the parts before
    LeRobot has declared the features)."""
    missing = [f for f in FIELDS if f not in fields]
    if missing:
        raise UserError(f"LeRobot config of type {POLICY_TYPE!r} lacks the fields {missing}")
    network = {"type": fields["network"], "width": fields["width"], "depth": fields["depth"], "heads": fields["heads"]}
    if fields["network"] == "mode":
        network.update(num_experts=fields["num_experts"], top_k=fields["top_k"])
    head = {"type": fields["head"]}
    if fields["head"] == "moh":
        head["horizons"] = list(fields["horizons"])
    policy = {
        "obs_keys": list(obs_layout(fields)) if obs_keys is None else list(obs_keys),
        "action_key": ACTION,
        "n_obs_steps": fields["n_obs_steps"],
        "horizon": fields["horizon"],
        "n_action_steps": fields["n_action_steps"],
        "task_conditioning": fields["task_conditioning"],
        "image_encoder": {"crop_size": fields["crop_size"], "film": fields["task_conditioning"] != "none"},
        "network": network,
        "head": head,
        "objective": {"type": fields["objective"], "num_inference_steps": fields["num_inference_steps"]},
    }
    overrides = fields["mixpolicy_overrides"] or "{}"
    try:
        extra = json.loads(overrides) if isinstance(overrides, str) else overrides
    except json.JSONDecodeError as exc:
        raise UserError(f"mixpolicy_overrides is not valid JSON ({exc})") from None
    if not isinstance(extra, Mapping):
        raise UserError("mixpolicy_overrides must be a JSON object of mixpolicy policy fields")
    return _merge(copy.deepcopy(policy), extra)


def shape_meta_dict(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The mixpolicy shape meta (as :meth:`ShapeMeta.to_json` writes it) of the plugin's features."""
    tasks = fields.get("tasks") or []
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise UserError("LeRobot config: tasks must be a list of task strings")
    return {
        "obs": {k: shape for k, (_, shape) in obs_layout(fields).items()},
        "action_dim": action_dim(fields),
        "tasks": list(tasks),
    }


def checkpoint_meta(raw: Mapping[str, Any], where: object) -> dict[str, Any]:
    """A LeRobot ``config.json`` as mixpolicy checkpoint meta; refused unless it is the plugin's type."""
    if raw.get("type") != POLICY_TYPE:
        raise UserError(
            f"{where} is a LeRobot checkpoint of policy type {raw.get('type')!r}; mixpolicy loads the "
            f"{POLICY_TYPE!r} type of its LeRobot plugin only"
        )
    try:
        policy, shape_meta = policy_dict(raw), shape_meta_dict(raw)
    except (TypeError, ValueError, AttributeError) as exc:  # a field of the wrong kind (e.g. horizons not a list)
        raise UserError(f"{where}: LeRobot config of type {POLICY_TYPE!r} is malformed ({type(exc).__name__}: {exc})") from None
    return {
        "format": 1,
        "policy_type": policy_kind(policy),
        "policy": policy,
        "shape_meta": shape_meta,
        "info": {"layout": LAYOUT, "lerobot_type": POLICY_TYPE},
    }


def unwrap_state(state: Mapping[str, Any], where: object) -> dict[str, Any]:
    """The DenoisingPolicy's tensors (or header entries) out of the plugin's state dict."""
    outside = [k for k in state if not k.startswith(WEIGHTS_PREFIX)]
    if outside:
        raise UserError(f"checkpoint weights {where}: tensors {outside[:3]} lie outside the plugin's {WEIGHTS_PREFIX!r} model")
    return {k[len(WEIGHTS_PREFIX) :]: v for k, v in state.items()}
