"""The client SDK against the REAL Triton server (session fixture `served_minilm`: all-MiniLM-L6-v2, fp32).

Covers the README example, parity with sentence-transformers, order preservation across split
requests (sync and async), the empty list, truncation, a server without `classify`, a server that
is down, and the `embedline embed` CLI end to end.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from embedline.client import (
    AsyncEmbeddingClient,
    DeadlineExceededError,
    EmbeddingClient,
    ModelNotFoundError,
    ServerUnavailableError,
)

DIM = 384

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The new movie is awesome and I would watch it again.",
    "The cat sits outside on the warm stone wall.",
    "I transferred money to my savings account yesterday evening.",
    "Why was my card payment declined at the supermarket?",
    "Quantum computers use qubits, which can exist in superpositions of states.",
    "The stock market fell sharply after the central bank raised interest rates.",
    "Please remind me to call the dentist tomorrow morning.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Le chat dort sur le canapé pendant que la pluie tombe.",
    "short",
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age "
    "of foolishness, it was the epoch of belief, it was the epoch of incredulity.",
]

# Well past max_seq_length (256 tokens): ~600 word-piece tokens.
LONG_TEXT = " ".join(f"sentence number {i} talks about embeddings." for i in range(100))


def mixed_length_texts(n: int) -> list[str]:
    """n distinct texts whose lengths jump around (a few over max_seq_length), not sorted by length."""
    rng = np.random.default_rng(7)
    texts = []
    for i in range(n):
        base = SENTENCES[i % len(SENTENCES)]
        repeats = 30 if i % 50 == 5 else int(rng.choice([1, 1, 1, 2, 2, 3, 5]))
        texts.append(f"item {i}: " + " ".join([base] * repeats))
    return texts


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def inference_executions(url: str) -> int:
    """How many batches the server's `embed` model has executed (Triton statistics)."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as triton:
        stats = triton.get_inference_statistics("embed")
    return sum(s.execution_count for s in stats.model_stats)


@pytest.fixture(scope="module")
def url(served_minilm) -> str:
    return served_minilm.grpc_url


