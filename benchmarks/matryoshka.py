"""Matryoshka dimensions: STS-B dev Spearman (x100) of embeddings cut to 64/128/256/384 dims.

Each embedding is truncated to its first k dimensions and re-normalized, and the cosine of each STS-B dev
pair is ranked against the gold score (as the SDK's `embed(texts, dimensions=k)` serves it). Three models:

  (a) the bundled all-MiniLM-L6-v2, imported as an artifact;
  (b) (a) after one epoch of supervised SimCSE with hard negatives on ../shared/data/nli/nli_triples.csv.gz
      with the Matryoshka loss over the same dims (`--matryoshka_dims=384,256,128,64`);
  (c) the same fine-tune without the Matryoshka loss: the control, so (b) - (c) is what the loss buys.

(b) and (c) share every setting and the seed (same batches in the same order). There is no dev file: the
trainer keeps the last weights, so STS-B dev, the reported set, selects nothing. The training settings are
the supervised section's (benchmarks/README.md, "Supervised SimCSE": lr 5e-5, temperature 0.05, hard
negatives) at batch 64, max_seq_length 64, one epoch, to fit a few CPU minutes a run. (b) - (c) comes with
a paired bootstrap over the dev pairs (95% interval).

    .venv/bin/python -m benchmarks.matryoshka
    .venv/bin/python -m benchmarks.matryoshka --max_steps=20 --no-readme   # a quick look

Options other than the ones below are training-config fields for both fine-tunes (the list: `embedline
train --help`). Results: benchmarks/results/matryoshka.json and the "matryoshka" section of
benchmarks/README.md. Artifacts: runs/benchmarks/matryoshka/{matryoshka,control}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (
    REPO, RESULTS, command_line, cpu_flags, cpu_seconds, data_dir, load_average, markdown_table,
    parse_with_train_config, pin_threads, save_results, update_readme_section,
)

log = logging.getLogger("matryoshka")

DIMS = (384, 256, 128, 64)
ROWS = {
    "bundled": "all-MiniLM-L6-v2 (bundled, no fine-tune)",
    "matryoshka": "sup SimCSE fine-tune **with** Matryoshka loss",
    "control": "sup SimCSE fine-tune without it (control)",
}


def cosines_by_dim(model_dir: Path, pairs, dims: tuple[int, ...]) -> dict[int, np.ndarray]:
    """{k: cosine of each pair's embeddings cut to their first k dims and re-normalized}."""
    from embedline.tokenization import load_tokenizer
    from embedline.training.evaluate import embed_texts, load_any_encoder

    encoder, tokenizer_json, max_len = load_any_encoder(model_dir)
    sentences = pairs.unique_sentences()
    left, right = pairs.rows(sentences)
    embeddings = embed_texts(encoder, load_tokenizer(tokenizer_json, max_len), sentences).numpy()  # (n, full dim)
    out = {}
    for k in dims:
        cut = embeddings[:, :k].astype(np.float64)
        cut /= np.linalg.norm(cut, axis=1, keepdims=True)
        out[k] = (cut[left] * cut[right]).sum(axis=1)
    return out


def spearman_by_dim(cosines: dict[int, np.ndarray], scores: np.ndarray) -> dict[int, float]:
    from embedline.sts import spearman

    return {k: round(100.0 * spearman(c, scores), 2) for k, c in cosines.items()}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, scores: np.ndarray, rounds: int, seed: int = 0) -> list[float]:
    """95% interval of Spearman(a) - Spearman(b) (x100) over pairs resampled with replacement."""
    from embedline.sts import spearman

    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(rounds):
        index = rng.integers(0, len(scores), len(scores))
        diffs.append(100.0 * (spearman(a[index], scores[index]) - spearman(b[index], scores[index])))
    return [round(float(x), 2) for x in np.percentile(diffs, [2.5, 97.5])]


def fine_tune(config, output: Path, name: str, dims: tuple[int, ...]) -> dict:
    from embedline.training.simcse.trainer import train

    shutil.rmtree(output, ignore_errors=True)
    config = dataclasses.replace(config, output=str(output), name=name, matryoshka_dims=dims)
    wall_start, cpu_start = time.perf_counter(), cpu_seconds()
    result = train(config)
    return {
        "artifact": str(output),
        "matryoshka_dims": list(result.artifact.matryoshka_dims),
        "steps": result.steps,
        "train_loss_last": result.metrics.get("train_loss"),
        "train_seconds": result.metrics["train_seconds"],
        "wall_seconds": round(time.perf_counter() - wall_start, 1),
        "process_cpu_seconds": round(cpu_seconds() - cpu_start, 1),
        "train_config": result.artifact.metadata["training"],  # resolved: lr, device, ... filled in
    }


