"""Several models in one server, and zero-downtime model updates, against the real launcher and tritonserver."""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest

from embedline.client import AsyncEmbeddingClient, EmbeddingClient, ModelNotFoundError

TEXTS = ["a man plays the guitar", "the cat sits on the red chair", "we transfer money to the bank"]


@pytest.fixture(scope="module")
def second_tiny(tmp_path_factory):
    """Another tiny model (other random weights, same 32-d size) as an fp32-exported artifact named tiny-b."""
    from tiny_model import build_tiny_model

    from embedline import artifact as art
    from embedline.export.onnx_export import export_fp32

    root = tmp_path_factory.mktemp("tiny-b")
    artifact = art.import_model_dir(build_tiny_model(root / "model", seed=1), root / "artifact", name="tiny-b")
    export_fp32(artifact)
    return artifact


def in_process(artifact, texts):
    """The artifact's embeddings computed with torch, in this process."""
    import torch

    from embedline.encoder import load_encoder
    from embedline.tokenization import encode, load_tokenizer

    tokens = encode(load_tokenizer(artifact.tokenizer_path, artifact.max_seq_length), texts)
    with torch.no_grad():
        return load_encoder(artifact)(**{k: torch.from_numpy(v) for k, v in tokens.items()}).numpy()


def test_two_artifacts_in_one_server_each_answer_as_in_process(launch_serve, tiny_fp32, second_tiny):
    served = launch_serve("--artifact", str(tiny_fp32.path), "--artifact", str(second_tiny.path), "--variant", "fp32")
    assert "serving tiny-b as `tiny-b`" in served.banner
    expected_a, expected_b = in_process(tiny_fp32, TEXTS), in_process(second_tiny, TEXTS)
    assert not np.allclose(expected_a, expected_b, atol=1e-3)  # the two really differ
    with EmbeddingClient(served.grpc_url) as default, EmbeddingClient(served.grpc_url, model="tiny-b") as b, \
            EmbeddingClient(served.grpc_url, model="tiny") as a:
        np.testing.assert_allclose(default.embed(TEXTS), expected_a, atol=1e-4)
        np.testing.assert_allclose(a.embed(TEXTS), expected_a, atol=1e-4)
        np.testing.assert_allclose(b.embed(TEXTS), expected_b, atol=1e-4)
        assert b.info().model_name == "tiny-b"
        assert default.info().served_models == ("tiny", "tiny-b")
    with EmbeddingClient(served.grpc_url, model="nope") as missing:
        with pytest.raises(ModelNotFoundError, match="tiny, tiny-b"):
            missing.embed(TEXTS)

    async def async_b():
        async with AsyncEmbeddingClient(served.grpc_url, model="tiny-b") as client:
            return await client.embed(TEXTS)

    import asyncio

    np.testing.assert_allclose(asyncio.run(async_b()), expected_b, atol=1e-4)


