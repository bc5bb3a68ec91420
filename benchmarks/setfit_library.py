"""The setfit library itself against `train-classifier`, on the same shots: SetFit at the same body, head to head.

SetFit's published few-shot accuracies (`fewshot.SETFIT_N8`) come from its authors' own draws of N
examples per class; with 8 shots the draw moves accuracy by several points. This benchmark runs the setfit
library, with its paper's settings (20 pair iterations, body lr 2e-5, batch 16, one epoch, its
cosine-similarity loss and logistic-regression head), on exactly the shots `benchmarks.fewshot` trains on
for each seed (`labeled_data.sample_shots`), with the same body (the bundled all-MiniLM-L6-v2) and the
full test sets, and sets the result beside `train-classifier`'s on the same seeds, read from a fewshot
results file.

    make bench-setfit-deps      # setfit into its own venv, .bench/setfit-venv (its pins are not ours)
    flock /tmp/embedline-heavy.lock .venv/bin/python -m benchmarks.setfit_library --datasets emotion sst5 --seeds 5

Each run is a subprocess of the setfit venv's Python (`benchmarks/setfit_worker.py`), offline. Results:
benchmarks/results/<--name>.json (written after every seed; `--resume` keeps them) and a table in
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import REPO, RESULTS, command_line, data_dir, markdown_table, save_results, update_readme_section
from benchmarks.fewshot import DATASETS, SETFIT_N8, summarize

log = logging.getLogger("setfit_library")

DEFAULT_VENV = REPO / ".bench" / "setfit-venv"
WORKER = Path(__file__).with_name("setfit_worker.py")
# setfit's TrainingArguments for the paper's recipe (Tunstall et al. 2022: R = 20, lr 2e-5, batch 16).
PAPER_ARGUMENTS = {"batch_size": 16, "num_iterations": 20, "num_epochs": 1, "body_learning_rate": 2e-5}


def run_setfit(venv: Path, job: dict) -> dict:
    """One setfit run in its venv: {"predictions": [...], "train_seconds": s}."""
    python = venv / "bin" / "python"
    if not python.is_file():
        raise SystemExit(f"{python} not found: run `make bench-setfit-deps` first (setfit in its own venv)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": str(job["threads"])}
    with tempfile.TemporaryDirectory(prefix="embedline-setfit-") as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_path.write_text(json.dumps(job))
        done = subprocess.run([str(python), str(WORKER), str(job_path), str(out_path)], env=env, cwd=tmp,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"setfit worker failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return json.loads(out_path.read_text())


def ours_by_seed(results_name: str, dataset: str, head_c: str) -> dict[str, float]:
    """train-classifier's default recipe on the same seeds, from benchmarks/results/<results_name>.json."""
    path = RESULTS / f"{results_name}.json"
    runs = json.loads(path.read_text())["runs"].get(f"minilm/{dataset}/contrastive", {}).get("seeds", {})
    return {seed: run["accuracy_by_c"][head_c] for seed, run in runs.items()}


def mean_std(values: list[float]) -> str:
    stats = summarize(values)
    return f"{stats['mean']:.1f} ± {stats['std']:.1f}"


def build_table(results: dict, ours_name: str, head_c: str) -> str:
    rows = []
    for dataset, by_seed in results["runs"].items():
        ours = ours_by_seed(ours_name, dataset, head_c)
        seeds = [seed for seed in by_seed if seed in ours]
        if not seeds:
            continue
        setfit = [by_seed[seed]["accuracy"] for seed in seeds]
        mine = [ours[seed] for seed in seeds]
        wins = sum(m > s for m, s in zip(mine, setfit))
        difference = statistics.fmean(m - s for m, s in zip(mine, setfit))
        rows.append([dataset, len(seeds), mean_std(setfit), mean_std(mine), f"{difference:+.2f}",
                     f"{wins} of {len(seeds)}", f"{SETFIT_N8[('minilm', dataset)]:.1f}"])
    return markdown_table(["dataset", "seeds", "setfit library, these shots", "train-classifier, these shots",
                           "ours - setfit (mean of per-seed differences)", "seeds ours ahead",
                           "SetFit published"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["emotion", "sst5"], choices=["emotion", "sst5"])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..S-1, as benchmarks.fewshot draws them")
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="the virtual environment with setfit")
    parser.add_argument("--ours", default="fewshot_10seeds",
                        help="benchmarks/results file with train-classifier's runs on the same seeds")
    parser.add_argument("--head-c", default="10", help="which of those runs' head C to compare (the table's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="setfit_library")
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument("--resume", action="store_true", help="keep the seeds already in results/NAME.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)

    from embedline import artifact as art
    from embedline.training.labeled_data import read_labeled, sample_shots

    body = art.bundled_model_dir()
    root = data_dir() / "classification"
    results = {"settings": {"command": command_line().replace(" --resume", ""), "arguments": PAPER_ARGUMENTS,
                            "body": body.name, "shots": args.shots, "ours": args.ours}, "runs": {}}
    previous = RESULTS / f"{args.name}.json"
    if args.resume and previous.is_file():
        results["runs"] = json.loads(previous.read_text())["runs"]
    for dataset in args.datasets:
        train_name, splits = DATASETS[dataset]
        full, test = read_labeled(root / train_name), read_labeled(root / splits["test"])
        by_seed = results["runs"].setdefault(dataset, {})
        for seed in range(args.seeds):
            if str(seed) in by_seed:
                continue
            shots = sample_shots(full, args.shots, seed)
            out = run_setfit(args.venv, {
                "body": str(body), "train_texts": list(shots.texts), "train_labels": list(shots.labels),
                "test_texts": list(test.texts), "seed": seed, "threads": args.threads, "arguments": PAPER_ARGUMENTS,
            })
            correct = sum(p == y for p, y in zip(out["predictions"], test.labels))
            by_seed[str(seed)] = {"accuracy": round(100.0 * correct / len(test), 2),
                                  "train_seconds": out["train_seconds"]}
            log.info("%s seed %d: setfit %.2f (%.0f s training)", dataset, seed, by_seed[str(seed)]["accuracy"],
                     out["train_seconds"])
            save_results(args.name, results)
    path = save_results(args.name, results)
    table = build_table(results, args.ours, args.head_c)
    print(table)
    if not args.no_readme:
        update_readme_section(args.name, (
            f"## SetFit, the library, on the same shots (N = {args.shots}, test split)\n\n{table}\n\n"
            f"Command: `flock /tmp/embedline-heavy.lock {results['settings']['command']}` "
            f"(setfit's venv: `make bench-setfit-deps`); per-seed numbers in `results/{args.name}.json`, "
            f"train-classifier's in `results/{args.ours}.json` (head C = {args.head_c})."
        ))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