@pytest.fixture(scope="module")
def client(url):
    with EmbeddingClient(url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def big_list(client, served_minilm):
    """150 mixed-length texts (more than max_batch_size) and their embeddings from the sync client."""
    texts = mixed_length_texts(150)
    assert len(texts) > served_minilm.max_batch_size
    return texts, client.embed_with_details(texts)


def test_readme_example(url, served_minilm):
    with EmbeddingClient(url) as client:
        assert client.health() is True
        embeddings = client.embed(["A man is eating food.", "A man is riding a horse."])
        info = client.info()
    assert embeddings.shape == (2, DIM) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert info.dim == DIM and info.max_seq_length == 256 and info.variant == "fp32"
    assert info.max_batch_size == served_minilm.max_batch_size
    assert info.model_name and info.labels == ()


def test_embeddings_match_sentence_transformers(client, served_minilm):
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(2)
    reference = SentenceTransformer(str(served_minilm.artifact.path), device="cpu").encode(
        SENTENCES, normalize_embeddings=True, convert_to_numpy=True)
    served = client.embed(SENTENCES)
    cosines = cosine_rows(served, reference)
    assert cosines.min() >= 0.9999, cosines


def test_order_is_preserved_across_split_requests(client, big_list, served_minilm):
    texts, result = big_list
    assert result.embeddings.shape == (150, DIM)
    # Reference rows from ONE request (fewer texts than max_batch_size: no splitting, no regrouping),
    # for texts spread over the list and over the length groups; a misplaced row would pair two
    # different texts (cosine far below 1).
    picks = list(range(0, 150, 8))
    assert len(picks) < served_minilm.max_batch_size
    reference = client.embed([texts[i] for i in picks])
    assert cosine_rows(result.embeddings[picks], reference).min() >= 0.9999
    # Neighbouring rows are different texts, so the check above can tell them apart.
    assert cosine_rows(result.embeddings[picks[:-1]], result.embeddings[[i + 1 for i in picks[:-1]]]).min() < 0.999


def test_async_client_gives_the_same_results(url, big_list):
    texts, result = big_list

    async def main():
        async with AsyncEmbeddingClient(url, timeout=60) as client:
            healthy = await client.health()
            info = await client.info()
            embeddings = await client.embed(texts)
            details = await client.embed_with_details(["short", LONG_TEXT])
            empty = await client.embed([])
        return healthy, info, embeddings, details, empty

    healthy, info, embeddings, details, empty = asyncio.run(main())
    assert healthy is True and info.dim == DIM
    assert embeddings.shape == (150, DIM) and embeddings.dtype == np.float32
    assert cosine_rows(embeddings, result.embeddings).min() >= 0.9999
    assert details.truncated.tolist() == [False, True]
    assert empty.shape == (0, DIM)


def settled_executions(url: str) -> int:
    """inference_executions once it has stopped changing: Triton updates its statistics just after a
    response is sent, so an earlier test's last batch can still be counting in."""
    previous = inference_executions(url)
    while True:
        time.sleep(0.5)
        current = inference_executions(url)
        if current == previous:
            return current
        previous = current


def test_empty_list_and_bad_types_send_no_inference(client, url):
    before = settled_executions(url)
    empty = client.embed([])
    assert empty.shape == (0, DIM) and empty.dtype == np.float32
    with pytest.raises(TypeError):
        client.embed(["fine", 3])
    with pytest.raises(TypeError):
        client.embed("a bare string")
    with pytest.raises(TypeError):
        client.embed([b"bytes"])
    assert inference_executions(url) == before


def test_empty_string_embeds(client):
    result = client.embed_with_details(["", "not empty"])
    assert result.embeddings.shape == (2, DIM)
    assert np.isfinite(result.embeddings).all()
    np.testing.assert_allclose(np.linalg.norm(result.embeddings, axis=1), 1.0, atol=1e-5)
    assert result.truncated.tolist() == [False, False]


def test_long_text_is_truncated_and_flagged(client, big_list):
    result = client.embed_with_details(["A short text.", LONG_TEXT, ""])
    assert result.truncated.tolist() == [False, True, False]
    np.testing.assert_allclose(np.linalg.norm(result.embeddings, axis=1), 1.0, atol=1e-5)
    # The long items of the big list are flagged, the short ones are not.
    texts, details = big_list
    assert details.truncated.any() and not details.truncated.all()
    assert not details.truncated[[len(t) < 200 for t in texts]].any()


def test_classify_without_a_head_is_model_not_found_and_embed_keeps_working(client):
    with pytest.raises(ModelNotFoundError, match="no 'classify' model") as error:
        client.classify(["Is this positive?"])
    assert "train-classifier" in str(error.value)  # the message says how to get one
    assert client.info().labels == ()
    assert client.embed(["still works"]).shape == (1, DIM)


def test_a_call_that_outlives_its_timeout_raises_deadline_exceeded(client):
    # 8 texts of 256 tokens, never sent before (the server answers a repeated text from its cache), take far
    # longer than 20 ms; gRPC cancels the call at the deadline.
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError, match="0.02 s timeout"):
        client.embed([f"{i} deadline {LONG_TEXT}" for i in range(8)], timeout=0.02)
    assert time.monotonic() - started < 0.02 + 0.3
    assert client.embed(["the server keeps serving"]).shape == (1, DIM)


