"""Serving throughput: 1,000 real sentences as 32-text requests, every engine in one run.

Engines: sentence-transformers (torch) in-process; raw ONNX Runtime in-process for each exported variant
(tokenization included, the same path the server runs); the Triton server for each variant through the
embedline client (one request in flight, and two). Every engine sees the same 32-text requests in the
same order, and threads are pinned to the same count everywhere.

    .venv/bin/python benchmarks/serving_throughput.py [--rounds 3] [--threads 2] [--artifact DIR]

Writes benchmarks/results/serving_throughput.json and the table in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from embedline.benchmarks.common import (
    markdown_table, pin_threads, save_results, sts_sentences, throughput, timed_rounds, update_readme_section,
)
from embedline.benchmarks.inprocess import onnxruntime_engine, sentence_transformers_engine

BATCH = 32
CPU_VARIANTS = ("fp32", "fused", "int8")  # fp16 is the GPU variant


def chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def bench_inprocess(engine, batches, rounds):
    """Each 32-text request encoded in turn, as a hand-rolled server sees them. (Handing
    sentence-transformers all 1,000 at once would let it sort the whole corpus by length, a
    head start no server gets from its requests.)"""
    return timed_rounds(lambda: [engine.encode(batch) for batch in batches], rounds)


def bench_server(url, batches, rounds, concurrency):
    """Send the 32-text requests, `concurrency` of them in flight."""
    from embedline.client import EmbeddingClient

    with EmbeddingClient(url) as client, ThreadPoolExecutor(concurrency) as pool:
        return timed_rounds(lambda: list(pool.map(client.embed, batches)), rounds)


def server_factory(tmp: Path):
    from contextlib import contextmanager

    from embedline.serving.repository import RepositorySettings, build_repository
    from embedline.serving.triton import TritonServer, free_port

    @contextmanager
    def start(artifact, variant, threads):
        settings = RepositorySettings(variant=variant, intra_op_threads=threads)
        repository = build_repository(artifact, tmp / f"models-{variant}", settings)
        with TritonServer(repository, grpc_port=free_port(), http_port=free_port(),
                          metrics_port=free_port()) as server:
            yield server

    return start


def prepare_artifact(path: str | None, tmp: Path):
    from embedline import artifact as art
    from embedline.export.pipeline import export_artifact

    if path:
        artifact = art.load_artifact(path)
        return artifact if artifact.has_onnx() else export_artifact(artifact)
    artifact = art.import_model_dir(art.bundled_model_dir(), tmp / "artifact", name="all-MiniLM-L6-v2")
    return export_artifact(artifact, variants=("fp32", "fused", "int8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--artifact", default=None, help="exported artifact (default: the bundled model)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    pin_threads(args.threads)

    sentences = sts_sentences(args.sentences)
    requests = chunks(sentences, BATCH)  # what every engine is given, in this order
    with tempfile.TemporaryDirectory(prefix="embedline-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        artifact = prepare_artifact(args.artifact, tmp)
        variants = [v for v in CPU_VARIANTS if v in artifact.exported_variants()]
        start_server = server_factory(tmp)
        engines: dict[str, dict] = {}

        def record(name, seconds, **extra):
            engines[name] = {**throughput(len(sentences), seconds), **extra}
            print(f"{name:28s} {engines[name]['best']:8.1f} sentences/s (median {engines[name]['median']})",
                  flush=True)

        engines_in_process = [sentence_transformers_engine(artifact, args.threads)]
        engines_in_process += [onnxruntime_engine(artifact, variant, args.threads) for variant in variants]
        for engine in engines_in_process:
            record(engine.name, bench_inprocess(engine, requests, args.rounds))
        for variant in variants:
            with start_server(artifact, variant, args.threads) as server:
                for concurrency in (1, 2):
                    record(f"triton {variant} c{concurrency}",
                           bench_server(server.grpc_url, requests, args.rounds, concurrency))

    st = engines["sentence-transformers"]["best"]
    rows = []
    for variant in variants:
        raw = engines[f"onnxruntime {variant}"]["best"]
        server = max(engines[f"triton {variant} c{c}"]["best"] for c in (1, 2))
        rows.append([variant, raw, engines[f"triton {variant} c1"]["best"], engines[f"triton {variant} c2"]["best"],
                     f"{server / raw:.2f}x", f"{server / st:.2f}x"])
    results = {
        "workload": {"sentences": len(sentences), "source": "STS-B dev (shared/data)", "request_size": BATCH,
                     "threads": args.threads, "rounds": args.rounds, "statistic": "best round"},
        "engines": engines,
        "artifact_export": artifact.metadata.get("export"),
    }
    path = save_results("serving_throughput", results)
    table = markdown_table(
        ["variant", "raw ORT in-process", "Triton (1 in flight)", "Triton (2 in flight)",
         "server / raw", "server / sentence-transformers"],
        rows,
    )
    update_readme_section("serving_throughput", (
        "## Serving throughput (sentences/s, 1,000 STS-B sentences, 32-text requests, "
        f"{args.threads} threads)\n\n"
        f"sentence-transformers (torch, in-process): **{st}** sentences/s. Every engine encodes the same "
        "32-text requests in the same order.\n\n"
        f"{table}\n\n"
        "Command: `.venv/bin/python benchmarks/serving_throughput.py` "
        f"(best of {args.rounds} rounds; full numbers in `results/serving_throughput.json`)."
    ))
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
