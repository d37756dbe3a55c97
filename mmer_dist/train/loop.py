"""The training loop: rank loaders -> Accelerate (DDP or DeepSpeed) -> evaluations, checkpoints, export.

    from mmer_dist.train.loop import train
    metrics = train(cfg, Path("runs/debug"), index)      # cfg resolved by mmer_dist.train.__main__

`train` reads as the steps of a run; `Run` holds what they share. Every rank runs the same number
of micro-batches per epoch (the rank loaders guarantee it, mmer_dist.data.loader), so collectives
never wait on a rank that ran out of data. A SIGTERM/SIGUSR1 (Slurm's warning before a time limit
or preemption) or a Ctrl-C makes every rank agree to stop at the same step, save a checkpoint and exit
cleanly; `resume=latest` continues exactly where it stopped (weights, optimizer, scheduler, RNG, the
loader's position and the weight average are all in the checkpoint; mmer_dist.train.resume says what a
resume may change).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mmer_dist import dist
from mmer_dist.config import Config
from mmer_dist.shards.schema import ShardIndex, load_index, write_json_atomic
from mmer_dist.train.checkpoint import (
    EXPORT_WEIGHTS, TrainerState, export_model, load_exported, read_checkpoint_extra, read_trainer_state,
    save_checkpoint,
)
from mmer_dist.train.accounting import DataAccounting
from mmer_dist.train.engine import (
    build_accelerator, fill_deepspeed_sizes, full_state_dict, param_checksum, rewrap_model, unwrap, whole_hf_models,
    zero_stage,
)
from mmer_dist.train.evaluation import evaluate, to_device
from mmer_dist.train.metrics import HEADLINE, write_metrics
from mmer_dist.train.resume import ResumePlan, plan_resume, record_start
from mmer_dist.train.runlog import RunLog, environment_info
from mmer_dist.train.stop import StoppedWaiting, StopRequest, requeue_if_slurm


def train(cfg: Config, run_dir: Path, index: ShardIndex | None = None) -> dict[str, Any]:
    """Train, evaluate periodically, keep the best by dev Macro-F1 (or the last: train.select), export,
    write metrics.json. `cfg` is the resolved config (model sized to the shards' labels)."""
    run_dir = Path(run_dir)
    accelerator = build_accelerator(cfg)
    stop = StopRequest()
    stop.install()
    if index is None:
        from mmer_dist.data.build import shards_location

        index = load_index(shards_location(cfg.data))
    plan = dist.broadcast_object(plan_resume(cfg, run_dir) if accelerator.is_main_process else None)
    write_run_files(run_dir, cfg, accelerator, plan)
    resume_from = plan.checkpoint
    run = Run(cfg, run_dir, accelerator, index,
              read_trainer_state(resume_from) if resume_from is not None else TrainerState())
    if resume_from is not None:
        run.restore(resume_from)
    outcome = run.fit(stop)
    if outcome != "done":
        run.log.close()
        requeue_if_slurm(accelerator.is_main_process, stop.signum)
        return {"stopped": True, "stalled": outcome == "stalled", "step": run.state.step}
    metrics = run.finish()
    accelerator.end_training()
    return metrics


def check_elastic_resume(checkpoint: Path, saved: int, world: int, stage: int | None, cfg: Config) -> None:
    """Refuse a resume on another number of ranks where the state cannot be re-divided, naming the choices."""
    from mmer_dist.config import ConfigError

    if stage is not None:
        raise ConfigError(
            f"{checkpoint} was written by {saved} DeepSpeed processes and this run has {world}: DeepSpeed's ZeRO "
            f"states are partitioned per rank. Resume with {saved} processes, or convert the checkpoint to "
            f"DeepSpeed's universal format (deepspeed/checkpoint/ds_to_universal.py) and resume from that with "
            f'"checkpoint": {{"load_universal": true}} in the DeepSpeed JSON')
    if cfg.data.loader == "stream":
        raise ConfigError(
            f"{checkpoint} was written by {saved} process(es) and this run has {world}: a streaming epoch is a "
            f"per-rank stream of shards and cannot be re-divided. Resume with {saved} processes, or use "
            f"data.loader=map (exact elastic resume), or start a new run from the exported weights")


def write_run_files(run_dir: Path, cfg: Config, accelerator: Any, plan: ResumePlan) -> None:
    """config.yaml (first start) or a resumes.jsonl line (later starts), and env.json, on the main rank,
    before anything trains (mmer_dist.train.resume)."""
    if accelerator.is_main_process:
        for line in record_start(run_dir, cfg, plan):
            print(line, flush=True)
        (run_dir / "env.json").write_text(json.dumps(environment_info(accelerator), indent=1))
    accelerator.wait_for_everyone()


class Run:
    """One training run on this rank: model, loaders, optimizer, schedule, state, log."""

    def __init__(self, cfg: Config, run_dir: Path, accelerator: Any, index: ShardIndex, state: TrainerState) -> None:
        from tqdm.auto import tqdm

        from mmer_dist.data.build import build_eval_loader, build_train_loader
        from mmer_dist.models import build_loss, build_model, build_tokenizer
        from mmer_dist.train.optim import add_unfrozen_params, apply_freeze_schedule, build_optimizer, build_scheduler

        self.cfg, self.run_dir, self.accelerator, self.state, self.index = cfg, run_dir, accelerator, state, index
        self.main, self.world = accelerator.is_main_process, accelerator.num_processes
        device, rank = accelerator.device, accelerator.process_index
        torch.manual_seed(cfg.train.seed)          # same initial weights on every rank
        model = build_model(cfg.model)
        tokenizer = build_tokenizer(cfg.model.text) if "text" in cfg.data.modalities else None
        self.train_loader = build_train_loader(cfg.data.shards, cfg.data, cfg.sampler, tokenizer, rank=rank,
                                               world_size=self.world, seed=cfg.train.seed, index=index)
        self.eval_loader = build_eval_loader(cfg.data.shards, cfg.data, tokenizer, split=cfg.data.eval_split,
                                             rank=rank, world_size=self.world, index=index)
        self.labels = self.train_loader.label_names
        self.loss_fn = build_loss(cfg.loss, self.train_loader.class_counts).to(device)   # weights are buffers
        self.steps_per_epoch = max(1, len(self.train_loader) // cfg.train.grad_accum)
        # The schedule's length is fixed when the run starts; a resumed run (on any number of ranks) keeps it.
        # The run's length is fixed when it starts: a resume on another number of ranks (other steps per epoch)
        # keeps it; a resume that asks for another length (train.epochs / max_steps) takes the new one.
        length = [cfg.train.epochs, cfg.train.max_steps]
        if not state.total_steps or state.length != length:
            state.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
            state.length = length
        self.total_steps = state.total_steps
        self.accounting = DataAccounting(self.train_loader, state, cfg.data.max_skip_fraction)

        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, self.total_steps)
        if apply_freeze_schedule(model, cfg.model, state.step):
            # resumed past an unfreeze step: rebuild the groups in the order they were saved in
            add_unfrozen_params(optimizer, model, cfg.optim, scheduler)
        fill_deepspeed_sizes(accelerator, model)
        # Only these three go through prepare; the rank loaders must not (mmer_dist.data.loader).
        self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)
        self.ema = self._weight_average()
        self.log = RunLog(run_dir, self.main)
        self.bar = tqdm(total=self.total_steps, initial=state.step, disable=not self.main, desc="train",
                        unit="step", dynamic_ncols=True, mininterval=1.0)

    # ---- setup

    def _weight_average(self) -> Any:
        """The train.ema_decay average of the prepared model's weights, registered for checkpointing; None if off."""
        from mmer_dist.train.ema import WeightAverage, check_zero_stage

        if self.cfg.train.ema_decay <= 0:
            return None
        check_zero_stage(self.cfg.train.ema_decay, zero_stage(self.accelerator))
        ema = WeightAverage(self.unwrapped, self.cfg.train.ema_decay)
        self.accelerator.register_for_checkpointing(ema)    # saved and loaded with every checkpoint
        return ema

    @property
    def unwrapped(self) -> torch.nn.Module:
        return unwrap(self.accelerator, self.model)

    def averaged(self) -> Any:
        """A context in which the model holds the weight average (train.ema_decay > 0), else a no-op."""
        return self.ema.applied(self.unwrapped) if self.ema is not None else contextlib.nullcontext()

    def restore(self, checkpoint: Path) -> None:
        """Model, optimizer, scheduler, RNG, weight average (Accelerate) and the loader's position.

        On another number of ranks than the checkpoint's, the map-style loader re-divides the rest of the
        epoch (exact: mmer_dist.data.sampler); a streaming epoch or DeepSpeed's partitioned states cannot be
        re-divided, so those are refused with the choices."""
        extra = read_checkpoint_extra(checkpoint)
        saved = int(extra.get("world_size", self.world))
        if saved != self.world:
            check_elastic_resume(checkpoint, saved, self.world, zero_stage(self.accelerator), self.cfg)
        self.accelerator.load_state(str(checkpoint))
        self.train_loader.load_state_dict(extra["loader"])
        if saved != self.world:
            self.state.batches_in_epoch = 0          # counts batches of the new layout from here
        if self.main:
            resized = (f"; the checkpoint was written by {saved} process(es): the rest of epoch {self.state.epoch} "
                       f"is re-divided over these {self.world}" if saved != self.world else "")
            print(f"resumed from {checkpoint} at step {self.state.step} (epoch {self.state.epoch}, "
                  f"batch {self.state.batches_in_epoch}){resized}", flush=True)

    # ---- the loop

    def fit(self, stop: StopRequest) -> str:
        """Train until train.epochs / train.max_steps: "done"; "stopped" when a stop signal ended it early
        (checkpointed); "stalled" when the signal came while the loop waited for data that never came."""
        try:
            return self._fit(stop)
        except StoppedWaiting:
            return self._stopped_waiting(stop)

    def _fit(self, stop: StopRequest) -> str:
        cfg, state = self.cfg, self.state
        if self.main:
            print(f"{self.world} process(es) on {self.accelerator.device} ({self.accelerator.distributed_type}); "
                  f"global batch {cfg.data.batch_size * self.world * cfg.train.grad_accum}; {self.steps_per_epoch} "
                  f"steps/epoch, {self.total_steps} steps; sampler {cfg.sampler.weighting}, loss {cfg.loss.name}; "
                  f"run folder {self.run_dir}", flush=True)
        self.model.train()
        self._window = torch.zeros(2, dtype=torch.float64, device=self.accelerator.device)   # [loss sum, count]
        self._t_last, self._seen_last = time.time(), state.samples_seen
        while state.step < self.total_steps:
            self.train_loader.set_epoch(state.epoch)
            batches = self.train_loader.iter_from()          # from the loader's own (restored) position
            while True:
                with stop.waiting():                          # a stop signal while data never comes: stop now
                    batch = next(batches, None)
                if batch is None:
                    break
                if not self.train_step(batch):
                    continue                      # accumulating gradients: no optimizer step yet
                self.after_step()
                if stop.agreed(self.accelerator.device):
                    self.checkpoint()
                    if self.main:
                        self.bar.write(f"{stop.name} received: checkpoint saved at step {state.step}; "
                                       f"run the same command with resume=latest to continue")
                    self.bar.close()
                    return "stopped"
                if state.step % self.checkpoint_every == 0 or state.step >= self.total_steps:
                    self.checkpoint()
                if state.step >= self.total_steps:
                    break
        self.bar.close()
        return "done"

    def _stopped_waiting(self, stop: StopRequest) -> str:
        """A stop signal while waiting for a batch. One process checkpoints the last completed step; with
        several, the other ranks may be inside a collective, so the last periodic checkpoint stands."""
        from mmer_dist.train.checkpoint import complete_checkpoints

        self.bar.close()
        if self.world == 1:
            self.checkpoint()
        last = complete_checkpoints(self.run_dir)
        print(f"{stop.name} received while waiting for data at step {self.state.step} (the loader delivered "
              f"nothing in {stop.grace:.0f} s; see data.loader_timeout_s): stopped. Last complete checkpoint: "
              f"{last[-1] if last else 'none'}; run again with resume=latest to continue from it", file=sys.stderr,
              flush=True)
        return "stalled"
    @property
    def selected_on(self) -> str | None:
        """The split the exported weights were chosen on: the eval split with train.select=best, none with
        last (the final weights are kept whatever the evaluations said)."""
        return self.cfg.data.eval_split if self.cfg.train.select == "best" else None

    @property
    def checkpoint_every(self) -> int:
        return self.cfg.train.checkpoint_every or self.steps_per_epoch

    def train_step(self, batch: dict[str, Any]) -> bool:
        """Forward, backward and (when the accumulation is complete) an optimizer step; True after one."""
        accelerator, state = self.accelerator, self.state
        batch = to_device(batch, accelerator.device)
        with accelerator.accumulate(self.model):
            logits = self.model(batch).float()
            # A batch can be empty (every sample skipped, or an elastic epoch's last step on a rank whose share
            # ran out): its zero loss still runs backward, so DDP's all-reduce sees every rank.
            loss = self.loss_fn(logits, batch["labels"]) if len(batch["labels"]) else logits.sum() * 0.0
            accelerator.backward(loss)
            if accelerator.sync_gradients and self.cfg.optim.grad_clip > 0:
                accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._window[0] += loss.detach().double()      # kept on the device: no host sync per step
        self._window[1] += 1
        state.samples_seen += len(batch["labels"]) * self.world
        # The state always names the next batch to consume, so a checkpoint taken now resumes after it.
        state.batches_in_epoch += 1
        if self.train_loader.epoch_done:
            self.log.write({"step": state.step, "epoch": state.epoch, "split": "epoch",   # a finished epoch
                            **self.accounting.end_epoch(state.epoch)})
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
            self.train_loader.set_epoch(state.epoch)
        if not accelerator.sync_gradients:
            return False
        self.scheduler.step()
        state.step += 1
        return True

    def after_step(self) -> None:
        """Weight average, unfreeze schedule, log line and evaluation after optimizer step `state.step`."""
        from mmer_dist.train.optim import add_unfrozen_params, apply_freeze_schedule

        state = self.state
        if self.ema is not None:
            self.ema.update(self.unwrapped)
        self.bar.update(1)
        if apply_freeze_schedule(self.unwrapped, self.cfg.model, state.step):
            names = add_unfrozen_params(self.optimizer, self.unwrapped, self.cfg.optim, self.scheduler)
            self.model = rewrap_model(self.accelerator, self.model)
            self.bar.write(f"step {state.step}: encoders unfrozen ({', '.join(names)})")
        if state.step % self.cfg.train.log_every == 0:
            self.log_train()
        if state.step % (self.cfg.train.eval_every or self.steps_per_epoch) == 0 or state.step >= self.total_steps:
            self.evaluate_and_select()

    def log_train(self) -> None:
        """The mean loss since the last line (over ranks), the learning rate of each component (`lr/fusion`,
        `lr/text`, ...: the fusion/head and every trainable encoder) and throughput."""
        from mmer_dist.train.optim import group_lrs

        now = time.time()
        totals = dist.all_reduce_sum(self._window)
        mean_loss = float(totals[0] / max(totals[1].item(), 1.0))
        rate = (self.state.samples_seen - self._seen_last) / max(now - self._t_last, 1e-9)
        read, skipped, degraded = self.accounting.running()
        self.accounting.check(read, skipped)
        self.log.write({"step": self.state.step, "epoch": self.state.epoch, "split": "train", "loss": mean_loss,
                        **{f"lr/{k}": v for k, v in group_lrs(self.optimizer).items()}, "samples_per_s": rate,
                        "samples_read": read, "skipped": skipped, "degraded": degraded})
        self.bar.set_postfix(loss=f"{mean_loss:.3f}", samples_s=f"{rate:.0f}", refresh=False)
        self._t_last, self._seen_last = now, self.state.samples_seen
        self._window.zero_()

    def evaluate_and_select(self) -> None:
        """Evaluate on the eval split; export to best/ when this evaluation is the one train.select keeps."""
        cfg, state = self.cfg, self.state
        with self.averaged():   # the weight average when train.ema_decay > 0
            metrics = evaluate(self.model, self.eval_loader, self.accelerator.device, self.loss_fn).metrics
            per_class = {k: v["f1"] for k, v in metrics["per_class"].items()}
            self.log.write({"step": state.step, "epoch": state.epoch, "split": cfg.data.eval_split,
                            **{k: metrics[k] for k in (*HEADLINE, "loss")}}, per_class)
            if self.main:
                self.bar.write(f"step {state.step}: {cfg.data.eval_split} macro-F1 {metrics['macro_f1']:.3f} "
                               f"weighted-F1 {metrics['weighted_f1']:.3f} acc {metrics['accuracy']:.3f}")
            chosen = (metrics["macro_f1"] > state.best_score if cfg.train.select == "best"
                      else state.step >= self.total_steps)
            if chosen:
                state.best_score, state.best_step = metrics["macro_f1"], state.step
                self.export(self.run_dir / "best", {"step": state.step, "macro_f1": metrics["macro_f1"],
                                                    "split": cfg.data.eval_split, "selected_on": self.selected_on})

    def export(self, path: Path, info: dict[str, Any]) -> None:
        """The current weights as an exported model folder (a collective: ZeRO-3 shards are gathered)."""
        sd = full_state_dict(self.accelerator, self.model)
        if self.main:
            export_model(sd, self.cfg.model, self.cfg.data, self.labels, path, info)

    def checkpoint(self) -> None:
        self.accounting.store(self.state)          # the run's data counts, summed over ranks
        extra = {"loader": self.train_loader.state_dict(), "world_size": self.world, "labels": list(self.labels)}
        save_checkpoint(self.accelerator, self.run_dir, self.state, extra, self.cfg.train.keep_checkpoints)

    # ---- the end

    def finish(self) -> dict[str, Any]:
        """Evaluate the selected checkpoint (a plain copy on every rank, whatever the engine: DDP, ZeRO-2/3),
        write metrics.json and train_state.json, export it."""
        from safetensors.torch import load_file

        cfg, state, accelerator = self.cfg, self.state, self.accelerator
        accelerator.wait_for_everyone()
        best_dir = self.run_dir / "best"
        if not (best_dir / EXPORT_WEIGHTS).exists():   # no evaluation ran (e.g. resumed at the last step)
            with self.averaged():
                self.export(best_dir, {"step": state.step})
            accelerator.wait_for_everyone()
        # Replicas must agree after training; record each rank's checksum (tests assert they are equal).
        checksums = dist.all_gather_object(param_checksum(self.unwrapped))
        with whole_hf_models():
            best_model = load_exported(best_dir)[0].to(accelerator.device)
        metrics = evaluate(best_model, self.eval_loader, accelerator.device, self.loss_fn,
                           predictions=self.run_dir).metrics
        self.accounting.store(state)
        if self.main:
            from mmer_dist.data.folds import protocol

            metrics["protocol"] = protocol(self.index, cfg.data.shards, cfg.data,
                                           ["train", "dev", "test"] if cfg.data.folds else sorted(self.index.splits))
        metrics.update({"split": cfg.data.eval_split, "selected_on": self.selected_on, "best_step": state.best_step,
                        "steps": state.step, "samples_seen": state.samples_seen, "shards": str(cfg.data.shards),
                        "train_data": {"read": state.samples_read, "skipped": state.skipped,
                                       "degraded": state.degraded}})
        if self.main:
            write_metrics(metrics, self.run_dir / "metrics.json")     # the format `mmer-dist eval` writes
            write_json_atomic(self.run_dir / "train_state.json",
                              {**state.to_json(), "param_checksums": checksums, "world_size": self.world})
            stage = zero_stage(accelerator)
            if len(set(checksums)) > 1 and (stage is None or stage < 3):
                print(f"WARNING: model replicas differ across ranks after training: {checksums}", file=sys.stderr)
            export_model(load_file(str(best_dir / EXPORT_WEIGHTS)), cfg.model, cfg.data, self.labels,
                         self.run_dir / "export", {"step": state.best_step, "macro_f1": metrics["macro_f1"],
                                                   "split": cfg.data.eval_split, "selected_on": self.selected_on})
            print(f"done: {cfg.data.eval_split} macro-F1 {metrics['macro_f1']:.4f} "
                  f"({cfg.train.select} step {state.best_step}); model exported to {self.run_dir / 'export'}; "
                  f"metrics in {self.run_dir / 'metrics.json'}", flush=True)
        self.log.close()
        accelerator.wait_for_everyone()
        return metrics