def test_server_down_raises_unavailable_within_the_timeout():
    down = f"127.0.0.1:{free_port()}"
    timeout = 1.5
    # Jittered backoff up to 0.2, 0.4, 0.8, 1.0 s: several attempts fit, none past the deadline.
    with EmbeddingClient(down, timeout=timeout, max_retries=10, initial_backoff=0.2, max_backoff=1.0) as client:
        assert client.health() is False
        started = time.monotonic()
        with pytest.raises(ServerUnavailableError, match=r"gave up after ([2-9]|\d\d+) attempt"):
            client.embed(["hello"])  # it did retry
        elapsed = time.monotonic() - started
    assert elapsed < timeout + 0.3  # and stopped before the deadline

    async def main():
        async with AsyncEmbeddingClient(down, timeout=timeout) as async_client:
            healthy = await async_client.health()
            async_started = time.monotonic()
            with pytest.raises(ServerUnavailableError):
                await async_client.embed(["hello"])
            return healthy, time.monotonic() - async_started

    healthy, async_elapsed = asyncio.run(main())
    assert healthy is False and async_elapsed < timeout + 0.3


def _embedline(*args: str, stdin: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "embedline.cli", *args], input=stdin.encode(),
                          capture_output=True, timeout=120, env=None if env is None else {**os.environ, **env})


def test_cli_embed_stdin_to_npy_and_jsonl(url, client, tmp_path):
    texts = ["A man is eating food.", "", "Le chat dort sur le canapé.", LONG_TEXT]
    stdin = "\n".join(texts) + "\n"
    expected = client.embed_with_details(texts)

    out = tmp_path / "vectors.npy"
    done = _embedline("embed", "--url", url, "--output", str(out), "--batch-size", "2", stdin=stdin)
    assert done.returncode == 0, done.stderr.decode()
    vectors = np.load(out)
    assert vectors.shape == (4, DIM) and vectors.dtype == np.float32
    assert cosine_rows(vectors, expected.embeddings).min() >= 0.9999

    done = _embedline("embed", "--url", url, "--input", "-", "--output", "-", stdin=stdin)
    assert done.returncode == 0, done.stderr.decode()
    records = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert [r["text"] for r in records] == texts
    assert [r["truncated"] for r in records] == [False, False, False, True]
    embeddings = np.array([r["embedding"] for r in records], dtype=np.float32)
    assert cosine_rows(embeddings, expected.embeddings).min() >= 0.9999


def test_cli_embed_streams_a_multi_block_input(url, client, tmp_path):
    """Blocks of 3 lines (the env var, then --block-size): rows stay in input order across blocks, from a
    file and from stdin, for .npy (written into a memory-mapped partial file) and JSON lines."""
    texts = [f"sentence number {i} {'long ' * (i % 7)}" for i in range(10)] + [""]
    stdin = "\n".join(texts) + "\n"
    source = tmp_path / "texts.txt"
    source.write_text(stdin, encoding="utf-8")
    expected = client.embed(texts)

    for input_args, out in (((), tmp_path / "stdin.npy"), (("--input", str(source)), tmp_path / "deep" / "file.npy")):
        done = _embedline("embed", "--url", url, *input_args, "--output", str(out), stdin=stdin,
                          env={"EMBEDLINE_CLI_BLOCK_SIZE": "3"})
        assert done.returncode == 0, done.stderr.decode()
        vectors = np.load(out)
        assert vectors.shape == (len(texts), DIM)
        assert cosine_rows(vectors, expected).min() >= 0.9999
        assert not out.with_name(out.name + ".partial").exists()

    out = tmp_path / "vectors.jsonl"
    done = _embedline("embed", "--url", url, "--input", str(source), "--output", str(out), "--block-size", "4",
                      stdin="")
    assert done.returncode == 0, done.stderr.decode()
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in records] == texts
    assert cosine_rows(np.array([r["embedding"] for r in records], dtype=np.float32), expected).min() >= 0.9999
    assert b"\rembedded" not in done.stderr  # no progress line when stderr is not a terminal


