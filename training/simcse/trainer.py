"""The training loop: SimCSE and the other contrastive objectives, from a config to a servable artifact.

Read top to bottom, `train` does:
  1. resolve the config, join the process group (torchrun), open the run directory or the checkpoint;
  2. read the data, build the model (base weights or random layers), AdamW + linear warmup/decay;
  3. loop over optimizer steps: a batch (a pure function of seed and step, so resume is exact),
     `train_step` (plain or cached loss, gradient clipping, optimizer and schedule), logging, dev
     evaluation with the best weights kept, periodic checkpoints, SIGTERM/SIGINT -> checkpoint and stop;
  4. write the artifact (best weights by dev Spearman, resolved config and metrics in embedline.json, and
     `matryoshka_dims` when trained for truncation); with a dev file the starting model (step 0) is a
     candidate too: when no step beats it strictly, the artifact holds the starting weights, the log says
     so and the metrics record `best_step` 0, `kept_start` true, `dev_spearman_start` and `dev_spearman_last`;
     a stop signal that arrives once every step is done waits for the artifact instead of losing it.

`train_step` is public so other trainers (e.g. a SetFit-style classifier body on labelled pairs) can run
any `losses.ObjectiveLoss` on any `data.Batch` with the same mechanics.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn
from tqdm.auto import tqdm

from embedline import artifact as art
from embedline.encoder import save_artifact
from embedline.errors import EmbedlineError
from embedline.tokenization import encode, load_tokenizer
from embedline.training.simcse import checkpoint as ckpt
from embedline.training.simcse import distributed
from embedline.training.simcse.cached_loss import Features, cached_backward, plain_backward
from embedline.training.simcse.config import (
    IN_BATCH_OBJECTIVES, ConfigError, TrainConfig, from_dict, resolve_config, to_dict,
)
from embedline.training.data import (
    Batch, DataError, batch_indices, load_training_data, make_batch, read_sts, steps_per_epoch,
)
from embedline.training.evaluate import sts_metrics
from embedline.training.simcse.losses import ObjectiveLoss, make_loss
from embedline.training.simcse.model import build_model, describe_base
from embedline.training.plot import plot_metrics

log = logging.getLogger(__name__)

# Settings a resumed run may change: they do not alter the trajectory.
RESUMABLE_CHANGES = ("device", "eval_batch_size", "log_steps", "checkpoint_steps")


class TrainingInterrupted(EmbedlineError):
    """SIGTERM/SIGINT stopped the run after it saved a checkpoint."""


@dataclass(frozen=True)
class TrainResult:
    artifact: art.Artifact
    metrics: dict[str, Any]
    steps: int


def batch_features(
    batch: Batch, tokenizer: Tokenizer, views: int, device: torch.device
) -> tuple[Features, list[int], torch.Tensor | None]:
    """Tokenize a batch's columns (x `views`) stacked as rows: (features, rows per column, labels)."""
    columns = batch.columns * views
    arrays = encode(tokenizer, [text for column in columns for text in column])
    features = {name: torch.from_numpy(array).to(device) for name, array in arrays.items()}
    labels = batch.labels.to(device) if batch.labels is not None else None
    return features, [len(column) for column in columns], labels


