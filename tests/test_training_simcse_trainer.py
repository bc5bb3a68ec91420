"""The trainer end to end on a tiny model: the artifact it writes, exact resume after SIGTERM, clear errors,
and the `embedline train` / `embedline eval-sts` verbs."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from embedline import artifact as art
from embedline.cli import main
from embedline.training.simcse.checkpoint import CheckpointError
from embedline.training.simcse.config import ConfigError, TrainConfig
from embedline.training.data import DataError
from embedline.training.simcse.trainer import TrainingInterrupted, train

from tiny_model import WORDS


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small unsup corpus (with blank lines), NLI-style triples and an STS dev file, from the tiny vocabulary."""
    folder = tmp_path_factory.mktemp("data")
    rng = random.Random(0)

    def sentence(n=6):
        return " ".join(rng.choice(WORDS) for _ in range(n))

    sentences = [sentence(rng.randint(3, 9)) for _ in range(60)]
    (folder / "train.txt").write_text("\n".join(sentences[:30]) + "\n\n" + "\n".join(sentences[30:]) + "\n\n")
    rows = ["sent0,sent1,hard_neg"] + [f"{sentence()},{sentence()},{sentence()}" for _ in range(40)]
    (folder / "triples.csv").write_text("\n".join(rows) + "\n")
    dev = ["score\tsentence1\tsentence2"] + [f"{rng.uniform(0, 5):.2f}\t{sentence()}\t{sentence()}" for _ in range(30)]
    (folder / "dev.tsv").write_text("\n".join(dev) + "\n")
    return folder


def _config(tiny_model_dir, corpus, output, **overrides):
    values = dict(model=str(tiny_model_dir), train_file=str(corpus / "train.txt"), dev_file=str(corpus / "dev.tsv"),
                  output=str(output), batch_size=8, max_steps=6, eval_steps=2, log_steps=1, lr=1e-3, device="cpu")
    values.update(overrides)
    return TrainConfig(**values)


