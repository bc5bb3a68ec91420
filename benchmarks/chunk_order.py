"""Chunk order: the SDK's corpus call sending its longest requests first (`planning.plan_chunks`) against
the same requests shortest first.

A call ends when its last requests do. With the costliest requests at the end, one instance sits idle
while the other finishes a long run; with the cheapest there, that wait is short (longest processing
time first). One server of the variant `embedline serve` runs on these cores; alternating rounds of
`client.embed(texts)` through the sync and the asyncio SDK, over the suite's short and mixed workloads.

    .venv/bin/python -m benchmarks.chunk_order [--artifact DIR] [--variant openvino] [--rounds 12]

Writes benchmarks/results/chunk_order_VARIANT.json, and the "chunk_order" table in benchmarks/README.md
from every such file.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import RESULTS, markdown_table, measured_settings
from benchmarks.experiment import Experiment

ORDERS = ("longest first", "shortest first")
CALLS = ("client", "client_async")


def shortest_first(plan_chunks):
    """`plan_chunks` with its requests in the reverse order: the cheapest go first."""
    return lambda texts, batch_size: plan_chunks(texts, batch_size)[::-1]


def measure(url: str, texts: list[str], order: str) -> dict[str, float]:
    """One sync and one asyncio `client.embed(texts)` with requests sent in `order`; -> sentences/s each."""
    from embedline.client import planning

    from benchmarks.suite import _async_corpus_call, _corpus_call

    longest_first = planning.plan_chunks
    if order == "shortest first":
        planning.plan_chunks = shortest_first(longest_first)
    try:
        return {"client": _corpus_call(url, texts)["sentences_per_s"], "client_async": _async_corpus_call(url, texts)}
    finally:
        planning.plan_chunks = longest_first


def main() -> None:
    experiment = Experiment.from_command_line(__doc__, rounds=12)
    from benchmarks.suite import triton
    from benchmarks.workloads import build_workloads

    artifact = experiment.artifact
    workloads = build_workloads(artifact.tokenizer_path, artifact.max_seq_length, names=("short", "mixed"))
    rounds = {w: {o: {c: [] for c in CALLS} for o in ORDERS} for w in workloads}
    with tempfile.TemporaryDirectory(prefix="embedline-chunk-order-") as tmp, \
            triton(artifact, Path(tmp), measured_settings(experiment.variant, experiment.threads)) as server:
        for workload in workloads.values():
            texts = list(workload.texts)
            for order in ORDERS:  # untimed: the engine's first runs of each input shape
                measure(server.grpc_url, texts, order)
            for k in range(experiment.rounds):
                for order in ORDERS if k % 2 == 0 else ORDERS[::-1]:
                    for call, value in measure(server.grpc_url, texts, order).items():
                        rounds[workload.name][order][call].append(value)
                print(f"round {k} {workload.name}: " + ", ".join(
                    f"{o} {rounds[workload.name][o]['client'][-1]}" for o in ORDERS), flush=True)
    record = experiment.record(
        texts={name: len(w.texts) for name, w in workloads.items()}, rounds=rounds,
        median={w: {o: {c: round(statistics.median(v), 1) for c, v in by_call.items()}
                    for o, by_call in by_order.items()} for w, by_order in rounds.items()},
        rounds_won_by_longest_first={
            w: {c: sum(a > b for a, b in zip(by_order[ORDERS[0]][c], by_order[ORDERS[1]][c])) for c in CALLS}
            for w, by_order in rounds.items()})
    print(json.dumps({k: record[k] for k in ("median", "rounds_won_by_longest_first")}))
    experiment.save(f"chunk_order_{experiment.variant}", record)
    experiment.report("chunk_order", readme_section())


def readme_section() -> str:
    """The table over every variant measured (results/chunk_order_*.json), then each run's conditions."""
    rows, notes = [], []
    for path in sorted(RESULTS.glob("chunk_order_*.json")):
        record = json.loads(path.read_text())
        for workload, by_order in record["median"].items():
            n = len(record["rounds"][workload][ORDERS[0]]["client"])
            won = record["rounds_won_by_longest_first"][workload]
            rows.append([record["variant"], f"{workload} ({record['texts'][workload]} texts)",
                         by_order[ORDERS[0]]["client"], by_order[ORDERS[1]]["client"], f"{won['client']} of {n}",
                         by_order[ORDERS[0]]["client_async"], by_order[ORDERS[1]]["client_async"],
                         f"{won['client_async']} of {n}"])
        notes.append(f"- {record['variant']}: `{record['command']}`, load average {record['load_before']} -> "
                     f"{record['load_after']}, CPU flags {', '.join(record['cpu_flags'])} (`results/{path.name}`)")
    table = markdown_table(["variant", "workload", "sync, longest first", "sync, shortest first", "longest first faster",
                            "asyncio, longest first", "asyncio, shortest first", "longest first faster"], rows)
    return ("## Chunk order: a corpus call's longest requests first or last\n\n" + table
            + "\n\n`client.embed(texts)` in sentences/s, medians of alternating rounds on one server (the layout "
            "`embedline serve` runs). The SDK sends the longest first (`client/planning.py: plan_chunks`).\n\n"
            + "\n".join(notes))


if __name__ == "__main__":
    main()
