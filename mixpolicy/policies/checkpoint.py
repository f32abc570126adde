"""Policy checkpoints: a folder with ``config.json`` and ``model.safetensors``.

The JSON holds the policy type, its config, the dataset's shape meta and free-form
training info; the safetensors file holds every parameter and buffer, the normalizer's
statistics included. Loading needs no pickle and no code from the training run.

A checkpoint is untrusted input. Before any real memory is allocated, loading checks that
``policy_type`` matches the config's type, that no config number is absurd, and that the
network the config describes (built first on PyTorch's ``meta`` device, which allocates
nothing, with a bound on how many tensors it may register) has exactly the tensor names
and shapes in the safetensors header. Every normalizer scale and offset read must be
finite and every scale nonzero before the real network is built. Saving flushes the files to disk before the
folder is renamed into place.

The ``pretrained_model/`` folder of mixpolicy's LeRobot plugin loads too: its LeRobot
``config.json`` maps to the same meta (:mod:`mixpolicy.policies.lerobot_layout`) and its
weights pass the same checks.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mixpolicy import __version__
from mixpolicy.config import to_dict
from mixpolicy.errors import UserError
from mixpolicy.policies import lerobot_layout
from mixpolicy.policies.config import policy_config_from_dict, policy_kind
from mixpolicy.utils import fsync_tree, replace_path

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_FORMAT = 1
MAX_CONFIG_BYTES = 16 << 20
# No config number of a real policy comes near this; a crafted one could make a scheduler
# or a table allocate without bound before any weight is read.
MAX_CONFIG_INT = 1 << 20


def save_policy(policy, path: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint folder atomically (temporary folder, flushed, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE))
        meta = {
            "format": CHECKPOINT_FORMAT,
            "mixpolicy_version": __version__,
            "policy_type": policy.cfg.type,
            "policy": to_dict(policy.cfg),
            "shape_meta": policy.shape_meta.to_json(),
            "info": info or {},
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        fsync_tree(tmp)
        replace_path(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _inside(path: Path, name: str) -> Path:
    """``path/name``, refused when it is a link leading out of the checkpoint folder."""
    f = path / name
    if f.is_symlink() and path.resolve() not in f.resolve().parents:
        raise UserError(f"checkpoint file {f} links to {os.readlink(f)}, outside the checkpoint folder; refusing it")
    return f


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    cfg_file, weights = _inside(path, CONFIG_FILE), _inside(path, WEIGHTS_FILE)
    if not cfg_file.is_file() or not weights.is_file():
        raise UserError(f"not a mixpolicy checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE}): {path}")
    if cfg_file.stat().st_size > MAX_CONFIG_BYTES:
        raise UserError(f"checkpoint config {cfg_file} is over {MAX_CONFIG_BYTES >> 20} MiB; not a mixpolicy checkpoint")
    try:
        meta = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"checkpoint config is not valid JSON: {cfg_file} ({exc})") from None
    if isinstance(meta, dict) and lerobot_layout.is_lerobot_config(meta):  # the LeRobot plugin's pretrained_model/
        meta = lerobot_layout.checkpoint_meta(meta, path)
    if not isinstance(meta, dict) or not isinstance(meta.get("policy"), dict) or not isinstance(meta.get("shape_meta"), dict):
        raise UserError(f"checkpoint config {cfg_file} lacks the 'policy' and 'shape_meta' objects")
    try:
        fmt = int(meta.get("format", 0))
    except (TypeError, ValueError):
        raise UserError(f"checkpoint config {cfg_file}: 'format' is not a number") from None
    if fmt > CHECKPOINT_FORMAT:
        raise UserError(f"checkpoint format {meta.get('format')} is newer than this mixpolicy reads")
    kind, declared = meta.get("policy_type"), policy_kind(meta["policy"])
    if kind != declared:
        raise UserError(f"checkpoint {path}: policy_type {kind!r} differs from its config's type {declared!r}")
    _check_numbers(meta["policy"], "policy")
    _check_numbers(meta["shape_meta"], "shape_meta")
    return meta


# Weights saved before the policy was composed of parts held the horizon gate at the top level.
LEGACY_PREFIXES = {"gate.": "head.gate.", "gate_noise.": "head.gate_noise."}


def _stored_layout(state: dict[str, Any], meta: dict[str, Any], where: Path) -> dict[str, Any]:
    """A state dict (or header) in the parts layout, whichever layout the checkpoint was saved in."""
    if meta.get("info", {}).get("layout") == lerobot_layout.LAYOUT:
        return lerobot_layout.unwrap_state(state, where)
    return upgrade_legacy_state(state)


def upgrade_legacy_state(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict (or header) of the earlier layout with its keys renamed to the parts layout."""
    out = {}
    for k, v in state.items():
        for old, new in LEGACY_PREFIXES.items():
            if k.startswith(old):
                k = new + k[len(old) :]
                break
        out[k] = v
    return out


