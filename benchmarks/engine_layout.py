"""Engine layout: one instance using every core against the layout `embedline serve` runs (two instances
sharing the cores, `serving/settings.py: engine_layout`), for one variant.

Two servers of the same artifact and variant run side by side, one per layout; each round measures both (in
alternating order) with: `client.embed(N texts)` through the sync SDK and through the asyncio SDK (each with
the request plan it derives from that server's config), the closed loop of 16 concurrent 32-text requests,
and one 1-text request at a time (p50 latency). `engine_layout` takes its defaults from here.

    .venv/bin/python -m benchmarks.engine_layout [--artifact DIR] [--variant openvino] [--rounds 6]

Writes benchmarks/results/engine_layout_VARIANT.json, and the "engine_layout" table in benchmarks/README.md from
every such file.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import (
    command_line, cpu_flags, load_average, markdown_table, save_results, sts_sentences, update_readme_section,
)

MEASURES = ("client", "client_async", "closed_loop_32x16", "c1_p50_ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", default=None, help="artifact directory (default: the bundled model's)")
    parser.add_argument("--variant", default="openvino")
    parser.add_argument("--threads", type=int, default=2, help="cores both layouts share")
    parser.add_argument("--texts", type=int, default=2000, help="texts in one corpus call (STS-B sentences)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()

    import numpy as np

    from embedline.serving.launcher import prepare_artifact
    from embedline.serving.settings import RepositorySettings, served_settings

    from benchmarks.load import closed_loop, sequential_latency
    from benchmarks.suite import _async_corpus_call, _corpus_call, triton

    artifact = prepare_artifact(args.artifact)
    texts = sts_sentences(args.texts)
    tokens = np.array([len(t.split()) for t in texts])
    served = served_settings(args.variant, args.threads)  # what `embedline serve` runs on these cores
    one = f"1 instance x {args.threads} threads"
    shared = f"{served.instances} instances x {served.intra_op_threads} thread{'s' if served.intra_op_threads > 1 else ''}"
    layouts = {one: RepositorySettings(variant=args.variant, intra_op_threads=args.threads), shared: served}
    rounds = {name: {measure: [] for measure in MEASURES} for name in layouts}
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="embedline-layout-") as tmp, \
            triton(artifact, Path(tmp), layouts[one]) as first, triton(artifact, Path(tmp), layouts[shared]) as second:
        servers = {one: first, shared: second}
        for k in range(args.rounds):
            for name in (list(servers) if k % 2 == 0 else list(servers)[::-1]):
                url, values = servers[name].grpc_url, rounds[name]
                values["client"].append(_corpus_call(url, texts)["sentences_per_s"])
                values["client_async"].append(_async_corpus_call(url, texts))
                values["closed_loop_32x16"].append(closed_loop(url, texts, tokens, 32, 16, 3.0, 0.5)["sentences_per_s"])
                values["c1_p50_ms"].append(sequential_latency(url, texts, tokens, 2.0)["p50_ms"])
                print(f"round {k} {name}: " + ", ".join(f"{m} {v[-1]}" for m, v in values.items()), flush=True)
    median = {name: {m: round(statistics.median(v), 2) for m, v in values.items()} for name, values in rounds.items()}
    wins = {m: sum(a > b if m != "c1_p50_ms" else a < b for a, b in zip(rounds[shared][m], rounds[one][m]))
            for m in MEASURES}
    record = {"artifact": artifact.name, "variant": args.variant, "threads": args.threads, "texts": len(texts),
              "rounds": rounds, "median": median, "rounds_won_by_shared_layout": wins, "cpu_flags": cpu_flags(),
              "load_before": load_before, "load_after": load_average(), "command": command_line()}
    path = save_results(f"engine_layout_{args.variant}", record)
    print(f"saved {path}")
    if not args.no_readme:
        update_readme_section("engine_layout", readme_section())


def readme_section() -> str:
    """One table over every variant measured (results/engine_layout_*.json), with each run's conditions."""
    import json

    from benchmarks.common import RESULTS

    rows, notes = [], []
    for path in sorted(RESULTS.glob("engine_layout_*.json")):
        record = json.loads(path.read_text())
        for layout, median in record["median"].items():
            won = "" if layout.startswith("1 ") else f" ({record['rounds_won_by_shared_layout']['client']} of " \
                f"{len(record['rounds'][layout]['client'])} rounds)"
            rows.append([record["variant"], layout, f"{median['client']}{won}", median["client_async"],
                         median["closed_loop_32x16"], median["c1_p50_ms"]])
        notes.append(f"- {record['variant']}: `{record['command']}`, {len(record['rounds'][layout]['client'])} "
                     f"rounds, load average {record['load_before']} -> {record['load_after']}, CPU flags "
                     f"{', '.join(record['cpu_flags'])} (`results/{path.name}`)")
    table = markdown_table(["variant", "layout", "client.embed(2,000) sent/s", "asyncio client.embed sent/s",
                            "closed loop 16 x 32 sent/s", "1 text c1 p50 ms"], rows)
    return ("## Engine layout: one instance on every core, or two on half each\n\n" + table + "\n\n"
            "Medians of alternating rounds, both servers up side by side on the same cores (in brackets: the rounds "
            "in which the two-instance `client.embed` was faster). `embedline serve` runs two instances on a CPU "
            "(`serving/settings.py: engine_layout`).\n\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
