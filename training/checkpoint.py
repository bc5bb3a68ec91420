"""The run directory and its checkpoints: save everything an exact resume needs, load it or fail loudly.

    <output>/run/metrics.jsonl        training and dev metrics, one JSON object a line
    <output>/run/metrics.png          their plot
    <output>/run/checkpoint/          state.pt (config, step, model, optimizer, scheduler, grad scaler,
                                      best dev result, unlogged losses), config.json,
                                      rng_rank<N>.pt per process
    <output>/run/best_model.pt        weights of the best dev Spearman so far

The checkpoint is written to a temporary directory and renamed into place, so a crash while saving
leaves the previous checkpoint intact. A checkpoint that cannot be read is a `CheckpointError`, never a
silent restart from scratch. The checkpoint and best weights are removed once the artifact is written.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from embedline.errors import EmbedlineError

CHECKPOINT_FORMAT = 1


class CheckpointError(EmbedlineError):
    """A checkpoint that is missing, unreadable or does not match the run."""


@dataclass(frozen=True)
class RunPaths:
    output: Path

    @property
    def run_dir(self) -> Path:
        return self.output / "run"

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "checkpoint"

    @property
    def metrics(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def plot(self) -> Path:
        return self.run_dir / "metrics.png"

    @property
    def best_model(self) -> Path:
        return self.run_dir / "best_model.pt"


def rng_state() -> dict[str, Any]:
    """This process's RNG states: dropout masks depend on torch's; python's for anything else."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        # weights_only: a checkpoint is data (tensors, numbers, strings), never code to unpickle.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, zipfile errors...
        raise CheckpointError(
            f"{path}: corrupt or unreadable checkpoint ({type(exc).__name__}: {exc}); "
            f"delete {path.parent} to start over"
        ) from exc


def begin_save(paths: RunPaths) -> Path:
    """Process 0: a fresh temporary directory every process writes its part into."""
    tmp = paths.run_dir / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def save_rng(tmp: Path, rank: int) -> None:
    _save(rng_state(), tmp / f"rng_rank{rank}.pt")


def finish_save(paths: RunPaths, tmp: Path, state: dict[str, Any]) -> Path:
    """Process 0, after every process saved its RNG: write the state and swap the directory into place."""
    _save({"format": CHECKPOINT_FORMAT, **state}, tmp / "state.pt")
    # The config again as JSON: readable by people, and by `--resume` without loading the weights.
    (tmp / "config.json").write_text(json.dumps(state["config"], indent=2) + "\n", encoding="utf-8")
    old = paths.run_dir / "checkpoint.old"
    shutil.rmtree(old, ignore_errors=True)
    if paths.checkpoint.exists():
        os.replace(paths.checkpoint, old)
    os.replace(tmp, paths.checkpoint)
    shutil.rmtree(old, ignore_errors=True)
    return paths.checkpoint


def load_state(paths: RunPaths) -> dict[str, Any]:
    """The checkpoint's state dict (config, step, model, ...), checked for format and keys."""
    if not paths.checkpoint.is_dir():
        raise CheckpointError(f"{paths.checkpoint}: no checkpoint to resume from")
    state = _load(paths.checkpoint / "state.pt")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{paths.checkpoint / 'state.pt'}: not a checkpoint of format {CHECKPOINT_FORMAT}")
    missing = [k for k in ("config", "step", "model", "optimizer", "scheduler") if k not in state]
    if missing:
        raise CheckpointError(f"{paths.checkpoint / 'state.pt'}: missing {', '.join(missing)}")
    return state


def load_config(paths: RunPaths) -> dict[str, Any]:
    """The checkpoint's training config (a `TrainConfig` as a dict)."""
    path = paths.checkpoint / "config.json"
    if not paths.checkpoint.is_dir():
        raise CheckpointError(f"{paths.checkpoint}: no checkpoint to resume from")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt or unreadable checkpoint config ({exc})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a training config")
    return config


def load_rng(paths: RunPaths, rank: int) -> dict[str, Any]:
    state = _load(paths.checkpoint / f"rng_rank{rank}.pt")
    if not isinstance(state, dict) or "torch" not in state:
        raise CheckpointError(f"{paths.checkpoint / f'rng_rank{rank}.pt'}: not an RNG state")
    return state


def save_best(paths: RunPaths, model_state: dict[str, torch.Tensor]) -> None:
    _save(model_state, paths.best_model)


def load_best(paths: RunPaths) -> dict[str, torch.Tensor]:
    return _load(paths.best_model)


def clean_up(paths: RunPaths) -> None:
    """Remove resume state once the final artifact is written (metrics and plot stay)."""
    for path in (paths.checkpoint, paths.run_dir / "checkpoint.tmp", paths.run_dir / "checkpoint.old"):
        shutil.rmtree(path, ignore_errors=True)
    paths.best_model.unlink(missing_ok=True)
