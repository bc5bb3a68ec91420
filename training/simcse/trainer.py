"""The training loop: SimCSE and the other contrastive objectives, from a config to a servable artifact.

`train` is the loop; `Run` (set up from the config) does each step of it, and `RunState` is where the run
is, the part of a checkpoint that is not weights, passed to each step explicitly:
  1. `Run(config)`: resolve the config, join the process group (torchrun), open the run directory or the
     checkpoint, read the data (the objective's `task.Task`: sentence objectives, or retrieval), build the
     model (base weights or random layers), AdamW + linear warmup/decay;
  2. `Run.start`: the checkpoint's state, or step 0 with the starting model evaluated;
  3. loop over optimizer steps: the task's preparation (retrieval mines its hard negatives again), a batch
     (a pure function of seed and step, so resume is exact), `train_step` (plain or cached loss, gradient
     clipping, optimizer and schedule), logging, dev evaluation with the best weights kept, periodic
     checkpoints, SIGTERM/SIGINT -> checkpoint and stop;
  4. `Run.write_artifact`: the artifact (best weights by the task's dev metric: STS Spearman, or nDCG@10 for
     retrieval; resolved config and metrics in embedline.json, and `matryoshka_dims` when trained for
     truncation); with a dev set the starting model (step 0) is a candidate too: when no step beats it
     strictly, the artifact holds the starting weights, the log says so and the metrics record `best_step`
     0, `kept_start` true, `dev_spearman_start` and `dev_spearman_last` (`dev_ndcg@10_start`, ... for
     retrieval); a stop signal that arrives once every step is done waits for the artifact instead of losing it.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn
from tqdm.auto import tqdm

from embedline import artifact as art
from embedline.encoder import SentenceEncoder, save_artifact
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
from embedline.training.simcse.retrieval import RetrievalTask
from embedline.training.simcse.task import Task
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


@dataclass
class RunState:
    """Where a run is: what a checkpoint holds beside the weights of the model, optimizer, schedule and scaler.

    best / start_metrics: the best dev result so far ({"step", "spearman", ...}) and the starting model's.
    pending_losses: the losses since the last log line; train_seconds: time in training steps only.
    last_eval (not checkpointed): the latest dev result, for the final log and metrics.
    """

    step: int = 0
    best: dict[str, Any] | None = None
    start_metrics: dict[str, float] | None = None
    pending_losses: list[float] = field(default_factory=list)
    train_seconds: float = 0.0
    last_eval: dict[str, float] | None = None

    CHECKPOINTED = ("step", "best", "start_metrics", "pending_losses", "train_seconds")

    def to_checkpoint(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.CHECKPOINTED}

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> RunState:
        return cls(step=saved["step"], best=saved.get("best"), start_metrics=saved.get("start_metrics"),
                   pending_losses=list(saved.get("pending_losses", [])), train_seconds=saved.get("train_seconds", 0.0))


class SentenceTask:
    """The sentence objectives: a text or CSV training file, an STS dev file (Spearman x100)."""

    selection = "spearman"

    def __init__(self, config: TrainConfig):
        self.config = config
        self.data = load_training_data(config.train_file, config.objective, config.hard_negatives)
        self.dev = read_sts(config.dev_file) if config.dev_file else None
        self.source, self.dev_source = config.train_file, config.dev_file
        self.views = 2 if config.objective == "unsup" else 1
        self.label = f"{config.objective} SimCSE" if self.views == 2 else config.objective
        # With --matryoshka_dims the objective's loss is averaged over embedding prefixes
        # (losses.matryoshka_loss); it acts on the embedding columns, so the plain and the cached step share it.
        self.loss_fn = make_loss(config.objective, config.temperature, config.margin,
                                 gather=distributed.gather_with_grad, matryoshka_dims=config.matryoshka_dims)

    def __len__(self) -> int:
        return len(self.data)

    @property
    def has_dev(self) -> bool:
        return self.dev is not None

    def before_step(self, encoder: SentenceEncoder, tokenizer: Tokenizer, step: int) -> None:
        pass

    def batch(self, step: int, indices: list[int], rows: slice) -> tuple[Batch, ObjectiveLoss]:
        batch = make_batch(self.data, indices[rows])
        if self.config.objective in IN_BATCH_OBJECTIVES and len(set(batch.columns[0])) < 2:
            raise DataError(f"{self.source}: the batch of step {step} has fewer than 2 distinct sentences")
        return batch, self.loss_fn

    def evaluate(self, encoder: SentenceEncoder, tokenizer: Tokenizer) -> dict[str, float]:
        result = sts_metrics(encoder, tokenizer, self.dev, self.config.eval_batch_size)
        return {key: value for key, value in result.items() if key != "pairs"}

    def describe(self, result: dict[str, float]) -> str:
        return (f"dev Spearman {result['spearman']:.2f}, alignment {result['alignment']:.3f}, "
                f"uniformity {result['uniformity']:.3f}")

    def log_record(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def artifact_metrics(self) -> dict[str, Any]:
        return {"train_examples": len(self.data), "skipped_empty_lines": self.data.skipped_empty}

    def finish_artifact(self, output: Path) -> None:
        pass


def make_task(config: TrainConfig) -> Task:
    """The task of the (resolved) config's objective; reads and checks its files."""
    return RetrievalTask(config) if config.objective == "retrieval" else SentenceTask(config)


