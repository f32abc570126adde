"""Evaluation results: the table printed, the folder they go to, the file they are written to.

Results of a training run's checkpoint ``<run>/checkpoints/step_N`` (or of the ``last`` /
``best`` link to one) go to ``<run>/eval/step_N/``, which checkpoint pruning and
``overwrite`` never delete; a checkpoint outside a run writes to ``<checkpoint>/eval``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

EVAL_DIR = "eval"
RESULTS_FILE = "results.json"
_RUN_STEP = re.compile(r"^step_\d+$")
# Per-task numbers some environments add (PushT), shown as extra table columns.
EXTRA_COLUMNS = {"mean_max_coverage": "max coverage", "mean_score": "score"}


def format_table(results: dict[str, Any]) -> str:
    """Per-task success table as plain text (with the environment's own numbers, PushT's coverage and score)."""
    extra = [k for k in EXTRA_COLUMNS if k in results]
    rows = [("task", "success", "95% CI", *(EXTRA_COLUMNS[k] for k in extra), "mean len", "calls/ep", "actions/call")]
    for task, r in results["tasks"].items():
        lo, hi = r["wilson95"]
        rows.append(
            (
                task,
                f"{r['successes']}/{r['episodes']} ({100 * r['success_rate']:.1f}%)",
                f"[{100 * lo:.1f}, {100 * hi:.1f}]",
                *(f"{r[k]:.3f}" for k in extra),
                f"{r['mean_length']:.1f}",
                f"{r['mean_policy_calls']:.1f}",
                f"{r['mean_executable']:.2f}",
            )
        )
    lo, hi = results["overall_wilson95"]
    rows.append(
        (
            "average",
            f"{100 * results['average_success']:.1f}%",
            f"[{100 * lo:.1f}, {100 * hi:.1f}]",
            *(f"{results[k]:.3f}" for k in extra),
            "",
            f"{results['mean_policy_calls']:.1f}",
            f"{results['mean_executable']:.2f}",
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(len(lines) - 1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def results_folder(checkpoint: str | Path, out: str = "") -> Path:
    """Where results of ``checkpoint`` go: ``out`` when given, ``<run>/eval/step_N`` for a
    step folder of a run's ``checkpoints/`` (followed through a ``last``/``best`` link), else ``<checkpoint>/eval``."""
    if out:
        return Path(out)
    ckpt = Path(checkpoint)
    step = Path(os.readlink(ckpt)) if ckpt.is_symlink() else Path(ckpt.name)
    if ckpt.parent.name == "checkpoints" and len(step.parts) == 1 and _RUN_STEP.match(step.name):
        return ckpt.parent.parent / EVAL_DIR / step.name
    return ckpt / EVAL_DIR


def write_results(folder: Path, results: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RESULTS_FILE
    tmp = folder / f".{RESULTS_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, path)
    return path
