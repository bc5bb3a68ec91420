"""Unsupervised SimCSE from randomly initialized layers: STS-B dev Spearman before and after, dropout ablation.

The model is all-MiniLM-L6-v2's config (6 layers, 384-d) with freshly initialized transformer layers and
MiniLM's pretrained word embeddings (no raw MLM-pretrained encoder is available offline: docs/architecture.md,
"Measured decisions", training),
trained on ../shared/data/corpus/unsup_corpus.txt.gz with the paper's settings (lr 3e-5, temperature 0.05,
batch 64, max_seq_length 32, no warmup). Each dropout value is one run from the same initialization (same
seed); "before" is the dev Spearman of that initialization. The runs go side by side, one process and one
thread each, so each run's budget is its own CPU time (--max-steps is sized to about 30 CPU-minutes a run
on this 2-core machine, evaluations included); both are reported.

    .venv/bin/python -m benchmarks.simcse_unsup                          # the documented run
    .venv/bin/python -m benchmarks.simcse_unsup --dropouts 0.1 --max_steps=20   # a quick pilot

Options other than the ones below are training-config fields, passed to the trainer as they are (e.g.
`--lr=3e-4 --warmup_ratio=0.1 --freeze_word_embeddings=false`; the list: `embedline train --help`).
Results: benchmarks/results/simcse_unsup.json (+ each run's metrics.png copied next to it).
Artifacts and run directories go to runs/benchmarks/simcse_unsup/ (ignored by git).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import logging
import multiprocessing
import shutil
import sys
import time
from pathlib import Path

from benchmarks.common import (
    REPO, RESULTS, command_line, cpu_seconds, data_dir, load_average, parse_with_train_config, pin_threads,
    save_results,
)

log = logging.getLogger("simcse_unsup")


def experiment_settings(data: Path) -> dict:
    """The experiment's training config, where it differs from TrainConfig's defaults (which are the paper's:
    lr 3e-5, temperature 0.05, batch 64, max_seq_length 32, no warmup)."""
    return {"objective": "unsup", "train_file": str(data / "corpus" / "unsup_corpus.txt.gz"),
            "dev_file": str(data / "sts" / "stsb_dev.tsv.gz"), "random_layers": True,
            "freeze_word_embeddings": True, "pooling": "mean", "max_steps": 300, "eval_steps": 100,
            "checkpoint_steps": 0, "device": "cpu"}


def run_one(config, dropout: float, threads: int, out_dir: Path) -> dict:
    """One training run of `config` with this dropout, in this process (pinned to `threads`), summarized."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pin_threads(threads)
    from embedline.training.plot import read_metrics
    from embedline.training.simcse.trainer import train

    output = out_dir / f"dropout{dropout}"
    shutil.rmtree(output, ignore_errors=True)
    config = dataclasses.replace(config, output=str(output), name=f"simcse-unsup-random-p{dropout}", dropout=dropout)
    load_start, wall_start, cpu_start = load_average(), time.perf_counter(), cpu_seconds()
    result = train(config)
    wall, cpu = time.perf_counter() - wall_start, cpu_seconds() - cpu_start
    records = read_metrics(output / "run" / "metrics.jsonl")
    curve = [{"step": r["step"], "dev_spearman": round(r["dev_spearman"], 2), "alignment": round(r["dev_alignment"], 3),
              "uniformity": round(r["dev_uniformity"], 3)} for r in records if "dev_spearman" in r]
    speeds = [r["sentences_per_s"] for r in records if r.get("sentences_per_s")]
    shutil.copy(output / "run" / "metrics.png", RESULTS / f"simcse_unsup_dropout{dropout}.png")
    metrics = result.metrics
    return {
        "dropout": dropout,
        "dev_spearman_before": round(metrics["dev_spearman_start"], 2),
        "dev_spearman_best": round(metrics["dev_spearman"], 2),
        "best_step": metrics["best_step"],
        "dev_spearman_last": curve[-1]["dev_spearman"],
        "gain_points": round(metrics["dev_spearman"] - metrics["dev_spearman_start"], 2),
        "steps": metrics["steps"],
        "train_seconds": metrics["train_seconds"],
        "wall_seconds_with_evals": round(wall, 1),
        "process_cpu_seconds": round(cpu, 1),
        "mean_sentences_per_s": round(sum(speeds) / len(speeds), 1) if speeds else None,
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "curve": curve,
        "artifact": str(output),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.1, 0.0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run")
    parser.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "benchmarks" / "simcse_unsup")
    parser.add_argument("--name", default="simcse_unsup", help="results file name (benchmarks/results/NAME.json)")
    data = data_dir()
    args, config = parse_with_train_config(parser, experiment_settings(data))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    # One process per dropout value, side by side: each run's CPU budget is its own (and fresh processes
    # keep the runs independent: same initialization, no shared thread pool).
    with concurrent.futures.ProcessPoolExecutor(len(args.dropouts),
                                                mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_one, config, dropout, args.threads, args.runs_dir) for dropout in args.dropouts]
        runs = [future.result() for future in futures]
    for run in runs:
        log.info("dropout %s: %s", run["dropout"], json.dumps({k: v for k, v in run.items() if k != "curve"}))
    path = save_results(args.name, {"command": command_line(),
                                    "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                    "train_config": dataclasses.asdict(config),
                                    "threads_per_run": args.threads, "runs": runs})
    print(json.dumps([{k: v for k, v in r.items() if k != "curve"} for r in runs], indent=2))
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
