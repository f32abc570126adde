"""Command line: ``mixpolicy <command> [key=value ...]`` with hydra overrides.

Each command composes ``configs/<command>.yaml`` (shipped inside the package), applies
the overrides, and validates the result into the command's config dataclass. Bad input
prints one line naming the problem and exits with status 2.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

USAGE = """usage: mixpolicy <command> [key=value ...] [--help] [--cfg]

commands:
  quickstart   collect demos for 3 Meta-World tasks, train one policy, evaluate it
  collect      scripted-expert demonstrations for Meta-World v3 tasks -> zarr
  train        train a policy on a zarr dataset
  eval         closed-loop evaluation of a checkpoint on Meta-World
  data         inspect, check, convert and view datasets: data info|validate|stats|convert|view
  deploy       run a policy on a robot or the real-time simulated one; --report LOG summarizes a run log
  serve        policy server for remote inference (msgpack over websocket)
  select-k     choose RTI's warm-start steps k on validation windows
  plot         PNG training curves (loss terms, success, learning rate) of run folders
  tasks        list the Meta-World v3 task names

Overrides use hydra syntax: key=value, nested.key=value, list=[a,b]; policy=<name> picks a
policy config for train (policy@train.policy=<name> for quickstart).
`mixpolicy <command> --help` shows the command's options and defaults;
`--cfg` prints the composed config without running.
"""

COMMAND_HELP = {
    "quickstart": "Collect scripted demonstrations, train one multitask policy and evaluate it closed-loop.\n"
    "Every option of collect, train and eval is available under collect.*, train.* and eval.*.\n"
    "example: mixpolicy quickstart out_dir=runs/qs train.steps=1000 eval.episodes_per_task=10",
    "collect": "Scripted-expert demonstrations (metaworld.policies) for any Meta-World v3 tasks, written to zarr.\n"
    "example: mixpolicy collect tasks=[reach-v3,push-v3] episodes_per_task=50 out=data/demo.zarr cameras=[corner]",
    "train": "Train a policy from a dataset and a policy config (configs/policy/<name>.yaml).\n"
    "Several processes (GPUs, or CPU processes on gloo): torchrun --nproc_per_node=N -m mixpolicy.cli train ...\n"
    "example: mixpolicy train dataset=data/demo.zarr out_dir=runs/dit policy=dit policy.network.depth=6 steps=5000\n"
    "example: mixpolicy train dataset=data/demo.zarr out_dir=runs/dit eval.every=1000 tracking.wandb=true",
    "eval": "Run closed-loop episodes of a checkpoint: success per task with a 95% Wilson interval.\n"
    "example: mixpolicy eval checkpoint=runs/dit/checkpoints/last episodes_per_task=50 video=true",
    "data/info": "Summary of a store: keys, dtypes, chunks, episodes per task, sources, saved stats.\n"
    "example: mixpolicy data info path=data/demo.zarr episodes=true",
    "data/validate": "List every problem in a store (lengths, NaN/inf, dtype/shape drift, missing keys, corrupt chunks);\n"
    "exits 1 when there is any, 0 when the store is sound.\n"
    "example: mixpolicy data validate path=data/demo.zarr",
    "data/stats": "Streaming per-key statistics (min, max, mean, std, q01, q99) saved into the store.\n"
    "example: mixpolicy data stats path=data/demo.zarr mode=quantile",
    "data/convert": "Convert between formats: LeRobot v3.0 folder, robomimic HDF5 or zarr -> zarr; zarr -> LeRobot v3.0.\n"
    "example: mixpolicy data convert src=lerobot_ds out=data/ds.zarr\n"
    "example: mixpolicy data convert src=data/demo.zarr out=exports/demo_lerobot out_format=lerobot",
    "data/view": "Write a PNG contact sheet (frames and an action plot) or an mp4 of one episode.\n"
    "example: mixpolicy data view path=data/demo.zarr episode=3 out=ep3.mp4",
    "plot": "Write PNG training curves from a run folder's metrics.jsonl: loss.png, success.png, lr.png, optimization.png.\n"
    "example: mixpolicy plot run=runs/dit compare=[runs/dit_small] smoothing=0.6",
}

DATA_USAGE = """usage: mixpolicy data <info|validate|stats|convert|view> [key=value ...] [--help]

  info       keys, dtypes, chunks, episodes per task, sources, saved stats
  validate   list every problem in a store; exit 1 if there is any
  stats      streaming statistics for normalization, saved into the store
  convert    LeRobot v3.0 / robomimic HDF5 / zarr -> zarr, zarr -> LeRobot v3.0
  view       PNG contact sheet or mp4 of one episode
