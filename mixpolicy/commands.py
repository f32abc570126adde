"""The command table of ``mixpolicy``: per command its config, the function it runs, how it
reports, and its help. ``mixpolicy.cli`` parses arguments and runs an entry with :func:`execute`.

Configs and runners are named ``"module:attribute"`` and imported only when their command
runs, so ``mixpolicy --help`` and a typo cost no torch import.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mixpolicy.errors import UserError

Report = Callable[[Any, Any], "int | None"]  # (result, config) -> exit status or None


@dataclass(frozen=True)
class Command:
    summary: str  # one line in `mixpolicy --help`
    help: str  # `mixpolicy <command> --help`: what it does, with examples
    writes: str  # where its output goes (shown by --help)
    config: str | Callable[..., Any] = ""  # a config dataclass ("module:Class") or a validator; "": no options
    run: str | Callable[[Any], Any] = ""  # called with the validated config
    report: Report | None = None  # prints the result; an int it returns is the exit status
    config_name: str = ""  # configs/<config_name>.yaml (default: the command name, data/x for data x)
    positional: tuple[str, ...] = ()  # PATH-like arguments, in order, standing for these options
    policy_pick: str = ""  # how this command picks a configs/policy/<name>.yaml (listed in --help)
    flags: dict[str, Callable[[list[str]], int]] = field(default_factory=dict)  # `--flag ARGS` variants


def load(ref: str | Callable[..., Any]) -> Any:
    """A ``"module:attribute"`` reference, imported; a callable as it is."""
    if callable(ref):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def validate(name: str, data: dict[str, Any], prefix: str = "") -> Any:
    """The command's config built and checked from a composed dict (a ConfigError names the field)."""
    from mixpolicy.config import from_dict

    config = load(COMMANDS[name].config)
    return from_dict(config, data, prefix=prefix) if isinstance(config, type) else config(data)


def execute(name: str, config: Any) -> tuple[int, Any]:
    """Run a validated config through the command's function and report; (exit status, result)."""
    cmd = COMMANDS[name]
    result = load(cmd.run)(config)
    status = cmd.report(result, config) if cmd.report else None
    return (status if isinstance(status, int) else 0), result


# ---------------------------------------------------------------------- runners that are more than a call
def _train(cfg: Any) -> dict[str, Any]:
    from mixpolicy.train.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        main_process = trainer.is_main
        if main_process:
            counts = trainer.policy.parameter_counts()
            procs = f", {trainer.group.world_size} processes" if trainer.group.distributed else ""
            print(
                f"policy {trainer.cfg.policy.type}: {counts['total'] / 1e6:.2f}M parameters ({counts['active'] / 1e6:.2f}M active per denoising step), "
                f"{len(trainer.windows)} windows, device {trainer.device}{procs}"
            )
            if trainer.policy.image_encoder is not None:
                print(_image_encoder_line(trainer.policy))
            if trainer.resumed_from:
                print(f"resuming at step {trainer.step} from {trainer.resumed_from}")
        res = trainer.run()
    finally:
        trainer.close()
    if main_process:
        print(f"trained {res['steps']} steps in {res['seconds']:.1f} s, final loss {res['final_loss']:.4f}; checkpoint {res['checkpoint']}")
        if res["best_checkpoint"]:
            print(f"best evaluated checkpoint: {res['best_checkpoint']} (success {100 * res['best_success']:.1f}%)")
    return res


def _image_encoder_line(policy) -> str:
    """The camera encoder's size and cost: parameters, and forward MFLOPs of one sample, counted (not timed)."""
    from mixpolicy.policies.encoders import encoder_cost

    ie, frames = policy.cfg.image_encoder, policy.cfg.n_obs_steps
    goal_dim = policy.cfg.network.width if policy.task_embedding is not None else 0
    cost = encoder_cost(policy.image_encoder, policy.shape_meta.obs, goal_dim, frames=frames)
    return (
        f"image encoder {ie.trunk}{' (frozen trunk)' if ie.freeze else ''}, {len(policy.image_keys)} camera(s), crop {ie.crop_size}: "
        f"{cost['params'] / 1e6:.3f}M parameters ({cost['trainable'] / 1e6:.3f}M trainable), "
        f"{cost['mflops_per_sample']:.1f} MFLOPs per sample ({frames} frame(s) per camera)"
    )


