"""Supervised SimCSE from all-MiniLM-L6-v2 on ../shared/data/nli/nli_triples.csv.gz, with and without hard negatives.

Reports STS-B dev and SICK trial Spearman of the starting model and of each trained artifact. The trainer
keeps the step with the best STS-B dev Spearman (evaluated every --eval-steps), so the STS-B dev number
after training is selected on that same set; the last-step STS-B dev number and SICK trial (never used
for selection) are reported beside it.

    .venv/bin/python -m benchmarks.simcse_sup
    .venv/bin/python -m benchmarks.simcse_sup --batch_size=512 --mini_batch_size=64 --variants hardneg

Options other than the ones below are training-config fields, passed to the trainer as they are (the
paper's defaults: lr 5e-5, batch 64, max_seq_length 32, temperature 0.05; the list: `embedline train
--help`). Results: benchmarks/results/simcse_sup.json (+ metrics plots). Artifacts: runs/benchmarks/simcse_sup/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from benchmarks.common import (
    REPO, RESULTS, command_line, cpu_seconds, data_dir, load_average, parse_with_train_config, pin_threads,
    save_results,
)

log = logging.getLogger("simcse_sup")


def evaluate(model: str | None, data: Path) -> dict[str, float]:
    """STS-B dev and SICK trial Spearman (x100) of an artifact or model directory (None = bundled model)."""
    from embedline.tokenization import load_tokenizer
    from embedline.training.data import read_sts
    from embedline.training.evaluate import load_any_encoder, sts_metrics

    encoder, tokenizer_json, max_len = load_any_encoder(model)
    tokenizer = load_tokenizer(tokenizer_json, max_len)
    out = {}
    for name, path in (("stsb_dev", "sts/stsb_dev.tsv.gz"), ("sick_trial", "sts/sick_trial.tsv.gz")):
        out[name] = round(sts_metrics(encoder, tokenizer, read_sts(data / path))["spearman"], 2)
    return out


def experiment_settings(data: Path) -> dict:
    """The experiment's training config, where it differs from TrainConfig's defaults."""
    return {"objective": "sup", "train_file": str(data / "nli" / "nli_triples.csv.gz"),
            "dev_file": str(data / "sts" / "stsb_dev.tsv.gz"), "eval_steps": 25, "checkpoint_steps": 0,
            "device": "cpu"}


def run_one(config, hard_negatives: bool, runs_dir: Path, name: str, data: Path) -> dict:
    from embedline.training.plot import read_metrics
    from embedline.training.simcse.trainer import train

    tag = "hardneg" if hard_negatives else "pairs"
    output = runs_dir / tag
    shutil.rmtree(output, ignore_errors=True)
    config = dataclasses.replace(config, output=str(output), name=f"simcse-sup-minilm-{tag}",
                                 hard_negatives=hard_negatives)
    wall_start, cpu_start = time.perf_counter(), cpu_seconds()
    result = train(config)
    wall, cpu = time.perf_counter() - wall_start, cpu_seconds() - cpu_start
    records = read_metrics(output / "run" / "metrics.jsonl")
    curve = [{"step": r["step"], "dev_spearman": round(r["dev_spearman"], 2)} for r in records if "dev_spearman" in r]
    shutil.copy(output / "run" / "metrics.png", RESULTS / f"{name}_{tag}.png")
    after = evaluate(str(output), data)
    return {
        "hard_negatives": hard_negatives,
        "stsb_dev_after": after["stsb_dev"],
        "sick_trial_after": after["sick_trial"],
        "stsb_dev_last_step": curve[-1]["dev_spearman"],
        "best_step": result.metrics["best_step"],
        "steps": result.metrics["steps"],
        "train_seconds": result.metrics["train_seconds"],
        "wall_seconds_with_evals": round(wall, 1),
        "process_cpu_seconds": round(cpu, 1),
        "curve": curve,
        "artifact": str(output),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=["hardneg", "pairs"], choices=["hardneg", "pairs"])
    parser.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "benchmarks" / "simcse_sup")
    parser.add_argument("--name", default="simcse_sup", help="results file name (benchmarks/results/NAME.json)")
    data = data_dir()
    args, config = parse_with_train_config(parser, experiment_settings(data))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pin_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    before = evaluate(None, data)
    log.info("all-MiniLM-L6-v2 before training: %s", before)
    runs = []
    for variant in args.variants:
        runs.append(run_one(config, variant == "hardneg", args.runs_dir, args.name, data))
        log.info("%s: %s", variant, json.dumps({k: v for k, v in runs[-1].items() if k != "curve"}))
        path = save_results(args.name, {
            "command": command_line(),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "train_config": dataclasses.asdict(config),
            "load_average_end": load_average(), "before": before, "runs": runs,
        })
    print(json.dumps({"before": before, "runs": [{k: v for k, v in r.items() if k != "curve"} for r in runs]},
                     indent=2))
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
