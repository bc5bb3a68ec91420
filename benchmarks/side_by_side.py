"""Servers of one artifact with different settings, up side by side on the same cores, measured in
alternating rounds: what the engine-layout and length-group comparisons share.

Each round measures every server (the order rotates from round to round, so no server always goes
first) with `client.embed(texts)` through the sync SDK and through the asyncio SDK (each with the request
plan it derives from that server's config), the closed loop of 16 concurrent 32-text requests, and one
1-text request at a time (p50 latency). A comparison saves one record per variant,
benchmarks/results/NAME_VARIANT.json, and its README table is built from every such file.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from contextlib import ExitStack
from pathlib import Path

from benchmarks.common import RESULTS, markdown_table

MEASURES = ("client", "client_async", "closed_loop_32x16", "c1_p50_ms")


def alternating_rounds(artifact, settings_by_name: dict, texts: list[str], tokens, rounds: int,
                       prefix: str = "embedline-side-by-side-") -> dict[str, dict[str, list[float]]]:
    """name -> measure -> one value per round, every server measured in every round."""
    from benchmarks.load import closed_loop, sequential_latency
    from benchmarks.suite import _async_corpus_call, _corpus_call, triton

    values = {name: {measure: [] for measure in MEASURES} for name in settings_by_name}
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp, ExitStack() as stack:
        servers = {name: stack.enter_context(triton(artifact, Path(tmp), settings))
                   for name, settings in settings_by_name.items()}
        names = list(servers)
        for k in range(rounds):
            for name in names[k % len(names):] + names[:k % len(names)]:
                url, measured = servers[name].grpc_url, values[name]
                measured["client"].append(_corpus_call(url, texts)["sentences_per_s"])
                measured["client_async"].append(_async_corpus_call(url, texts))
                measured["closed_loop_32x16"].append(closed_loop(url, texts, tokens, 32, 16, 3.0, 0.5)["sentences_per_s"])
                measured["c1_p50_ms"].append(sequential_latency(url, texts, tokens, 2.0)["p50_ms"])
                print(f"round {k} {name}: " + ", ".join(f"{m} {v[-1]}" for m, v in measured.items()), flush=True)
    return values


def medians(values: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    return {name: {m: round(statistics.median(v), 2) for m, v in measured.items()} for name, measured in values.items()}


def rounds_won(values: dict[str, dict[str, list[float]]], name: str, other: str) -> dict[str, int]:
    """Per measure, the rounds in which `name` did better than `other` (lower is better for latency)."""
    return {m: sum(a < b if m == "c1_p50_ms" else a > b for a, b in zip(values[name][m], values[other][m]))
            for m in MEASURES}


def compare(name: str, experiment, settings_by_name: dict, default: str, texts: list[str], tokens) -> Path:
    """Run the rounds for `settings_by_name` (two servers, `default` being what `serve` runs) and save the
    record as results/NAME_VARIANT.json; -> its path."""
    other = next(server for server in settings_by_name if server != default)
    rounds = alternating_rounds(experiment.artifact, settings_by_name, texts, tokens, experiment.rounds,
                                prefix=f"embedline-{name}-")
    record = experiment.record(texts=len(texts), default=default, rounds=rounds, median=medians(rounds),
                               rounds_won_by_default=rounds_won(rounds, default, other))
    return experiment.save(f"{name}_{experiment.variant}", record)


def readme_table(name: str, settings_header: str) -> str:
    """The table over every variant compared (results/NAME_*.json), then each run's conditions."""
    rows, notes = [], []
    for path in sorted(RESULTS.glob(f"{name}_*.json")):
        record = json.loads(path.read_text())
        n = len(record["rounds"][record["default"]]["client"])
        for server, median in record["median"].items():
            mark = f" (default; won {record['rounds_won_by_default']['client']} of {n})" \
                if server == record["default"] else ""
            rows.append([record["variant"], f"{server}{mark}", median["client"], median["client_async"],
                         median["closed_loop_32x16"], median["c1_p50_ms"]])
        notes.append(f"- {record['variant']}: `{record['command']}`, {n} rounds, {record['texts']} texts, "
                     f"load average {record['load_before']} -> {record['load_after']}, CPU flags "
                     f"{', '.join(record['cpu_flags'])} (`results/{path.name}`)")
    table = markdown_table(["variant", settings_header, "client.embed(texts) sent/s", "asyncio client.embed sent/s",
                            "closed loop 16 x 32 sent/s", "1 text c1 p50 ms"], rows)
    return (table + "\n\nMedians of alternating rounds, both servers up side by side on the same cores (in "
            "brackets: the rounds in which the default's sync `client.embed` was faster).\n\n" + "\n".join(notes))
