"""PNG training curves from run folders' ``metrics.jsonl``.

Writes ``loss.png`` (one panel per loss term the policy logged), ``success.png``
(closed-loop success vs step with the 95% Wilson band, overall and per task), ``lr.png``
and ``optimization.png`` (gradient norm, samples/s). Other run folders can be overlaid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixpolicy.config import check
from mixpolicy.errors import UserError
from mixpolicy.train.tracking import METRICS_FILE, read_metrics

# Train-record fields that are not loss terms.
NOT_LOSS = {"lr", "epoch", "grad_norm", "samples_per_s", "steps_per_s", "data_wait_frac"}


@dataclass
class PlotConfig:
    run: str = ""
    compare: list[str] = field(default_factory=list)
    out: str = ""
    smoothing: float = 0.0
    dpi: int = 120

    def __post_init__(self):
        check(bool(self.run), "run", "a run folder is required (run=runs/<name>)")
        check(0 <= self.smoothing < 1, "smoothing", "must be in [0, 1) (exponential moving average weight; 0: raw)")
        check(40 <= self.dpi <= 600, "dpi", "must be in [40, 600]")


def _load(run: str) -> tuple[str, list[dict], list[dict]]:
    path = Path(run)
    if not path.is_dir():
        raise UserError(f"run folder not found: {path}")
    records = read_metrics(path / METRICS_FILE)
    if not records:
        raise UserError(f"no training records in {path / METRICS_FILE} (is this a `mixpolicy train` out_dir?)")
    train = [r for r in records if r.get("kind", "train") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    return path.resolve().name, train, evals


def _smooth(values: list[float], weight: float) -> list[float]:
    if weight <= 0:
        return values
    out, acc = [], None
    for v in values:
        acc = v if acc is None or not math.isfinite(acc) else weight * acc + (1 - weight) * v
        out.append(acc)
    return out


def _figure(n_panels: int, title: str):
    from matplotlib.figure import Figure

    cols = min(n_panels, 3)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(5 * cols, 3.4 * rows), layout="constrained")
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n_panels)]
    fig.suptitle(title)
    return fig, axes


def _style(ax, title: str, ylabel: str = "", percent: bool = False, legend: bool = True, legend_size: str | None = None) -> None:
    """Common axis dressing: title, step axis, optional y label and 0-100% range, grid, legend."""
    if title:
        ax.set_title(title)
    ax.set_xlabel("step")
    if ylabel:
        ax.set_ylabel(ylabel)
    if percent:
        ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=legend_size)


def plot_runs(cfg: PlotConfig) -> dict[str, Any]:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("mixpolicy plot needs matplotlib: pip install 'mixpolicy[plot]'") from None
    runs = [_load(r) for r in [cfg.run, *cfg.compare]]
    names = [n for n, _, _ in runs]
    if len(set(names)) < len(names):  # same folder names in different places: label by path
        names = [str(Path(r)) for r in [cfg.run, *cfg.compare]]
    out = Path(cfg.out) if cfg.out else Path(cfg.run) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    title = names[0] if len(names) == 1 else " vs ".join(names)
    written: list[str] = []

    def save(fig, name: str) -> None:
        path = out / name
        fig.savefig(path, dpi=cfg.dpi)
        written.append(str(path))

    loss_keys: list[str] = []
    for _, train, _ in runs:
        for r in train:
            loss_keys += [k for k in r if k not in NOT_LOSS and k not in ("kind", "step") and k not in loss_keys]
    if loss_keys:
        fig, axes = _figure(len(loss_keys), f"loss terms: {title}")
        for ax, key in zip(axes, loss_keys):
            positive = True
            for name, (_, train, _) in zip(names, runs):
                pts = [(r["step"], r[key]) for r in train if key in r]
                if pts:
                    steps, vals = zip(*pts)
                    ax.plot(steps, _smooth(list(vals), cfg.smoothing), label=name)
                    positive &= all(v > 0 for v in vals if math.isfinite(v))
            if positive:
                ax.set_yscale("log")
            _style(ax, key, legend=len(runs) > 1)
        save(fig, "loss.png")

    if any(evals for _, _, evals in runs):
        per_task = sorted({k[len("success/") :] for _, _, evals in runs for r in evals for k in r if k.startswith("success/")})
        fig, axes = _figure(1 + (len(per_task) > 1), f"closed-loop success: {title}")
        ax = axes[0]
        for name, (_, _, evals) in zip(names, runs):
            if not evals:
                continue
            steps = [r["step"] for r in evals]
            ax.plot(steps, [100 * r["average_success"] for r in evals], marker="o", label=name)
            if all("wilson95_low" in r for r in evals):
                ax.fill_between(steps, [100 * r["wilson95_low"] for r in evals], [100 * r["wilson95_high"] for r in evals], alpha=0.2)
        _style(ax, "average success (95% Wilson interval)", "success %", percent=True)
        if len(per_task) > 1:
            ax = axes[1]
            for name, (_, _, evals) in zip(names, runs):
                for task in per_task:
                    pts = [(r["step"], 100 * r[f"success/{task}"]) for r in evals if f"success/{task}" in r]
                    if pts:
                        steps, vals = zip(*pts)
                        ax.plot(steps, vals, marker=".", label=task if len(runs) == 1 else f"{name}: {task}")
            _style(ax, "success per task", "success %", percent=True, legend_size="small")
        save(fig, "success.png")

    fig, axes = _figure(1, f"learning rate: {title}")
    for name, (_, train, _) in zip(names, runs):
        pts = [(r["step"], r["lr"]) for r in train if "lr" in r]
        if pts:
            axes[0].plot(*zip(*pts), label=name)
    _style(axes[0], "", "lr", legend=len(runs) > 1)
    save(fig, "lr.png")

    fig, axes = _figure(2, f"optimization: {title}")
    for ax, key, label in ((axes[0], "grad_norm", "gradient norm (before clipping)"), (axes[1], "samples_per_s", "training samples / s")):
        for name, (_, train, _) in zip(names, runs):
            pts = [(r["step"], r[key]) for r in train if key in r]
            if pts:
                ax.plot(*zip(*pts), label=name)
        _style(ax, label, legend=len(runs) > 1)
    save(fig, "optimization.png")
    return {"out": str(out), "files": written, "runs": names}
