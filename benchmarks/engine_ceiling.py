"""Engine ceiling: how fast each CPU engine embeds the corpus workloads (short texts, sentences, passages)
in-process, with and without the padding that request order costs, next to sentence-transformers on the
same texts.

The suite's targets compare the server with sentence-transformers: its 32-text requests with
sentence-transformers encoding the same requests, and `client.embed(N)` with `SentenceTransformer.encode(N)`
on each corpus workload. A server cannot beat its engine, so this script measures what the engines
themselves can do, each alone in its own process with pinned threads:

    request order   consecutive 32-text batches in workload order (the suite's reference, padded as
                    requests arrive)
    length-sorted   the whole workload sorted by token count, then cut into batches of 32: the least
                    padding possible, what `SentenceTransformer.encode(list)` does, and what a corpus
                    call's length groups approach

and the served variant laid out as `serve` lays it out on a CPU (one one-thread instance per core): that many
one-thread processes embedding at once, their sentences/s summed.

Engines: sentence-transformers (torch), ONNX Runtime fp32 and int8 (the server's session options),
OpenVINO on the NNCF int8 IR and on the fp32 ONNX graph. OpenVINO's int8 gains need VNNI/AMX; the JSON
records the CPU's vector extensions so the numbers can be read against the hardware.

    flock /tmp/embedline-heavy.lock .venv/bin/python -m benchmarks.engine_ceiling [--seconds 4] [--rounds 2]

Writes benchmarks/results/engine_ceiling.json and its section of benchmarks/README.md.
"""

from __future__ import annotations

import statistics
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

from benchmarks.common import markdown_table, pin_threads
from benchmarks.experiment import Experiment

ENGINES = ("sentence-transformers", "onnxruntime fp32", "onnxruntime int8", "openvino", "openvino fp32")
ORDERS = {"request order": False, "length-sorted": True}
BASELINE = "sentence-transformers"
BATCH = 32


def measure_engines(artifact, workloads_file: Path, engines, workloads, threads: int, seconds: float,
                    rounds: int) -> dict:
    """engine -> workload -> {order: median sentences/s over `rounds`}; an engine that cannot load gets an
    error."""
    from benchmarks.engine_process import EngineProcess

    results: dict[str, dict] = {}
    for name in engines:
        try:
            with EngineProcess(artifact.path, name, threads, workloads_file) as engine:
                runs = {workload: {order: [] for order in ORDERS} for workload in workloads}
                for _ in range(rounds):  # interleaved, so a load change hits every workload and order alike
                    for workload in workloads:
                        for order, sort in ORDERS.items():
                            point = engine.batches(workload, BATCH, seconds, sort_by_length=sort)
                            runs[workload][order].append(point["sentences_per_s"])
                results[name] = {workload: _medians(by_order) for workload, by_order in runs.items()}
        except Exception as exc:  # noqa: BLE001 - record why an engine is missing, measure the rest
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(name, results[name], flush=True)
    return results


def measure_served_layout(artifact, workloads_file: Path, name: str, workloads, processes: int, seconds: float,
                          rounds: int) -> dict:
    """The layout `serve` runs on a CPU: `processes` one-thread processes of engine `name` embedding at once,
    each the whole length-sorted workload; workload -> {"length-sorted": median of their summed sentences/s}."""
    from benchmarks.engine_process import EngineProcess

    try:
        with ExitStack() as stack, ThreadPoolExecutor(processes) as pool:
            engines = [stack.enter_context(EngineProcess(artifact.path, name, 1, workloads_file))
                       for _ in range(processes)]
            runs = {workload: {"length-sorted": []} for workload in workloads}
            for _ in range(rounds):
                for workload in workloads:
                    points = pool.map(lambda e: e.batches(workload, BATCH, seconds, sort_by_length=True), engines)
                    runs[workload]["length-sorted"].append(sum(p["sentences_per_s"] for p in points))
            result = {workload: _medians(by_order) for workload, by_order in runs.items()}
    except Exception as exc:  # noqa: BLE001 - record why the layout is missing, as for a single engine
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print(name, f"{processes} x 1 thread", result, flush=True)
    return result


def _medians(by_order: dict[str, list[float]]) -> dict:
    return {**{order: round(statistics.median(v), 1) for order, v in by_order.items()}, "rounds": by_order}


