"""The training loop: Accelerate (DDP or DeepSpeed) over per-rank loaders, eval, checkpoints, export.

Accelerate creates the process group and prepares the model, the optimizer and the scheduler
only. The loaders are built per rank by `mmer_dist.data.pipeline` (already split by rank, the
weighted draw already distributed) and are deliberately NOT passed to `accelerator.prepare`,
which would shard them a second time, silently (see DESIGN.md, "Distributed sampling contract").

Every rank runs the same number of micro-batches per epoch (the loader guarantees it), so
collectives never wait on a rank that ran out of data. A SIGTERM/SIGUSR1 (Slurm's warning
before a time limit or preemption) makes every rank agree to stop at the same step, save a
checkpoint and exit cleanly; `resume=latest` continues exactly where it stopped.

    from mmer_dist.train.loop import train
    metrics = train(cfg, Path("runs/debug"))
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mmer_dist import dist
from mmer_dist.config import Config, replace, save_config
from mmer_dist.shards.schema import load_index, split_index
from mmer_dist.train.checkpoint import (
    TrainerState, export_model, read_checkpoint_extra, read_trainer_state, resolve_resume, save_checkpoint,
)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Set by SIGTERM/SIGUSR1; the loop checks it once per optimizer step, agreed over ranks."""

    def __init__(self) -> None:
        self.signum = 0

    def install(self) -> None:
        for s in STOP_SIGNALS:
            signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def agreed(self, device: torch.device) -> bool:
        """True on every rank as soon as any rank received a stop signal."""
        flag = torch.tensor([1.0 if self.signum else 0.0], device=device)
        return bool(dist.all_reduce_max(flag).item() > 0)


def build_accelerator(cfg: Config) -> Any:
    """Accelerator for this machine: gloo without CUDA, DeepSpeed when asked, no loader handling."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    dist.export_slurm_env()
    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = {
        "gradient_accumulation_steps": cfg.train.grad_accum,
        # Our scheduler counts optimizer steps; Accelerate's default would step it once per process.
        "step_scheduler_with_optimizer": False,
        "cpu": not cuda,
    }
    if dist.world_info().world_size > 1:
        # Without CUDA Accelerate would pick no backend (or nccl); name gloo/nccl explicitly. Passing it
        # to a single process makes Accelerate expect a process group that never starts.
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend=dist.backend(cuda),
                                                            timeout=datetime.timedelta(seconds=cfg.train.dist_timeout_s))]
    mp = cfg.train.mixed_precision
    if mp == "auto":
        mp = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    kwargs["mixed_precision"] = mp
    ds_config = cfg.train.deepspeed or os.environ.get("MMER_DEEPSPEED_CONFIG", "")
    use_ds = bool(ds_config) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if use_ds:
        if not cuda:
            # DeepSpeed's shared-memory comm op compiles a C++ extension; gloo does the job on CPU.
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        plugin = DeepSpeedPlugin(hf_ds_config=ds_config) if ds_config else None
        if plugin is not None:
            kwargs["deepspeed_plugin"] = plugin
        # cpu=True would silently turn DeepSpeed off (plain MULTI_CPU DDP); DeepSpeed picks its CPU
        # accelerator by itself and runs over the gloo group named above.
        kwargs["cpu"] = False
    accelerator = Accelerator(**kwargs)
    if accelerator.state.deepspeed_plugin is not None:
        # The training config is the single source of truth: fill DeepSpeed's "auto" values from it.
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
        ds["gradient_accumulation_steps"] = cfg.train.grad_accum
        ds["train_batch_size"] = cfg.data.batch_size * cfg.train.grad_accum * accelerator.num_processes
        if ds.get("gradient_clipping", "auto") == "auto":
            ds["gradient_clipping"] = cfg.optim.grad_clip
    return accelerator


def fill_deepspeed_sizes(accelerator: Any, model: torch.nn.Module) -> None:
    """ZeRO-3 bucket sizes left "auto": Accelerate derives them from `model.config.hidden_size`, which a
    multimodal model does not have; use the widest linear layer instead (same formulas as Accelerate)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    hidden = max((m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)), default=256)
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    for key, value in (("reduce_bucket_size", hidden * hidden),
                       ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
                       ("stage3_param_persistence_threshold", 10 * hidden)):
        if zero.get(key) == "auto":
            zero[key] = value