class Run:
    """One training run set up from its config: processes, data, model, optimizer, and the run directory.

    Its methods are the loop's steps; the loop's position is a RunState, passed to them explicitly.
    """

    def __init__(self, config: TrainConfig, resume: bool):
        self.config = config = resolve_config(config)
        self.env = env = distributed.init(config.device)
        self.paths = ckpt.RunPaths(Path(config.output))
        self.saved: dict[str, Any] | None = None
        if resume:
            self.saved = ckpt.load_state(self.paths)
            _check_resume_config(config, resolve_config(from_dict(self.saved["config"])))
        elif ckpt.has_checkpoint(self.paths) or art.is_artifact(self.paths.output):
            raise ConfigError(f"{self.paths.output}: already holds an artifact or a checkpoint; resume it with "
                              "--resume or choose another --output")
        self.task = make_task(config)  # the objective's data, batches, loss and dev metric (task.py)
        if config.batch_size > len(self.task):
            raise DataError(f"{self.task.source}: --batch_size {config.batch_size} is larger than its "
                            f"{len(self.task)} examples")
        if config.batch_size % env.world_size:
            raise ConfigError(f"--batch_size {config.batch_size} is not divisible by the {env.world_size} processes")
        self.steps_per_epoch = steps_per_epoch(len(self.task), config.batch_size)
        self.total_steps = config.max_steps or self.steps_per_epoch * config.epochs
        self.local = config.batch_size // env.world_size  # this process's share of each global batch
        self._build_model()

    def _build_model(self) -> None:
        config, env = self.config, self.env
        torch.manual_seed(config.seed)  # identical initialization on every process
        self.model = build_model(config).to(env.device).train()  # from_pretrained returns eval mode: no dropout
        self.base = describe_base(config)
        self.tokenizer = load_tokenizer(self.base.tokenizer_json, config.max_seq_length)
        self.eval_tokenizer = load_tokenizer(self.base.tokenizer_json, self.base.inference_max_seq_length)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, config.weight_decay), lr=config.lr)
        schedule = linear_schedule(self.total_steps, int(config.warmup_ratio * self.total_steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.scaler = torch.amp.GradScaler(env.device.type) if config.precision == "fp16" else None
        self.trained: nn.Module = self.model
        if env.world_size > 1:
            self.trained = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                broadcast_buffers=False)
        self.autocast = _autocast(config, env.device)

    def start(self) -> RunState:
        """The state to start from: the checkpoint's on resume, else step 0 with the starting model evaluated
        as the first candidate for "best" (a later step must beat it strictly)."""
        if self.saved is not None:
            state = self._restore(self.saved)
        else:
            state = RunState()
            torch.manual_seed(self.config.seed + self.env.rank)  # independent dropout streams per process
        self.metrics_log = MetricsLog(self.paths.metrics, self.env.is_main, keep_until_step=state.step)
        if state.step == 0 and self.task.has_dev:
            state.start_metrics = self.evaluate(0)
            if self.env.is_main:
                state.best = {"step": 0, **state.start_metrics}
                ckpt.save_best(self.paths, self.model.state_dict())
        return state

    def _restore(self, saved: dict[str, Any]) -> RunState:
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.scaler is not None and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        self.task.load_state_dict(saved.get("task") or {})
        state = RunState.from_checkpoint(saved)
        if state.best is not None and not self.paths.best_model.is_file():
            raise ckpt.CheckpointError(f"{self.paths.best_model}: missing, but the checkpoint records a best step")
        ckpt.set_rng_state(ckpt.load_rng(self.paths, self.env.rank))
        log.info("resumed from %s at step %d of %d", ckpt.checkpoint_dir(self.paths), state.step, self.total_steps)
        return state

    def progress_bar(self, step: int) -> tqdm:
        return tqdm(total=self.total_steps, initial=step, disable=not self.env.is_main, dynamic_ncols=True,
                    desc=self.task.label)

    def step(self, state: RunState) -> tuple[float, float]:
        """One optimizer step on this step's batch (a pure function of seed and step, so resume is exact);
        -> (loss, seconds)."""
        config = self.config
        self.task.before_step(self.model.encoder, self.eval_tokenizer, state.step)  # e.g. mine negatives again
        started = time.perf_counter()
        indices = batch_indices(len(self.task), config.batch_size, config.seed, state.step)
        rows = slice(self.env.rank * self.local, (self.env.rank + 1) * self.local)
        batch, loss_fn = self.task.batch(state.step, indices, rows)
        loss = train_step(self.trained, batch, self.tokenizer, loss_fn, self.optimizer, self.scheduler,
                          views=self.task.views, mini_batch_size=config.mini_batch_size,
                          max_grad_norm=config.max_grad_norm, autocast=self.autocast, scaler=self.scaler)
        seconds = time.perf_counter() - started
        state.step += 1
        state.train_seconds += seconds
        state.pending_losses.append(loss)
        return loss, seconds

    def log_step(self, state: RunState, window: Throughput, bar: tqdm) -> None:
        """A metrics line every log_steps steps (and at the last): mean loss, lr, sentences/s in training."""
        if state.step % self.config.log_steps and state.step != self.total_steps:
            return
        record = {"step": state.step, "epoch": state.step / self.steps_per_epoch,
                  "loss": sum(state.pending_losses) / len(state.pending_losses),
                  "lr": self.scheduler.get_last_lr()[0], "sentences_per_s": window.take(), **self.task.log_record()}
        self.metrics_log.write(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                        sent_s=f"{record['sentences_per_s'] or 0:.0f}")
        state.pending_losses = []

    def evaluate(self, at_step: int) -> dict[str, float] | None:
        """Dev metrics on process 0 (None elsewhere); the others wait."""
        result = None
        if self.env.is_main and self.task.has_dev:
            result = self.task.evaluate(self.model.encoder, self.eval_tokenizer)
            self.metrics_log.write({"step": at_step, **{f"dev_{k}": v for k, v in result.items()}})
            log.info("step %d: %s", at_step, self.task.describe(result))
        distributed.barrier()
        return result

    def maybe_evaluate(self, state: RunState) -> None:
        """Every eval_steps steps (and at the last): evaluate, and keep the weights of a new best."""
        if not self.task.has_dev or (state.step % self.config.eval_steps and state.step != self.total_steps):
            return
        result = state.last_eval = self.evaluate(state.step)
        key = self.task.selection
        if self.env.is_main and (state.best is None or result[key] > state.best[key]):
            state.best = {"step": state.step, **result}
            ckpt.save_best(self.paths, self.model.state_dict())

    def checkpoint_due(self, step: int) -> bool:
        every = self.config.checkpoint_steps
        return bool(every) and step % every == 0 and step < self.total_steps

    def save_checkpoint(self, state: RunState) -> None:
        tmp = ckpt.begin_save(self.paths) if self.env.is_main else None
        distributed.barrier()
        ckpt.save_rng(self.paths.checkpoint_tmp, self.env.rank)
        distributed.barrier()
        if self.env.is_main:
            ckpt.finish_save(self.paths, tmp, {
                "config": to_dict(self.config), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "task": self.task.state_dict(), **state.to_checkpoint()})
            log.info("checkpoint at step %d saved to %s", state.step, self.paths.checkpoint)
        distributed.barrier()

    def write_artifact(self, state: RunState) -> dict[str, Any]:
        """The artifact (process 0): the best dev weights, or the last ones without a dev file; -> metrics."""
        config, paths = self.config, self.paths
        metrics: dict[str, Any] = {"steps": state.step, **self.task.artifact_metrics(),
                                   "train_seconds": round(state.train_seconds, 1)}
        if not self.env.is_main:
            return metrics
        last = [r for r in (json.loads(line) for line in paths.metrics.read_text().splitlines()) if "loss" in r]
        metrics["train_loss"] = last[-1]["loss"] if last else None
        metrics.update(self._dev_metrics(state))
        save_artifact(self.model.encoder.cpu(), config.output, tokenizer_dir=self.base.path, name=config.name,
                      base_model=config.model, max_seq_length=self.base.inference_max_seq_length,
                      training=to_dict(config), metrics=metrics, matryoshka_dims=config.matryoshka_dims)
        self.task.finish_artifact(Path(config.output))  # e.g. the retrieval prompts
        plot_metrics(paths.metrics, paths.plot, title=f"{config.name} ({config.objective})")
        ckpt.clean_up(paths)
        log.info("artifact written to %s: %s", config.output, json.dumps(metrics))
        return metrics

    def _dev_metrics(self, state: RunState) -> dict[str, Any]:
        """The dev results for the artifact's metrics (`dev_<metric>` of the best step, the selection metric at
        the start and the last step); loads the best weights into the model."""
        metrics: dict[str, Any] = {}
        best, start, last, key = state.best, state.start_metrics, state.last_eval, self.task.selection
        if best is not None:
            self.model.load_state_dict(ckpt.load_best(self.paths))
            metrics.update({"dev_file": self.task.dev_source, "best_step": best["step"],
                            **{f"dev_{name}": value for name, value in best.items() if name not in ("step", "pairs")}})
        if start is not None:
            metrics[f"dev_{key}_start"] = start[key]
            metrics["kept_start"] = best is not None and best["step"] == 0
            if metrics["kept_start"]:
                log.warning("no step beat the starting model on the dev set (%s %.4g at the start, %s last): "
                            "the artifact holds the starting weights", key, start[key],
                            f"{last[key]:.4g}" if last is not None else "none")
        if last is not None:
            metrics[f"dev_{key}_last"] = last[key]
        return metrics


class Throughput:
    """Sentences per second over the training time of the steps since the last log line."""

    def __init__(self, batch_size: int):
        self.batch_size, self.seconds, self.examples = batch_size, 0.0, 0

    def add(self, seconds: float) -> None:
        self.seconds += seconds
        self.examples += self.batch_size

    def take(self) -> float | None:
        rate = self.examples / self.seconds if self.seconds > 0 else None
        self.seconds, self.examples = 0.0, 0
        return rate


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train as `config` says and write the artifact to `config.output`. See the module docstring."""
    run = Run(config, resume)
    state = run.start()
    window = Throughput(run.config.batch_size)  # training time only: evaluations and checkpoints excluded
    # The stop handler stays in place until the artifact is written: a signal after the last step lets the
    # run finish (there is nothing left to checkpoint) instead of killing it halfway through the save.
    with StopSignal() as stop:
        with run.progress_bar(state.step) as bar:
            while state.step < run.total_steps:
                loss, seconds = run.step(state)
                window.add(seconds)
                run.log_step(state, window, bar)
                bar.update(1)
                run.maybe_evaluate(state)
                if on_step is not None:
                    on_step(state.step, loss)
                # After the last step there is nothing to resume: the run goes on to write its artifact.
                stopping = distributed.any_process(stop.received is not None) and state.step < run.total_steps
                if stopping or run.checkpoint_due(state.step):
                    run.save_checkpoint(state)
                if stopping:
                    raise TrainingInterrupted(
                        f"stopped at step {state.step} of {run.total_steps}; checkpoint saved in "
                        f"{run.paths.checkpoint}; continue with: embedline train --resume --output {run.paths.output}")
        if stop.received is not None:
            log.warning("all %d steps were done when the stop arrived: writing the artifact", run.total_steps)
        metrics = run.write_artifact(state)
    distributed.barrier()
    return TrainResult(art.load_artifact(run.config.output), metrics, state.step)
