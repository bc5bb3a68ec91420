"""Corpus calls without a server: how a long list is planned into requests (`planning.plan_requests`),
what the model config says about it, and the `embedline embed` CLI's streaming (blocks, .npy, progress)."""

from __future__ import annotations

import argparse
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from embedline.client import model_config, planning
from embedline.client import cli
from embedline.client.planning import RequestPlan, plan_requests
from embedline.client.results import EmbedResult
from embedline.errors import EmbedlineError

# ----------------------------------------------------------------------------------------------
# plan_requests


def test_a_list_that_fits_one_request_goes_as_one():
    assert plan_requests(10, 64).batch_size == 64
    assert plan_requests(64, 64).batch_size == 64


def test_a_long_list_is_cut_into_length_groups_with_enough_in_flight():
    # The default server: max_batch_size 64, one instance, length groups of 32, queue bound 32.
    # Two dynamic batches' worth in flight: 2 x 64 / 32 = 4.
    assert plan_requests(2000, 64, max_queue_size=32) == RequestPlan(batch_size=32, in_flight=4)
    # A smaller max_batch_size caps the request; the in-flight count never drops below 4.
    assert plan_requests(2000, 16) == RequestPlan(batch_size=16, in_flight=4)
    assert plan_requests(2000, 64, instances=4) == RequestPlan(batch_size=32, in_flight=16)
    # A server whose instances batch more texts at once gets more in flight: 2 x 4 x 128 / 32 = 32.
    assert plan_requests(2000, 128, instances=4) == RequestPlan(batch_size=32, in_flight=32)
    # ... bounded by 64 and by the server's queue bound.
    assert plan_requests(10_000, 256, instances=16).in_flight == planning.MAX_AUTO_IN_FLIGHT
    assert plan_requests(10_000, 256, instances=16, max_queue_size=20).in_flight == 20
    # The server's own length group size is followed.
    assert plan_requests(2000, 64, group_size=16).batch_size == 16
    assert plan_requests(2000, 64, group_size=128).batch_size == 64


def test_an_explicit_batch_size_or_concurrency_is_kept():
    assert plan_requests(2000, 64, batch_size=64, max_concurrency=4) == RequestPlan(64, 4)
    assert plan_requests(2000, 64, batch_size=500).batch_size == 64  # still capped by the server
    assert plan_requests(10, 64, batch_size=2).batch_size == 2
    assert plan_requests(2000, 64, max_concurrency=3) == RequestPlan(32, 3)
    assert plan_requests(2000, 64, batch_size=8).in_flight == 16  # 2 x 64 / 8 = 16
    with pytest.raises(ValueError):
        plan_requests(10, 0)


def _config_response(max_batch_size=64, counts=(1,), queue=0, **parameters):
    response = service_pb2.ModelConfigResponse()
    response.config.name = "embed"
    response.config.max_batch_size = max_batch_size
    for count in counts:
        response.config.instance_group.add(count=count)
    if queue:
        response.config.dynamic_batching.default_queue_policy.max_queue_size = queue
    for key, value in parameters.items():
        response.config.parameters[key].string_value = value
    return response


def test_the_plan_follows_the_model_config():
    spec = model_config.parse_model_config(_config_response(64, (1,), 32, length_group_size="32"), "h:1")
    assert (spec.instances, spec.max_queue_size) == (1, 32)
    assert planning.plan_for_spec(spec, 2000, None, None, "h:1") == RequestPlan(32, 4)
    spec = model_config.parse_model_config(_config_response(128, (2, 2), 0, length_group_size="16"), "h:1")
    assert (spec.instances, spec.max_queue_size, planning.spec_group_size(spec)) == (4, 0, 16)
    assert planning.plan_for_spec(spec, 2000, None, None, "h:1") == RequestPlan(16, 64)
    # An older config without these fields: one instance, groups of 32, no queue bound.
    bare = model_config.parse_model_config(_config_response(64, ()), "h:1")
    assert (bare.instances, bare.max_queue_size, planning.spec_group_size(bare)) == (1, 0, 32)
    assert planning.plan_for_spec(bare, 2000, 64, 4, "h:1") == RequestPlan(64, 4)


def test_max_concurrency_none_is_automatic_and_bad_values_are_refused():
    from embedline.client import EmbeddingClient

    assert EmbeddingClient("h:1").max_concurrency is None
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError):
            EmbeddingClient("h:1", max_concurrency=bad)


# ----------------------------------------------------------------------------------------------
# The CLI's streaming


def test_iter_lines_and_count_lines_agree_with_read_texts(tmp_path):
    data = "first\r\n\nthird with \x0b inside\nlast".encode()
    for payload in (data, data + b"\n", b"", b"\n", b"only"):
        path = tmp_path / "in.txt"
        path.write_bytes(payload)
        expected = cli.read_texts(str(path))
        with open(path, "rb") as handle:
            assert cli.count_lines(handle) == len(expected)
            assert list(cli.iter_lines(handle, str(path))) == expected