"""

COMMAND_HELP.update({
    "deploy": "Run a checkpoint at a fixed control rate on a robot: the simulated Meta-World robot (real time, its own\n"
    "thread) or a LeRobot robot. Inference runs in a worker (RTI warm start by default), actions pass a safety layer,\n"
    "every cycle is logged. `mixpolicy deploy --report LOG` prints a log's summary and writes PNG histograms.\n"
    "example: mixpolicy deploy checkpoint=runs/dit/checkpoints/last robot.episodes_per_task=5 inference.rti.k=3",
    "serve": "Serve a checkpoint for remote inference: msgpack over websocket, loopback by default; a shared token is\n"
    "read from the environment variable named by token_env (required for a non-loopback host).\n"
    "example: MIXPOLICY_POLICY_TOKEN=secret mixpolicy serve checkpoint=runs/dit/checkpoints/last port=8765",
    "select-k": "Estimate, on dataset windows, the shift error and the contraction of the truncated denoising map for\n"
    "each k, and recommend the smallest k whose actions stay within tolerance of full denoising.\n"
    "example: mixpolicy select-k checkpoint=runs/dit/checkpoints/last dataset=data/val.zarr",
})

# Commands whose YAML file name differs from the command name.
CONFIG_NAMES = {"select-k": "select_k"}


def _quiet() -> None:
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", message=".*Constant\\(s\\) may be too high.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*Overriding environment.*")


def compose(command: str, overrides: list[str]) -> dict[str, Any]:
    """Compose configs/<command>.yaml with overrides into a plain dict."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="mixpolicy.configs", version_base="1.3"):
        cfg = hydra_compose(config_name=CONFIG_NAMES.get(command, command), overrides=overrides)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise _user_error(f"missing required option(s) {', '.join(missing)} (pass them as key=value)")
    return OmegaConf.to_container(cfg, resolve=True)


def _user_error(msg: str):
    from mixpolicy.errors import UserError

    return UserError(msg)


def _yaml(d: dict[str, Any]) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(d))


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


# ---------------------------------------------------------------------- commands
def cmd_collect(d: dict[str, Any]) -> dict[str, Any]:
    from mixpolicy.config import from_dict
    from mixpolicy.envs.collect import CollectConfig, collect

    res = collect(from_dict(CollectConfig, d))
    print(f"wrote {res['episodes']} episodes ({res['steps']} steps) to {res['path']} in {res['seconds']:.1f} s")
    return res


def cmd_train(d: dict[str, Any]) -> dict[str, Any]:
    from mixpolicy.config import from_dict
    from mixpolicy.train.config import TrainConfig
    from mixpolicy.train.trainer import Trainer

    trainer = Trainer(from_dict(TrainConfig, d))
    try:
        main_process = trainer.is_main
        if main_process:
            counts = trainer.policy.parameter_counts()
            procs = f", {trainer.group.world_size} processes" if trainer.group.distributed else ""
            print(
                f"policy {trainer.cfg.policy.type}: {counts['total'] / 1e6:.2f}M parameters ({counts['active'] / 1e6:.2f}M active per denoising step), "
                f"{len(trainer.windows)} windows, device {trainer.device}{procs}"
            )
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


def cmd_eval(d: dict[str, Any]) -> dict[str, Any]:
    from mixpolicy.config import from_dict
    from mixpolicy.envs.evaluate import EvalConfig, evaluate, format_table

    res = evaluate(from_dict(EvalConfig, d))
    print(format_table(res))
    print(f"evaluated in {res['seconds']:.1f} s; results in {res['results_file']}")
    return res


def cmd_plot(d: dict[str, Any]) -> dict[str, Any]:
    from mixpolicy.config import from_dict
    from mixpolicy.train.plot import PlotConfig, plot_runs

    res = plot_runs(from_dict(PlotConfig, d))
    print(f"wrote {', '.join(Path(f).name for f in res['files'])} to {res['out']}")
    return res


