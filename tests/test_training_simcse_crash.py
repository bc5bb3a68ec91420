"""Training survives kill -9: a crash at any point of a checkpoint save leaves the previous or the new
checkpoint to resume from, and a SIGKILLed `embedline train` resumes to the same weights as a run never
interrupted, losing at most `checkpoint_steps` steps.

The crash tests record every operation a save makes on the disk (file written, fsync, rename, unlink,
rmdir, mkdir) and stop the save before each one in turn, or halfway through it when it writes a file,
with an exception nothing catches: the files are then exactly as a process killed there leaves them.
"""

import contextlib
import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from embedline import artifact as art
from embedline.cli import main
from embedline.training.simcse import checkpoint as ckpt
from embedline.training.simcse.config import ConfigError
from embedline.training.simcse.trainer import MetricsLog, train

from test_training_simcse_trainer import _config, corpus  # noqa: F401  (corpus: the fixture)

# Each kills a training run mid-save and resumes it: seconds apiece, so outside `make test-fast`.
pytestmark = pytest.mark.slow

RANKS = 2  # processes saving their RNG state, as under torchrun


class Crash(BaseException):
    """The process dies here: a BaseException, so no `except Exception` (or rmtree's ignore_errors) runs on."""


def _fd_path(fd: int) -> Path:
    return Path(os.readlink(f"/proc/self/fd/{fd}"))


@contextlib.contextmanager
def disk_operations(crash_at: int | None = None, torn: bool = False, real_fsync: bool = False):
    """Record the operations that change the disk as (kind, path...) tuples, in the list it yields.

    crash_at=k raises `Crash` instead of doing operation k (counting from 0); with torn=True and a file
    write there, half the file is written first. fsync is recorded but only done with real_fsync: a killed
    process loses nothing the kernel already has, so the crash tests need no real flushes (only power loss
    does, which `test_every_rename_is_durable_before_the_next_step` checks by the order of operations).
    """
    ops: list[tuple] = []
    real = {name: getattr(os, name) for name in ("replace", "unlink", "rmdir", "mkdir", "fsync")}
    real_save, real_write_text = torch.save, pathlib.Path.write_text

    def step(op: tuple, torn_write=None) -> None:
        ops.append(op)
        if len(ops) - 1 == crash_at:
            if torn and torn_write is not None:
                torn_write()
            raise Crash(op)

    def full(path, dir_fd=None) -> Path:  # shutil.rmtree names files relative to a directory descriptor
        return _fd_path(dir_fd) / path if dir_fd is not None else Path(path)

    def replace(src, dst, **kwargs):
        step(("replace", Path(src), Path(dst)))
        return real["replace"](src, dst, **kwargs)

    def unlink(path, *, dir_fd=None):
        step(("unlink", full(path, dir_fd)))
        return real["unlink"](path, dir_fd=dir_fd)

    def rmdir(path, *, dir_fd=None):
        step(("rmdir", full(path, dir_fd)))
        return real["rmdir"](path, dir_fd=dir_fd)

    def mkdir(path, mode=0o777, *, dir_fd=None):
        step(("mkdir", full(path, dir_fd)))
        return real["mkdir"](path, mode, dir_fd=dir_fd)

    def fsync(fd):
        step(("fsync", _fd_path(fd)))
        if real_fsync:
            real["fsync"](fd)

    def save(obj, f, *args, **kwargs):
        def half():
            buffer = io.BytesIO()
            real_save(obj, buffer)
            Path(f).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])

        step(("write", Path(f)), half)
        return real_save(obj, f, *args, **kwargs)

    def write_text(self, data, *args, **kwargs):
        step(("write", Path(self)), lambda: real_write_text(self, data[: len(data) // 2], *args, **kwargs))
        return real_write_text(self, data, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        for name, function in (("replace", replace), ("unlink", unlink), ("rmdir", rmdir), ("mkdir", mkdir),
                               ("fsync", fsync)):
            patch.setattr(os, name, function)
        patch.setattr(torch, "save", save)
        patch.setattr(pathlib.Path, "write_text", write_text)
        yield ops


def _rng_seed(step: int, rank: int) -> int:
    return 1000 * step + rank


def save(paths: ckpt.RunPaths, step: int) -> None:
    """One checkpoint save as the trainer makes it: every rank's RNG state, then process 0's state."""
    tmp = ckpt.begin_save(paths)
    for rank in range(RANKS):
        torch.default_generator.manual_seed(_rng_seed(step, rank))  # CPU only: fast
        ckpt.save_rng(tmp, rank)
    ckpt.finish_save(paths, tmp, {
        "config": {"seed": 1, "lr": 0.001}, "step": step, "model": {"w": torch.full((8,), float(step))},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.001 * step}]}, "scheduler": {"last_epoch": step},
    })


def resume_step(paths: ckpt.RunPaths) -> int | None:
    """The step a resume starts from (None: no checkpoint), after checking that every part of it loads
    and belongs to that one save."""
    try:
        state = ckpt.load_state(paths)
    except ckpt.CheckpointError as exc:
        assert "no checkpoint to resume from" in str(exc)
        return None
    step = state["step"]
    assert torch.equal(state["model"]["w"], torch.full((8,), float(step)))
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.001 * step and state["scheduler"]["last_epoch"] == step
    assert ckpt.load_config(paths) == state["config"]
    for rank in range(RANKS):
        torch.default_generator.manual_seed(_rng_seed(step, rank))  # CPU only: fast
        assert torch.equal(ckpt.load_rng(paths, rank)["torch"], torch.get_rng_state())
    assert ckpt.has_checkpoint(paths)  # a fresh run refuses to overwrite it
    return step


def crash_points(paths: ckpt.RunPaths, step: int) -> tuple[list[tuple[int, bool, tuple]], int]:
    """Where a save of `step` from the files as they are now can die: (index, torn, operation) triples, and
    the index of the rename that puts the new checkpoint in place. Dry-runs the save on a copy."""
    copy = ckpt.RunPaths(paths.output.with_name(paths.output.name + "-dry-run"))
    shutil.copytree(paths.output, copy.output)
    try:
        with disk_operations() as ops:
            save(copy, step)
    finally:
        shutil.rmtree(copy.output)
    swap = ops.index(("replace", copy.checkpoint_tmp, copy.checkpoint))
    points = [(k, False, op) for k, op in enumerate(ops)]
    points += [(k, True, op) for k, op in enumerate(ops) if op[0] == "write"]
    return points, swap


def crashed_save(paths: ckpt.RunPaths, step: int, at: int, torn: bool) -> None:
    with disk_operations(crash_at=at, torn=torn), pytest.raises(Crash):
        save(paths, step)


def _files(paths: ckpt.RunPaths) -> frozenset[tuple[str, bytes | None]]:
    """What the run directory holds: every path under it, with its bytes for a file."""
    return frozenset((str(path.relative_to(paths.output)), path.read_bytes() if path.is_file() else None)
                     for path in paths.output.rglob("*"))


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A directory for thousands of simulated kills: on tmpfs where there is one (removing files from the
    disk can take a millisecond each), and fsync a no-op (a killed process loses nothing the kernel has)."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    if os.access("/dev/shm", os.W_OK):
        with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="embedline-test-") as directory:
            yield Path(directory)
    else:
        yield tmp_path


