"""Engine ceiling: how fast each CPU engine embeds the short workload in-process, with and without the
padding that request order costs, next to sentence-transformers on the same texts.

The suite's "best CPU server >= 5x sentence-transformers" target compares the server's 32-text requests
with sentence-transformers encoding the same 32-text requests. A server cannot beat its engine, so this
script measures what the engines themselves can do, each alone in its own process with pinned threads:

    request order   consecutive 32-text batches in workload order (the suite's reference, padded as
                    requests arrive)
    length-sorted   the whole workload sorted by token count, then cut into batches of 32: the least
                    padding possible, what `SentenceTransformer.encode(list)` does, and more than a
                    server can do with the few requests of one dynamic batch

Engines: sentence-transformers (torch), ONNX Runtime fp32 and int8 (the server's session options),
OpenVINO on the NNCF int8 IR and on the fp32 ONNX graph. OpenVINO's int8 gains need VNNI/AMX; the JSON
records the CPU's vector extensions so the numbers can be read against the hardware.

    flock /tmp/embedline-heavy.lock .venv/bin/python -m benchmarks.engine_ceiling [--seconds 4] [--rounds 2]

Writes benchmarks/results/engine_ceiling.json and a table in benchmarks/README.md.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from benchmarks.common import markdown_table, pin_threads
from benchmarks.experiment import Experiment

ENGINES = ("sentence-transformers", "onnxruntime fp32", "onnxruntime int8", "openvino", "openvino fp32")
ORDERS = {"request order": False, "length-sorted": True}
BASELINE = "sentence-transformers"


def measure_engines(artifact, workloads_file: Path, engines, threads: int, seconds: float, rounds: int) -> dict:
    """engine -> {order: median sentences/s over `rounds`}; an engine that cannot load gets an error."""
    from benchmarks.engine_process import EngineProcess
    from benchmarks.workloads import SHORT

    results: dict[str, dict] = {}
    for name in engines:
        try:
            with EngineProcess(artifact.path, name, threads, workloads_file) as engine:
                runs = {order: [] for order in ORDERS}
                for _ in range(rounds):  # interleaved, so a load change hits both orders alike
                    for order, sort in ORDERS.items():
                        point = engine.batches(SHORT, 32, seconds, sort_by_length=sort)
                        runs[order].append(point["sentences_per_s"])
                results[name] = {order: round(statistics.median(v), 1) for order, v in runs.items()}
                results[name]["rounds"] = runs
        except Exception as exc:  # noqa: BLE001 - record why an engine is missing, measure the rest
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(name, results[name], flush=True)
    return results


def ratio_rows(results: dict) -> list[list]:
    base = results.get(BASELINE, {}).get("request order")
    rows = []
    for name, entry in results.items():
        if "error" in entry:
            rows.append([name, "-", "-", "-", "-", entry["error"]])
            continue
        ratios = [f"{entry[order] / base:.2f}x" if base else "-" for order in ORDERS]
        rows.append([name, entry["request order"], entry["length-sorted"], *ratios, ""])
    return rows


def main() -> int:
    experiment = Experiment.from_command_line(__doc__.split("\n\n")[0], rounds=2, one_variant=False, options=lambda parser: (
        parser.add_argument("--seconds", type=float, default=4.0, help="seconds per measurement")))
    from benchmarks.engine_process import write_workloads
    from benchmarks.workloads import SHORT, build_workloads

    threads, artifact = experiment.threads, experiment.artifact
    pin_threads(threads)
    workloads = build_workloads(artifact.tokenizer_path, artifact.max_seq_length, n=1000, names=(SHORT,))
    with tempfile.TemporaryDirectory(prefix="embedline-ceiling-") as tmp:
        workloads_file = write_workloads(workloads, Path(tmp) / "workloads.json")
        results = measure_engines(artifact, workloads_file, ENGINES, threads, experiment.args.seconds,
                                  experiment.rounds)
    record = experiment.record(seconds=experiment.args.seconds, rounds=experiment.rounds,
                               workload=workloads[SHORT].summary(), batch_size=32, engines=results)
    path = experiment.save("engine_ceiling", record)
    table = markdown_table(["engine (in-process, batches of 32)", "request order sent/s", "length-sorted sent/s",
                            "request order / ST", "length-sorted / ST", "note"], ratio_rows(results))
    print(table)
    experiment.report("engine_ceiling", (
        f"## Engine ceiling (short texts, {threads} threads, CPU vector extensions: "
        f"{', '.join(record['cpu_flags']) or 'none reported'})\n\n{table}\n\n"
        f"Ratios are to sentence-transformers in request order (the suite's reference). Median of "
        f"{experiment.rounds} interleaved rounds of {experiment.args.seconds:g} s. Command: "
        f"`{record['command']}`; numbers: `results/{path.name}`."))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