def cmd_quickstart(d: dict[str, Any]) -> dict[str, Any]:
    from mixpolicy.config import from_dict
    from mixpolicy.envs.collect import CollectConfig
    from mixpolicy.envs.evaluate import EvalConfig
    from mixpolicy.train.config import TrainConfig

    # Check every stage's options before any work, so a typo costs nothing.
    from_dict(CollectConfig, d["collect"], prefix="collect.")
    from_dict(TrainConfig, d["train"], prefix="train.")  # builds and checks the policy config too
    from_dict(EvalConfig, d["eval"], prefix="eval.")
    t0 = time.perf_counter()
    times = {}
    print("== 1/3 collect demonstrations")
    t = time.perf_counter()
    cmd_collect(d["collect"])
    times["collect_s"] = time.perf_counter() - t
    print("== 2/3 train")
    t = time.perf_counter()
    train_res = cmd_train(d["train"])
    times["train_s"] = time.perf_counter() - t
    print("== 3/3 evaluate")
    t = time.perf_counter()
    eval_res = cmd_eval(d["eval"])
    times["eval_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - t0
    summary = {
        "average_success": eval_res["average_success"],
        "per_task": {k: v["success_rate"] for k, v in eval_res["tasks"].items()},
        **{k: round(v, 1) for k, v in times.items()},
        "train_steps": train_res["steps"],
        "params": train_res["params"],
    }
    out = Path(d["out_dir"]) / "quickstart_summary.json"
    out.write_text(json.dumps(summary, indent=2))
    print(
        f"quickstart: average success {100 * summary['average_success']:.1f}% in {times['total_s'] / 60:.1f} min "
        f"(collect {times['collect_s']:.0f} s, train {times['train_s']:.0f} s, eval {times['eval_s']:.0f} s); summary in {out}"
    )
    return summary


def cmd_data_info(d: dict[str, Any]) -> dict[str, Any]:
    from mixpolicy.config import from_dict
    from mixpolicy.datasets.commands import DataInfoConfig, data_info, format_info

    cfg = from_dict(DataInfoConfig, d)
    info = data_info(cfg)
    print(json.dumps(info, indent=2) if cfg.json else format_info(info))
    return info


def cmd_data_validate(d: dict[str, Any]) -> int:
    from mixpolicy.config import from_dict
    from mixpolicy.datasets.commands import DataValidateConfig
    from mixpolicy.datasets.validate import validate_store

    cfg = from_dict(DataValidateConfig, d)
    problems = validate_store(cfg.path, progress=cfg.progress)
    for p in problems:
        print(f"{cfg.path}: {p}")
    if problems:
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
        return 1
    print(f"{cfg.path}: no problems found")
    return 0


def cmd_data_stats(d: dict[str, Any]) -> dict[str, Any]:
    from mixpolicy.config import from_dict
    from mixpolicy.datasets.commands import DataStatsConfig, data_stats

    res = data_stats(from_dict(DataStatsConfig, d))
    _print_json(res)
    return res


def cmd_data_convert(d: dict[str, Any]) -> dict[str, Any]:
    from mixpolicy.config import from_dict
    from mixpolicy.datasets.commands import DataConvertConfig, data_convert

    res = data_convert(from_dict(DataConvertConfig, d))
    print(f"wrote {res['episodes']} episodes ({res['steps']} steps) from {res['src']} ({res['src_format']}) to {res['out']} ({res['out_format']})")
    return res


def cmd_data_view(d: dict[str, Any]) -> dict[str, Any]:
    from mixpolicy.config import from_dict
    from mixpolicy.datasets.commands import DataViewConfig, data_view

    res = data_view(from_dict(DataViewConfig, d))
    print(f"wrote {res['out']}")
    return res


def cmd_deploy(d: dict[str, Any]) -> dict[str, Any]:
    from mixpolicy.config import from_dict
    from mixpolicy.deploy.report import format_summary
    from mixpolicy.deploy.runner import DeployConfig, deploy

    res = deploy(from_dict(DeployConfig, d))
    print(format_summary(res))
    print(f"log: {res['log']} (mixpolicy deploy --report {res['log']} draws its histograms)")
    if res.get("stopped"):
        print(f"mixpolicy deploy: stopped safely on {res['stopped']}", file=sys.stderr)
    return res


def cmd_deploy_report(args: list[str]) -> int:
    from mixpolicy.deploy.report import format_summary, summarize, write_histograms

    if len(args) != 1 or args[0].startswith("-"):
        raise _user_error("usage: mixpolicy deploy --report LOG")
    summary = summarize(args[0])
    print(format_summary(summary))
    files = write_histograms(args[0])
    out = Path(args[0]).with_suffix(".summary.json")
    out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {out} and {len(files)} histograms to {files[0].parent}")
    return 0


def cmd_serve(d: dict[str, Any]) -> None:
    from mixpolicy.config import from_dict
    from mixpolicy.deploy.server import ServeConfig, serve

    serve(from_dict(ServeConfig, d))


def cmd_select_k(d: dict[str, Any]) -> dict[str, Any]:
    from mixpolicy.config import from_dict
    from mixpolicy.deploy.kselect import SelectKConfig, format_select_k, select_k

    res = select_k(from_dict(SelectKConfig, d))
    print(format_select_k(res))
    print(f"results in {res['out']}")
    return res


def cmd_tasks(_: list[str]) -> None:
    from mixpolicy.envs.metaworld_env import MT10_TASKS, available_tasks, task_description

    for t in available_tasks():
        print(f"{t:32s} {'MT10 ' if t in MT10_TASKS else '     '}{task_description(t)}")


COMMANDS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "quickstart": cmd_quickstart,
    "collect": cmd_collect,
    "train": cmd_train,
    "eval": cmd_eval,
    "data/info": cmd_data_info,
    "data/validate": cmd_data_validate,
    "data/stats": cmd_data_stats,
    "data/convert": cmd_data_convert,
    "data/view": cmd_data_view,
    "deploy": cmd_deploy,
    "serve": cmd_serve,
    "select-k": cmd_select_k,
    "plot": cmd_plot,
}