@pytest.mark.processes
def test_two_artifacts_with_one_name_are_refused(tiny_fp32, tmp_path):
    import subprocess
    import sys

    copy = tmp_path / "copy"
    shutil.copytree(tiny_fp32.path, copy)
    result = subprocess.run([sys.executable, "-m", "embedline.cli", "serve", "--artifact", str(tiny_fp32.path),
                             "--artifact", str(copy)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "artifact names must be unique" in result.stderr


def test_publish_swaps_the_model_under_load_without_a_failed_request(launch_serve, tiny_fp32, second_tiny, tmp_path):
    import subprocess
    import sys

    repository = tmp_path / "models"
    served = launch_serve("--artifact", str(tiny_fp32.path), "--variant", "fp32",
                          "--repository", str(repository), "--watch")
    old, new = in_process(tiny_fp32, TEXTS), in_process(second_tiny, TEXTS)
    counts = {"old": 0, "new": 0, "other": 0}
    errors: list[BaseException] = []
    stop = threading.Event()

    def load():
        with EmbeddingClient(served.grpc_url, timeout=30) as client:
            while not stop.is_set():
                try:
                    embeddings = client.embed(TEXTS)
                except Exception as exc:  # every failure is a finding
                    errors.append(exc)
                    continue
                kind = ("old" if np.allclose(embeddings, old, atol=1e-4)
                        else "new" if np.allclose(embeddings, new, atol=1e-4) else "other")
                counts[kind] += 1

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    published = subprocess.run([sys.executable, "-m", "embedline.cli", "publish", "--artifact", str(second_tiny.path),
                                "--repository", str(repository), "--variant", "fp32"],
                               capture_output=True, text=True, timeout=120)
    assert published.returncode == 0, published.stderr
    served.read_until("now serves version 2", timeout=60)
    before = counts["new"]
    deadline = time.monotonic() + 30
    while counts["new"] < before + 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join(60)
    print(f"swap under load: {counts}, {len(errors)} errors")
    assert errors == [], errors[:3]
    assert counts["old"] > 0 and counts["new"] >= before + 20 and counts["other"] == 0, counts
    with EmbeddingClient(served.grpc_url) as client:
        np.testing.assert_allclose(client.embed(TEXTS), new, atol=1e-4)  # the switch is for good
        assert client.info().model_name == "tiny-b"


def test_the_launcher_serves_every_model_on_the_openai_route(launch_serve, tiny_fp32, second_tiny, tmp_path):
    import openai

    key_file = tmp_path / "key"
    key_file.write_text("route-key")
    served = launch_serve("--artifact", str(tiny_fp32.path), "--artifact", str(second_tiny.path), "--variant", "fp32",
                          "--api-key-file", str(key_file))
    assert f"OpenAI   http://127.0.0.1:{served.openai_port}/v1" in served.banner
    base_url = f"http://127.0.0.1:{served.openai_port}/v1"
    client = openai.OpenAI(base_url=base_url, api_key="route-key", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny", "tiny-b"]
    with EmbeddingClient(served.grpc_url, api_key="route-key", model="tiny-b") as sdk:
        expected = sdk.embed(TEXTS, dimensions=16)
    response = client.embeddings.create(model="tiny-b", input=TEXTS, dimensions=16, encoding_format="float")
    got = np.array([item.embedding for item in response.data], dtype=np.float32)
    assert ((got * expected).sum(axis=1) >= 0.9999).all()
    assert response.usage.prompt_tokens > len(TEXTS)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).embeddings.create(model="tiny", input="x")


def test_a_published_model_keeps_the_index_and_refuses_the_old_models_collection(launch_serve, tiny_fp32, second_tiny,
                                                                                   tmp_path):
    """`publish` keeps the server's store: the new version ranks too, with its own model record, so the
    collection indexed with the old weights is refused instead of compared with vectors of the new ones."""
    import subprocess
    import sys

    from embedline.client import InvalidInputError
    from embedline.client.cli import Progress
    from embedline.search.indexer import index_corpus
    from embedline.search.store import open_store

    repository, store = tmp_path / "models", open_store(str(tmp_path / "store"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    served = launch_serve("--artifact", str(tiny_fp32.path), "--variant", "fp32", "--index", store.uri,
                          "--repository", str(repository), "--watch")
    with EmbeddingClient(served.grpc_url) as client:
        index_corpus(client, store, "old", str(corpus), progress=Progress(len(TEXTS), enabled=False))
        assert client.search(TEXTS[0], k=1, collection="old")[0][0].text == TEXTS[0]
    published = subprocess.run([sys.executable, "-m", "embedline.cli", "publish", "--artifact", str(second_tiny.path),
                                "--repository", str(repository), "--variant", "fp32"],
                               capture_output=True, text=True, timeout=120)
    assert published.returncode == 0, published.stderr
    served.read_until("now serves version 2", timeout=60)
    with EmbeddingClient(served.grpc_url) as client:
        with pytest.raises(InvalidInputError, match="indexed with model"):
            client.search(TEXTS[0], k=1, collection="old")
        index_corpus(client, store, "new", str(corpus), progress=Progress(len(TEXTS), enabled=False))
        assert client.search(TEXTS[0], k=1, collection="new")[0][0].text == TEXTS[0]