@pytest.mark.processes
def test_cli_reports_a_down_server_in_one_line():
    done = _embedline("embed", "--url", f"127.0.0.1:{free_port()}", "--timeout", "2", stdin="hello\n")
    assert done.returncode == 1
    stderr_lines = [line for line in done.stderr.decode().splitlines() if line.startswith("embedline embed")]
    assert len(stderr_lines) == 1 and "unavailable" in stderr_lines[0], done.stderr.decode()
    assert done.stdout == b""


def test_cli_classify_on_a_server_without_classify_is_a_one_line_error(url, tmp_path):
    out = tmp_path / "predictions.jsonl"
    done = _embedline("classify", "--url", url, "--output", str(out), stdin="hello\n")
    assert done.returncode == 1
    assert "no 'classify' model" in done.stderr.decode()
    assert not out.exists()


@pytest.fixture(scope="module")
def served_prompted(start_server, minilm_artifact, tmp_path_factory):
    """all-MiniLM-L6-v2 with sentence-transformers prompts (`query: ` / `passage: `), served as fp32."""
    import shutil

    from embedline import artifact as art

    dest = tmp_path_factory.mktemp("prompted") / "artifact"
    shutil.copytree(minilm_artifact.path, dest, copy_function=os.link)  # the shared files stay untouched
    (dest / art.PROMPTS_FILE).write_text(json.dumps({"prompts": {"query": "query: ", "passage": "passage: "},
                                                     "default_prompt_name": None}))
    return start_server(art.load_artifact(dest), variant="fp32")


def test_prompts_embed_as_sentence_transformers_encodes_them(served_prompted):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(served_prompted.artifact.path), device="cpu")
    # Past max_seq_length with its prompt: the text is cut at its end, never the prompt.
    texts = SENTENCES[:6] + [" ".join(["the dog runs in the park"] * 80)]
    with EmbeddingClient(served_prompted.grpc_url) as client:
        info = client.info()
        assert info.prompts == {"query": "query: ", "passage": "passage: "} and info.default_prompt_name == ""
        for name in ("query", "passage"):
            ours = client.embed(texts, prompt_name=name)
            reference = model.encode(texts, prompt_name=name, normalize_embeddings=True)
            assert float(np.min(np.sum(ours * reference, axis=1))) >= 0.9999, name
        plain = client.embed(texts)
        assert float(np.min(np.sum(plain * model.encode(texts, normalize_embeddings=True), axis=1))) >= 0.9999
        assert float(np.max(np.sum(plain * client.embed(texts, prompt_name="query"), axis=1))) < 0.9999
        assert client.embed_with_details(texts, prompt_name="query").truncated.tolist() == [False] * 6 + [True]
        with pytest.raises(ValueError, match=r"'doc' is not one of the model's prompts \(passage, query\)"):
            client.embed(["a"], prompt_name="doc")

    async def embed_async():
        async with AsyncEmbeddingClient(served_prompted.grpc_url) as client:
            return await client.embed(texts, prompt_name="query")

    reference = model.encode(texts, prompt_name="query", normalize_embeddings=True)
    assert float(np.min(np.sum(asyncio.run(embed_async()) * reference, axis=1))) >= 0.9999


@pytest.mark.processes
def test_cli_embed_takes_a_prompt_name(served_prompted, tmp_path):
    texts = ["what is a qubit?", "why was my card declined?"]
    with EmbeddingClient(served_prompted.grpc_url) as client:
        expected = client.embed(texts, prompt_name="query")
    out = tmp_path / "queries.npy"
    done = _embedline("embed", "--url", served_prompted.grpc_url, "--prompt-name", "query", "--output", str(out),
                      stdin="\n".join(texts) + "\n")
    assert done.returncode == 0, done.stderr.decode()
    assert cosine_rows(np.load(out), expected).min() >= 0.9999
    done = _embedline("embed", "--url", served_prompted.grpc_url, "--prompt-name", "doc", stdin="a\n")
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1
    assert "--prompt-name 'doc' is not one of the model's prompts (passage, query)" in lines[0]