def _help(command: str) -> None:
    from importlib import resources

    print(f"usage: mixpolicy {command.replace('/', ' ')} [key=value ...]\n")
    print(COMMAND_HELP[command] + "\n")
    print("options (defaults from the packaged configs/%s.yaml):\n" % CONFIG_NAMES.get(command, command))
    text = resources.files("mixpolicy.configs").joinpath(f"{CONFIG_NAMES.get(command, command)}.yaml").read_text()
    print(text.rstrip())
    if command in ("train", "quickstart"):
        names = sorted(p.name.removesuffix(".yaml") for p in resources.files("mixpolicy.configs").joinpath("policy").iterdir() if p.name.endswith(".yaml"))
        pick = "policy=<name>" if command == "train" else "policy@train.policy=<name>"
        print(f"\npolicy configs ({pick}): {', '.join(names)}")


def _one_line(exc: BaseException, command: str = "") -> str:
    msg = str(exc).strip() or type(exc).__name__
    unknown = re.match(r"Could not override '([^']+)'", msg)
    if unknown:
        name = command.replace("/", " ")
        return f"unknown config key '{unknown.group(1)}' for `mixpolicy {name}` (see `mixpolicy {name} --help`)"
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    return " ".join(lines[:2]) if len(lines) > 1 and len(lines[0]) < 40 else lines[0]


def main(argv: list[str] | None = None) -> int:
    if argv is None and hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `mixpolicy x --help | head` exits quietly
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] in ("--version", "version"):
        from mixpolicy import __version__

        print(__version__)
        return 0
    command, args = argv[0], argv[1:]
    if command == "data":
        if not args or args[0] in ("-h", "--help", "help"):
            print(DATA_USAGE)
            return 0
        command, args = f"data/{args[0]}", args[1:]
        if command not in COMMANDS:
            print(f"mixpolicy: error: unknown data command {command[5:]!r}; choose from info, validate, stats, convert, view", file=sys.stderr)
            return 2
    if command == "tasks":
        cmd_tasks(args)
        return 0
    if command not in COMMANDS:
        print(f"mixpolicy: error: unknown command {command!r}; choose from {', '.join([*COMMANDS, 'tasks'])}", file=sys.stderr)
        return 2
    if any(a in ("-h", "--help") for a in args):
        _help(command)
        return 0
    if command == "deploy" and args and args[0] == "--report":
        _quiet()
        from mixpolicy.errors import UserError

        try:
            return cmd_deploy_report(args[1:])
        except UserError as exc:
            print(f"mixpolicy: error: {_one_line(exc, command)}", file=sys.stderr)
            return 2
    print_cfg = "--cfg" in args
    overrides = [a for a in args if a != "--cfg"]
    bad = [a for a in overrides if a.startswith("-")]
    if bad:
        print(f"mixpolicy: error: unknown flag {bad[0]!r}; options are key=value overrides (see --help)", file=sys.stderr)
        return 2
    _quiet()
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from mixpolicy.errors import UserError

    try:
        cfg = compose(command, overrides)
        if print_cfg:
            print(_yaml(cfg))
            return 0
        result = COMMANDS[command](cfg)
        if isinstance(result, int):  # a command's own exit status (data validate)
            return result
    except (UserError, HydraException, OmegaConfBaseException) as exc:
        print(f"mixpolicy: error: {_one_line(exc, command)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mixpolicy: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