def train_step(
    model: nn.Module,
    batch: Batch,
    tokenizer: Tokenizer,
    loss_fn: ObjectiveLoss,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    views: int = 1,
    mini_batch_size: int = 0,
    max_grad_norm: float = 1.0,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    """One optimizer step on `batch`; returns the loss (averaged over processes).

    All columns (x `views`: 2 for unsupervised SimCSE, the same sentences twice under independent
    dropout) are stacked into one forward pass of (columns * batch) rows, then split back per column.
    """
    features, sizes, labels = batch_features(batch, tokenizer, views, next(model.parameters()).device)

    def loss_on(embeddings: torch.Tensor) -> torch.Tensor:  # (rows, dim) -> scalar
        return loss_fn(embeddings.split(sizes), labels)

    scale = scaler.scale if scaler is not None else (lambda loss: loss)
    if mini_batch_size:
        loss = cached_backward(model, features, loss_on, mini_batch_size, autocast, scale)
    else:
        loss = plain_backward(model, features, loss_on, autocast, scale)
    if scaler is not None:
        scaler.unscale_(optimizer)
    if max_grad_norm > 0:
        nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return distributed.mean_over_processes(float(loss))


def linear_schedule(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warmup from 0 to 1, then linear decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only, not on biases and LayerNorm weights (BERT's convention)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


class StopSignal:
    """Turns SIGTERM and SIGINT into a flag the loop checks between steps; a second SIGINT aborts."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        log.warning("received %s: finishing this step, then stopping (a second Ctrl-C aborts at once)",
                    signal.Signals(signum).name)

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _check_resume_config(config: TrainConfig, saved: TrainConfig) -> TrainConfig:
    changed = [
        f"{key} ({getattr(saved, key)!r} -> {getattr(config, key)!r})"
        for key in to_dict(saved)
        if key not in RESUMABLE_CHANGES and getattr(config, key) != getattr(saved, key)
    ]
    if changed:
        raise ConfigError(f"cannot change settings when resuming: {'; '.join(changed)}")
    return config


def _autocast(config: TrainConfig, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    if config.precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if config.precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def _record(line: str) -> dict[str, Any] | None:
    """A metrics line, or None for a blank one or one a power loss cut short (it is past the last checkpoint,
    which flushes the lines before it)."""
    try:
        return json.loads(line) if line.strip() else None
    except ValueError:
        return None


class MetricsLog:
    """Appends JSON lines to run/metrics.jsonl (process 0 only); on resume, drops lines past the checkpoint."""

    def __init__(self, path: Path, enabled: bool, keep_until_step: int):
        self.path, self.enabled = path, enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
            kept = [line for line in lines if (record := _record(line)) and record["step"] <= keep_until_step]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train as `config` says and write the artifact to `config.output`. See the module docstring."""
    # 1. Config, processes, run directory.
    config = resolve_config(config)
    env = distributed.init(config.device)
    paths = ckpt.RunPaths(Path(config.output))
    state: dict[str, Any] | None = None
    if resume:
        state = ckpt.load_state(paths)
        _check_resume_config(config, resolve_config(from_dict(state["config"])))
    elif ckpt.has_checkpoint(paths) or art.is_artifact(paths.output):
        raise ConfigError(
            f"{paths.output}: already holds an artifact or a checkpoint; resume it with --resume "
            "or choose another --output"
        )

    # 2. Data, model, optimizer.
    data = load_training_data(config.train_file, config.objective, config.hard_negatives)
    dev = read_sts(config.dev_file) if config.dev_file else None
    if config.batch_size > len(data):
        raise DataError(f"{config.train_file}: --batch_size {config.batch_size} is larger than its {len(data)} examples")
    if config.batch_size % env.world_size:
        raise ConfigError(f"--batch_size {config.batch_size} is not divisible by the {env.world_size} processes")
    total_steps = config.max_steps or steps_per_epoch(len(data), config.batch_size) * config.epochs
    local = config.batch_size // env.world_size  # this process's share of each global batch

    torch.manual_seed(config.seed)  # identical initialization on every process
    model = build_model(config).to(env.device).train()  # from_pretrained returns eval mode: no dropout
    base = describe_base(config)
    tokenizer = load_tokenizer(base.tokenizer_json, config.max_seq_length)
    eval_tokenizer = load_tokenizer(base.tokenizer_json, base.inference_max_seq_length)
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr)
    warmup_steps = int(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(total_steps, warmup_steps))
    scaler = torch.amp.GradScaler(env.device.type) if config.precision == "fp16" else None

    step, best, start_metrics, pending_losses, train_seconds = 0, None, None, [], 0.0
    last_eval: dict[str, float] | None = None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, best, start_metrics = state["step"], state.get("best"), state.get("start_metrics")
        pending_losses, train_seconds = list(state.get("pending_losses", [])), state.get("train_seconds", 0.0)
        if best is not None and not paths.best_model.is_file():
            raise ckpt.CheckpointError(f"{paths.best_model}: missing, but the checkpoint records a best step")
        ckpt.set_rng_state(ckpt.load_rng(paths, env.rank))
        log.info("resumed from %s at step %d of %d", ckpt.checkpoint_dir(paths), step, total_steps)
    else:
        torch.manual_seed(config.seed + env.rank)  # independent dropout streams per process

    trained: nn.Module = model
    if env.world_size > 1:
        trained = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None, broadcast_buffers=False
        )
    # With --matryoshka_dims the objective's loss is averaged over embedding prefixes (losses.matryoshka_loss);
    # it acts on the embedding columns, so the plain and the cached step share it.
    loss_fn = make_loss(config.objective, config.temperature, config.margin, gather=distributed.gather_with_grad,
                        matryoshka_dims=config.matryoshka_dims)
    metrics_log = MetricsLog(paths.metrics, env.is_main, keep_until_step=step)
    autocast = _autocast(config, env.device)
    views = 2 if config.objective == "unsup" else 1

    def evaluate(at_step: int) -> dict[str, float] | None:
        """Dev metrics on process 0 (None elsewhere); the others wait."""
        result = None
        if env.is_main and dev is not None:
            result = sts_metrics(model.encoder, eval_tokenizer, dev, config.eval_batch_size)
            metrics_log.write({"step": at_step, **{f"dev_{k}": v for k, v in result.items() if k != "pairs"}})
            log.info("step %d: dev Spearman %.2f, alignment %.3f, uniformity %.3f",
                     at_step, result["spearman"], result["alignment"], result["uniformity"])
        distributed.barrier()
        return result

    def save_checkpoint() -> None:
        tmp = ckpt.begin_save(paths) if env.is_main else None
        distributed.barrier()
        ckpt.save_rng(paths.checkpoint_tmp, env.rank)
        distributed.barrier()
        if env.is_main:
            ckpt.finish_save(paths, tmp, {
                "config": to_dict(config), "step": step, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None, "best": best,
                "start_metrics": start_metrics, "pending_losses": pending_losses, "train_seconds": train_seconds,
            })
            log.info("checkpoint at step %d saved to %s", step, paths.checkpoint)
        distributed.barrier()

    if step == 0 and dev is not None:
        # The starting model is the first candidate for "best": a later step must beat it strictly.
        start_metrics = evaluate(0)
        if env.is_main:
            best = {"step": 0, **start_metrics}
            ckpt.save_best(paths, model.state_dict())

    # 3. The loop.
    window_seconds, window_examples = 0.0, 0  # training time only: evaluations and checkpoints excluded
    bar = tqdm(total=total_steps, initial=step, desc=f"{config.objective} SimCSE" if views == 2 else config.objective,
               disable=not env.is_main, dynamic_ncols=True)
    # The stop handler stays in place until the artifact is written: a signal after the last step lets the
    # run finish (there is nothing left to checkpoint) instead of killing it halfway through the save.
    with StopSignal() as stop:
        with bar:
            while step < total_steps:
                step_start = time.perf_counter()
                indices = batch_indices(len(data), config.batch_size, config.seed, step)
                batch = make_batch(data, indices[env.rank * local : (env.rank + 1) * local])
                if config.objective in IN_BATCH_OBJECTIVES and len(set(batch.columns[0])) < 2:
                    raise DataError(
                        f"{config.train_file}: the batch of step {step} has fewer than 2 distinct sentences"
                    )
                loss = train_step(
                    trained, batch, tokenizer, loss_fn, optimizer, scheduler, views=views,
                    mini_batch_size=config.mini_batch_size, max_grad_norm=config.max_grad_norm,
                    autocast=autocast, scaler=scaler,
                )
                step += 1
                step_seconds = time.perf_counter() - step_start
                train_seconds += step_seconds
                pending_losses.append(loss)
                window_seconds += step_seconds
                window_examples += config.batch_size
                if step % config.log_steps == 0 or step == total_steps:
                    record = {
                        "step": step, "epoch": step / steps_per_epoch(len(data), config.batch_size),
                        "loss": sum(pending_losses) / len(pending_losses), "lr": scheduler.get_last_lr()[0],
                        "sentences_per_s": window_examples / window_seconds if window_seconds > 0 else None,
                    }
                    metrics_log.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                    sent_s=f"{record['sentences_per_s'] or 0:.0f}")
                    pending_losses, window_seconds, window_examples = [], 0.0, 0
                bar.update(1)

                if dev is not None and (step % config.eval_steps == 0 or step == total_steps):
                    result = last_eval = evaluate(step)
                    if env.is_main and (best is None or result["spearman"] > best["spearman"]):
                        best = {"step": step, **result}
                        ckpt.save_best(paths, model.state_dict())
                if on_step is not None:
                    on_step(step, loss)
                # After the last step there is nothing to resume: the run goes on to write its artifact.
                stopping = distributed.any_process(stop.received is not None) and step < total_steps
                if stopping or (config.checkpoint_steps and step % config.checkpoint_steps == 0 and step < total_steps):
                    save_checkpoint()
                if stopping:
                    raise TrainingInterrupted(
                        f"stopped at step {step} of {total_steps}; checkpoint saved in {paths.checkpoint}; "
                        f"continue with: embedline train --resume --output {paths.output}"
                    )

        # 4. The artifact: the best dev weights (or the last ones without a dev file).
        if stop.received is not None:
            log.warning("all %d steps were done when the stop arrived: writing the artifact", total_steps)
        metrics: dict[str, Any] = {"steps": step, "train_examples": len(data),
                                   "skipped_empty_lines": data.skipped_empty,
                                   "train_seconds": round(train_seconds, 1)}
        if env.is_main:
            last = [r for r in (json.loads(line) for line in paths.metrics.read_text().splitlines()) if "loss" in r]
            metrics["train_loss"] = last[-1]["loss"] if last else None
            if best is not None:
                model.load_state_dict(ckpt.load_best(paths))
                metrics.update({"dev_file": config.dev_file, "best_step": best["step"],
                                "dev_spearman": best["spearman"], "dev_alignment": best["alignment"],
                                "dev_uniformity": best["uniformity"]})
            if start_metrics is not None:
                metrics["dev_spearman_start"] = start_metrics["spearman"]
                metrics["kept_start"] = best is not None and best["step"] == 0
                if metrics["kept_start"]:
                    log.warning("no step beat the starting model on the dev set (Spearman %.2f at the start, "
                                "%s last): the artifact holds the starting weights", start_metrics["spearman"],
                                f"{last_eval['spearman']:.2f}" if last_eval is not None else "none")
            if last_eval is not None:
                metrics["dev_spearman_last"] = last_eval["spearman"]
            save_artifact(
                model.encoder.cpu(), config.output, tokenizer_dir=base.path, name=config.name, base_model=config.model,
                max_seq_length=base.inference_max_seq_length, training=to_dict(config), metrics=metrics,
                matryoshka_dims=config.matryoshka_dims,
            )
            plot_metrics(paths.metrics, paths.plot, title=f"{config.name} ({config.objective})")
            ckpt.clean_up(paths)
            log.info("artifact written to %s: %s", config.output, json.dumps(metrics))
    distributed.barrier()
    return TrainResult(art.load_artifact(config.output), metrics, step)
