"""mixpolicy's dense diffusion transformer vs LeRobot's DiffusionPolicy, side by side.

Same Meta-World scripted demonstrations, same machine, one invocation:

1. convert   the mixpolicy zarr store into a LeRobotDataset v3.0 (mixpolicy's exporter)
2. train     each policy for the same number of steps and batch size, each with its own
             training script and default recipe (mixpolicy's Trainer; LeRobot's
             ``lerobot.scripts.lerobot_train.train``), each in a fresh process; training
             samples/s comes from the time between consecutive optimizer steps after a warm-up
3. latency   one observation in, one action chunk out, 10 denoising steps (DDIM) for both,
             normalization included, calls interleaved A/B in one process
4. eval      closed-loop success of both on the same tasks and episode seeds through
             mixpolicy's evaluator (LeRobot's policy behind a small adapter)

Both policies see the same information: LeRobot's ``observation.state`` is the hand pose
and gripper (the first 4 state dims), ``observation.environment_state`` the other 35 state
dims plus a one-hot task id (LeRobot's diffusion policy has no task conditioning);
mixpolicy reads the 39-d state and its task embedding.

    python benchmarks/lerobot_compare/compare.py --data /tmp/mw.zarr --work /tmp/cmp --steps 3000

Needs lerobot (see README.md next to this file). Prints a table and writes
``<work>/results.json``; phases whose outputs exist are skipped (``--redo`` repeats them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MUJOCO_GL", "egl")

REPO_ID = "local/metaworld_scripted"
N_OBS, HORIZON, N_ACTION, DENOISE_STEPS, TRAIN_TIMESTEPS = 2, 16, 8, 10, 100
PROPRIO = 4
WARMUP_STEPS = 20
MIXPOLICY_VARIANTS = ("fp32-eager", "fp32-compile", "bf16-eager", "bf16-compile")
PHASES = {"convert", "probe", "train", "latency", "eval", "flops"}


def _mixpolicy_policy_cfg(args) -> dict:
    return {
        "type": "dit",
        "n_obs_steps": N_OBS,
        "horizon": HORIZON,
        "n_action_steps": N_ACTION,
        "network": {
            "width": args.width,
            "depth": args.depth,
            "heads": 4,
            "condition": args.condition,
            "actions_per_token": args.actions_per_token,
            "condition_layers": args.condition_layers,
            "norm": args.norm,
        },
        "objective": {
            "num_train_timesteps": TRAIN_TIMESTEPS,
            "num_inference_steps": DENOISE_STEPS,
            "prediction_type": args.mixpolicy_prediction,
        },
    }


def _lerobot_policy_cfg(args):
    from lerobot.configs.types import NormalizationMode
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig

    return DiffusionConfig(
        n_obs_steps=N_OBS,
        horizon=HORIZON,
        n_action_steps=N_ACTION,
        down_dims=tuple(args.down_dims),
        noise_scheduler_type="DDIM",  # DDIM's forward process equals DDPM's; sampling takes 10 steps
        num_train_timesteps=TRAIN_TIMESTEPS,
        num_inference_steps=DENOISE_STEPS,
        # The preset maps only VISUAL/STATE/ACTION; environment_state would enter unnormalized.
        # Min-max it like the state, as mixpolicy normalizes its whole state vector.
        normalization_mapping={
            "VISUAL": NormalizationMode.MEAN_STD,
            "STATE": NormalizationMode.MIN_MAX,
            "ENV": NormalizationMode.MIN_MAX,
            "ACTION": NormalizationMode.MIN_MAX,
        },
        device="cpu",
        push_to_hub=False,
        **({"optimizer_lr": args.lerobot_lr} if args.lerobot_lr else {}),
    )


# ---------------------------------------------------------------------- 1. convert
def convert(data: Path, root: Path) -> dict:
    """Split the state into LeRobot's two inputs in a zarr store, then export it with
    mixpolicy's LeRobotDataset v3.0 exporter (``mixpolicy data convert ... out_format=lerobot``)."""
    import shutil

    import numpy as np

    from mixpolicy.datasets.lerobot_format import export_lerobot
    from mixpolicy.datasets.replay_buffer import DatasetMeta, KeySpec, ReplayBuffer

    buf = ReplayBuffer.open(data)
    tasks = list(buf.meta.tasks)
    state_dim = buf.meta.specs["state"].shape[0]
    action_dim = buf.meta.specs["action"].shape[0]
    split = root.with_name(root.name + "_split.zarr")
    meta = DatasetMeta(
        fps=buf.meta.fps,
        tasks=tasks,
        obs_keys=["state", "environment_state"],
        action_key="action",
        task_descriptions=dict(buf.meta.task_descriptions),
        specs={
            "state": KeySpec((PROPRIO,), "float32"),
            "environment_state": KeySpec((state_dim - PROPRIO + len(tasks),), "float32"),
            "action": KeySpec((action_dim,), "float32"),
        },
    )
    t0 = time.perf_counter()
    out = ReplayBuffer.create(split, meta, overwrite=True)
    episodes = frames = 0
    for e in range(buf.n_episodes):
        if not buf.episode_success[e]:  # mixpolicy trains on successful episodes only (successful_only=true)
            continue
        ep = buf.get_episode(e, ["state", "action"])
        task = int(buf.episode_task_index[e])
        onehot = np.zeros((len(ep["state"]), len(tasks)), np.float32)
        onehot[:, task] = 1.0
        out.add_episode(
            {
                "state": ep["state"][:, :PROPRIO].astype(np.float32),
                "environment_state": np.concatenate([ep["state"][:, PROPRIO:], onehot], axis=1).astype(np.float32),
                "action": ep["action"].astype(np.float32),
            },
            task=tasks[task],
            seed=int(buf.episode_seeds[e]),
        )
        episodes += 1
        frames += len(ep["action"])
    shutil.rmtree(root, ignore_errors=True)
    export_lerobot(ReplayBuffer.open(split), root, progress=False)
    return {"episodes": episodes, "frames": frames, "tasks": tasks, "seconds": time.perf_counter() - t0, "exporter": "mixpolicy.datasets.lerobot_format.export_lerobot"}


