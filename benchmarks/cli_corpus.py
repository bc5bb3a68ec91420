"""The `embedline embed` CLI on a large file against `client.embed` on the same texts and the server's
closed-loop best, on one server.

The CLI streams: it embeds the file in blocks (`--block-size`, one client call each) and writes each
block's rows before reading the next, so its rate includes the process start, reading the file and
writing the `.npy` output. One server of the variant `embedline serve` runs on these cores; alternating
rounds of the CLI over a file of LINES lines (the suite's short texts, repeated), `client.embed` of the
same texts in-process, and the closed loop of 16 concurrent 32-text requests.

    .venv/bin/python -m benchmarks.cli_corpus [--artifact DIR] [--variant openvino] [--lines 20000] [--rounds 4]

Writes benchmarks/results/cli_corpus.json and the "cli_corpus" section of benchmarks/README.md.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import markdown_table, measured_settings
from benchmarks.experiment import Experiment

MEASURES = ("cli", "client", "closed_loop_32x16")


def main() -> None:
    experiment = Experiment.from_command_line(__doc__, rounds=4, options=lambda parser: parser.add_argument(
        "--lines", type=int, default=20_000, help="lines in the file the CLI embeds"))
    import numpy as np

    from benchmarks.load import closed_loop
    from benchmarks.suite import _corpus_call, triton
    from benchmarks.workloads import build_workloads

    artifact, lines_wanted = experiment.artifact, experiment.args.lines
    short = build_workloads(artifact.tokenizer_path, artifact.max_seq_length, names=("short",))["short"]
    one_line = [text.replace("\n", " ") for text in short.texts]
    texts = (one_line * -(-lines_wanted // len(one_line)))[:lines_wanted]
    embed_cli = Path(sys.executable).parent / "embedline"
    rounds: dict[str, list[float]] = {measure: [] for measure in MEASURES}
    with tempfile.TemporaryDirectory(prefix="embedline-cli-corpus-") as tmp:
        lines, output = Path(tmp) / "texts.txt", Path(tmp) / "vectors.npy"
        lines.write_text("\n".join(texts) + "\n", encoding="utf-8")
        with triton(artifact, Path(tmp), measured_settings(experiment.variant, experiment.threads)) as server:
            url = server.grpc_url
            _corpus_call(url, texts[:2000])  # untimed: the engine's first runs of each input shape
            for k in range(experiment.rounds):
                started = time.perf_counter()
                subprocess.run([str(embed_cli), "embed", "--url", url, "--input", str(lines), "--output", str(output)],
                               check=True, stderr=subprocess.DEVNULL)
                rounds["cli"].append(round(len(texts) / (time.perf_counter() - started), 1))
                rows = np.load(output, mmap_mode="r").shape[0]
                if rows != len(texts):
                    raise SystemExit(f"the CLI wrote {rows} rows for {len(texts)} lines")
                rounds["client"].append(_corpus_call(url, texts)["sentences_per_s"])
                rounds["closed_loop_32x16"].append(
                    closed_loop(url, list(short.texts), short.tokens, 32, 16, 4.0, 0.5)["sentences_per_s"])
                print(f"round {k}: " + ", ".join(f"{m} {v[-1]}" for m, v in rounds.items()), flush=True)
    median = {measure: round(statistics.median(values), 1) for measure, values in rounds.items()}
    record = experiment.record(
        lines=len(texts), rounds=rounds, median=median,
        ratio_cli_to_closed_loop=round(median["cli"] / median["closed_loop_32x16"], 3),
        ratio_client_to_closed_loop=round(median["client"] / median["closed_loop_32x16"], 3))
    print({k: record[k] for k in ("median", "ratio_cli_to_closed_loop", "ratio_client_to_closed_loop")})
    experiment.save("cli_corpus", record)
    experiment.report("cli_corpus", readme_section(record))


def readme_section(record: dict) -> str:
    median, closed = record["median"], record["median"]["closed_loop_32x16"]
    rows = [["`embedline embed --input FILE --output OUT.npy` (a process of its own)", median["cli"],
             record["ratio_cli_to_closed_loop"]],
            ["`client.embed(texts)` in-process, the same texts", median["client"], record["ratio_client_to_closed_loop"]],
            ["closed-loop best: 16 concurrent 32-text requests (asyncio SDK)", closed, 1.0]]
    return (f"## The CLI on a large file ({record['variant']}, {record['lines']:,} lines)\n\n"
            + markdown_table(["", "sentences/s", "/ closed-loop best"], rows)
            + f"\n\nMedians of {len(record['rounds']['cli'])} alternating rounds on one server (the layout `embedline "
            "serve` runs); the CLI's rate counts its whole run, process start and `.npy` writing included. "
            f"Command: `{record['command']}`; load average {record['load_before']} -> {record['load_after']}, CPU flags "
            f"{', '.join(record['cpu_flags'])} (`results/cli_corpus.json`).")


if __name__ == "__main__":
    main()