def _fresh_run(root: Path, name: str, *steps: int) -> ckpt.RunPaths:
    paths = ckpt.RunPaths(root / name)
    paths.run_dir.mkdir(parents=True)
    paths.metrics.write_text('{"step": 1, "loss": 1.0}\n')
    for step in steps:
        save(paths, step)
    return paths


def test_a_kill_at_any_point_of_a_save_leaves_the_previous_or_the_new_checkpoint(sandbox):
    """A kill before each operation of a save (each file written, fsync, rename and removal) and halfway
    through each file write: until the swap's rename the previous checkpoint resumes, from then on the new
    one, and every part of the one loaded is there. The resumed run's next save then cleans up and is the
    one resumed. For the first save (no previous checkpoint: none resumes until the rename) and a later one."""
    for previous in ([], [10]):
        points, swap = crash_points(_fresh_run(sandbox, f"dry-{len(previous)}", *previous), 20)
        for at, torn, op in points:
            paths = _fresh_run(sandbox, f"crash-{len(previous)}-{at}-{torn}", *previous)
            crashed_save(paths, 20, at, torn)
            expected = 20 if at > swap else (previous[-1] if previous else None)
            assert resume_step(paths) == expected, f"killed {'in' if torn else 'before'} operation {at}: {op}"
            save(paths, 30)
            assert resume_step(paths) == 30
            assert sorted(p.name for p in paths.run_dir.iterdir()) == ["checkpoint", "metrics.jsonl"]
            assert sorted(p.name for p in paths.checkpoint.iterdir()) == [
                "config.json", "rng_rank0.pt", "rng_rank1.pt", "state.pt"]