def test_tiny_run_writes_a_servable_artifact(tiny_model_dir, corpus, tmp_path):
    result = train(_config(tiny_model_dir, corpus, tmp_path / "out", pooling="cls"))
    artifact = art.load_artifact(tmp_path / "out")
    assert artifact.pooling == "cls" and artifact.normalize and artifact.max_seq_length == 64  # the base model's
    meta = artifact.metadata
    assert meta["training"]["objective"] == "unsup" and meta["training"]["lr"] == 1e-3
    assert meta["training"]["temperature"] == 0.05 and meta["training"]["max_seq_length"] == 32
    metrics = meta["metrics"]
    assert metrics["skipped_empty_lines"] == 2 and metrics["train_examples"] == 60 and metrics["steps"] == 6
    assert metrics["best_step"] in (2, 4, 6) and "dev_spearman_start" in metrics
    assert {"dev_spearman", "dev_alignment", "dev_uniformity"} <= metrics.keys()
    records = [json.loads(line) for line in (tmp_path / "out/run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "dev_spearman" in r] == [0, 2, 4, 6]
    assert all({"loss", "lr", "sentences_per_s"} <= r.keys() for r in records if "loss" in r)
    assert (tmp_path / "out/run/metrics.png").stat().st_size > 1000
    assert not (tmp_path / "out/run/checkpoint").exists()  # resume state removed once the artifact is written
    # The training-only MLP is not in the artifact: sentence-transformers loads it and agrees with eval-sts's encoder.
    from sentence_transformers import SentenceTransformer

    from embedline.training.evaluate import embed_texts, load_any_encoder
    from embedline.tokenization import load_tokenizer

    texts = ["a man plays the guitar", "the cat sleeps"]
    st = SentenceTransformer(str(artifact.path), device="cpu").encode(texts, convert_to_tensor=True)
    encoder, tokenizer_json, max_len = load_any_encoder(artifact.path)
    ours = embed_texts(encoder, load_tokenizer(tokenizer_json, max_len), texts)
    torch.testing.assert_close(ours, st.cpu(), rtol=1e-4, atol=1e-5)
    assert result.metrics["dev_spearman"] == metrics["dev_spearman"]


@pytest.mark.parametrize("objective", ["sup", "triplet", "contrastive", "cosine"])
def test_labelled_objectives_run(tiny_model_dir, corpus, tmp_path, objective):
    result = train(_config(tiny_model_dir, corpus, tmp_path / "out", objective=objective,
                           train_file=str(corpus / "triples.csv"), dev_file="", max_steps=2, mini_batch_size=5))
    assert result.steps == 2 and result.artifact.metadata["training"]["objective"] == objective


def test_supcon_runs_plain_and_cached(tiny_model_dir, corpus, tmp_path):
    classes = tmp_path / "classes.csv"
    classes.write_text("sent0,sent1,label\n" + "".join(
        f"text {i} of class {i % 3},other text {i} of class {i % 3},{i % 3}\n" for i in range(12)))
    for mini_batch_size in (0, 5):
        result = train(_config(tiny_model_dir, corpus, tmp_path / f"out{mini_batch_size}", objective="supcon",
                               train_file=str(classes), dev_file="", max_steps=2, mini_batch_size=mini_batch_size))
        assert result.steps == 2 and result.artifact.metadata["training"]["objective"] == "supcon"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_paths(tiny_model_dir, corpus, tmp_path, precision):
    """The autocast (+ GradScaler for fp16) code paths, plain and cached; on CPU here, on GPU in production."""
    for mini_batch_size in (0, 5):
        result = train(_config(tiny_model_dir, corpus, tmp_path / f"out{mini_batch_size}", precision=precision,
                               mini_batch_size=mini_batch_size, dev_file="", max_steps=2))
        assert result.artifact.metadata["training"]["precision"] == precision
        assert 0 < result.metrics["train_loss"] < 10


def _stop_at(step_to_stop: int):
    def on_step(step: int, loss: float) -> None:
        if step == step_to_stop:
            os.kill(os.getpid(), signal.SIGTERM)  # the real signal path: handler -> flag -> checkpoint

    return on_step


def test_resume_after_sigterm_equals_uninterrupted(tiny_model_dir, corpus, tmp_path):
    """Dropout on, cached loss on: an exact resume needs model, optimizer, scheduler, RNG and data position."""
    overrides = dict(mini_batch_size=6, warmup_ratio=0.3, checkpoint_steps=0)
    straight = train(_config(tiny_model_dir, corpus, tmp_path / "straight", **overrides))

    config = _config(tiny_model_dir, corpus, tmp_path / "resumed", **overrides)
    with pytest.raises(TrainingInterrupted, match="stopped at step 3 of 6"):
        train(config, on_step=_stop_at(3))
    assert (tmp_path / "resumed/run/checkpoint/state.pt").is_file()
    with pytest.raises(ConfigError, match="already holds an artifact or a checkpoint"):
        train(config)  # never a silent restart from scratch
    resumed = train(config, resume=True)

    drop = ("train_seconds",)
    assert {k: v for k, v in resumed.metrics.items() if k not in drop} == {
        k: v for k, v in straight.metrics.items() if k not in drop}
    a, b = load_file(straight.artifact.path / "model.safetensors"), load_file(resumed.artifact.path / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)

    def log(path):
        return [{k: v for k, v in json.loads(line).items() if k != "sentences_per_s"}
                for line in (path / "run/metrics.jsonl").read_text().splitlines()]

    assert log(tmp_path / "resumed") == log(tmp_path / "straight")


@pytest.mark.parametrize("when", ["after the last step", "while the artifact is written"])
def test_a_stop_after_the_last_step_still_writes_the_artifact(tiny_model_dir, corpus, tmp_path, monkeypatch, when):
    """Ctrl-C once the steps are done must not lose the run: there is nothing to resume, so it finishes."""
    from embedline.training.simcse import trainer

    on_step = None
    if when == "after the last step":
        def on_step(step: int, loss: float) -> None:
            if step == 6:
                os.kill(os.getpid(), signal.SIGINT)
    else:
        real_save = trainer.save_artifact

        def save_artifact(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGINT)  # without the handler in place: KeyboardInterrupt mid-save
            return real_save(*args, **kwargs)

        monkeypatch.setattr(trainer, "save_artifact", save_artifact)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN under a shell's `cmd &`
    result = train(_config(tiny_model_dir, corpus, tmp_path / "out", checkpoint_steps=0), on_step=on_step)
    assert result.steps == 6 and result.artifact.metadata["metrics"]["steps"] == 6
    assert not (tmp_path / "out/run/checkpoint").exists()
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back


def test_corrupt_or_missing_checkpoint_is_a_clear_error(tiny_model_dir, corpus, tmp_path):
    config = _config(tiny_model_dir, corpus, tmp_path / "out")
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        train(config, resume=True)
    with pytest.raises(TrainingInterrupted):
        train(config, on_step=_stop_at(1))
    with pytest.raises(ConfigError, match=r"cannot change settings when resuming: lr \(0.001 -> 0.5\)"):
        train(_config(tiny_model_dir, corpus, tmp_path / "out", lr=0.5), resume=True)
    state = tmp_path / "out/run/checkpoint/state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"state.pt: corrupt or unreadable checkpoint"):
        train(config, resume=True)


def test_batch_larger_than_data(tiny_model_dir, corpus, tmp_path):
    with pytest.raises(DataError, match="--batch_size 100 is larger than its 60 examples"):
        train(_config(tiny_model_dir, corpus, tmp_path / "out", batch_size=100))


def test_cli_rejects_unknown_keys(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--train-file", "x.txt", "--output", "o", "--tempreature=0.1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --tempreature=0.1" in err and "valid training-config keys: objective" in err
    assert main(["train", "--train-file", "x.txt", "--output", "o", "--batch_size=zero"]) == 1
    assert "--batch_size=zero: expected int" in capsys.readouterr().err


def test_eval_sts_verb(tiny_artifact, corpus, capsys):
    assert main(["eval-sts", "--artifact", str(tiny_artifact.path), "--data", str(corpus / "dev.tsv")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["pairs"] == 30 and -100 <= result["spearman"] <= 100 and result["uniformity"] < 0


@pytest.mark.processes
def test_cli_sigint_saves_checkpoint_and_resumes(tiny_model_dir, corpus, tmp_path):
    """`embedline train` in a real process: SIGINT -> checkpoint, exit 130; `--resume` finishes the run."""
    out = tmp_path / "out"
    # Enough steps (70-90/s here, about 2.5 s in all) that the signal lands mid-run, not after the last one.
    steps = 200
    command = [sys.executable, "-m", "embedline.cli", "train", "--model", str(tiny_model_dir),
               "--train-file", str(corpus / "train.txt"), "--output", str(out), "--batch_size=8",
               f"--max_steps={steps}", "--log_steps=1", "--device=cpu", "--checkpoint_steps=0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    metrics = out / "run/metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert process.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "checkpoint saved" in err and (out / "run/checkpoint/state.pt").is_file()
    resumed = subprocess.run([sys.executable, "-m", "embedline.cli", "train", "--resume", "--output", str(out)],
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert art.load_artifact(out).metadata["metrics"]["steps"] == steps


def test_the_start_is_kept_when_no_step_beats_it(tiny_model_dir, corpus, tmp_path, monkeypatch, caplog):
    """A dev score that only falls: the artifact holds the starting weights and records both numbers."""
    from embedline.training.simcse import trainer

    calls = []

    def falling_metrics(*args, **kwargs):
        calls.append(1)
        return {"spearman": 50.0 - len(calls), "alignment": 0.1, "uniformity": -1.0, "pairs": 30}

    monkeypatch.setattr(trainer, "sts_metrics", falling_metrics)
    config = _config(tiny_model_dir, corpus, tmp_path / "out", pooling="cls_no_mlp")
    with caplog.at_level("WARNING"):
        train(config)
    artifact = art.load_artifact(tmp_path / "out")
    metrics = artifact.metadata["metrics"]
    assert metrics["best_step"] == 0 and metrics["kept_start"] is True
    assert metrics["dev_spearman_start"] == metrics["dev_spearman"] == 49.0 and metrics["dev_spearman_last"] == 46.0
    assert "no step beat the starting model" in caplog.text
    # The written weights are the base model's, untouched (a trained step would have moved them: lr 1e-3).
    start, written = load_file(tiny_model_dir / "model.safetensors"), load_file(artifact.path / "model.safetensors")
    assert start.keys() == written.keys()
    assert all(torch.equal(start[k], written[k]) for k in start)


def test_a_step_that_beats_the_start_is_kept(tiny_model_dir, corpus, tmp_path, monkeypatch):
    from embedline.training.simcse import trainer

    calls = []

    def rising_metrics(*args, **kwargs):
        calls.append(1)
        return {"spearman": 10.0 + len(calls), "alignment": 0.1, "uniformity": -1.0, "pairs": 30}

    monkeypatch.setattr(trainer, "sts_metrics", rising_metrics)
    train(_config(tiny_model_dir, corpus, tmp_path / "out"))
    metrics = art.load_artifact(tmp_path / "out").metadata["metrics"]
    assert metrics["best_step"] == 6 and metrics["kept_start"] is False
    assert metrics["dev_spearman_start"] == 11.0 and metrics["dev_spearman"] == 14.0