def _check_numbers(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _check_numbers(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_numbers(v, f"{where}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"checkpoint config {where} is {value}; not a usable checkpoint")
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_CONFIG_INT:
        raise UserError(f"checkpoint config {where} = {value} is beyond any real policy (limit {MAX_CONFIG_INT}); refusing to build it")


def _weights_header(weights: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from the safetensors header alone (no tensor is read)."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise UserError(f"cannot read checkpoint weights {weights}: {exc}") from None


def _build_on_meta(cfg, shape_meta, max_tensors: int) -> torch.nn.Module:
    """The policy on the meta device; refused once it registers more than ``max_tensors`` tensors."""
    from torch.nn.modules.module import register_module_buffer_registration_hook, register_module_parameter_registration_hook

    count = 0

    def counted(module, name, tensor):
        nonlocal count
        count += 1
        if count > max_tensors:
            raise UserError(
                f"checkpoint config describes a network of more than {max_tensors} tensors "
                "but the weights file holds far fewer; refusing to build it"
            )

    hooks = [register_module_parameter_registration_hook(counted), register_module_buffer_registration_hook(counted)]
    try:
        from mixpolicy.policies.denoising_policy import DenoisingPolicy

        with torch.device("meta"):
            return DenoisingPolicy(cfg, shape_meta)
    finally:
        for h in hooks:
            h.remove()


def _check_shapes(path: Path, expected: dict[str, list[int]], stored: dict[str, list[int]]) -> None:
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    if missing or extra:
        names = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise UserError(f"checkpoint weights do not fit its config ({names} tensors in {path / WEIGHTS_FILE})")
    for name, shape in expected.items():
        if stored[name] != shape:
            raise UserError(
                f"checkpoint weights do not fit its config: {name} has shape {stored[name]} in {WEIGHTS_FILE}, "
                f"the config implies {shape}"
            )


def _check_normalizers(state: dict[str, torch.Tensor], path: Path) -> None:
    """Every normalizer scale finite and nonzero, every offset finite (by tensor name: ``...normalizer...<key>.scale``)."""
    for name, value in state.items():
        if "normalizer" not in name or not name.endswith((".scale", ".offset")):
            continue
        stem, what = name.rsplit(".", 1)
        key = stem.split("params.", 1)[-1]
        if not torch.isfinite(value).all():
            raise UserError(f"checkpoint {path}: normalizer {key!r} has a NaN or infinite {what}")
        if what == "scale" and (value.abs() < torch.finfo(torch.float32).tiny).any():
            raise UserError(f"checkpoint {path}: normalizer {key!r} has a zero scale (unnormalizing would divide by it)")


def load_policy(path: str | Path, expected_type: str | None = None, device: str | torch.device = "cpu"):
    """Rebuild the policy saved at ``path``; ``expected_type`` guards against mix-ups."""
    from mixpolicy.policies.denoising_policy import DenoisingPolicy, ShapeMeta

    path = Path(path)
    meta = read_checkpoint_meta(path)
    kind = meta.get("policy_type")
    if expected_type is not None and kind != expected_type:
        raise UserError(f"checkpoint {path} holds a {kind!r} policy, expected {expected_type!r}")
    cfg = policy_config_from_dict(meta["policy"])
    try:
        shape_meta = ShapeMeta.from_json(meta["shape_meta"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"checkpoint {path}: shape_meta is malformed ({type(exc).__name__}: {exc})") from None
    stored = _stored_layout(_weights_header(path / WEIGHTS_FILE), meta, path / WEIGHTS_FILE)
    probe = _build_on_meta(cfg, shape_meta, max_tensors=2 * len(stored) + 64)
    _check_shapes(path, {k: list(v.shape) for k, v in probe.state_dict().items()}, stored)
    del probe
    try:
        state = load_file(str(path / WEIGHTS_FILE))
    except Exception as exc:
        raise UserError(f"cannot read checkpoint weights {path / WEIGHTS_FILE}: {exc}") from None
    state = _stored_layout(state, meta, path / WEIGHTS_FILE)
    _check_normalizers(state, path)
    policy = DenoisingPolicy(cfg, shape_meta)
    try:
        policy.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"checkpoint weights do not fit its config ({first})") from None
    policy.eval()
    return policy.to(device), meta
