"""A retrieval run killed mid-checkpoint, or SIGKILLed as a process, resumes to the run never interrupted: the
mined hard negatives (BM25 and the model's own index, mined again every 2 steps), the guard's counts, the best
dev step and the GradCache step all travel in the checkpoint or are a pure function of (seed, step)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from embedline import artifact as art
from embedline.cli import main
from embedline.training.simcse import checkpoint as ckpt
from embedline.training.simcse.trainer import train

from test_training_retrieval import _config, write_collection
from test_training_simcse_crash import Crash, _kill_in_the_second_save

pytestmark = pytest.mark.slow  # each test trains the same run twice

WALL_CLOCK = ("train_seconds", "mining_seconds")


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    return write_collection(tmp_path_factory.mktemp("retrieval"), random.Random(1))


def _assert_same_run(a: Path, b: Path) -> None:
    """Same weights, metrics (but wall-clock times) and metrics log (but speed): the same trajectory."""
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[name], wb[name]) for name in wa)
    ma, mb = ({k: v for k, v in art.load_artifact(p).metadata["metrics"].items() if k not in WALL_CLOCK} for p in (a, b))
    assert ma == mb
    logs = [[{k: v for k, v in json.loads(line).items() if k != "sentences_per_s"}
             for line in (p / "run/metrics.jsonl").read_text().splitlines()] for p in (a, b)]
    assert logs[0] == logs[1]


def test_a_run_killed_mid_save_resumes_to_the_uninterrupted_result(tiny_model_dir, collection, tmp_path, monkeypatch):
    overrides = dict(negatives="bm25+self", refresh_steps=2, checkpoint_steps=2, max_steps=7, eval_steps=3,
                     mini_batch_size=6, warmup_ratio=0.3, query_prompt="q: ", passage_prompt="p: ")
    train(_config(tiny_model_dir, collection, tmp_path / "straight", **overrides))
    config = _config(tiny_model_dir, collection, tmp_path / "killed", **overrides)
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", _kill_in_the_second_save("halfway through state.pt"))
        with pytest.raises(Crash):
            train(config)
    assert ckpt.load_state(ckpt.RunPaths(tmp_path / "killed"))["step"] == 2
    assert main(["train", "--resume", "--output", str(tmp_path / "killed")]) == 0
    _assert_same_run(tmp_path / "straight", tmp_path / "killed")
    assert art.load_artifact(tmp_path / "killed").prompts == {"query": "q: ", "passage": "p: "}


@pytest.mark.processes
def test_a_sigkilled_retrieval_run_resumes_to_the_same_weights(tiny_model_dir, collection, tmp_path):
    """`embedline train --objective retrieval` SIGKILLed once past its second checkpoint (self-mined negatives
    refreshed in between), then `--resume`: the weights, metrics and log of an uninterrupted run."""
    steps = 120
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def command(output: Path) -> list[str]:
        files = [arg for key, path in collection.items() if not key.startswith("dev")
                 for arg in (f"--{key}", str(path))]
        return [sys.executable, "-m", "embedline.cli", "train", "--objective", "retrieval", "--model",
                str(tiny_model_dir), *files, "--output", str(output), "--batch_size=8", f"--max_steps={steps}",
                "--log_steps=1", "--device=cpu", "--checkpoint_steps=10", "--negatives=self", "--refresh_steps=7"]

    out = tmp_path / "killed"
    paths = ckpt.RunPaths(out)
    with (tmp_path / "killed.log").open("w") as stderr:
        process = subprocess.Popen(command(out), stderr=stderr, env=env)
    try:
        deadline = time.time() + 120
        while not (paths.checkpoint.is_dir() and ckpt.load_state(paths)["step"] >= 20
                   if (paths.checkpoint / ckpt.STATE_FILE).is_file() else False):
            assert process.poll() is None and time.time() < deadline, (tmp_path / "killed.log").read_text()
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        process.kill()
    saved = ckpt.load_state(paths)["step"]
    assert saved < steps, "the run finished before the kill: raise `steps`"
    resumed = subprocess.run([sys.executable, "-m", "embedline.cli", "train", "--resume", "--output", str(out)],
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    straight = subprocess.run(command(tmp_path / "straight"), capture_output=True, text=True, env=env, timeout=300)
    assert straight.returncode == 0, straight.stderr
    _assert_same_run(tmp_path / "straight", out)
