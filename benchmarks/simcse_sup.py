"""Supervised SimCSE from all-MiniLM-L6-v2 on ../shared/data/nli/nli_triples.csv.gz, with and without hard negatives.

Reports STS-B dev and SICK trial Spearman of the starting model and of each trained artifact. The trainer
keeps the step with the best STS-B dev Spearman (evaluated every --eval-steps), so the STS-B dev number
after training is selected on that same set; the last-step STS-B dev number and SICK trial (never used
for selection) are reported beside it.

    .venv/bin/python benchmarks/simcse_sup.py

Results: benchmarks/results/simcse_sup.json (+ metrics plots). Artifacts: runs/benchmarks/simcse_sup/.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, RESULTS, data_dir, pin_threads, save_results  # noqa: E402
from benchmarks.simcse_unsup import cpu_seconds, load_average  # noqa: E402

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


def run_one(args: argparse.Namespace, hard_negatives: bool, data: Path) -> dict:
    from embedline.training.config import TrainConfig
    from embedline.training.plot import read_metrics
    from embedline.training.trainer import train

    tag = "hardneg" if hard_negatives else "pairs"
    output = args.runs_dir / tag
    shutil.rmtree(output, ignore_errors=True)
    config = TrainConfig(
        objective="sup", train_file=str(data / "nli" / "nli_triples.csv.gz"),
        dev_file=str(data / "sts" / "stsb_dev.tsv.gz"), output=str(output), name=f"simcse-sup-minilm-{tag}",
        hard_negatives=hard_negatives, lr=args.lr, batch_size=args.batch_size, epochs=args.epochs,
        mini_batch_size=args.mini_batch_size,
        max_steps=args.max_steps, warmup_ratio=args.warmup_ratio,
        max_seq_length=args.max_seq_length, temperature=args.temperature, eval_steps=args.eval_steps,
        log_steps=10, checkpoint_steps=0, seed=args.seed, device="cpu",
    )
    wall_start, cpu_start = time.perf_counter(), cpu_seconds()
    result = train(config)
    wall, cpu = time.perf_counter() - wall_start, cpu_seconds() - cpu_start
    records = read_metrics(output / "run" / "metrics.jsonl")
    curve = [{"step": r["step"], "dev_spearman": round(r["dev_spearman"], 2)} for r in records if "dev_spearman" in r]
    shutil.copy(output / "run" / "metrics.png", RESULTS / f"{args.name}_{tag}.png")
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
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--mini-batch-size", type=int, default=0,
                        help="> 0: cached loss encoding this many texts at a time (the paper's batch 512 in fixed memory)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--warmup-ratio", type=float, default=0.0)
    parser.add_argument("--max-steps", type=int, default=0, help="> 0: stop early (pilots)")
    parser.add_argument("--max-seq-length", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--eval-steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=["hardneg", "pairs"], choices=["hardneg", "pairs"])
    parser.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "benchmarks" / "simcse_sup")
    parser.add_argument("--name", default="simcse_sup")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pin_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = data_dir()
    before = evaluate(None, data)
    log.info("all-MiniLM-L6-v2 before training: %s", before)
    runs = []
    for variant in args.variants:
        runs.append(run_one(args, variant == "hardneg", data))
        log.info("%s: %s", variant, json.dumps({k: v for k, v in runs[-1].items() if k != "curve"}))
        path = save_results(args.name, {
            "command": " ".join([".venv/bin/python", *sys.argv]),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "load_average_end": load_average(), "before": before, "runs": runs,
        })
    print(json.dumps({"before": before, "runs": [{k: v for k, v in r.items() if k != "curve"} for r in runs]},
                     indent=2))
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