# ---------------------------------------------------------------------- 2. train
def _timing(stamps: list[float], batch_size: int, params: int, **extra) -> dict:
    timed = stamps[WARMUP_STEPS:]
    seconds = timed[-1] - timed[0]
    return {
        "steps": len(stamps),
        "timed_steps": len(timed) - 1,
        "seconds_timed": seconds,
        "samples_per_s": batch_size * (len(timed) - 1) / seconds,
        "params": params,
        **extra,
    }


def _mixpolicy_train_cfg(args, out: Path, precision: str = "auto", compile: bool = False):
    """mixpolicy's training config: its defaults, the benchmark's shapes and the recipe overrides."""
    from mixpolicy.config import from_dict
    from mixpolicy.train.config import TrainConfig

    return from_dict(
        TrainConfig,
        {
            "dataset": str(args.data),
            "out_dir": str(out),
            "policy": _mixpolicy_policy_cfg(args),
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "precision": precision,
            "compile": compile,
            "progress": False,
            "overwrite": True,
            **({"lr": args.mixpolicy_lr} if args.mixpolicy_lr else {}),
            **({"warmup_steps": args.mixpolicy_warmup} if args.mixpolicy_warmup >= 0 else {}),
        },
    )


def train_mixpolicy(args, out: Path, precision: str = "auto", compile: bool = False) -> dict:
    from mixpolicy.train.trainer import Trainer

    cfg = _mixpolicy_train_cfg(args, out, precision, compile)
    trainer = Trainer(cfg)
    stamps: list[float] = []
    trainer.optimizer.register_step_pre_hook(lambda *_: stamps.append(time.perf_counter()))
    t0 = time.perf_counter()
    trainer.run()
    return _timing(stamps, args.batch_size, trainer.n_params, wall_s=time.perf_counter() - t0, threads=_threads(), precision=precision, compile=compile)


