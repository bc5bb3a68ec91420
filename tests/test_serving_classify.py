"""`classify` through the REAL Triton server: the model repository built for an artifact with a head, the
served predictions against in-process ones, neighbours, invalid UTF-8, the CLI, and the async client."""

from __future__ import annotations

import asyncio
import json
import queue
import subprocess
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from embedline import artifact as art
from embedline.client import AsyncEmbeddingClient, EmbeddingClient
from embedline.serving.repository import RepositorySettings, build_repository

TEXTS = ["the song is good", "the film is terrible", "the road is near the door", "", "love love love",
         "the coffee is cold and sad", "a chair"]


def read_config(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def in_process(artifact, texts):
    """(labels, probabilities, neighbour labels) computed with torch + the Python head."""
    from embedline.encoder import load_encoder
    from embedline.tokenization import load_tokenizer
    from embedline.training.evaluate import embed_texts
    from embedline.training.fewshot.head import load_head, load_train_examples, nearest_labels

    tokenizer = load_tokenizer(artifact.tokenizer_path, artifact.max_seq_length)
    embeddings = embed_texts(load_encoder(artifact), tokenizer, texts).numpy()
    head = load_head(artifact.head_dir)
    train_x, train_labels = load_train_examples(artifact.head_dir)
    return head.predict(embeddings), head.probabilities(embeddings), nearest_labels(embeddings, train_x, train_labels, 3)


@pytest.fixture(scope="module")
def served(start_server, tiny_classifier):
    # A 50 ms batching window: the requests of the UTF-8 test below reliably share one dynamic batch.
    return start_server(tiny_classifier, variant="fp32", queue_delay_us=50_000, max_batch_size=16)


@pytest.fixture(scope="module")
def client(served):
    with EmbeddingClient(served.grpc_url, timeout=60) as c:
        yield c


# ---- the repository ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["python", "onnxruntime"])
def test_repository_wires_classify_through_the_shared_encoder(tiny_classifier, tmp_path, layout):
    repo = build_repository(tiny_classifier, tmp_path / "models", RepositorySettings(layout=layout, max_batch_size=8))
    configs = {p.name: read_config(p / "config.pbtxt") for p in repo.iterdir()}
    assert {"embed", "classify", "classifier_head"} <= set(configs)
    classify = configs["classify"]
    assert classify.platform == "ensemble" and classify.max_batch_size == 8
    outputs = {t.name: t for t in classify.output}
    assert outputs["label"].data_type == mc.TYPE_STRING and list(outputs["label"].dims) == [1]
    assert list(outputs["probabilities"].dims) == [3] and outputs["truncated"].data_type == mc.TYPE_BOOL
    assert list(outputs["neighbour_labels"].dims) == [3]
    params = {k: v.string_value for k, v in classify.parameters.items()}
    assert json.loads(params["labels"]) == ["negative", "neutral", "positive"] and params["neighbours"] == "3"
    assert params["dim"] == str(tiny_classifier.dim)
    # Every step input exists before it is read, with the same type; every ensemble output is produced.
    available = {t.name: t.data_type for t in classify.input}
    for step in classify.ensemble_scheduling.step:
        model = configs[step.model_name]
        inputs, model_outputs = {t.name: t for t in model.input}, {t.name: t for t in model.output}
        for model_tensor, ensemble_tensor in step.input_map.items():
            assert inputs[model_tensor].data_type == available[ensemble_tensor]
        for model_tensor, ensemble_tensor in step.output_map.items():
            available[ensemble_tensor] = model_outputs[model_tensor].data_type
    assert all(available.get(t.name) == t.data_type for t in classify.output)
    head_dir = repo / "classifier_head" / "1"
    assert {p.name for p in head_dir.iterdir()} == {"model.py", "ort_options.py", "parent_watch.py", "head.onnx",
                                                    "train_embeddings.npy", "train_labels.json"}
    assert not any(p.is_symlink() for p in repo.rglob("*"))


@pytest.fixture(scope="module")
def headless(tiny_classifier, tmp_path_factory):
    """The same artifact without its head/."""
    plain = tmp_path_factory.mktemp("headless") / "artifact"
    shutil.copytree(tiny_classifier.path, plain, ignore=shutil.ignore_patterns("head"))
    return art.load_artifact(plain)


def test_repository_without_a_head_has_no_classify(headless, tmp_path):
    repo = build_repository(headless, tmp_path / "models", RepositorySettings())
    assert sorted(p.name for p in repo.iterdir()) == ["embed"]


# ---- served predictions -----------------------------------------------------------------------------


def test_classify_agrees_with_in_process_prediction(client, tiny_classifier):
    labels, probabilities, neighbours = in_process(tiny_classifier, TEXTS)
    predictions = client.classify(TEXTS)
    assert client.info().labels == ("negative", "neutral", "positive")
    assert [p.label for p in predictions] == labels
    served = np.array([[p.probabilities[label] for label in client.info().labels] for p in predictions])
    np.testing.assert_allclose(served, probabilities, atol=1e-4)
    assert all(p.score == max(p.probabilities.values()) for p in predictions)
    assert [list(p.neighbour_labels) for p in predictions] == neighbours
    assert client.embed(TEXTS).shape == (len(TEXTS), tiny_classifier.dim)  # embed keeps working beside it


def test_async_classify_and_split_requests_keep_order(served, client):
    texts = [f"the {w} is {v}" for w in ("song", "film", "road", "coffee", "book") for v in ("good", "bad", "near", "sad")]
    expected = client.classify(texts)

    async def go():
        async with AsyncEmbeddingClient(served.grpc_url, timeout=60, batch_size=3) as aclient:
            return await aclient.classify(texts), await aclient.classify([])

    predictions, empty = asyncio.run(go())
    assert empty == [] and [p.label for p in predictions] == [p.label for p in expected]
    for got, want in zip(predictions, expected):
        assert got.neighbour_labels == want.neighbour_labels
        assert got.probabilities == pytest.approx(want.probabilities, abs=1e-5)


def executions(triton) -> int:
    """Batches the shared `embed` step has run (every classify request goes through it)."""
    return sum(s.execution_count for s in triton.get_inference_statistics("embed").model_stats)


def test_invalid_utf8_fails_only_its_own_classify_request(served, client):
    def text_input(items):
        data = np.array(items, dtype=np.object_).reshape(-1, 1)
        infer_input = grpcclient.InferInput("text", list(data.shape), "BYTES")
        infer_input.set_data_from_numpy(data)
        return infer_input

    requests = [("good-0", [b"the song is good"]), ("bad-0", [b"\xff\xfe"]),
                ("good-1", [b"the film is bad", "caf\u00e9".encode()]), ("bad-1", [b"ok", b"\xe2\x82"])]
    outcomes: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(served.grpc_url) as triton:
        before = executions(triton)
        for request_id, items in requests:
            triton.async_infer("classify", [text_input(items)], request_id=request_id,
                               callback=lambda result, error, rid=request_id: outcomes.put((rid, result, error)))
        results = {}
        for _ in requests:
            request_id, result, error = outcomes.get(timeout=60)
            results[request_id] = (result, error)
        # The 50 ms batching delay gathers the four requests: fewer executions than requests means the bad
        # ones really shared a batch with the good ones.
        assert executions(triton) - before <= 2, "the requests were not batched together"
        for request_id, items in requests:
            result, error = results[request_id]
            if request_id.startswith("bad"):
                assert isinstance(error, InferenceServerException) and "UTF-8" in error.message(), error
            else:
                assert error is None, error
                labels = [x.decode() for x in result.as_numpy("label").reshape(-1)]
                assert labels == [p.label for p in client.classify([i.decode("utf-8") for i in items])]
        assert triton.is_server_ready() and triton.is_model_ready("classify")


def test_cli_classify_writes_json_lines(served, client, tmp_path):
    out = tmp_path / "predictions.jsonl"
    done = subprocess.run([sys.executable, "-m", "embedline.cli", "classify", "--url", served.grpc_url,
                           "--output", str(out)], input="the song is good\nthe film is terrible\n",
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    expected = client.classify(["the song is good", "the film is terrible"])
    assert [r["label"] for r in records] == [p.label for p in expected]
    assert [r["neighbour_labels"] for r in records] == [list(p.neighbour_labels) for p in expected]
    assert set(records[0]["probabilities"]) == {"negative", "neutral", "positive"}