def experiment_settings(data: Path) -> dict:
    """Both fine-tunes' training config, where it differs from TrainConfig's defaults."""
    return {"objective": "sup", "train_file": str(data / "nli" / "nli_triples.csv.gz"), "hard_negatives": True,
            "batch_size": 64, "epochs": 1, "max_seq_length": 64, "checkpoint_steps": 0, "log_steps": 5,
            "device": "cpu"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dims", default=",".join(map(str, DIMS)), help="dims to evaluate and train for")
    parser.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap rounds (0: none)")
    parser.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "benchmarks" / "matryoshka")
    parser.add_argument("--name", default="matryoshka", help="results file name (benchmarks/results/NAME.json)")
    parser.add_argument("--no-readme", action="store_true", help="do not write the README section")
    parser.add_argument("--readme-only", action="store_true",
                        help="only rewrite the README section from benchmarks/results/NAME.json")
    data = data_dir()
    args, config = parse_with_train_config(parser, experiment_settings(data))
    if args.readme_only:
        return readme_only(args.name)
    dims = tuple(sorted({int(d) for d in args.dims.split(",")}, reverse=True))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pin_threads(args.threads)

    from embedline.artifact import bundled_model_dir, import_model_dir
    from embedline.sts import read_sts

    pairs = read_sts(data / "sts" / "stsb_dev.tsv.gz")
    scores = np.asarray(pairs.scores)
    load_start = load_average()
    cosines, runs = {}, {}
    with tempfile.TemporaryDirectory(prefix="embedline-matryoshka-") as tmp:
        bundled = import_model_dir(bundled_model_dir(), Path(tmp) / "all-MiniLM-L6-v2", name="all-MiniLM-L6-v2")
        cosines["bundled"] = cosines_by_dim(bundled.path, pairs, dims)
    log.info("bundled: %s", spearman_by_dim(cosines["bundled"], scores))
    for tag, train_dims in (("matryoshka", dims), ("control", ())):
        runs[tag] = fine_tune(config, args.runs_dir / tag, f"simcse-sup-minilm-{tag}", train_dims)
        cosines[tag] = cosines_by_dim(Path(runs[tag]["artifact"]), pairs, dims)
        log.info("%s: %s (%s)", tag, spearman_by_dim(cosines[tag], scores),
                 {k: v for k, v in runs[tag].items() if k != "train_config"})

    table = {tag: spearman_by_dim(c, scores) for tag, c in cosines.items()}
    gain = {k: round(table["matryoshka"][k] - table["control"][k], 2) for k in dims}
    interval = ({k: paired_bootstrap(cosines["matryoshka"][k], cosines["control"][k], scores, args.bootstrap)
                 for k in dims} if args.bootstrap else {})
    results = {
        "command": command_line(), "cpu_flags": cpu_flags(), "threads": args.threads, "dims": list(dims),
        "load_average_start": load_start, "load_average_end": load_average(), "stsb_dev_pairs": len(scores),
        "spearman_x100": {tag: {str(k): v for k, v in by_dim.items()} for tag, by_dim in table.items()},
        "matryoshka_minus_control": {str(k): v for k, v in gain.items()},
        "bootstrap_95ci": {str(k): v for k, v in interval.items()}, "bootstrap_rounds": args.bootstrap,
        "runs": runs,
    }
    path = save_results(args.name, results)
    print(results_table(results))
    print(f"saved {path}")
    if not args.no_readme:
        write_readme_section(args.name, results)
    return 0


def results_table(results: dict) -> str:
    """The markdown table (rows: models and the Matryoshka - control difference; columns: dims ascending)."""
    columns = sorted(results["dims"])
    table, gain, interval = results["spearman_x100"], results["matryoshka_minus_control"], results["bootstrap_95ci"]
    rows = [[ROWS[tag], *(f"{table[tag][str(k)]:.2f}" for k in columns)] for tag in ROWS]
    rows.append(["Matryoshka - control (95% CI, paired bootstrap)", *(
        f"**{gain[str(k)]:+.2f}** [{interval[str(k)][0]:+.2f}, {interval[str(k)][1]:+.2f}]" if interval
        else f"**{gain[str(k)]:+.2f}**" for k in columns)])
    return markdown_table(["STS-B dev Spearman x100", *(f"{k} dims" for k in columns)], rows)


def write_readme_section(name: str, results: dict) -> None:
    """The "<name>" section of benchmarks/README.md, from a results dict (as saved in results/<name>.json)."""
    runs = results["runs"]
    settings = runs["matryoshka"]["train_config"]
    dims = ",".join(map(str, results["dims"]))
    update_readme_section(name, (
        f"## Matryoshka dimensions: STS-B dev Spearman of truncated embeddings ({results['threads']} threads, "
        f"CPU flags: {', '.join(results['cpu_flags']) or 'none reported'})\n\n"
        f"Each embedding cut to its first k dims and re-normalized, cosine vs the gold score "
        f"({results['stsb_dev_pairs']:,} STS-B dev pairs), as the SDK's `embed(texts, dimensions=k)` serves it. "
        f"Both fine-tunes: supervised SimCSE with hard negatives from all-MiniLM-L6-v2 on "
        f"`nli/nli_triples.csv.gz`, {runs['matryoshka']['steps']} steps (1 epoch) of batch "
        f"{settings['batch_size']}, lr {settings['lr']:g}, temperature {settings['temperature']:g}, "
        f"max_seq_length {settings['max_seq_length']}, seed {settings['seed']}, the same batches in the same "
        f"order; the Matryoshka one with `--matryoshka_dims={dims}` (equal weights, the mean over the dims), "
        f"the control without. No dev file: the last weights are kept, so STS-B dev selects nothing.\n\n"
        f"{results_table(results)}\n\n"
        f"Training took {runs['matryoshka']['train_seconds']:,.0f} s (Matryoshka) and "
        f"{runs['control']['train_seconds']:,.0f} s (control) on 2 shared cores (load average "
        f"{results['load_average_start'][0]} at the start, {results['load_average_end'][0]} at the end), so "
        f"the times compare poorly. Command: `{results['command']}`; numbers: `results/{name}.json`; "
        f"`--readme-only` rewrites this section from that file."))


def readme_only(name: str) -> int:
    path = RESULTS / f"{name}.json"
    results = json.loads(path.read_text())
    print(results_table(results))
    write_readme_section(name, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