QUICKSTART_STAGES = {"collect": "collect demonstrations", "train": "train", "eval": "evaluate"}  # name -> title


@dataclass(frozen=True)
class QuickstartConfig:
    out_dir: Path
    overwrite: bool
    stages: dict[str, Any]  # stage name -> its validated config


def _quickstart_config(d: dict[str, Any]) -> QuickstartConfig:
    from mixpolicy.config import check

    check(isinstance(d["overwrite"], bool), "overwrite", f"expected true/false, got {d['overwrite']!r}")
    check(bool(d["out_dir"]), "out_dir", "a run folder is required (out_dir=runs/quickstart)")
    # Every stage's options are checked before any work, so a typo costs nothing.
    stages = {s: validate(s, d[s], prefix=f"{s}.") for s in QUICKSTART_STAGES}
    return QuickstartConfig(Path(d["out_dir"]), d["overwrite"], stages)


def _quickstart(cfg: QuickstartConfig) -> dict[str, Any]:
    import torch

    from mixpolicy.utils import cpu_model

    if cfg.out_dir.exists() and not cfg.overwrite and (cfg.out_dir.is_file() or any(cfg.out_dir.iterdir())):
        raise UserError(f"run folder {cfg.out_dir} already exists (pass overwrite=true to replace it, or another out_dir=)")
    t0 = time.perf_counter()
    times, results = {}, {}
    for i, (stage, title) in enumerate(QUICKSTART_STAGES.items(), 1):
        print(f"== {i}/{len(QUICKSTART_STAGES)} {title}")
        t = time.perf_counter()
        results[stage] = execute(stage, cfg.stages[stage])[1]
        times[f"{stage}_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - t0
    eval_res, train_res = results["eval"], results["train"]
    summary = {
        "average_success": eval_res["average_success"],
        "per_task": {k: v["success_rate"] for k, v in eval_res["tasks"].items()},
        **{k: round(v, 1) for k, v in times.items()},
        "train_steps": train_res["steps"],
        "train_steps_per_s": round(train_res["trained_steps"] / max(train_res["seconds"], 1e-9), 2),
        "params": train_res["params"],
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
    }
    out = cfg.out_dir / "quickstart_summary.json"
    out.write_text(json.dumps(summary, indent=2))
    print(
        f"quickstart: average success {100 * summary['average_success']:.1f}% in {times['total_s'] / 60:.1f} min "
        f"(collect {times['collect_s']:.0f} s, train {times['train_s']:.0f} s at {summary['train_steps_per_s']:.2f} steps/s, "
        f"eval {times['eval_s']:.0f} s) on {summary['cpu']}, {summary['threads']} threads"
    )
    print(
        f"  dataset      {results['collect']['path']}\n  run folder   {cfg.stages['train'].out_dir}\n"
        f"  checkpoint   {train_res['checkpoint']}\n  eval results {eval_res['results_file']}\n  summary      {out}"
    )
    return summary


def _validate_store(cfg: Any) -> list[str]:
    from mixpolicy.datasets.validate import validate_store

    return validate_store(cfg.path, progress=cfg.progress)


def _report_problems(problems: list[str], cfg: Any) -> int:
    for p in problems:
        print(f"{cfg.path}: {p}")
    if problems:
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
        return 1
    print(f"{cfg.path}: no problems found")
    return 0


def _report_info(info: dict[str, Any], cfg: Any) -> None:
    from mixpolicy.datasets.commands import format_info

    print(json.dumps(info, indent=2) if cfg.json else format_info(info))


def _print_table(formatter: str, footer: Callable[[dict[str, Any]], str]) -> Report:
    def report(res: dict[str, Any], _cfg: Any) -> None:
        print(load(formatter)(res))
        print(footer(res))

    return report


# Stops the operator asked for; any other fault ends the run with exit status 3.
REQUESTED_STOPS = ("sigint", "sigterm", "estop")


def _report_deploy(res: dict[str, Any], _cfg: Any) -> int:
    from mixpolicy.deploy.report import format_summary

    print(format_summary(res))
    print(f"log: {res['log']} (mixpolicy deploy --report {res['log']} draws its histograms)")
    if res.get("stopped"):
        print(f"mixpolicy deploy: stopped safely on {res['stopped']}", file=sys.stderr)
        return 0 if res["stopped"] in REQUESTED_STOPS else 3
    return 0


def _deploy_report(args: list[str]) -> int:
    from mixpolicy.deploy.report import format_summary, summarize, write_histograms

    if len(args) != 1 or args[0].startswith("-"):
        raise UserError("usage: mixpolicy deploy --report LOG")
    summary = summarize(args[0])
    print(format_summary(summary))
    files = write_histograms(args[0])
    out = Path(args[0]).with_suffix(".summary.json")
    out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {out} and {len(files)} histograms to {files[0].parent}")
    return 0


def _tasks(_cfg: Any) -> None:
    from mixpolicy.envs.metaworld_env import MT10_TASKS, available_tasks, task_description

    for t in available_tasks():
        print(f"{t:32s} {'MT10 ' if t in MT10_TASKS else '     '}{task_description(t)}")


def _say(template: str) -> Report:
    """A report that prints one line formatted from the result dict."""
    return lambda res, _cfg: print(template.format(**res))


# ---------------------------------------------------------------------- the table
GROUPS = {"data": "inspect, check, convert and view datasets: data info|validate|stats|convert|view PATH"}

COMMANDS: dict[str, Command] = {
    "quickstart": Command(
        summary="collect demos for 3 Meta-World tasks, train one policy, evaluate it",
        help="Collect scripted demonstrations, train one multitask policy and evaluate it closed-loop.\n"
        "Every option of collect, train and eval is available under collect.*, train.* and eval.*.\n"
        "An existing out_dir is never replaced unless overwrite=true.\n"
        "preset=camera: from camera demonstrations (corner camera + proprio, light encoder; configs/preset/camera.yaml).\n"
        "example: mixpolicy quickstart out_dir=runs/qs train.steps=1000 eval.episodes_per_task=10\n"
        "example: mixpolicy quickstart preset=camera   (out_dir runs/quickstart_camera)",
        writes="<out_dir>/ (default runs/quickstart, runs/quickstart_camera with preset=camera): data.zarr, train/ (the run folder), eval/results.json, quickstart_summary.json",
        config=_quickstart_config,
        run=_quickstart,
        policy_pick="policy@train.policy=<name>",
    ),
    "collect": Command(
        summary="scripted-expert demonstrations for Meta-World v3 tasks -> zarr",
        help="Scripted-expert demonstrations (metaworld.policies) for any Meta-World v3 tasks, written to zarr.\n"
        "example: mixpolicy collect tasks=[reach-v3,push-v3] episodes_per_task=50 out=data/demo.zarr cameras=[corner]",
        writes="the zarr store out= (default data/metaworld.zarr)",
        config="mixpolicy.envs.collect:CollectConfig",
        run="mixpolicy.envs.collect:collect",
        report=_say("wrote {episodes} episodes ({steps} steps) to {path} in {seconds:.1f} s"),
    ),
    "train": Command(
        summary="train a policy on a zarr dataset",
        help="Train a policy from a dataset and a policy config (configs/policy/<name>.yaml).\n"
        "Several processes (GPUs, or CPU processes on gloo): torchrun --nproc_per_node=N -m mixpolicy.cli train ...\n"
        "example: mixpolicy train dataset=data/demo.zarr out_dir=runs/dit policy=dit policy.network.depth=6 steps=5000\n"
        "example: mixpolicy train dataset=data/demo.zarr out_dir=runs/dit eval.every=1000 tracking.wandb=true",
        writes="the run folder out_dir= (default runs/train): checkpoints/step_N/, checkpoints/last, metrics.jsonl, tb/, train_config.json",
        config="mixpolicy.train.config:TrainConfig",
        run=_train,
        policy_pick="policy=<name>",
    ),
    "eval": Command(
        summary="closed-loop evaluation of a checkpoint on Meta-World or PushT",
        help="Run closed-loop episodes of a checkpoint: success per task with a 95% Wilson interval.\n"
        "env=pusht (gym-pusht: bash scripts/install_pusht.sh) adds Diffusion Policy's score and the mean max coverage.\n"
        "example: mixpolicy eval checkpoint=runs/dit/checkpoints/last episodes_per_task=50 video=true\n"
        "example: mixpolicy eval checkpoint=runs/pusht/checkpoints/last env=pusht episodes_per_task=50 rerun=true",
        writes="out= (default <run>/eval/step_N): results.json, videos/*.mp4 with video=true, rerun/*.rrd with rerun=true",
        config="mixpolicy.envs.eval_config:EvalConfig",
        run="mixpolicy.envs.evaluate:evaluate",
        report=_print_table("mixpolicy.envs.evaluate:format_table", lambda r: f"evaluated in {r['seconds']:.1f} s; results in {r['results_file']}"),
    ),
    "data/info": Command(
        summary="keys, dtypes, chunks, episodes per task, sources, saved stats",
        help="Summary of a store: keys, dtypes, chunks, episodes per task, sources, saved stats.\n"
        "example: mixpolicy data info data/demo.zarr episodes=true",
        writes="nothing (reads the store)",
        config="mixpolicy.datasets.commands:DataInfoConfig",
        run="mixpolicy.datasets.commands:data_info",
        report=_report_info,
        positional=("path",),
    ),
    "data/validate": Command(
        summary="list every problem in a store; exit 1 if there is any",
        help="List every problem in a store (lengths, NaN/inf, dtype/shape drift, missing keys, corrupt chunks);\n"
        "exits 1 when there is any, 0 when the store is sound.\n"
        "example: mixpolicy data validate data/demo.zarr",
        writes="nothing (reads the store)",
        config="mixpolicy.datasets.commands:DataValidateConfig",
        run=_validate_store,
        report=_report_problems,
        positional=("path",),
    ),
    "data/stats": Command(
        summary="streaming statistics for normalization, saved into the store",
        help="Streaming per-key statistics (min, max, mean, std, q01, q99) saved into the store.\n"
        "example: mixpolicy data stats data/demo.zarr mode=quantile",
        writes="the store's attributes (attrs['mixpolicy_stats']); nothing with write=false",
        config="mixpolicy.datasets.commands:DataStatsConfig",
        run="mixpolicy.datasets.commands:data_stats",
        report=lambda res, _cfg: print(json.dumps(res, indent=2)),
        positional=("path",),
    ),
    "data/convert": Command(
        summary="LeRobot v3.0 or v2.1 / robomimic HDF5 / zarr -> zarr, zarr -> LeRobot v3.0",
        help="Convert between formats: LeRobot v3.0 or v2.1 folder, robomimic HDF5 or zarr -> zarr; zarr -> LeRobot v3.0.\n"
        "example: mixpolicy data convert lerobot_ds data/ds.zarr\n"
        "example: mixpolicy data convert lerobot_ds data/ds96.zarr resize=[96,128]  (frames scaled to cover 96x128, centre-cropped)\n"
        "example: mixpolicy data convert data/demo.zarr exports/demo_lerobot out_format=lerobot",
        writes="OUT (out=), staged in <out>.partial and renamed at the end; the source is never written",
        config="mixpolicy.datasets.commands:DataConvertConfig",
        run="mixpolicy.datasets.commands:data_convert",
        report=_say("wrote {episodes} episodes ({steps} steps) from {src} ({src_format}) to {out} ({out_format})"),
        positional=("src", "out"),
    ),
    "data/view": Command(
        summary="PNG contact sheet, mp4 or Rerun recording of one episode",
        help="Write a PNG contact sheet (frames and an action plot), an h264 mp4 or a Rerun recording (.rrd: every\n"
        "camera, one series per state and action dimension, the outcome; the viewer extra) of one episode.\n"
        "example: mixpolicy data view data/demo.zarr episode=3 out=ep3.mp4\n"
        "example: mixpolicy data view data/demo.zarr episode=3 out=ep3.rrd && rerun ep3.rrd",
        writes="out= (default <dataset>_ep<N>.png beside the store)",
        config="mixpolicy.datasets.commands:DataViewConfig",
        run="mixpolicy.datasets.commands:data_view",
        report=_say("wrote {out}"),
        positional=("path",),
    ),
    "deploy": Command(
        summary="run a policy on a robot or the real-time simulated one; --report LOG summarizes a run log",
        help="Run a checkpoint at a fixed control rate on a robot: the simulated Meta-World robot (real time, its own\n"
        "thread) or a LeRobot robot. Inference runs in a worker (RTI warm start by default), actions pass a safety layer,\n"
        "every cycle is logged. `mixpolicy deploy --report LOG` prints a log's summary and writes PNG histograms.\n"
        "example: mixpolicy deploy checkpoint=runs/dit/checkpoints/last robot.episodes_per_task=5 inference.rti.k=3",
        writes="the per-cycle log log= (default runs/deploy/log.jsonl); --report LOG: LOG.summary.json and <LOG>_report/*.png",
        config="mixpolicy.deploy.runner:DeployConfig",
        run="mixpolicy.deploy.runner:deploy",
        report=_report_deploy,
        flags={"--report": _deploy_report},
    ),
    "serve": Command(
        summary="policy server for remote inference (msgpack over websocket)",
        help="Serve a checkpoint for remote inference: msgpack over websocket, loopback by default; a shared token is\n"
        "read from the environment variable named by token_env (required for a non-loopback host).\n"
        "example: MIXPOLICY_POLICY_TOKEN=secret mixpolicy serve checkpoint=runs/dit/checkpoints/last port=8765",
        writes="nothing",
        config="mixpolicy.deploy.server:ServeConfig",
        run="mixpolicy.deploy.server:serve",
    ),
    "select-k": Command(
        summary="choose RTI's warm-start steps k on validation windows",
        help="Estimate, on dataset windows, the shift error and the contraction of the truncated denoising map for\n"
        "each k, and recommend the smallest k whose actions stay within tolerance of full denoising.\n"
        "example: mixpolicy select-k checkpoint=runs/dit/checkpoints/last dataset=data/val.zarr",
        writes="out= (default <checkpoint>/select_k.json)",
        config="mixpolicy.deploy.kselect:SelectKConfig",
        run="mixpolicy.deploy.kselect:select_k",
        report=_print_table("mixpolicy.deploy.kselect:format_select_k", lambda r: f"results in {r['out']}"),
        config_name="select_k",
    ),
    "plot": Command(
        summary="PNG training curves (loss terms, success, learning rate) of run folders",
        help="Write PNG training curves from a run folder's metrics.jsonl: loss.png, success.png, lr.png, optimization.png.\n"
        "example: mixpolicy plot run=runs/dit compare=[runs/dit_small] smoothing=0.6",
        writes="out= (default <run>/plots)",
        config="mixpolicy.train.plot:PlotConfig",
        run="mixpolicy.train.plot:plot_runs",
        report=lambda res, _cfg: print(f"wrote {', '.join(Path(f).name for f in res['files'])} to {res['out']}"),
    ),
    "tasks": Command(
        summary="list the Meta-World v3 task names",
        help="List the 50 Meta-World v3 tasks, MT10 ones marked, with their descriptions.",
        writes="nothing",
        run=_tasks,
    ),
}
