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
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from mixpolicy.utils import replace_path

STEP_DIR = re.compile(r"^step_(\d+)$")
EVAL_FILE = "eval.json"
LAST = "last"
BEST = "best"


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        """The folder ``last``/``best`` points at (a plain folder named so is accepted too)."""
        link = self.root / name
        if link.is_symlink():
            target = self.root / os.readlink(link)
            return target if target.is_dir() else None
        return link if link.is_dir() else None

    def write(self, step: int, fill: Callable[[Path], None]) -> Path:
        """Create step ``step``'s folder through ``fill(tmp_path)`` (which creates tmp_path), then point ``last`` at it."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.step_dir(step)
        tmp = self.root / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            fill(tmp)
            os.chmod(tmp, 0o755)  # the policy writer's temporary folder is private
            _fsync_tree(tmp)
            # (a step saved again after a resume replayed it has identical content)
            replace_path(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _fsync_dir(self.root)
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
        _fsync_dir(self.root)

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
        """Remove leftovers of writes interrupted by a crash."""
        if not self.root.is_dir():
            return
        for p in self.root.iterdir():
            if p.name.startswith((".tmp-", ".old-", f".{LAST}.tmp", f".{BEST}.tmp")):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)

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
