"""DDP on CPU (gloo, 2 processes) == one process on the same global batch: loss, gradients, trained weights.

Each process takes half of every global batch and all-gathers the candidates, so its negatives include
the other process's examples. Dropout is off so both runs see identical computations.
"""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from embedline.tokenization import load_tokenizer
from embedline.training.simcse import distributed
from embedline.training.simcse.cached_loss import cached_backward, plain_backward
from embedline.training.simcse.config import TrainConfig, resolve_config
from embedline.training.data import Batch
from embedline.training.simcse.losses import make_loss
from embedline.training.simcse.model import build_model
from embedline.training.simcse.trainer import batch_features, train

ANCHORS = ["a man plays the guitar", "the cat sleeps on the bed", "a dog runs in the park", "she reads a book",
           "the children play with a ball", "a bird sings", "people walk in the city", "he drives a car"]
POSITIVES = ["a man plays music", "a cat sleeps", "the dog runs", "a woman reads", "children play", "the bird sings",
             "people walk", "a man drives"]
NEGATIVES = ["a woman cooks", "the car is red", "the train is slow", "he eats bread", "it is cold today",
             "the fox jumps", "they dance", "the room is small"]


def _config(model_dir, work, **overrides) -> TrainConfig:
    return TrainConfig(model=str(model_dir), train_file=str(work / "train.txt"), output=str(work / "out"),
                       dropout=0.0, batch_size=8, max_steps=3, lr=1e-3, log_steps=1, device="cpu", **overrides)


def _step_grads(model, model_dir, rows: slice, mini_batch_size: int):
    """Loss and parameter gradients of one supervised step on `rows` of the global batch."""
    tokenizer = load_tokenizer(f"{model_dir}/tokenizer.json", 32)
    batch = Batch([ANCHORS[rows], POSITIVES[rows], NEGATIVES[rows]])
    features, sizes, _ = batch_features(batch, tokenizer, 1, torch.device("cpu"))
    loss_fn = make_loss("sup", temperature=0.05, gather=distributed.gather_with_grad)

    def loss_on(embeddings):
        return loss_fn(embeddings.split(sizes), None)

    model.zero_grad()
    if mini_batch_size:
        loss = cached_backward(model, features, loss_on, mini_batch_size)
    else:
        loss = plain_backward(model, features, loss_on)
    inner = model.module if hasattr(model, "module") else model
    grads = {n: p.grad.clone() for n, p in inner.named_parameters() if p.grad is not None}
    return distributed.mean_over_processes(loss.item()), grads


def _worker(rank: int, world_size: int, port: int, model_dir: str, work: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from pathlib import Path

    work = Path(work)
    config = resolve_config(_config(model_dir, work, objective="sup"))
    env = distributed.init("cpu")
    half = len(ANCHORS) // world_size
    rows = slice(rank * half, (rank + 1) * half)
    results = {}
    for mini_batch_size in (0, 3):
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(build_model(config).train(), broadcast_buffers=False)
        loss, grads = _step_grads(model, model_dir, rows, mini_batch_size)
        results[mini_batch_size] = (loss, grads)
    if env.is_main:
        torch.save(results, work / "ddp_step.pt")
    train(_config(model_dir, work, objective="unsup"))  # the whole trainer under torchrun-style env
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.processes
def test_ddp_gloo_equals_single_process(tiny_model_dir, tmp_path):
    (tmp_path / "ddp").mkdir()
    (tmp_path / "single").mkdir()
    for folder in ("ddp", "single"):
        (tmp_path / folder / "train.txt").write_text("\n".join(ANCHORS + POSITIVES + NEGATIVES) + "\n")

    mp.spawn(_worker, args=(2, _free_port(), str(tiny_model_dir), str(tmp_path / "ddp")), nprocs=2, join=True)

    # One step, plain and cached: the 2-process loss and averaged gradients equal the single-process ones.
    ddp_results = torch.load(tmp_path / "ddp" / "ddp_step.pt")
    config = resolve_config(_config(tiny_model_dir, tmp_path / "single", objective="sup"))
    for mini_batch_size in (0, 3):
        torch.manual_seed(0)
        loss, grads = _step_grads(build_model(config).train(), tiny_model_dir, slice(0, len(ANCHORS)), mini_batch_size)
        ddp_loss, ddp_grads = ddp_results[mini_batch_size]
        assert ddp_loss == pytest.approx(loss, rel=1e-5)
        assert ddp_grads.keys() == grads.keys()
        for name in grads:
            torch.testing.assert_close(ddp_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)

    # Three optimizer steps of the trainer: same logged losses, same trained weights.
    single = train(_config(tiny_model_dir, tmp_path / "single", objective="unsup"))
    logs = [[json.loads(line)["loss"] for line in (tmp_path / d / "out/run/metrics.jsonl").read_text().splitlines()]
            for d in ("ddp", "single")]
    assert logs[0] == pytest.approx(logs[1], rel=1e-5)
    from safetensors.torch import load_file

    ddp_weights = load_file(tmp_path / "ddp" / "out" / "model.safetensors")
    single_weights = load_file(single.artifact.path / "model.safetensors")
    for name, tensor in single_weights.items():
        torch.testing.assert_close(ddp_weights[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