def test_a_kill_during_the_save_after_a_killed_save_still_leaves_a_checkpoint(sandbox):
    """Two kills in a row: a save killed at any point, then the resumed run's next save killed at any point
    (it starts from whatever the first kill left, e.g. only checkpoint.old/). A checkpoint always resumes:
    the first kill's, or the second save's once its swap rename is done; and the save after that cleans up."""
    first_points, _ = crash_points(_fresh_run(sandbox, "dry", 10), 20)
    # Kills that leave the same files (e.g. before and after an fsync) are one case.
    first_states, second_states = set(), set()
    for first_at, first_torn, _ in first_points:
        base = _fresh_run(sandbox, f"first-{first_at}-{first_torn}", 10)
        crashed_save(base, 20, first_at, first_torn)
        if _files(base) in first_states:
            continue
        first_states.add(_files(base))
        after_first = resume_step(base)
        points, swap = crash_points(base, 30)
        for at, torn, op in points:
            paths = ckpt.RunPaths(sandbox / "second")
            shutil.copytree(base.output, paths.output)
            crashed_save(paths, 30, at, torn)
            expected = 30 if at > swap else after_first
            if (_files(paths), expected) not in second_states:
                second_states.add((_files(paths), expected))
                assert resume_step(paths) == expected, (first_at, first_torn, at, torn, op)
                save(paths, 40)
                assert resume_step(paths) == 40
            shutil.rmtree(paths.output)
    assert len(first_states) >= 15 and len(second_states) > 100


def test_every_rename_is_durable_before_the_next_step(tmp_path):
    """Power loss, not just a kill: a file's data is fsynced before the rename that names it, and each
    rename (and the removal of state.pt that makes a directory incomplete) is fsynced in its directory
    before any later rename or removal depends on it. The metrics up to the step are flushed before the
    checkpoint that keeps them is in place."""
    paths = _fresh_run(tmp_path, "out", 10)
    with disk_operations(real_fsync=True) as ops:
        save(paths, 20)
    def synced(operations: list[tuple]) -> set[Path]:
        return {op[1].resolve() for op in operations if op[0] == "fsync"}

    for i, op in enumerate(ops):
        if op[0] == "replace" and op[1].suffix == ".tmp" and op[1].name.startswith("."):  # a file
            assert op[1].resolve() in synced(ops[:i]), f"{op}: renamed before its data was fsynced"
        if op[0] == "replace" or (op[0] == "unlink" and op[1].name == ckpt.STATE_FILE):
            later = [j for j in range(i + 1, len(ops)) if ops[j][0] in ("replace", "unlink", "rmdir")]
            until = later[0] if later else len(ops)
            assert op[-1].parent.resolve() in synced(ops[i + 1 : until]), f"{op}: not fsynced in its directory"
    swap = ops.index(("replace", paths.checkpoint_tmp, paths.checkpoint))
    assert paths.metrics.resolve() in synced(ops[:swap])
    assert resume_step(paths) == 20


def test_a_half_written_metrics_line_does_not_stop_a_resume(tmp_path):
    """A power loss can cut the last line of metrics.jsonl (written after the last checkpoint): resuming
    drops it with the other lines past the checkpoint instead of failing to parse it."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.2}\n{"step": 4, "lo')
    MetricsLog(path, enabled=True, keep_until_step=3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def _weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(output / "model.safetensors")


def _metrics_log(output: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "sentences_per_s"}
            for line in (output / "run/metrics.jsonl").read_text().splitlines()]


def _assert_same_run(a: Path, b: Path) -> None:
    """Same final weights, metrics (but time) and metrics log (but speed): the same trajectory."""
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[name], wb[name]) for name in wa)
    drop = ("train_seconds",)
    ma, mb = (art.load_artifact(p).metadata["metrics"] for p in (a, b))
    assert {k: v for k, v in ma.items() if k not in drop} == {k: v for k, v in mb.items() if k not in drop}
    assert _metrics_log(a) == _metrics_log(b)


def _kill_in_the_second_save(where: str):
    """An os.replace that kills the process at `where` in the trainer's second checkpoint save."""
    real_replace = os.replace
    saves = {"count": 0}

    def replace(src, dst, **kwargs):
        src, dst = Path(src), Path(dst)
        if src.name == ".state.pt.tmp":
            saves["count"] += 1  # once a save
        if saves["count"] == 2:
            if where == "halfway through state.pt" and src.name == ".state.pt.tmp":
                src.write_bytes(src.read_bytes()[:1000])
                raise Crash
            if where == "between the two renames" and dst.name == "checkpoint.old":
                real_replace(src, dst, **kwargs)
                raise Crash
            if where == "before checkpoint.old is removed" and src.name == "checkpoint.tmp":
                real_replace(src, dst, **kwargs)
                raise Crash
        return real_replace(src, dst, **kwargs)

    return replace