def test_iter_lines_names_the_offset_of_invalid_utf8():
    with pytest.raises(EmbedlineError, match=r"stdin is not valid UTF-8 \(byte 3\)"):
        list(cli.iter_lines(io.BytesIO(b"ok\n\xff\n"), "-"))


def test_iter_blocks():
    assert list(cli.iter_blocks(iter("abcde"), 2)) == [["a", "b"], ["c", "d"], ["e"]]
    assert list(cli.iter_blocks(iter(""), 2)) == []


def test_block_size_from_option_env_and_default(monkeypatch):
    monkeypatch.delenv(cli.BLOCK_SIZE_ENV, raising=False)
    assert cli.block_size_from(SimpleNamespace()) == cli.EMBED_BLOCK_SIZE
    monkeypatch.setenv(cli.BLOCK_SIZE_ENV, "7")
    assert cli.block_size_from(SimpleNamespace(block_size=None)) == 7
    assert cli.block_size_from(SimpleNamespace(block_size=3)) == 3
    monkeypatch.setenv(cli.BLOCK_SIZE_ENV, "x")
    with pytest.raises(EmbedlineError, match=cli.BLOCK_SIZE_ENV):
        cli.block_size_from(SimpleNamespace(block_size=None))


def test_progress_writes_one_line_only_to_a_terminal():
    stream = io.StringIO()
    progress = cli.Progress(10, stream=stream, enabled=True)
    progress.update(4)
    progress.update(6)
    progress.close()
    text = stream.getvalue()
    assert text.startswith("\rembedded 4/10 texts") and "\rembedded 10/10 texts 100%" in text and text.endswith("\n")
    quiet = io.StringIO()
    progress = cli.Progress(None, stream=quiet)  # StringIO is not a TTY
    progress.update(3)
    progress.close()
    assert quiet.getvalue() == "" and progress.done == 3


def embed_args(*argv: str) -> argparse.Namespace:
    """`embedline embed`'s arguments, parsed by its own parser (so every option has its default)."""
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    return parser.parse_args(["--url", "h:1", "--timeout", "1", *argv])


class _FakeClient:
    """Stands in for EmbeddingClient in cli.run: embeds text i as a one-hot-ish vector of its length."""

    calls: list[int] = []

    def __init__(self, url, timeout=None, batch_size=None):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def info(self):
        return SimpleNamespace(dim=3)

    def embed_with_details(self, texts, prompt_name=None):
        _FakeClient.calls.append(len(texts))
        embeddings = np.array([[len(t), 1.0, 0.0] for t in texts], dtype=np.float32)
        return EmbedResult(embeddings, np.array([len(t) > 5 for t in texts], dtype=bool))


@pytest.mark.parametrize("from_stdin", [False, True])
def test_cli_embed_streams_blocks_to_npy_and_jsonl(tmp_path, monkeypatch, from_stdin):
    monkeypatch.setattr(cli, "EmbeddingClient", _FakeClient)
    texts = [f"text {'x' * (i % 9)}" for i in range(23)]
    path = tmp_path / "in.txt"
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")

    def run(output):
        source = "-" if from_stdin else str(path)
        if from_stdin:
            monkeypatch.setattr(cli.sys, "stdin", SimpleNamespace(buffer=io.BytesIO(path.read_bytes())))
        _FakeClient.calls = []
        assert cli.run(embed_args("--input", source, "--output", str(output), "--block-size", "5")) == 0
        assert _FakeClient.calls == [5, 5, 5, 5, 3]

    run(tmp_path / "out" / "vectors.npy")
    vectors = np.load(tmp_path / "out" / "vectors.npy")
    assert vectors.shape == (23, 3) and vectors.dtype == np.float32
    assert vectors[:, 0].tolist() == [len(t) for t in texts]
    assert not (tmp_path / "out" / "vectors.npy.partial").exists()

    run(tmp_path / "vectors.jsonl")
    records = [json.loads(line) for line in (tmp_path / "vectors.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in records] == texts
    assert [r["embedding"][0] for r in records] == [len(t) for t in texts]


def test_cli_embed_to_npy_leaves_no_partial_file_on_failure(tmp_path, monkeypatch):
    class Failing(_FakeClient):
        def embed_with_details(self, texts, prompt_name=None):
            raise EmbedlineError("server went away")

    monkeypatch.setattr(cli, "EmbeddingClient", Failing)
    path = tmp_path / "in.txt"
    path.write_text("a\nb\n", encoding="utf-8")
    out = tmp_path / "vectors.npy"
    with pytest.raises(EmbedlineError, match="went away"):
        cli.run(embed_args("--input", str(path), "--output", str(out), "--block-size", "1"))
    assert not out.exists() and not (tmp_path / "vectors.npy.partial").exists()


def test_cli_embed_empty_input_writes_an_empty_npy(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "EmbeddingClient", _FakeClient)
    path = tmp_path / "in.txt"
    path.write_bytes(b"")
    out = tmp_path / "vectors.npy"
    assert cli.run(embed_args("--input", str(path), "--output", str(out))) == 0
    assert np.load(out).shape == (0, 3)