def train_lerobot(args, out: Path, num_workers: int) -> dict:
    import torch
    from lerobot.configs.default import DatasetConfig, WandBConfig
    from lerobot.configs.train import TrainPipelineConfig
    import lerobot.scripts.lerobot_train as lerobot_train

    stamps: list[float] = []
    params: list[int] = []
    update = lerobot_train.update_policy

    def timed_update(train_metrics, policy, *a, **kw):
        stamps.append(time.perf_counter())
        if not params:
            params.append(sum(p.numel() for p in policy.parameters()))
        return update(train_metrics, policy, *a, **kw)

    lerobot_train.update_policy = timed_update
    cfg = TrainPipelineConfig(
        dataset=DatasetConfig(repo_id=REPO_ID, root=str(args.work / "lerobot_dataset")),
        policy=_lerobot_policy_cfg(args),
        output_dir=out,
        steps=args.steps,
        batch_size=args.batch_size,
        num_workers=num_workers,
        seed=args.seed,
        log_freq=max(1, args.steps // 20),
        save_freq=args.steps,
        eval_freq=0,
        wandb=WandBConfig(enable=False),
    )
    t0 = time.perf_counter()
    lerobot_train.train(cfg)
    return _timing(stamps, args.batch_size, params[0], wall_s=time.perf_counter() - t0, threads=torch.get_num_threads(), num_workers=num_workers)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


# ---------------------------------------------------------------------- the LeRobot policy behind mixpolicy's evaluator
class LeRobotAdapter:
    """Presents a trained LeRobot DiffusionPolicy through the interface mixpolicy's evaluator calls."""

    def __init__(self, ckpt: Path, tasks: list[str], parts=None):
        """``parts``: (policy, preprocessor, postprocessor) already built (the tests' stand-ins);
        otherwise LeRobot's checkpoint at ``ckpt`` is loaded."""
        import torch

        if parts is None:
            from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
            from lerobot.policies.factory import make_pre_post_processors

            policy = DiffusionPolicy.from_pretrained(str(ckpt))
            parts = (policy, *make_pre_post_processors(policy.config, pretrained_path=str(ckpt)))
        self.policy, self.preprocessor, self.postprocessor = parts
        self.policy.eval()
        self.tasks = tasks
        self.task_conditioned = True  # tells the evaluator to pass task indices
        action_dim = self.policy.config.output_features["action"].shape[0]
        self.shape_meta = SimpleNamespace(tasks=tasks, obs={"state": [PROPRIO + 35]}, action_dim=action_dim)
        self.cfg = SimpleNamespace(
            obs_keys=["state"], n_obs_steps=N_OBS, horizon=N_ACTION, n_action_steps=N_ACTION,
            objective=SimpleNamespace(num_inference_steps=DENOISE_STEPS),
            head=SimpleNamespace(type="single"),
        )
        # the evaluator checks the step count against the objective's schedule; LeRobot's scheduler samples any
        self.objective = SimpleNamespace(schedule=lambda n: list(range(int(n))))
        self.device = torch.device("cpu")
        self._torch = torch

    def eval(self):
        self.policy.eval()
        return self

    def task_index(self, task: str) -> int:
        return self.tasks.index(task)

    def execution_info(self) -> dict:
        return {"execution": "fixed", "n_action_steps": N_ACTION}

    def plan(self, obs, generator=None, num_steps=None):
        from mixpolicy.policies.denoising_policy import ActionPlan

        actions = self.predict_action_chunk(obs, generator, num_steps)
        executable = self._torch.full((actions.shape[0],), N_ACTION, dtype=self._torch.long)
        return ActionPlan(actions, executable, normalized=actions)  # (normalized: read by warm starts only, never made here)

    def predict_action_chunk(self, obs, generator=None, num_steps=None):
        torch = self._torch
        state = obs["state"].float()
        b = state.shape[0]
        onehot = torch.nn.functional.one_hot(obs["task"].long(), len(self.tasks)).float()[:, None, :].expand(b, state.shape[1], -1)
        batch = {
            "observation.state": state[..., :PROPRIO],
            "observation.environment_state": torch.cat([state[..., PROPRIO:], onehot], dim=-1),
        }
        batch = self.preprocessor(batch)
        cfg = self.policy.config
        noise = torch.randn((b, cfg.horizon, cfg.output_features["action"].shape[0]), generator=generator)
        with torch.no_grad():
            actions = self.policy.diffusion.generate_actions(batch, noise=noise)
        return self.postprocessor(actions)


def _lerobot_checkpoint(run: Path) -> Path:
    return run / "checkpoints" / "last" / "pretrained_model"


# ---------------------------------------------------------------------- 3. latency
def latency(args, tasks: list[str], calls: int = 200) -> dict:
    """Per-chunk latency at batch 1, eager and with torch.compile (each tool's network compiled
    the way its config offers: mixpolicy ``compile=true`` compiles ``policy.net``, LeRobot's
    ``compile_model`` compiles its U-Net)."""
    import numpy as np
    import torch

    from mixpolicy.policies.checkpoint import load_policy

    ours, _ = load_policy(args.work / "mixpolicy" / "checkpoints" / "last")
    theirs = LeRobotAdapter(_lerobot_checkpoint(args.work / "lerobot"), tasks)
    rng = np.random.default_rng(0)
    obs = {
        "state": torch.from_numpy(rng.normal(size=(1, N_OBS, 39)).astype(np.float32)),
        "task": torch.zeros(1, dtype=torch.long),
    }
    out = {}
    for mode in ("eager", "compiled"):
        if mode == "compiled":
            ours.net.compile()
            theirs.policy.diffusion.unet = torch.compile(theirs.policy.diffusion.unet)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            times = {"mixpolicy": [], "lerobot": []}
            with torch.inference_mode():
                for i in range(calls + 10):
                    for name, policy in (("mixpolicy", ours), ("lerobot", theirs)) if i % 2 == 0 else (("lerobot", theirs), ("mixpolicy", ours)):
                        t = time.perf_counter()
                        chunk = policy.predict_action_chunk(obs, num_steps=DENOISE_STEPS)
                        dt = time.perf_counter() - t
                        assert chunk.shape[0] == 1 and chunk.shape[1] >= N_ACTION
                        if i >= 10:  # the first calls compile
                            times[name].append(dt * 1000)
            out[f"{mode}/threads_{threads}"] = {
                name: {"median_ms": statistics.median(v), "p90_ms": float(np.percentile(v, 90))} for name, v in times.items()
            }
            print(mode, threads, {k: round(v["median_ms"], 2) for k, v in out[f"{mode}/threads_{threads}"].items()}, flush=True)
    return out


def flops(args, tasks: list[str], batch: int = 32) -> dict:
    """Floating-point operations (torch's FlopCounterMode: matmuls, convolutions, attention)
    of one action chunk at batch 1 and of one training sample (forward + backward)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mixpolicy.policies.checkpoint import load_policy

    ours, _ = load_policy(args.work / "mixpolicy" / "checkpoints" / "last")
    theirs = LeRobotAdapter(_lerobot_checkpoint(args.work / "lerobot"), tasks)
    obs = {"state": torch.zeros(1, N_OBS, PROPRIO + 35), "task": torch.zeros(1, dtype=torch.long)}
    out: dict = {}
    for name, policy in (("mixpolicy", ours), ("lerobot", theirs)):
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            policy.predict_action_chunk(obs, num_steps=DENOISE_STEPS)
        out[name] = {"chunk_mflop": counter.get_total_flops() / 1e6}
    g = torch.Generator().manual_seed(0)
    ours.train()
    ours_batch = {
        "state": torch.randn(batch, N_OBS, PROPRIO + 35, generator=g),
        "action": torch.randn(batch, HORIZON, 4, generator=g),
        "task": torch.zeros(batch, dtype=torch.long),
    }
    with FlopCounterMode(display=False) as counter:
        ours.compute_loss(ours_batch)[0].backward()
    out["mixpolicy"]["train_mflop_per_sample"] = counter.get_total_flops() / 1e6 / batch
    theirs.policy.train()
    their_batch = {
        "observation.state": torch.randn(batch, N_OBS, PROPRIO, generator=g),
        "observation.environment_state": torch.randn(batch, N_OBS, 35 + len(tasks), generator=g),
        "action": torch.randn(batch, HORIZON, 4, generator=g),
        "action_is_pad": torch.zeros(batch, HORIZON, dtype=torch.bool),
    }
    with FlopCounterMode(display=False) as counter:
        theirs.policy.forward(their_batch)[0].backward()
    out["lerobot"]["train_mflop_per_sample"] = counter.get_total_flops() / 1e6 / batch
    return out


# ---------------------------------------------------------------------- 4. eval
def evaluate_both(args, tasks: list[str]) -> dict:
    return evaluate_runs(args, tasks, {"mixpolicy": args.work / "mixpolicy", "lerobot": args.work / "lerobot"})


def evaluate_runs(args, tasks: list[str], runs: dict[str, Path]) -> dict:
    """Closed-loop success of each run's final checkpoint (a mixpolicy run named "mixpolicy",
    LeRobot runs otherwise), same tasks and episode seeds for all."""
    import torch

    from mixpolicy.policies.checkpoint import load_policy
    from mixpolicy.envs.evaluate import evaluate_policy

    torch.set_num_threads(_cores())
    res = {}
    for name, run in runs.items():
        if name == "mixpolicy":
            policy, _ = load_policy(run / "checkpoints" / "last")
        else:
            policy = LeRobotAdapter(_lerobot_checkpoint(run), tasks)
        r = evaluate_policy(policy, tasks, episodes_per_task=args.episodes, seed=100_000, num_envs=25, progress=False)
        res[name] = {
            "average_success": r["average_success"],
            "overall_wilson95": r["overall_wilson95"],
            "tasks": {t: {k: v[k] for k in ("success_rate", "successes", "episodes", "wilson95", "mean_length")} for t, v in r["tasks"].items()},
            "seconds": r["seconds"],
        }
    return res


def _extra_lerobot_name(lr: float) -> str:
    return f"lerobot_lr{lr:g}"


def _median_run(runs: list[dict]) -> dict:
    return {**runs[0], "samples_per_s": statistics.median(r["samples_per_s"] for r in runs), "rounds": [r["samples_per_s"] for r in runs]}


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ---------------------------------------------------------------------- driver
def _phase_in_subprocess(args, phase: str, **extra) -> dict:
    """Each training runs in a fresh interpreter (nothing warmed up or shared between the two)."""
    cmd = [sys.executable, __file__, "--phase", phase, *sys.argv[1:]]
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    result = args.work / f".{phase}{''.join(f'_{v}' for v in extra.values())}.json"
    cmd += ["--result", str(result)]
    subprocess.run(cmd, check=True)
    return json.loads(result.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="mixpolicy zarr store of Meta-World demonstrations")
    p.add_argument("--work", type=Path, required=True, help="folder for the converted dataset, runs and results")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--episodes", type=int, default=50, help="evaluation episodes per task")
    p.add_argument("--width", type=int, default=160, help="mixpolicy transformer width")
    p.add_argument("--depth", type=int, default=4, help="mixpolicy transformer depth")
    p.add_argument("--condition", default="joint", choices=["joint", "cached"], help="mixpolicy network.condition")
    p.add_argument("--actions-per-token", type=int, default=1, help="mixpolicy network.actions_per_token")
    p.add_argument("--condition-layers", type=int, default=1, help="mixpolicy network.condition_layers (cached layout)")
    p.add_argument("--norm", default="rms", choices=["rms", "layer"], help="mixpolicy network.norm")
    p.add_argument("--down-dims", type=int, nargs="+", default=[64, 128], help="LeRobot UNet down_dims")
    p.add_argument("--lerobot-workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers to probe for LeRobot; the fastest trains")
    p.add_argument("--probe-steps", type=int, default=60, help="steps of each throughput probe (LeRobot worker counts, mixpolicy precision/compile)")
    p.add_argument("--probe-rounds", type=int, default=2, help="rounds of throughput probes (median reported)")
    p.add_argument("--lerobot-lr", type=float, default=0.0, help="override LeRobot's preset lr (0: its default 1e-4)")
    p.add_argument("--mixpolicy-lr", type=float, default=0.0, help="override mixpolicy's train.lr (0: its default 1e-3)")
    p.add_argument("--mixpolicy-prediction", default="epsilon", choices=["epsilon", "sample"],
                   help="mixpolicy's DDPM target: noise (epsilon, as LeRobot's preset) or clean actions (sample)")
    p.add_argument("--mixpolicy-warmup", type=int, default=-1, help="override mixpolicy's train.warmup_steps (-1: its default 100)")
    p.add_argument("--lerobot-train-workers", type=int, default=-1, help="DataLoader workers of LeRobot's full training runs (-1: the fastest probed)")
    p.add_argument("--mixpolicy-variants", nargs="+", default=["fp32-eager", "fp32-compile"], choices=MIXPOLICY_VARIANTS,
                   help="mixpolicy precision/compile variants to probe (benchmarks/train_scale.py measures all of them)")
    p.add_argument("--extra-lerobot-lr", type=float, nargs="*", default=[],
                   help="also train and evaluate LeRobot at these learning rates (a sensitivity check of its preset)")
    p.add_argument("--reuse-lerobot", type=Path, default=None,
                   help="a LeRobot run folder of an earlier comparison: not trained again (its latency needs no converged weights); "
                   "only mixpolicy trains and is evaluated, for comparing mixpolicy layouts against one LeRobot run")
    p.add_argument("--latency-calls", type=int, default=200, help="timed calls per policy and setting")
    p.add_argument("--phases", default="convert,probe,train,latency,flops,eval", help="comma-separated subset to run")
    p.add_argument("--redo", action="store_true", help="repeat the selected phases even when results.json holds them")
    p.add_argument("--phase", default="all", help=argparse.SUPPRESS)
    p.add_argument("--num-workers", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--variant", default="", help=argparse.SUPPRESS)
    p.add_argument("--run-name", default="lerobot", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    if args.phase != "all":
        if args.phase == "train-mixpolicy":
            res = train_mixpolicy(args, args.work / "mixpolicy")
        elif args.phase == "probe-mixpolicy":
            args.steps = args.probe_steps
            precision, compiled = args.variant.split("-")
            res = train_mixpolicy(args, args.work / f"probe_mixpolicy_{args.variant}", precision, compiled == "compile")
        elif args.phase == "train-lerobot":
            res = train_lerobot(args, args.work / args.run_name, args.num_workers)
        elif args.phase == "probe-lerobot":
            args.steps = args.probe_steps
            out = args.work / f"probe_lerobot_w{args.num_workers}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            res = train_lerobot(args, out, args.num_workers)
        else:
            raise SystemExit(f"unknown phase {args.phase}")
        args.result.write_text(json.dumps(res, indent=2))
        return

    results_file = args.work / "results.json"
    # --redo repeats the selected phases; the results of the others stay
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    recipe = _mixpolicy_train_cfg(args, args.work / "mixpolicy")
    results["settings"] = {
        "steps": args.steps, "batch_size": args.batch_size, "seed": args.seed, "episodes_per_task": args.episodes,
        "mixpolicy": _mixpolicy_policy_cfg(args), "mixpolicy_lr": recipe.lr,
        "mixpolicy_warmup": recipe.warmup_steps, "lerobot_down_dims": args.down_dims, "denoising_steps": DENOISE_STEPS,
        "cores": _cores(),
    }

    def save():
        results_file.write_text(json.dumps(results, indent=2))

    root = args.work / "lerobot_dataset"
    if "convert" not in results or (args.redo and "convert" in args.phases.split(",")):
        subprocess.run(["rm", "-rf", str(root)], check=True)
        results["convert"] = convert(args.data, root)
        save()
    tasks = results["convert"]["tasks"]
    print(f"converted {results['convert']['episodes']} episodes ({results['convert']['frames']} frames) to {root}")

    phases = set(args.phases.split(","))
    unknown = phases - PHASES
    if unknown:
        raise SystemExit(f"unknown phase(s) {sorted(unknown)}; choose from {sorted(PHASES)}")

    if "probe" in phases and ("probe_lerobot" not in results or args.redo):
        # Rounds alternate the two tools so that load drifting on the machine hits both alike.
        runs_lr: dict[str, list] = {str(w): [] for w in args.lerobot_workers}
        runs_mp: dict[str, list] = {v: [] for v in args.mixpolicy_variants}
        for _ in range(args.probe_rounds):
            for w in args.lerobot_workers:
                runs_lr[str(w)].append(_phase_in_subprocess(args, "probe-lerobot", num_workers=w))
            for v in args.mixpolicy_variants:
                runs_mp[v].append(_phase_in_subprocess(args, "probe-mixpolicy", variant=v))
        results["probe_lerobot"] = {w: _median_run(r) for w, r in runs_lr.items()}
        results["probe_mixpolicy"] = {v: _median_run(r) for v, r in runs_mp.items()}
        save()
    if "probe_lerobot" in results:
        print("LeRobot DataLoader workers probe (samples/s):", {w: round(r["samples_per_s"], 1) for w, r in results["probe_lerobot"].items()})
        print("mixpolicy precision/compile probe (samples/s):", {v: round(r["samples_per_s"], 1) for v, r in results["probe_mixpolicy"].items()})

    if args.lerobot_train_workers < 0:
        probed = results.get("probe_lerobot")
        args.lerobot_train_workers = int(max(probed, key=lambda w: probed[w]["samples_per_s"])) if probed else 0
    if "train" in phases and ("train_mixpolicy" not in results or args.redo):
        results["train_mixpolicy"] = _phase_in_subprocess(args, "train-mixpolicy")
        save()
    if args.reuse_lerobot is not None:
        link = args.work / "lerobot"
        if not link.exists():
            link.symlink_to(args.reuse_lerobot.resolve())
        results["settings"]["reused_lerobot_run"] = str(args.reuse_lerobot.resolve())
    if "train" in phases and args.reuse_lerobot is None and ("train_lerobot" not in results or args.redo):
        subprocess.run(["rm", "-rf", str(args.work / "lerobot")], check=True)
        results["train_lerobot"] = _phase_in_subprocess(args, "train-lerobot", num_workers=args.lerobot_train_workers)
        save()
    for lr in args.extra_lerobot_lr:
        name = _extra_lerobot_name(lr)
        if "train" in phases and (f"train_{name}" not in results or args.redo):
            subprocess.run(["rm", "-rf", str(args.work / name)], check=True)
            results[f"train_{name}"] = _phase_in_subprocess(
                args, "train-lerobot", num_workers=args.lerobot_train_workers, lerobot_lr=lr, run_name=name
            )
            save()
    if "latency" in phases and ("latency" not in results or args.redo):
        results["latency"] = latency(args, tasks, calls=args.latency_calls)
        save()
    if "flops" in phases and ("flops" not in results or args.redo):
        results["flops"] = flops(args, tasks)
        save()
    if "eval" in phases and ("eval" not in results or args.redo):
        results["eval"] = evaluate_both(args, tasks) if args.reuse_lerobot is None else evaluate_runs(args, tasks, {"mixpolicy": args.work / "mixpolicy"})
        save()
    extra = [_extra_lerobot_name(lr) for lr in args.extra_lerobot_lr]
    if "eval" in phases and extra and (any(n not in results.get("eval", {}) for n in extra) or args.redo):
        results.setdefault("eval", {}).update(evaluate_runs(args, tasks, {n: args.work / n for n in extra}))
        save()
    report(results)


def report(r: dict) -> None:
    if "train_mixpolicy" in r and "train_lerobot" in r:
        tm, tl = r["train_mixpolicy"], r["train_lerobot"]
        print(f"\nparameters: mixpolicy {tm['params'] / 1e6:.2f}M, LeRobot {tl['params'] / 1e6:.2f}M")
        print(f"training samples/s, full runs: mixpolicy {tm['samples_per_s']:.0f}, LeRobot {tl['samples_per_s']:.0f} (num_workers={tl['num_workers']}) -> {tm['samples_per_s'] / tl['samples_per_s']:.2f}x (goal >= 1.5x)")
    if "probe_lerobot" in r:
        best_lerobot = max(v["samples_per_s"] for v in r["probe_lerobot"].values())
        for variant, v in r["probe_mixpolicy"].items():
            print(f"training samples/s, probes: mixpolicy {variant} {v['samples_per_s']:.0f} vs LeRobot's fastest probe {best_lerobot:.0f} -> {v['samples_per_s'] / best_lerobot:.2f}x (goal >= 1.5x)")
    if "flops" in r:
        fm, fl = r["flops"]["mixpolicy"], r["flops"]["lerobot"]
        print(
            f"FLOPs: training {fm['train_mflop_per_sample']:.0f} vs {fl['train_mflop_per_sample']:.0f} MFLOP per sample, "
            f"inference {fm['chunk_mflop']:.0f} vs {fl['chunk_mflop']:.0f} MFLOP per chunk (mixpolicy vs LeRobot)"
        )
    for setting, v in r.get("latency", {}).items():
        m, l = v["mixpolicy"]["median_ms"], v["lerobot"]["median_ms"]
        print(f"latency per chunk, {DENOISE_STEPS} DDIM steps, {setting}: mixpolicy {m:.2f} ms, LeRobot {l:.2f} ms -> {m / l:.2f}x (goal <= 0.5x)")
    for name, e in r.get("eval", {}).items():
        lo, hi = e["overall_wilson95"]
        per = ", ".join(f"{t} {100 * v['success_rate']:.0f}%" for t, v in e["tasks"].items())
        print(f"success {name}: {100 * e['average_success']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] ({per})")


if __name__ == "__main__":
    main()
