"""Training loop: data-parallel, mixed precision, exact resume, periodic closed-loop evaluation.

One process (``mixpolicy train ...``) or many (``torchrun --nproc_per_node=N -m
mixpolicy.cli train ...``) run the same loop. ``batch_size`` is the global batch of one
optimizer step: it splits into ``processes x grad_accum_steps`` equal micro-batches.
Every random draw of a micro-batch (which windows, noise levels, noise, dropout) derives
from (seed, step, micro-batch index), so a resumed run continues exactly where the
checkpoint left off, and the result depends on the global batch and on the number of
micro-batches, not on how they are spread over processes and accumulation steps.

Configs are in ``config.py`` (with what ``resume=true`` restores), the steps that build a
run in ``setup.py``, ``init_from`` in ``finetune.py``, checkpoint folders and the training
state in ``checkpointing.py``; the windows come from ``mixpolicy.datasets.assembly``.

A run folder holds::

    train_config.json          the validated config of the run (what resume=true continues)
    metrics.jsonl              one JSON line per logged step, validation loss or evaluation
    tb/                        tensorboard scalars (tracking.tensorboard)
    wandb/                     wandb files (tracking.wandb)
    checkpoints/step_<N>/      policy (EMA weights) + training state; see checkpointing.py
    checkpoints/last, best     links to the newest and to the best-evaluated step
    eval/step_<N>/             closed-loop results of step N (periodic and `mixpolicy eval`)
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from mixpolicy.config import to_dict
from mixpolicy.errors import UserError
from mixpolicy.policies.checkpoint import read_checkpoint_meta, save_policy
from mixpolicy.policies.denoising_policy import key_offsets
from mixpolicy.train import finetune
from mixpolicy.train.batches import StepBatchSampler, augment_seed, batch_stream, micro_batch_seed
from mixpolicy.train.checkpointing import LAST, CheckpointStore, load_train_state, read_train_state, save_train_state, write_json_atomic
from mixpolicy.train.config import RUN_CONFIG_FILE, TrainConfig, resume_config
from mixpolicy.train.distributed import ProcessGroup
from mixpolicy.train.setup import (
    TrainingData,
    build_augment,
    build_ema,
    build_optimizer,
    build_policy,
    build_training_data,
    build_validation,
    compile_network,
    configure_compute,
    eval_tasks,
    find_resume_checkpoint,
    wrap_for_processes,
)
from mixpolicy.train.tracking import METRICS_FILE, TRACKING_FILE, LogInterval, Tracker
from mixpolicy.video import read_video

# What overwrite=true removes from a run folder (other files, eval/ included, are left alone).
RUN_ARTIFACTS = ("checkpoints", "tb", "wandb", METRICS_FILE, TRACKING_FILE, RUN_CONFIG_FILE)


class _StopSignal:
    """SIGTERM / SIGINT (preemption, Ctrl-C) ask the loop to checkpoint and stop at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second signal stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class Trainer:
    """``Trainer(cfg).run()``; attributes ``policy``, ``n_params``, ``windows``, ``device``, ``step``.

    With ``cfg.resume`` the run continues its saved config (see :func:`resume_config`); ``self.cfg`` is that config.
    """

    def __init__(self, cfg: TrainConfig, data: TrainingData | None = None):
        self.cfg = cfg = resume_config(cfg) if cfg.resume else cfg
        self.group = ProcessGroup(cfg.device)
        try:
            self._setup(cfg, data)
        except BaseException:
            self.group.close()
            raise

    def _setup(self, cfg: TrainConfig, data: TrainingData | None) -> None:
        self.device = self.group.device
        self.is_main = self.group.is_main
        self.out = Path(cfg.out_dir)
        self.checkpoints = CheckpointStore(self.out / "checkpoints", cfg.keep_last)
        self.ckpt_dir = self.checkpoints.root / LAST
        resume_dir = find_resume_checkpoint(cfg, self.out, self.checkpoints)
        self.autocast_dtype = configure_compute(cfg, self.group)
        init_dir = finetune.start_checkpoint(cfg, resume_dir)
        self.data = data if data is not None else self._build_data(cfg, init_dir, resume_dir)
        self.windows = self.data.windows
        self.validation = build_validation(cfg, self.data)
        policy_cfg, n_old_tasks = finetune.run_policy_config(cfg, self.data.shape_meta.tasks)
        self.policy = build_policy(policy_cfg, self.data).to(self.device)
        self.augment = build_augment(cfg.augment, self.policy.cfg, cfg.data.image_size)  # the policy's resolved crop
        finetune.initialize(self.policy, cfg, init_dir, n_old_tasks)
        if cfg.distill_from:
            finetune.attach_teacher(self.policy, cfg.distill_from, cfg.distill_first_share, self.device)
        self.n_params = sum(p.numel() for p in self.policy.parameters())
        self.eval_tasks = eval_tasks(cfg, self.policy) if cfg.eval.every else []
        # Ranks must train the same thing: compare configs and what they loaded.
        self.group.check_same(
            "training config",
            {"config": to_dict(cfg), "windows": len(self.windows), "parameters": self.n_params, "world_size": self.group.world_size},
        )
        self._batches: Iterator[dict[str, torch.Tensor]] | None = None
        self.sampler = StepBatchSampler(len(self.windows), cfg.batch_size, cfg.seed, self.group.world_size, self.group.rank, cfg.grad_accum_steps)
        self.optimizer, self.scheduler = build_optimizer(self.policy, cfg)
        self.ema = build_ema(self.policy, cfg)
        self.step = 0
        self.resumed_from: str | None = None
        if resume_dir is not None:
            self._load_state(resume_dir)
            self.resumed_from = str(resume_dir)
        self._fresh = not cfg.resume
        if cfg.compile:
            compile_network(self.policy, cfg)
        self.loss_module = wrap_for_processes(self.policy, self.group)

    @staticmethod
    def _build_data(cfg: TrainConfig, init_dir: Path | None, resume_dir: Path | None) -> TrainingData:
        """Windows for the policy's key offsets; a run started from a checkpoint extends its task vocabulary."""
        vocabulary_from = resume_dir if cfg.init_from and resume_dir is not None else init_dir
        tasks, descriptions = finetune.checkpoint_tasks(vocabulary_from) if vocabulary_from is not None else (None, None)
        return build_training_data(cfg, key_offsets(cfg.policy), tasks, descriptions)

    # ------------------------------------------------------------------ state
    @contextlib.contextmanager
    def ema_weights(self):
        """Temporarily load the EMA weights into the policy (for saving and evaluation)."""
        params = list(self.policy.parameters())
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield self.policy
        finally:
            self.ema.restore(params)

    def _write_checkpoint(self, path: Path) -> None:
        with self.ema_weights():
            save_policy(self.policy, path, info={"step": self.step, "dataset": self.data.source})
        info = {
            "step": self.step,
            "sampler": self.sampler.state(self.step),
            "world_size": self.group.world_size,
            "grad_accum_steps": self.cfg.grad_accum_steps,
            "seed": self.cfg.seed,
        }
        save_train_state(path, self.policy, self.ema, self.optimizer, self.scheduler, info)

    def _save(self) -> None:
        if self.is_main:
            self.checkpoints.write(self.step, self._write_checkpoint)

    def _load_state(self, ckpt: Path) -> None:
        meta = read_checkpoint_meta(ckpt)
        if meta["policy_type"] != self.cfg.policy.type:
            raise UserError(f"cannot resume: {ckpt} holds a {meta['policy_type']!r} policy, the config asks for {self.cfg.policy.type!r}")
        tensors, state_json = read_train_state(ckpt)
        saved_sampler = state_json.get("sampler")
        if saved_sampler is not None:
            for key, now in (("n_windows", self.sampler.n_windows), ("batch_size", self.sampler.batch_size)):
                if saved_sampler[key] != now:
                    raise UserError(
                        f"cannot resume exactly: the run used {key}={saved_sampler[key]}, now {now} "
                        "(same dataset, filters and batch_size are needed; overwrite=true starts over)"
                    )
        if state_json.get("seed", self.cfg.seed) != self.cfg.seed:
            raise UserError(f"cannot resume exactly: the run used seed={state_json['seed']}, now {self.cfg.seed}")
        self.step = load_train_state(tensors, state_json, self.policy, self.ema, self.optimizer, self.scheduler)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, Any]:
        """Closed-loop success of the EMA weights on the evaluation tasks (main process only).

        The full results go to ``<run>/eval/step_N/results.json``; returns their summary.
        """
        from mixpolicy.envs.evaluate import evaluate_policy, results_folder, write_results

        e = self.cfg.eval
        out = results_folder(self.checkpoints.step_dir(self.step))
        with self.ema_weights():
            try:
                res = evaluate_policy(
                    self.policy,
                    self.eval_tasks,
                    episodes_per_task=e.episodes_per_task,
                    seed=e.seed,
                    num_envs=e.num_envs,
                    max_episode_steps=e.max_episode_steps,
                    num_inference_steps=e.num_inference_steps or None,
                    progress=False,
                    video_dir=out / "videos" if e.video_episodes else None, video_episodes=e.video_episodes,
                )
            finally:
                self.policy.train()
        res.update(step=self.step, checkpoint=str(self.checkpoints.step_dir(self.step)), config=to_dict(e))
        results_file = write_results(out, res)
        return {
            "step": self.step,
            "average_success": res["average_success"],
            "wilson95": res["overall_wilson95"],
            "episodes_per_task": e.episodes_per_task,
            "seed": e.seed,
            "seconds": res["seconds"],
            "results_file": str(results_file),
            "videos": sorted(str(p) for p in (out / "videos").glob("*.mp4")) if e.video_episodes else [],
            "tasks": {t: {k: r[k] for k in ("success_rate", "successes", "episodes", "wilson95", "mean_length")} for t, r in res["tasks"].items()},
        }

    def _evaluate_and_select(self, tracker: Tracker, bar) -> None:
        if self.is_main:
            summary = self.evaluate()
            is_best = self.checkpoints.record_eval(self.step, summary)
            values = {"average_success": summary["average_success"], "wilson95_low": summary["wilson95"][0], "wilson95_high": summary["wilson95"][1]}
            values.update({f"success/{t}": r["success_rate"] for t, r in summary["tasks"].items()})
            tracker.log("eval", self.step, values)
            for path in summary.get("videos", []):
                tracker.video(f"eval/{Path(path).stem}", read_video(path), self.step)
            bar.write(
                f"step {self.step}: success {100 * summary['average_success']:.1f}% "
                f"[{100 * summary['wilson95'][0]:.1f}, {100 * summary['wilson95'][1]:.1f}]" + (" (best so far)" if is_best else "")
            )
        self.group.barrier()

    def _validate(self, tracker: Tracker) -> None:
        """Validation loss of the EMA weights (main process), logged as kind ``val``."""
        if self.is_main:
            with self.ema_weights():
                tracker.log("val", self.step, self.validation(self.policy, self.device, self.autocast_dtype))
        self.group.barrier()

    # ------------------------------------------------------------------ loop
    def _prepare_run_folder(self) -> None:
        if not self.is_main:
            return
        if self._fresh and self.cfg.overwrite:
            for name in RUN_ARTIFACTS:
                p = self.out / name
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        self._fresh = False
        self.out.mkdir(parents=True, exist_ok=True)
        self.checkpoints.clean_temporaries()
        write_json_atomic(self.out / RUN_CONFIG_FILE, to_dict(self.cfg))

    def train_step(self, batches: Iterator[dict[str, torch.Tensor]] | None = None, interval: LogInterval | None = None) -> float:
        """One optimization step over ``grad_accum_steps`` micro-batches; returns the gradient norm.

        ``batches`` defaults to a stream that continues from the current step (what ``run`` uses).
        """
        cfg = self.cfg
        if batches is None:
            if self._batches is None:
                self._batches = batch_stream(self.windows, self.sampler, self.step, cfg.loader, self.device)
            batches = self._batches
        interval = interval if interval is not None else LogInterval()
        accum = cfg.grad_accum_steps
        amp = self.autocast_dtype is not None
        t_step = time.perf_counter()
        for k in range(accum):
            t = time.perf_counter()
            batch = next(batches)
            interval.data_s += time.perf_counter() - t
            batch = {key: v.to(self.device, non_blocking=True) for key, v in batch.items()}
            if self.augment is not None:  # camera keys, on the device, from the micro-batch's own seed
                g = torch.Generator().manual_seed(augment_seed(cfg.seed, self.step, self.sampler.shard_index(k)))
                batch.update({key: self.augment.frames(batch[key], g) for key in self.policy.image_keys})
            torch.manual_seed(micro_batch_seed(cfg.seed, self.step, self.sampler.shard_index(k)))
            sync = self.loss_module.no_sync() if self.group.distributed and k < accum - 1 else contextlib.nullcontext()
            with sync:
                with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=amp):
                    loss, logs = self.loss_module(batch)
                if not torch.isfinite(loss):
                    raise UserError(f"loss became {float(loss)} at step {self.step}; lower lr or check the data")
                (loss / accum).backward()
            interval.add(logs)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.ema.step(self.policy.parameters())
        self.step += 1
        interval.grad_norm += float(grad_norm)
        interval.steps += 1
        interval.train_s += time.perf_counter() - t_step
        return float(grad_norm)

    def run(self, until: int | None = None) -> dict[str, Any]:
        """Train to cfg.steps (or stop early at step ``until``, saving a resumable state)."""
        cfg = self.cfg
        stop = min(cfg.steps, until) if until is not None else cfg.steps
        self._prepare_run_folder()
        self.group.barrier()
        tracker = Tracker(self.out, cfg.tracking, to_dict(cfg), resume_step=self.step if self.step > 0 else None, active=self.is_main)
        self.policy.train()
        batches = self._batches = batch_stream(self.windows, self.sampler, self.step, cfg.loader, self.device)
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", disable=not (cfg.progress and self.is_main), dynamic_ncols=True)
        interval = LogInterval()
        t_run = time.perf_counter()
        start_step = self.step
        last_loss = float("nan")
        saved_at = -1
        try:
            with _StopSignal() as stop_signal:
                while self.step < stop:
                    self.train_step(batches, interval)
                    bar.update(1)

                    if self.step % cfg.log_every == 0 or self.step == stop:
                        record = interval.reduce(self.group)
                        last_loss = record.get("loss", last_loss)
                        record.update(
                            lr=self.scheduler.get_last_lr()[0],
                            epoch=self.step / self.sampler.steps_per_epoch,
                            samples_per_s=cfg.batch_size * interval.steps / max(interval.train_s, 1e-9),
                            steps_per_s=interval.steps / max(interval.train_s, 1e-9),
                            data_wait_frac=interval.data_s / max(interval.train_s, 1e-9),
                        )
                        tracker.log("train", self.step, record)
                        bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{record['lr']:.1e}")
                        interval = LogInterval()

                    if self.validation is not None and (self.step % cfg.val_every == 0 or self.step == cfg.steps):
                        self._validate(tracker)
                    do_eval = cfg.eval.every and (self.step % cfg.eval.every == 0 or self.step == cfg.steps)
                    periodic = cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
                    if do_eval or periodic or self.step == stop:
                        self._save()
                        saved_at = self.step
                    if do_eval:
                        self._evaluate_and_select(tracker, bar)
                    if self.group.any(stop_signal.requested) and self.step < stop:
                        if saved_at != self.step:
                            self._save()
                        if self.is_main:
                            print(f"training stopped at step {self.step}; checkpoint in {self.ckpt_dir} (resume=true continues)", file=sys.stderr)
                        raise KeyboardInterrupt
        finally:
            bar.close()
            tracker.close()
        if saved_at != self.step:
            self._save()
        self.group.barrier()
        best = self.checkpoints.resolve("best") if self.is_main else None
        result = {
            "checkpoint": str(self.ckpt_dir),
            "steps": self.step,
            "final_loss": last_loss,
            "seconds": time.perf_counter() - t_run,
            "params": self.n_params,
            "windows": len(self.windows),
            "trained_steps": self.step - start_step,
            "best_checkpoint": str(best) if best else None,
            "best_success": self.checkpoints.best_score() if best else None,
        }
        if self.step >= cfg.steps:
            self.close()
        return result

    def close(self) -> None:
        """Leave the process group (when this trainer joined it)."""
        self.group.close()


def train(cfg: TrainConfig) -> dict[str, Any]:
    return Trainer(cfg).run()