def environment_info(accelerator: Any) -> dict[str, Any]:
    import accelerate
    import transformers

    info: dict[str, Any] = {
        "python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
        "transformers": transformers.__version__, "accelerate": accelerate.__version__,
        "world_size": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
        "device": str(accelerator.device), "cuda": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpus": os.cpu_count(), "mixed_precision": accelerator.mixed_precision,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""), "hostname": platform.node(),
    }
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except Exception:  # deepspeed is optional at run time
        pass
    return info


class RunLog:
    """log.jsonl + TensorBoard scalars, main rank only."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
            self.file = open(run_dir / "log.jsonl", "a", encoding="utf-8")

    def write(self, record: dict[str, Any], per_class: dict[str, float] | None = None) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        split, step = record.get("split", "train"), record["step"]
        for k, v in record.items():
            if k not in ("step", "epoch", "split") and isinstance(v, (int, float)):
                self.tb.add_scalar(f"{split}/{k}", v, step)
        for label, f1 in (per_class or {}).items():
            self.tb.add_scalar(f"{split}/f1_per_class/{label}", f1, step)

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
            self.file.close()


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def run_eval_loader(model: torch.nn.Module, loader: Any, labels: list[str], device: torch.device,
                    loss_fn: Any = None, expected_keys: list[str] | None = None) -> Any:
    """Predict over this rank's part of a split and gather: every sample exactly once, padding
    duplicates dropped, the same `EvalResult` on every rank (a collective)."""
    from mmer_dist.train.metrics import EvalAccumulator

    was_training = model.training
    model.eval()
    acc = EvalAccumulator(labels)
    with torch.no_grad():
        for batch in loader:
            batch = _to_device(batch, device)
            logits = model(batch).float()
            losses = (torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
                      if loss_fn is not None else None)
            acc.add(batch["keys"], batch["labels"].cpu(), torch.softmax(logits, -1).cpu(),
                    is_padding=batch["pad"].cpu() if "pad" in batch else None,
                    losses=losses.cpu() if losses is not None else None)
    result = acc.gather(expected_keys=expected_keys)
    model.train(was_training)
    return result


def rewrap_model(accelerator: Any, model: torch.nn.Module) -> torch.nn.Module:
    """Prepare the unwrapped model again after parameters became trainable (DDP only)."""
    if accelerator.num_processes == 1:
        return model
    inner = accelerator.unwrap_model(model)
    accelerator._models = [m for m in accelerator._models if m is not model]
    return accelerator.prepare_model(inner)


def param_checksum(model: torch.nn.Module) -> str:
    """A hash of every parameter's bytes (this rank's view; ZeRO-3 shards differ by design)."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _unwrapped_state_dict(accelerator: Any, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full state dict on the main rank (gathers ZeRO-3 shards; a collective on every rank)."""
    return accelerator.get_state_dict(model)


