"""The run directory and its checkpoints: save everything an exact resume needs, load it or fail loudly.

    <output>/run/metrics.jsonl        training and dev metrics, one JSON object a line
    <output>/run/metrics.png          their plot
    <output>/run/checkpoint/          state.pt (config, step, model, optimizer, scheduler, grad scaler,
                                      best dev result, unlogged losses, the objective's state: retrieval's
                                      mined negatives and guard counts), config.json,
                                      rng_rank<N>.pt per process
    <output>/run/checkpoint.tmp/      the next checkpoint while it is written
    <output>/run/checkpoint.old/      the previous checkpoint while the new one is swapped in
    <output>/run/best_model.pt        weights of the best dev Spearman so far

A save survives a kill (SIGKILL, power loss) at any instant: the previous or the new checkpoint resumes.
  1. every process writes its RNG state into checkpoint.tmp/, then process 0 its config.json and, last,
     state.pt. Each file is written under a temporary name, fsynced, renamed, and its directory fsynced;
  2. checkpoint/ is renamed to checkpoint.old/, checkpoint.tmp/ to checkpoint/ (run/ fsynced after each);
  3. checkpoint.old/ is removed.
A directory holding state.pt is complete: state.pt is written last and removed first. Loading takes
checkpoint/ if complete, else checkpoint.old/ (a kill between the two renames of step 2 leaves only that).
A complete checkpoint that cannot be read is a `CheckpointError`, never a silent restart from scratch.
The checkpoints and best weights are removed once the artifact is written.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from embedline.errors import EmbedlineError

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
STATE_FILE = "state.pt"  # written last, removed first: its presence marks a complete checkpoint


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
    def checkpoint_tmp(self) -> Path:
        return self.run_dir / "checkpoint.tmp"

    @property
    def checkpoint_old(self) -> Path:
        return self.run_dir / "checkpoint.old"

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


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries (creations, renames, removals), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _write(path: Path, write: Callable[[Path], object]) -> None:
    """Write a file so that a crash leaves either no file or the whole one under its name, on disk."""
    tmp = _tmp_name(path)
    write(tmp)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def _save(obj: Any, path: Path) -> None:
    _write(path, lambda tmp: torch.save(obj, tmp))


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


def _is_complete(directory: Path) -> bool:
    return (directory / STATE_FILE).is_file()


def _remove(directory: Path) -> None:
    """Remove a checkpoint directory, state.pt first: a kill halfway leaves it incomplete, never half-complete."""
    if not directory.exists():
        return
    (directory / STATE_FILE).unlink(missing_ok=True)
    _fsync(directory)
    shutil.rmtree(directory)


def has_checkpoint(paths: RunPaths) -> bool:
    """Whether the run directory holds a checkpoint, complete or not: a fresh run must not overwrite it."""
    return paths.checkpoint.exists() or paths.checkpoint_old.exists()


def checkpoint_dir(paths: RunPaths) -> Path:
    """The checkpoint to resume from: checkpoint/, or checkpoint.old/ when a kill cut its swap short."""
    for directory in (paths.checkpoint, paths.checkpoint_old):
        if _is_complete(directory):
            return directory
    raise CheckpointError(f"{paths.checkpoint}: no checkpoint to resume from")


def begin_save(paths: RunPaths) -> Path:
    """Process 0: a fresh temporary directory every process writes its part into."""
    _remove(paths.checkpoint_tmp)  # what a killed save left
    paths.checkpoint_tmp.mkdir(parents=True)
    return paths.checkpoint_tmp


def save_rng(tmp: Path, rank: int) -> None:
    _save(rng_state(), tmp / f"rng_rank{rank}.pt")


def finish_save(paths: RunPaths, tmp: Path, state: dict[str, Any]) -> Path:
    """Process 0, after every process saved its RNG: write the state and swap the directory into place.

    At every instant checkpoint/ or checkpoint.old/ is complete (see the module docstring).
    """
    # The config again as JSON: readable by people, and by `--resume` without loading the weights.
    config = json.dumps(state["config"], indent=2) + "\n"
    _write(tmp / "config.json", lambda path: path.write_text(config, encoding="utf-8"))
    _save({"format": CHECKPOINT_FORMAT, **state}, tmp / STATE_FILE)
    if paths.metrics.is_file():
        _fsync(paths.metrics)  # the lines up to this step must outlive a power loss along with the checkpoint
    if _is_complete(paths.checkpoint):
        _remove(paths.checkpoint_old)  # older than checkpoint/, which is complete
        os.replace(paths.checkpoint, paths.checkpoint_old)
        _fsync(paths.run_dir)
    else:  # no checkpoint yet, or a resume from checkpoint.old/: that one stays until the new one is in place
        _remove(paths.checkpoint)
    os.replace(tmp, paths.checkpoint)
    _fsync(paths.run_dir)
    _remove(paths.checkpoint_old)
    return paths.checkpoint


def load_state(paths: RunPaths) -> dict[str, Any]:
    """The checkpoint's state dict (config, step, model, ...), checked for format and keys."""
    directory = checkpoint_dir(paths)
    if directory != paths.checkpoint:
        log.warning("%s is missing or incomplete (a save was cut short): resuming from the previous checkpoint, %s",
                    paths.checkpoint, directory)
    path = directory / STATE_FILE
    state = _load(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of format {CHECKPOINT_FORMAT}")
    missing = [k for k in ("config", "step", "model", "optimizer", "scheduler") if k not in state]
    if missing:
        raise CheckpointError(f"{path}: missing {', '.join(missing)}")
    return state


def load_config(paths: RunPaths) -> dict[str, Any]:
    """The checkpoint's training config (a `TrainConfig` as a dict)."""
    path = checkpoint_dir(paths) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt or unreadable checkpoint config ({exc})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a training config")
    return config


def load_rng(paths: RunPaths, rank: int) -> dict[str, Any]:
    path = checkpoint_dir(paths) / f"rng_rank{rank}.pt"
    state = _load(path)
    if not isinstance(state, dict) or "torch" not in state:
        raise CheckpointError(f"{path}: not an RNG state")
    return state


def save_best(paths: RunPaths, model_state: dict[str, torch.Tensor]) -> None:
    _save(model_state, paths.best_model)


def load_best(paths: RunPaths) -> dict[str, torch.Tensor]:
    return _load(paths.best_model)


def clean_up(paths: RunPaths) -> None:
    """Remove resume state once the final artifact is written (metrics and plot stay)."""
    for directory in (paths.checkpoint, paths.checkpoint_tmp, paths.checkpoint_old):
        _remove(directory)
    for path in (paths.best_model, _tmp_name(paths.best_model)):
        path.unlink(missing_ok=True)
