"""`python -m benchmarks.suite --tune`: measure the server settings the defaults in RepositorySettings are
chosen from.

One variant (the artifact's default CPU variant), the same points for every setting: 1 short text at a
time through the blocking client (latency), closed-loop 1-text requests at concurrency 16 (dynamic
batching), 32-text requests at concurrency 2 (throughput), and mixed lengths in 32-text requests (length
grouping). Settings varied one at a time from the defaults: instances x threads, spin-wait, queue delay,
OpenVINO streams, the per-run overhead of the length grouping plan, the largest group, the dynamic batch.
On a shared machine one 3-second window moves by tens of percent, so the full mode measures every
setting in several rounds (each round in a rotated order) and reports the medians. Results:
benchmarks/results/server_tuning[_quick].json and a README section.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from tqdm.auto import tqdm

from benchmarks.common import (
    RESULTS, load_average, machine_info, markdown_table, measured_settings, other_group_size, update_readme_section,
)
from benchmarks.workloads import MIXED, SHORT, build_workloads

POINTS = ((SHORT, 1, 16), (SHORT, 32, 2), (MIXED, 32, 2))  # closed loop; c1 latency: suite.sequential_point
ROUNDS = {"full": 3, "quick": 1}


def candidate_settings(base, variant: str) -> dict[str, object]:
    """name -> RepositorySettings, each one change away from the defaults."""
    # The other engine layout than the defaults' (serving/settings.py: engine_layout).
    if base.instances > 1:
        layout = ("1 instance x all threads", replace(base, instances=1,
                                                      intra_op_threads=base.instances * base.intra_op_threads))
    else:
        layout = ("2 instances x 1 thread", replace(base, instances=2, intra_op_threads=1))
    other_group = other_group_size(base.group_size)
    candidates = {
        f"defaults ({base.instances} x {base.intra_op_threads} threads, queue delay {base.queue_delay_us} us)": base,
        layout[0]: layout[1],
        f"ORT threads spin-wait {'off' if base.spin_wait else 'on'}": replace(base, spin_wait=not base.spin_wait),
        "group overhead 16 tokens": replace(base, group_overhead_tokens=16),
        "group overhead 512 tokens": replace(base, group_overhead_tokens=512),
        f"groups of at most {other_group}": replace(base, length_group_size=other_group),
        # more requests per dynamic batch: more texts to sort by length before cutting the groups
        "max batch size 256": replace(base, max_batch_size=256),
    }
    for delay in (0, 250, 1000, 3000):
        if delay != base.queue_delay_us:
            candidates[f"queue delay {delay} us"] = replace(base, queue_delay_us=delay)
    if variant == "openvino":
        candidates["openvino 2 streams per instance"] = replace(base, streams=2)
    return candidates


def median_points(rounds: list[list[dict]]) -> list[dict]:
    """Point by point over the rounds (same points, same order): the median of every number."""
    def is_number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    merged = []
    for same_point in zip(*rounds):
        point = dict(same_point[0])  # labels (workload, client) and missing values (None) from the first round
        for key in point:
            values = [p.get(key) for p in same_point]
            if all(is_number(v) for v in values):
                point[key] = round(statistics.median(values), 3)
        merged.append(point)
    return merged


def run_tuning(args: argparse.Namespace, artifact, mode) -> Path:
    from embedline.variants import choose_variant

    from benchmarks.suite import sequential_point, sweep_points, triton

    variant = args.variants.split(",")[0] if args.variants else choose_variant(artifact, "cpu")
    base = measured_settings(variant, args.threads)
    workloads = build_workloads(artifact.tokenizer_path, artifact.max_seq_length, n=mode.texts,
                                names=(SHORT, MIXED))
    load_before = load_average()
    rows, results = [], {}
    candidates = candidate_settings(base, variant)
    rounds = ROUNDS.get(mode.name, 1)
    names = list(candidates)
    with tempfile.TemporaryDirectory(prefix="embedline-tune-") as tmp, \
            tqdm(total=rounds * len(names), desc="tune", unit="setting") as bar:
        for round_index in range(rounds):
            shift = round_index * len(names) // rounds  # rotate the order: drift does not favour the first
            for name in names[shift:] + names[:shift]:
                settings = candidates[name]
                entry = results.setdefault(name, {"settings": asdict(settings), "rounds": []})
                bar.set_postfix_str(name)
                try:
                    with triton(artifact, Path(tmp), settings) as server:
                        points = [sequential_point(server, workloads, mode), *sweep_points(server, workloads,
                                                                                           POINTS, mode)]
                    entry["rounds"].append(points)
                except Exception as exc:  # noqa: BLE001 - one setting failing must not lose the others
                    entry.setdefault("errors", []).append(f"{type(exc).__name__}: {exc}")
                bar.update(1)
    for name in names:
        entry = results[name]
        if not entry["rounds"]:
            continue
        entry["median"] = median_points(entry["rounds"])
        by_key = {(p["workload"], p["request_size"], p["concurrency"]): p for p in entry["median"]}
        rows.append([name, by_key[(SHORT, 1, 1)]["p50_ms"], by_key[(SHORT, 1, 16)]["sentences_per_s"],
                     by_key[(SHORT, 1, 16)]["avg_dynamic_batch"], by_key[(SHORT, 32, 2)]["sentences_per_s"],
                     by_key[(MIXED, 32, 2)]["sentences_per_s"]])
    record = {"machine": machine_info(), "mode": mode.name, "variant": variant, "threads": args.threads,
              "rounds": rounds, "load_before": load_before, "load_after": load_average(), "settings": results}
    path = RESULTS / ("server_tuning.json" if mode.name == "full" else "server_tuning_quick.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    table = markdown_table(["setting (one change from the defaults)", "1 text c1 p50 ms", "1-text c16 sent/s",
                            "avg dynamic batch", "32-text c2 sent/s", "mixed 32-text c2 sent/s"], rows)
    print(table)
    if mode.name == "full" and not args.no_readme:
        update_readme_section("server_tuning", (
            f"## Server tuning ({variant}, {args.threads} threads, short texts unless noted)\n\n{table}\n\n"
            f"Median of {rounds} rounds per setting (rotated order); 1 text c1 = one request at a time through "
            f"the blocking client. Load average before / after: {load_before} / {record['load_after']} "
            "(shared machine). "
            "Command: `.venv/bin/python -m benchmarks.suite --tune`; numbers: `results/server_tuning.json`."))
    return path
