"""`embedline index-ray`: Parquet shards embedded by an actor pool of SDK clients over two real server replicas,
in a local Ray instance, loaded into a real (Milvus Lite) Milvus server; resumable per shard."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import EMBEDLINE_CLI
from embedline.client import EmbeddingClient
from embedline.search.store import open_store

pytestmark = pytest.mark.processes


def write_shards(directory, shards: int, rows: int) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        ids = [f"s{shard}-{i}" for i in range(rows)]
        pq.write_table(pa.table({"id": ids, "text": [f"note {i} on wing flutter and stall" for i in ids],
                                 "year": [1950 + i % 20 for i in range(rows)]}), directory / f"part-{shard}.parquet")
    return str(directory / "*.parquet")


def embedded_texts(metrics_url: str) -> float:
    """Texts the replica's `embed` model has embedded (Triton's inference count metric)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        lines = response.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith("nv_inference_count{") and 'model="embed"' in line)


def index_ray(replicas, pattern, output, store, *extra):
    command = [*EMBEDLINE_CLI, "index-ray", "--url", ",".join(r.grpc_url for r in replicas), "--input", pattern,
               "--output", str(output), "--store", store, "--collection", "shards", "--metadata-fields", "year",
               "--actors", "2", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_shards_are_embedded_over_two_replicas_and_loaded_into_milvus_resumably(start_server, tiny_fp32, milvus,
                                                                                tmp_path):
    replicas = [start_server(tiny_fp32, variant="fp32", intra_op_threads=1) for _ in range(2)]
    pattern = write_shards(tmp_path / "corpus", shards=3, rows=200)
    output = tmp_path / "vectors"
    result = index_ray(replicas, pattern, output, milvus.uri)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 embedded now" in result.stdout and "collection 'shards' holds 600" in result.stdout

    # Every row reached the store once, with the vector a replica gives for its text and its metadata.
    collection = open_store(milvus.uri).open("shards")
    assert collection.count() == 600
    with EmbeddingClient(replicas[1].grpc_url) as client:
        vector = client.embed(["note s2-7 on wing flutter and stall"])
    [hits] = collection.search(vector, 1, exact=True)
    assert hits[0].id == "s2-7" and hits[0].score == pytest.approx(1.0, abs=1e-4) and hits[0].metadata == {"year": 1957}
    # Both replicas did the embedding (the SDK spreads its requests over them).
    assert all(embedded_texts(r.metrics_url) > 0 for r in replicas)

    # A lost shard (its output gone, as after a crash mid-shard) is the only one redone.
    shutil.rmtree(output / "part-1")
    result = index_ray(replicas, pattern, output, milvus.uri)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 embedded now, 2 already embedded" in result.stdout and "holds 600" in result.stdout


def test_bad_shards_are_a_one_line_error(tmp_path, milvus):
    (tmp_path / "a.csv").write_text("id,text\n1,x\n")
    result = subprocess.run([*EMBEDLINE_CLI, "index-ray", "--url", "127.0.0.1:1", "--input", str(tmp_path / "*.csv"),
                             "--output", str(tmp_path / "out"), "--store", milvus.uri],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "expected one or more .parquet shards" in result.stderr