def train(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Train, evaluate periodically, keep the best by dev Macro-F1 (or the last: train.select), export,
    write metrics.json."""
    from tqdm.auto import tqdm

    from mmer_dist.data.pipeline import build_eval_loader, build_train_loader
    from mmer_dist.models import build_model
    from mmer_dist.models.encoders import build_tokenizer
    from mmer_dist.models.heads import build_loss
    from mmer_dist.train.metrics import HEADLINE
    from mmer_dist.train.optim import add_unfrozen_params, apply_freeze_schedule, build_optimizer, build_scheduler

    run_dir = Path(run_dir)
    accelerator = build_accelerator(cfg)
    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    stop = StopRequest()
    stop.install()

    index = load_index(cfg.data.shards)
    labels = list(index.labels)
    train_split = split_index(index, cfg.data.train_split, cfg.data.shards)
    class_counts = [train_split.class_counts.get(name, 0) for name in labels]
    model_cfg = replace(cfg.model, num_classes=len(labels), modalities=tuple(cfg.data.modalities),
                        sample_rate=cfg.data.sample_rate)
    cfg = replace(cfg, model=model_cfg)

    resume_from = dist.broadcast_object(resolve_resume(run_dir, cfg.train.resume) if main else None)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "env.json").write_text(json.dumps(environment_info(accelerator), indent=1))
    accelerator.wait_for_everyone()

    torch.manual_seed(cfg.train.seed)          # same initial weights on every rank
    model = build_model(model_cfg)
    tokenizer = build_tokenizer(model_cfg.text) if "text" in cfg.data.modalities else None
    loss_fn = build_loss(cfg.loss, class_counts).to(accelerator.device)   # class weights are buffers

    train_loader = build_train_loader(cfg.data.shards, cfg.data, cfg.sampler, tokenizer, rank=rank,
                                      world_size=world, seed=cfg.train.seed)
    eval_loader = build_eval_loader(cfg.data.shards, cfg.data, tokenizer, split=cfg.data.eval_split,
                                    rank=rank, world_size=world)
    eval_keys = split_index(index, cfg.data.eval_split, cfg.data.shards).keys
    batches_per_epoch = len(train_loader)
    steps_per_epoch = max(1, batches_per_epoch // cfg.train.grad_accum)
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch

    state = read_trainer_state(resume_from) if resume_from is not None else TrainerState()
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    if apply_freeze_schedule(model, model_cfg, state.step):
        # resumed past an unfreeze step: rebuild the groups in the order they were saved in
        add_unfrozen_params(optimizer, model, cfg.optim, scheduler)
    fill_deepspeed_sizes(accelerator, model)
    # Only these three go through prepare; the loaders stay per rank (see module docstring).
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ema = build_weight_average(cfg, accelerator, model)

    def averaged() -> Any:
        """Evaluate and export the weight average when train.ema_decay > 0, else the live weights."""
        return ema.applied(accelerator.unwrap_model(model)) if ema is not None else contextlib.nullcontext()

    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        train_loader.load_state_dict(read_checkpoint_extra(resume_from)["loader"])
        if main:
            print(f"resumed from {resume_from} at step {state.step} (epoch {state.epoch}, "
                  f"batch {state.batches_in_epoch})", flush=True)

    log = RunLog(run_dir, main)
    eval_every = cfg.train.eval_every or steps_per_epoch
    ckpt_every = cfg.train.checkpoint_every or steps_per_epoch
    if main:
        print(f"{world} process(es) on {accelerator.device} ({accelerator.distributed_type}); global batch "
              f"{cfg.data.batch_size * world * cfg.train.grad_accum}; {steps_per_epoch} steps/epoch, {total_steps} "
              f"steps; sampler {cfg.sampler.weighting}, loss {cfg.loss.name}; run folder {run_dir}", flush=True)
    bar = tqdm(total=total_steps, initial=state.step, disable=not main, desc="train", unit="step",
               dynamic_ncols=True, mininterval=1.0)

    def checkpoint() -> None:
        extra = {"loader": train_loader.state_dict(), "world_size": world}
        save_checkpoint(accelerator, run_dir, state, extra, cfg.train.keep_checkpoints)

    def run_eval() -> None:
        with averaged():   # the weight average when train.ema_decay > 0
            metrics = run_eval_loader(model, eval_loader, labels, accelerator.device, loss_fn, eval_keys).metrics
            per_class = {k: v["f1"] for k, v in metrics["per_class"].items()}
            log.write({"step": state.step, "epoch": state.epoch, "split": cfg.data.eval_split,
                       **{k: metrics[k] for k in (*HEADLINE, "loss")}}, per_class)
            if main:
                bar.write(f"step {state.step}: {cfg.data.eval_split} macro-F1 {metrics['macro_f1']:.3f} "
                          f"weighted-F1 {metrics['weighted_f1']:.3f} acc {metrics['accuracy']:.3f}")
            chosen = (metrics["macro_f1"] > state.best_score if cfg.train.select == "best"
                      else state.step >= total_steps)
            if chosen:
                state.best_score, state.best_step = metrics["macro_f1"], state.step
                sd = _unwrapped_state_dict(accelerator, model)
                if main:
                    export_model(sd, model_cfg, cfg.data, labels, run_dir / "best",
                                 {"step": state.step, "macro_f1": metrics["macro_f1"], "split": cfg.data.eval_split})

    model.train()
    stopped = False
    t_last, samples_last = time.time(), state.samples_seen
    # [sum of micro-batch losses, their count] since the last log line, kept on the device: no host sync per step
    loss_window = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    while state.step < total_steps and not stopped:
        train_loader.set_epoch(state.epoch)
        for batch in train_loader.iter_from(state.batches_in_epoch):
            batch = _to_device(batch, accelerator.device)
            with accelerator.accumulate(model):
                logits = model(batch)
                loss = loss_fn(logits.float(), batch["labels"])
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.optim.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_window[0] += loss.detach().double()
            loss_window[1] += 1
            state.samples_seen += len(batch["labels"]) * world
            # The state always names the next batch to consume, so a checkpoint taken now resumes after it.
            state.batches_in_epoch += 1
            if state.batches_in_epoch >= batches_per_epoch:
                state.epoch, state.batches_in_epoch = state.epoch + 1, 0
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            state.step += 1
            if ema is not None:
                ema.update(accelerator.unwrap_model(model))
            bar.update(1)
            if apply_freeze_schedule(accelerator.unwrap_model(model), model_cfg, state.step):
                names = add_unfrozen_params(optimizer, accelerator.unwrap_model(model), cfg.optim, scheduler)
                # DDP fixes its gradient buckets at wrap time: wrap again so the new parameters are all-reduced.
                model = rewrap_model(accelerator, model)
                bar.write(f"step {state.step}: encoders unfrozen ({', '.join(names)})")
            if state.step % cfg.train.log_every == 0:
                now = time.time()
                totals = dist.all_reduce_sum(loss_window)
                mean_loss = float(totals[0] / max(totals[1].item(), 1.0))
                rate = (state.samples_seen - samples_last) / max(now - t_last, 1e-9)
                log.write({"step": state.step, "epoch": state.epoch, "split": "train", "loss": mean_loss,
                           "lr": scheduler.get_last_lr()[0], "samples_per_s": rate})
                bar.set_postfix(loss=f"{mean_loss:.3f}", samples_s=f"{rate:.0f}", refresh=False)
                t_last, samples_last = now, state.samples_seen
                loss_window.zero_()
            if state.step % eval_every == 0 or state.step >= total_steps:
                run_eval()
            if stop.agreed(accelerator.device):
                stopped = True
                checkpoint()
                if main:
                    bar.write(f"signal {stop.signum} received: checkpoint saved at step {state.step}; "
                              f"run again with resume=latest to continue")
                break
            if state.step % ckpt_every == 0 or state.step >= total_steps:
                checkpoint()
            if state.step >= total_steps:
                break
    bar.close()

    if stopped:
        log.close()
        _requeue_if_slurm(main)
        return {"stopped": True, "step": state.step}

    # Final: the selected checkpoint (best or last), evaluated on the eval split, exported with its metrics.
    accelerator.wait_for_everyone()
    final = _final_metrics(run_dir, cfg, accelerator, model, eval_loader, labels, loss_fn, eval_keys, state,
                           averaged)
    log.close()
    if hasattr(accelerator, "end_training"):
        accelerator.end_training()
    return final


def build_weight_average(cfg: Config, accelerator: Any, model: torch.nn.Module) -> Any:
    """The train.ema_decay average of the prepared model's weights, registered for checkpointing; None if off."""
    from mmer_dist.train.ema import WeightAverage, check_zero_stage

    if cfg.train.ema_decay <= 0:
        return None
    plugin = accelerator.state.deepspeed_plugin
    check_zero_stage(cfg.train.ema_decay, plugin.zero_stage if plugin is not None else None)
    ema = WeightAverage(accelerator.unwrap_model(model), cfg.train.ema_decay)
    accelerator.register_for_checkpointing(ema)    # saved and loaded with every checkpoint
    return ema


def _final_metrics(run_dir: Path, cfg: Config, accelerator: Any, model: Any, eval_loader: Any,
                   labels: list[str], loss_fn: Any, eval_keys: list[str], state: TrainerState,
                   averaged: Any) -> dict[str, Any]:
    """Evaluate the best checkpoint (a plain copy on every rank, whatever the engine: DDP, ZeRO-2/3),
    write metrics.json and train_state.json, export it."""
    from safetensors.torch import load_file

    from mmer_dist.shards.schema import write_json_atomic
    from mmer_dist.train.checkpoint import EXPORT_WEIGHTS, load_exported
    from mmer_dist.train.metrics import write_metrics

    best_dir = run_dir / "best"
    if not (best_dir / EXPORT_WEIGHTS).exists():   # no evaluation ran (e.g. resumed at the last step)
        with averaged():
            sd = _unwrapped_state_dict(accelerator, model)
        if accelerator.is_main_process:
            export_model(sd, cfg.model, cfg.data, labels, best_dir, {"step": state.step})
        accelerator.wait_for_everyone()
    # Replicas must agree after training; record each rank's checksum (tests assert they are equal).
    checksums = dist.all_gather_object(param_checksum(accelerator.unwrap_model(model)))
    with _whole_hf_models():
        best_model = load_exported(best_dir)[0].to(accelerator.device)
    metrics = run_eval_loader(best_model, eval_loader, labels, accelerator.device, loss_fn, eval_keys).metrics
    metrics.update({"split": cfg.data.eval_split, "best_step": state.best_step, "steps": state.step,
                    "samples_seen": state.samples_seen, "shards": str(cfg.data.shards)})
    if accelerator.is_main_process:
        write_metrics(metrics, run_dir / "metrics.json")     # the format `mmer-dist eval` writes
        write_json_atomic(run_dir / "train_state.json", {**state.to_json(), "param_checksums": checksums,
                                                        "world_size": accelerator.num_processes})
        if len(set(checksums)) > 1 and (accelerator.state.deepspeed_plugin is None
                                        or accelerator.state.deepspeed_plugin.zero_stage < 3):
            print(f"WARNING: model replicas differ across ranks after training: {checksums}", file=sys.stderr)
        export_model(load_file(str(best_dir / EXPORT_WEIGHTS)), cfg.model, cfg.data, labels, run_dir / "export",
                     {"step": state.best_step, "macro_f1": metrics["macro_f1"], "split": cfg.data.eval_split})
        print(f"done: {cfg.data.eval_split} macro-F1 {metrics['macro_f1']:.4f} "
              f"({cfg.train.select} step {state.best_step}); model exported to {run_dir / 'export'}; "
              f"metrics in {run_dir / 'metrics.json'}", flush=True)
    accelerator.wait_for_everyone()
    return metrics


@contextlib.contextmanager
def _whole_hf_models() -> Any:
    """Build transformers models unpartitioned even while a ZeRO-3 engine is registered (transformers
    would otherwise create every parameter under deepspeed.zero.Init, as an empty shard)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def _requeue_if_slurm(main: bool) -> None:
    """Under Slurm with --requeue, put the job back in the queue; it resumes with resume=latest."""
    job = os.environ.get("SLURM_JOB_ID")
    if main and job and os.environ.get("MMER_REQUEUE", "1") == "1":
        try:
            subprocess.run(["scontrol", "requeue", job], check=False, timeout=60)
        except (OSError, subprocess.SubprocessError) as e:
            print(f"could not requeue Slurm job {job}: {e}", file=sys.stderr)