def short_rows(results: dict, workload: str) -> list[list]:
    """Each engine on the short texts in request order and length-sorted, both against sentence-transformers
    in request order (the suite's 32-text reference)."""
    base = results.get(BASELINE, {}).get(workload, {}).get("request order")
    rows = []
    for name, entry in results.items():
        if "error" in entry:
            rows.append([name, "-", "-", "-", "-", entry["error"]])
            continue
        point = entry[workload]
        if "request order" not in point:  # the served layout: length-sorted only
            continue
        ratios = [f"{point[order] / base:.2f}x" if base else "-" for order in ORDERS]
        rows.append([name, point["request order"], point["length-sorted"], *ratios, ""])
    return rows


def sorted_rows(results: dict, workloads) -> list[list]:
    """Each engine length-sorted on every workload against sentence-transformers length-sorted: what
    `client.embed(N)` is compared with (`SentenceTransformer.encode(N)` sorts by length)."""
    rows = []
    for name, entry in results.items():
        row = [name]
        for workload in workloads:
            base = results.get(BASELINE, {}).get(workload, {}).get("length-sorted")
            value = entry.get(workload, {}).get("length-sorted")
            row += [value or "-", f"{value / base:.2f}x" if value and base else "-"]
        rows.append(row + [entry.get("error", "")])
    return rows


def main() -> int:
    experiment = Experiment.from_command_line(__doc__.split("\n\n")[0], rounds=2, one_variant=False, options=lambda parser: (
        parser.add_argument("--seconds", type=float, default=4.0, help="seconds per measurement")))
    from benchmarks.engine_process import write_workloads
    from benchmarks.report import inprocess_name
    from benchmarks.workloads import CORPUS_WORKLOADS, SHORT, build_workloads

    threads, artifact = experiment.threads, experiment.artifact
    served = inprocess_name(experiment.variant)
    pin_threads(threads)
    workloads = build_workloads(artifact.tokenizer_path, artifact.max_seq_length, n=1000, names=CORPUS_WORKLOADS)
    with tempfile.TemporaryDirectory(prefix="embedline-ceiling-") as tmp:
        workloads_file = write_workloads(workloads, Path(tmp) / "workloads.json")
        results = measure_engines(artifact, workloads_file, ENGINES, CORPUS_WORKLOADS, threads,
                                  experiment.args.seconds, experiment.rounds)
        layout = f"{served}, {threads} processes x 1 thread (the served layout)"
        results[layout] = measure_served_layout(artifact, workloads_file, served, CORPUS_WORKLOADS, threads,
                                                experiment.args.seconds, experiment.rounds)
    record = experiment.record(seconds=experiment.args.seconds, rounds=experiment.rounds, batch_size=BATCH,
                               workloads={name: workloads[name].summary() for name in CORPUS_WORKLOADS},
                               engines=results)
    path = experiment.save("engine_ceiling", record)
    short = markdown_table([f"engine (in-process, batches of {BATCH})", "request order sent/s",
                            "length-sorted sent/s", "request order / ST", "length-sorted / ST", "note"],
                           short_rows(results, SHORT))
    columns = [c for w in CORPUS_WORKLOADS
               for c in (f"{w} ({workloads[w].summary()['mean_tokens']} tokens) sent/s", "/ ST")]
    corpus = markdown_table([f"engine (in-process, length-sorted batches of {BATCH})", *columns, "note"],
                            sorted_rows(results, CORPUS_WORKLOADS))
    print(short, corpus, sep="\n\n")
    experiment.report("engine_ceiling", (
        f"## Engine ceiling ({threads} threads, CPU vector extensions: "
        f"{', '.join(record['cpu_flags']) or 'none reported'})\n\n"
        f"Short texts, against sentence-transformers in request order (the suite's 32-text reference):\n\n{short}\n\n"
        "Every corpus workload length-sorted, against sentence-transformers length-sorted "
        "(`SentenceTransformer.encode(N)`, what the suite's corpus call is compared with); the last row is the "
        f"served variant as `serve` lays it out, {threads} one-thread processes at once, their sentences/s "
        f"summed:\n\n{corpus}\n\n"
        f"Median of {experiment.rounds} interleaved rounds of {experiment.args.seconds:g} s. Command: "
        f"`{record['command']}`; numbers: `results/{path.name}`."))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