@pytest.mark.parametrize("where, resumes_at", [
    ("halfway through state.pt", 2), ("between the two renames", 2), ("before checkpoint.old is removed", 4)])
def test_trainer_killed_mid_save_resumes_to_the_uninterrupted_result(
        tiny_model_dir, corpus, tmp_path, monkeypatch, caplog, where, resumes_at):  # noqa: F811
    """The trainer and `embedline train --resume` (its config, state, RNG and best weights) after a kill
    inside the checkpoint save of step 4: they pick the checkpoint the kill left (checkpoint.old/ between
    the renames) and finish exactly as a run never interrupted. Dropout and a dev file (best weights) on."""
    overrides = dict(checkpoint_steps=2, max_steps=6, eval_steps=2, mini_batch_size=6, warmup_ratio=0.3)
    train(_config(tiny_model_dir, corpus, tmp_path / "straight", **overrides))

    config = _config(tiny_model_dir, corpus, tmp_path / "killed", **overrides)
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", _kill_in_the_second_save(where))
        with pytest.raises(Crash):
            train(config)
    paths = ckpt.RunPaths(tmp_path / "killed")
    assert paths.checkpoint.exists() == (where != "between the two renames")
    assert ckpt.load_state(paths)["step"] == resumes_at
    with pytest.raises(ConfigError, match="already holds an artifact or a checkpoint"):
        train(config)
    with caplog.at_level("INFO"):
        assert main(["train", "--resume", "--output", str(tmp_path / "killed")]) == 0
    assert f"at step {resumes_at} of 6" in caplog.text
    _assert_same_run(tmp_path / "straight", tmp_path / "killed")
    assert sorted(p.name for p in paths.run_dir.iterdir()) == ["metrics.jsonl", "metrics.png"]


@pytest.mark.processes
def test_cli_sigkill_loses_at_most_checkpoint_steps_and_resumes_to_the_same_weights(
        tiny_model_dir, corpus, tmp_path):  # noqa: F811
    """`embedline train` in a real process, SIGKILLed mid-run (wherever it is: in a step, writing metrics,
    inside a checkpoint save): the checkpoint left is at most `checkpoint_steps` behind the last step logged,
    and `--resume` finishes with the weights, metrics and log of an uninterrupted run."""
    steps, every = 200, 20  # 70-90 steps/s here: the kill lands ~2 s before the end, checkpoint saves included
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def command(output: Path) -> list[str]:
        return [sys.executable, "-m", "embedline.cli", "train", "--model", str(tiny_model_dir),
                "--train-file", str(corpus / "train.txt"), "--output", str(output), "--batch_size=8",
                f"--max_steps={steps}", "--log_steps=1", "--device=cpu", f"--checkpoint_steps={every}"]

    out = tmp_path / "killed"
    paths = ckpt.RunPaths(out)

    def logged_step() -> int:  # of the last whole line: the process may be writing the next one
        text = paths.metrics.read_text() if paths.metrics.is_file() else ""
        lines = text[: text.rfind("\n") + 1].splitlines()
        return json.loads(lines[-1])["step"] if lines else 0

    with (tmp_path / "killed.log").open("w") as stderr:
        process = subprocess.Popen(command(out), stderr=stderr, env=env)
    try:
        deadline = time.time() + 120
        # Past the second checkpoint: from then on a kill may land in a save that replaces one.
        while not (ckpt.has_checkpoint(paths) and logged_step() > 2 * every):
            assert process.poll() is None and time.time() < deadline, (tmp_path / "killed.log").read_text()
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        process.kill()  # only if the test failed before the kill

    last = logged_step()
    assert last < steps, "the run finished before the kill: raise `steps`"
    saved = ckpt.load_state(paths)["step"]
    assert saved % every == 0 and 0 <= last - saved <= every, f"checkpoint at step {saved}, step {last} logged"

    resumed = subprocess.run([sys.executable, "-m", "embedline.cli", "train", "--resume", "--output", str(out)],
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {saved} of {steps}" in resumed.stderr

    straight = subprocess.run(command(tmp_path / "straight"), capture_output=True, text=True, env=env, timeout=300)
    assert straight.returncode == 0, straight.stderr
    _assert_same_run(tmp_path / "straight", out)
