"""Checkpoint folders of a training run, written atomically.

Layout under ``<run>/checkpoints/``::

    step_00001000/   policy checkpoint (EMA weights: config.json + model.safetensors),
                     training_state.safetensors + .json (everything resume needs),
                     eval.json when the step was evaluated
    last -> step_00001000      newest complete checkpoint (what resume=true reads)
    best -> step_00000800      highest evaluation success so far

A step folder is written under a hidden temporary name, flushed to disk, then renamed;
``last`` and ``best`` are relative symlinks replaced by rename. A process killed at any
moment therefore leaves ``last`` pointing at a complete checkpoint. Only the newest
``keep_last`` step folders are kept, plus whatever ``last`` and ``best`` point at.
Evaluation results live in ``<run>/eval/step_N/``, outside these folders, so pruning
never deletes them; a step folder keeps only its summary (``eval.json``) for ``best``.

The training state is the raw weights, the EMA weights, the optimizer moments and the
scheduler, as safetensors plus JSON (no pickle). Random streams need no saving: every
draw of a step derives from (seed, step, micro-batch), and the JSON records the sampler's
position and what an exact resume must match (seed, windows, batch size).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from mixpolicy.errors import UserError
from mixpolicy.utils import clean_temporaries, fsync_path, fsync_tree, replace_path, resolve_inside

STEP_DIR = re.compile(r"^step_(\d+)$")
EVAL_FILE = "eval.json"
TRAIN_STATE_FILE = "training_state.safetensors"
TRAIN_STATE_JSON = "training_state.json"
LAST = "last"
BEST = "best"


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CheckpointStore:
    def __init__(self, root: Path, keep_last: int):
        self.root = Path(root)
        self.keep_last = keep_last

    def step_dir(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir() and not p.is_symlink())

    def resolve(self, name: str) -> Path | None:
        """The folder ``last``/``best`` points at (a plain folder named so is accepted too); a
        link out of the run folder is an error."""
        return resolve_inside(self.root, name)

    def write(self, step: int, fill: Callable[[Path], None]) -> Path:
        """Create step ``step``'s folder through ``fill(tmp_path)`` (which creates tmp_path), then point ``last`` at it."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.step_dir(step)
        tmp = self.root / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            fill(tmp)
            os.chmod(tmp, 0o755)  # the policy writer's temporary folder is private
            fsync_tree(tmp)
            # (a step saved again after a resume replayed it has identical content)
            replace_path(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        fsync_path(self.root)
        self.link(LAST, final)
        self.prune()
        return final

    def link(self, name: str, target: Path) -> None:
        link = self.root / name
        tmp = self.root / f".{name}.tmp-{os.getpid()}"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(target.name, tmp)
        replace_path(tmp, link)  # a run written before step folders existed has a plain folder here
        fsync_path(self.root)

    def prune(self) -> None:
        keep = set(self.steps()[-self.keep_last :])
        for name in (LAST, BEST):
            target = self.resolve(name)
            if target is not None and (m := STEP_DIR.match(target.name)):
                keep.add(int(m.group(1)))
        for step in self.steps():
            if step not in keep:
                shutil.rmtree(self.step_dir(step), ignore_errors=True)

    def clean_temporaries(self) -> None:
        """Remove leftovers of writes interrupted by a crash (never the only copy of a step)."""
        if self.root.is_dir():
            clean_temporaries(self.root, (".tmp-", ".old-", f".{LAST}.tmp", f".{BEST}.tmp"))

    # ------------------------------------------------------------------ evaluation
    def record_eval(self, step: int, summary: dict[str, Any]) -> bool:
        """Store ``summary`` with the step's checkpoint; returns True when it became ``best``."""
        write_json_atomic(self.step_dir(step) / EVAL_FILE, summary)
        best = self.best_score()
        if best is None or summary["average_success"] > best:
            self.link(BEST, self.step_dir(step))
            self.prune()
            return True
        return False

    def best_score(self) -> float | None:
        best = self.resolve(BEST)
        if best is None or not (best / EVAL_FILE).is_file():
            return None
        return float(json.loads((best / EVAL_FILE).read_text())["average_success"])


# ---------------------------------------------------------------------- training state
def save_train_state(path: Path, policy, ema, optimizer, scheduler, info: dict[str, Any]) -> None:
    """Write the raw weights, EMA weights, optimizer and scheduler state into checkpoint folder ``path``."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}
    for i, p in enumerate(ema.shadow_params):
        tensors[f"ema.{i}"] = p.detach().cpu().contiguous()
    opt = optimizer.state_dict()
    for pid, st in opt["state"].items():
        for name, v in st.items():
            tensors[f"optim.{pid}.{name}"] = torch.as_tensor(v).detach().cpu().contiguous()
    state_json = {
        **info,
        "optimizer_param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]],
        "scheduler": scheduler.state_dict(),
        "ema_optimization_step": int(ema.optimization_step),
    }
    save_file(tensors, str(path / TRAIN_STATE_FILE))
    (path / TRAIN_STATE_JSON).write_text(json.dumps(state_json, indent=2))


def read_train_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, JSON) of the training state in checkpoint folder ``path``."""
    if not (path / TRAIN_STATE_FILE).is_file() or not (path / TRAIN_STATE_JSON).is_file():
        raise UserError(f"{path} holds no training state ({TRAIN_STATE_FILE}); it is not a training run's checkpoint")
    return load_file(str(path / TRAIN_STATE_FILE)), json.loads((path / TRAIN_STATE_JSON).read_text())


def raw_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The policy's raw (not averaged) state dict inside training-state tensors."""
    return {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}


def load_train_state(tensors: dict[str, torch.Tensor], state_json: dict[str, Any], policy, ema, optimizer, scheduler) -> int:
    """Restore what :func:`save_train_state` wrote; returns the step."""
    try:
        policy.load_state_dict(raw_weights(tensors), strict=True)
    except RuntimeError as exc:
        raise UserError(f"cannot resume: saved weights do not fit the config ({str(exc).splitlines()[0]})") from None
    for i, p in enumerate(ema.shadow_params):
        p.data.copy_(tensors[f"ema.{i}"])
    ema.optimization_step = state_json["ema_optimization_step"]
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = v
    groups = optimizer.state_dict()["param_groups"]
    for g, saved in zip(groups, state_json["optimizer_param_groups"]):
        g.update(saved)
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    scheduler.load_state_dict(state_json["scheduler"])
    return int(state_json["step"])
