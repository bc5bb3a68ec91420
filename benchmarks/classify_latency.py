"""The suite's classification stage: latency of `classify` vs `embed` through the real Triton server
(p50 / p95 / mean, one request in flight).

A classifier artifact (all-MiniLM-L6-v2 + a head fitted on 8 emotion examples per class, frozen body: the
head's weights do not change the latency) is exported to ONNX, served, and called through the embedline
client with 1-text and 32-text requests of real emotion test sentences. `classify` is the ensemble
embed -> classifier_head, so the difference is the cost of the head step (and the neighbour look-up).
`benchmarks.suite` runs it (`measure_classify`) and `benchmarks.report` writes its table.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from benchmarks.common import data_dir, markdown_table, measured_settings, percentile, read_tsv

SIZES = (1, 32)


def classifier_artifact(tmp: Path):
    """A frozen-MiniLM emotion classifier (8 examples per class) with its fp32 ONNX graph, under tmp."""
    from embedline import artifact as art
    from embedline.export.onnx_export import export_fp32
    from embedline.training.fewshot.classifier import ClassifierConfig, train_classifier

    train_file = data_dir() / "classification" / "emotion_train.tsv.gz"
    artifact = train_classifier(ClassifierConfig(train_file=str(train_file), output=str(tmp / "artifact"),
                                                 shots=8, seed=0, frozen_body=True))
    if not artifact.onnx_path("fp32").is_file():
        export_fp32(artifact)
    return art.load_artifact(artifact.path)


def paired_latencies(calls: dict, batches: list[list[str]], requests: int) -> dict[str, list[float]]:
    """Milliseconds of `requests` sequential calls of each function, alternating between them on the same
    batch so that both see the same load on a shared machine (after 10 untimed warm-up rounds)."""
    for batch in batches[:10]:
        for call in calls.values():
            call(batch)
    out: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(requests):
        batch = batches[i % len(batches)]
        for name, call in calls.items():
            start = time.perf_counter()
            call(batch)
            out[name].append(1000.0 * (time.perf_counter() - start))
    return out


def summary(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": round(percentile(ms, 50), 2), "p95_ms": round(percentile(ms, 95), 2),
            "mean_ms": round(statistics.fmean(ms), 2), "requests": len(ms)}


def emotion_texts() -> list[str]:
    """Real short texts (the emotion test split) for the requests."""
    return [row["text"] for row in read_tsv(data_dir() / "classification" / "emotion_test.tsv.gz")]


def measure_classify_latency(artifact, variant: str, threads: int, requests: int, texts: list[str],
                             tmp: Path) -> tuple[dict[str, dict], int]:
    """Serve `artifact` (which has a head) and time embed vs classify with 1- and 32-text requests.

    Returns ({"embed x1": summary, "classify x1": ..., ...}, number of labels)."""
    from embedline.client import EmbeddingClient
    from embedline.serving.repository import build_repository
    from embedline.serving.triton import TritonServer, free_port

    results: dict[str, dict] = {}
    repository = build_repository(artifact, tmp / "classify-models",
                                  measured_settings(variant, threads))
    with TritonServer(repository, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port()) as server, \
            EmbeddingClient(server.grpc_url, timeout=60) as client:
        labels = len(client.info().labels)
        for size in SIZES:
            batches = [texts[i : i + size] for i in range(0, len(texts) - size + 1, size)]
            measured = paired_latencies({"embed": client.embed, "classify": client.classify}, batches, requests)
            for name, ms in measured.items():
                results[f"{name} x{size}"] = summary(ms)
    return results, labels


def latency_table(results: dict[str, dict]) -> str:
    """Markdown: embed vs classify p50/p95 per request size."""
    rows = []
    for size in SIZES:
        embed, classify = results[f"embed x{size}"], results[f"classify x{size}"]
        rows.append([size, embed["p50_ms"], embed["p95_ms"], classify["p50_ms"], classify["p95_ms"],
                     f"{classify['p50_ms'] - embed['p50_ms']:+.2f}"])
    return markdown_table(["texts / request", "embed p50 ms", "embed p95 ms", "classify p50 ms", "classify p95 ms",
                           "classify - embed (p50)"], rows)
