"""Server settings the benchmark compares (length grouping off, dynamic batching off, the OpenVINO engine)
give the same embeddings as the default server, against the real tritonserver.

Texts of very different lengths are sent as concurrent 1-text requests, so the dynamic batcher really
groups them (and length grouping has something to reorder); every answer must match the default server's
and come back in request order.
"""

from __future__ import annotations

import importlib.util
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest


TEXTS = [
    "hi",
    "the quick brown fox jumps over the lazy dog " * 6,
    "a man is playing a guitar",
    "",
    "the cat sits on the table near the window and the dog sleeps under the old chair " * 3,
    "coffee",
    "she reads a book in the park every morning",
    "the children play music " * 10,
] * 3


def embed_concurrently(url: str, texts: list[str]) -> np.ndarray:
    """One request per text, 8 in flight: the dynamic batcher sees mixed-length batches."""
    from embedline.client import EmbeddingClient

    with EmbeddingClient(url) as client, ThreadPoolExecutor(8) as pool:
        return np.concatenate(list(pool.map(lambda t: client.embed([t]), texts)))


def embed_in_one_request(url: str, texts: list[str]) -> np.ndarray:
    from embedline.client import EmbeddingClient

    with EmbeddingClient(url, batch_size=len(texts)) as client:
        return client.embed(texts)


@pytest.fixture(scope="module")
def reference(start_server, tiny_fp32) -> np.ndarray:
    served = start_server(tiny_fp32, variant="fp32", max_batch_size=32)
    return embed_in_one_request(served.grpc_url, TEXTS)


@pytest.mark.parametrize("settings", [
    {"length_grouping": False},
    {"dynamic_batching": False},
    {"length_group_size": 2, "group_overhead_tokens": 0},  # many small groups: scatter back in order
])
def test_settings_give_the_default_embeddings(start_server, tiny_fp32, reference, settings):
    served = start_server(tiny_fp32, variant="fp32", max_batch_size=32, **settings)
    np.testing.assert_allclose(embed_concurrently(served.grpc_url, TEXTS), reference, atol=2e-5)
    np.testing.assert_allclose(embed_in_one_request(served.grpc_url, TEXTS), reference, atol=2e-5)


def test_config_reflects_the_settings(tiny_fp32, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from embedline.serving.repository import RepositorySettings, build_repository

    def config(**settings) -> mc.ModelConfig:
        repo = build_repository(tiny_fp32, tmp_path / str(len(settings)), RepositorySettings(**settings))
        return text_format.Parse((repo / "embed" / "config.pbtxt").read_text(), mc.ModelConfig())

    default = config()
    assert default.HasField("dynamic_batching")
    assert default.parameters["length_grouping"].string_value == "true"
    assert default.parameters["engine"].string_value == "onnxruntime"
    off = config(dynamic_batching=False, length_grouping=False)
    assert not off.HasField("dynamic_batching")
    assert off.parameters["length_grouping"].string_value == "false"


def _load_text_batch():
    path = Path(__file__).parents[1] / "model_repository" / "common" / "text_batch.py"
    spec = importlib.util.spec_from_file_location("text_batch_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_groups_splits_long_texts_off_and_covers_every_text():
    text_batch = _load_text_batch()
    lengths = [12] * 28 + [256] * 4
    groups = text_batch.plan_groups(lengths, max_group=32, overhead_tokens=64)
    assert sorted(int(i) for g in groups for i in g) == list(range(32))
    assert len(groups) == 2 and {len(g) for g in groups} == {28, 4}  # the long ones run on their own
    # Similar lengths stay one run: splitting would only add per-run overhead.
    assert len(text_batch.plan_groups([10, 11, 12, 12, 13] * 4, max_group=32, overhead_tokens=64)) == 1
    # The cap on texts per run holds.
    assert max(len(g) for g in text_batch.plan_groups([5] * 70, max_group=32, overhead_tokens=64)) <= 32
    assert text_batch.plan_groups([], 32, 64) == []


def test_plan_groups_caps_padded_tokens_per_run_but_never_drops_a_text():
    text_batch = _load_text_batch()
    lengths = [256] * 64 + [100] * 64
    groups = text_batch.plan_groups(lengths, max_group=64, overhead_tokens=64, max_tokens=8192)
    assert sorted(int(i) for g in groups for i in g) == list(range(128))
    assert all(len(g) * max(lengths[int(i)] for i in g) <= 8192 for g in groups)
    assert max(len(g) for g in groups) <= 64
    # A lone text past the cap still runs (on its own); no cap (0 / None) leaves only max_group.
    assert [len(g) for g in text_batch.plan_groups([9000, 9000], 64, 64, max_tokens=8192)] == [1, 1]
    assert len(text_batch.plan_groups([256] * 64, 64, 64, max_tokens=0)) == 1


def test_pad_matches_a_python_reference():
    text_batch = _load_text_batch()
    padder = text_batch.TextTokenizer.__new__(text_batch.TextTokenizer)
    padder.pad_id = 0
    ids = [[101, 5, 102], [101, 102], [101, 7, 8, 9, 102]]
    input_ids, mask = padder.pad(ids)
    assert input_ids.tolist() == [[101, 5, 102, 0, 0], [101, 102, 0, 0, 0], [101, 7, 8, 9, 102]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert input_ids.dtype == mask.dtype == np.int64


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None or importlib.util.find_spec("nncf") is None,
                    reason="needs the openvino extra (pip install 'embedline[openvino]')")
def test_openvino_variant_serves_close_to_fp32(start_server, tiny_artifact, tmp_path_factory, reference):
    from embedline.export.pipeline import export_artifact
    from embedline.variants import servable_variants

    dest = tmp_path_factory.mktemp("openvino-artifact") / "a"
    shutil.copytree(tiny_artifact.path, dest)
    artifact = export_artifact(dest, variants=("fp32",), show_progress=False, speed_seconds=0.1, openvino=True)
    assert "openvino" in servable_variants(artifact)
    entry = artifact.parity()["variants"]["openvino"]
    assert entry["measured"] and entry["provider"] == "OpenVINO CPU"
    # Two streams in one instance, and the two single-thread instances `serve` gives the variant on a CPU.
    for layout in ({"streams": 2}, {"instances": 2, "intra_op_threads": 1}):
        served = start_server(artifact, variant="openvino", max_batch_size=32, **layout)
        embeddings = embed_concurrently(served.grpc_url, TEXTS)
        cosines = (embeddings * reference).sum(axis=1)
        assert cosines.mean() > 0.95, (layout, cosines)
        np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-4)
