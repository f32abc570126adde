"""Policy checkpoints: a folder with ``config.json`` and ``model.safetensors``.

The JSON holds the policy type, its config, the dataset's shape meta and free-form
training info; the safetensors file holds every parameter and buffer, the normalizer's
statistics included. Loading needs no pickle and no code from the training run.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mixpolicy import __version__
from mixpolicy.config import to_dict
from mixpolicy.errors import UserError
from mixpolicy.policies.config import policy_config_from_dict
from mixpolicy.utils import replace_path

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_FORMAT = 1


def save_policy(policy, path: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint folder atomically (temporary folder, then rename)."""
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
        replace_path(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file() or not (path / WEIGHTS_FILE).is_file():
        raise UserError(f"not a mixpolicy checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE}): {path}")
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"checkpoint config is not valid JSON: {cfg_file} ({exc})") from None
    if int(meta.get("format", 0)) > CHECKPOINT_FORMAT:
        raise UserError(f"checkpoint format {meta.get('format')} is newer than this mixpolicy reads")
    return meta


# Weights saved before the policy was composed of parts held the horizon gate at the top level.
LEGACY_PREFIXES = {"gate.": "head.gate.", "gate_noise.": "head.gate_noise."}


def upgrade_legacy_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of the earlier layout with its keys renamed to the parts layout."""
    out = {}
    for k, v in state.items():
        for old, new in LEGACY_PREFIXES.items():
            if k.startswith(old):
                k = new + k[len(old) :]
                break
        out[k] = v
    return out


def load_policy(path: str | Path, expected_type: str | None = None, device: str | torch.device = "cpu"):
    """Rebuild the policy saved at ``path``; ``expected_type`` guards against mix-ups."""
    from mixpolicy.policies.denoising_policy import DenoisingPolicy, ShapeMeta

    meta = read_checkpoint_meta(path)
    kind = meta.get("policy_type")
    if expected_type is not None and kind != expected_type:
        raise UserError(f"checkpoint {path} holds a {kind!r} policy, expected {expected_type!r}")
    cfg = policy_config_from_dict(meta["policy"])
    policy = DenoisingPolicy(cfg, ShapeMeta.from_json(meta["shape_meta"]))
    try:
        state = load_file(str(Path(path) / WEIGHTS_FILE))
    except Exception as exc:
        raise UserError(f"cannot read checkpoint weights {Path(path) / WEIGHTS_FILE}: {exc}") from None
    state = upgrade_legacy_state(state)
    try:
        policy.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"checkpoint weights do not fit its config ({first})") from None
    policy.eval()
    return policy.to(device), meta
