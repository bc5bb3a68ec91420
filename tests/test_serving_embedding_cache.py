"""The embed model's cache of recent texts' embeddings: the unit (model_repository/python/embed/1/
embedding_cache.py) and what a real server answers with it on."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from embedline.client import EmbeddingClient
from embedline.client.encoding import text_input
from embedline.serving.repository import build_repository
from embedline.serving.settings import served_settings

from test_serving_repository import read_config

CACHE_FILE = Path(__file__).parents[1] / "model_repository" / "python" / "embed" / "1" / "embedding_cache.py"


def _cache_module():
    spec = importlib.util.spec_from_file_location("embedding_cache_under_test", CACHE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CountingEngine:
    """A stand-in for the engine: each text's embedding is its length, and every text it computes is counted."""

    def __init__(self):
        self.computed: list[str] = []

    def __call__(self, texts):
        self.computed += texts
        embeddings = np.array([[len(t), 1.0] for t in texts], dtype=np.float32)
        return embeddings, np.array([len(t) > 10 for t in texts])


def test_a_repeated_text_is_answered_from_the_cache_with_the_same_outputs():
    cache, engine = _cache_module().EmbeddingCache(8), CountingEngine()
    first = cache.embed(["hello", "a much longer text"], engine)
    again = cache.embed(["a much longer text", "new", "hello"], engine)
    assert engine.computed == ["hello", "a much longer text", "new"]
    np.testing.assert_array_equal(again[0], np.array([[18, 1], [3, 1], [5, 1]], dtype=np.float32))
    assert again[1].tolist() == [True, False, False] and first[1].tolist() == [False, True]
    assert again[0].dtype == np.float32 and again[0].shape == (3, 2)


def test_a_text_twice_in_one_batch_is_computed_once():
    cache, engine = _cache_module().EmbeddingCache(8), CountingEngine()
    embeddings, truncated = cache.embed(["same", "other", "same"], engine)
    assert engine.computed == ["same", "other"]
    np.testing.assert_array_equal(embeddings[0], embeddings[2])
    assert len(embeddings) == len(truncated) == 3


def test_the_least_recently_used_text_leaves_a_full_cache():
    cache, engine = _cache_module().EmbeddingCache(2), CountingEngine()
    cache.embed(["a"], engine)
    cache.embed(["b"], engine)
    cache.embed(["a"], engine)  # used again: "b" is now the oldest
    cache.embed(["c"], engine)  # full: "b" leaves
    engine.computed.clear()
    cache.embed(["a"], engine)
    cache.embed(["c"], engine)
    cache.embed(["b"], engine)
    assert engine.computed == ["b"]


def test_a_corpus_sized_batch_is_not_remembered():
    module = _cache_module()
    cache, engine = module.EmbeddingCache(1000), CountingEngine()
    corpus = [f"document {i}" for i in range(module.REMEMBER_BATCH_TEXTS + 1)]
    cache.embed(corpus, engine)
    cache.embed(["a query"], engine)
    engine.computed.clear()
    cache.embed([corpus[0]], engine)
    cache.embed(["a query"], engine)
    assert engine.computed == [corpus[0]]  # the query stayed, the corpus never came in


def test_a_cached_row_is_its_own_copy():
    cache = _cache_module().EmbeddingCache(8)
    output = np.ones((1, 2), dtype=np.float32)
    cache.embed(["text"], lambda texts: (output, np.array([False])))
    output[:] = 7  # the engine reuses its output buffer
    embeddings, _ = cache.embed(["text"], CountingEngine())
    np.testing.assert_array_equal(embeddings, np.ones((1, 2), dtype=np.float32))


def test_the_cache_is_on_by_default_and_off_with_the_cli_value_0(tiny_fp32, tmp_path):
    def entries(**overrides):
        repo = build_repository(tiny_fp32, tmp_path / "models", served_settings("fp32", 2, **overrides))
        return read_config(repo / "embed" / "config.pbtxt").parameters["embedding_cache_entries"].string_value

    assert int(entries()) > 0
    assert entries(embedding_cache_entries=0) == "0"


@pytest.fixture(scope="module")
def cached_server(start_server, tiny_fp32):
    return start_server(tiny_fp32, variant="fp32")  # RepositorySettings: the cache on, as serve runs it


def test_a_served_repeat_gets_the_first_answer_and_every_caller_its_own_outputs(cached_server, tiny_fp32):
    """The failure of Triton's response cache, asked of this one: a caller that wants the embedding alone
    makes the entry, then the SDK asks for the embedding and the truncation flags."""
    text = "a query some service sends again and again"
    raw = grpcclient.InferenceServerClient(cached_server.grpc_url)
    alone = raw.infer("embed", [text_input(grpcclient, [text])],
                      outputs=[grpcclient.InferRequestedOutput("sentence_embedding")])
    with EmbeddingClient(cached_server.grpc_url) as client:
        first = client.embed_with_details([text, "x " * (tiny_fp32.max_seq_length + 5)])
        again = client.embed_with_details([text, "x " * (tiny_fp32.max_seq_length + 5)])
    np.testing.assert_array_equal(first.embeddings[0], alone.as_numpy("sentence_embedding")[0])
    np.testing.assert_array_equal(again.embeddings, first.embeddings)
    assert first.truncated.tolist() == again.truncated.tolist() == [False, True]


def test_a_long_text_costs_the_cache_a_16_byte_key():
    module = _cache_module()
    assert len(module.text_key("word " * 200_000)) == len(module.text_key("hi")) == 16
    assert module.text_key("hi") != module.text_key("hi ")
