"""Retrieval fine-tuning on Cranfield: the bundled model, BM25, hybrid and `train --objective retrieval` on the
test queries, hard negatives from BM25, from the model itself or none, and what it costs on STS-B.

    .venv/bin/python -m benchmarks.retrieval_finetune --seeds 0 --variants bm25      # one run (~30 min)
    .venv/bin/python -m benchmarks.retrieval_finetune --report                        # the README section

For each seed s, Cranfield's 225 queries are split by `python -m embedline.training.simcse.retrieval_split
--seed s` (75 test, 25 dev, 125 train: a seeded shuffle of the query ids), and the run trains with `--seed s`.
Every number is on the seed's 75 test queries, which neither training nor model selection sees (the best
step is chosen by nDCG@10 on the 25 dev queries). The corpus is the 1,398 non-empty documents as title +
" " + text, as `embedline index --title-field title` stores them. Rankings are exact and in-process (the fp32
torch model, 100 passages a query); BM25 is the store's (SQLite FTS5, `embedline.lexical`) and hybrid the
server's reciprocal rank fusion (k 60, each list cut at 200), so they equal what `eval-retrieval` reports for
an exactly searched index. Graded nDCG@10 as BEIR (trec_eval) computes it.

Runs are appended to benchmarks/results/retrieval_finetune.json one (seed, variant) at a time, so that each
can take its turn on a shared machine (wrap each in `flock /tmp/embedline-heavy.lock`); a run already there
with the same settings is replaced. Options other than the ones below are training-config fields (the list:
`embedline train --help`), over this experiment's defaults (`experiment_settings`). Artifacts:
runs/benchmarks/retrieval_finetune/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    REPO, RESULTS, command_line, cpu_flags, cpu_seconds, data_dir, load_average, markdown_table,
    parse_with_train_config, pin_threads, save_results, update_readme_section,
)

log = logging.getLogger("retrieval_finetune")
NAME = "retrieval_finetune"
VARIANTS = ("none", "bm25", "self")
DEPTH, POOL = 100, 200  # passages ranked per query (recall@100); each list's cut before fusion (the server's)
# Config fields a run sets itself (per seed and variant): runs compare on the rest.
RUN_FIELDS = ("output", "name", "seed", "negatives", "queries", "qrels", "dev_queries", "dev_qrels")


def comparable(settings: dict[str, Any]) -> dict[str, Any]:
    """The training config without what each run sets itself: equal for runs of one experiment."""
    kept = {k: v for k, v in settings.items() if k not in RUN_FIELDS}
    return json.loads(json.dumps(kept))  # as the results file holds them (a tuple reads back as a list)


def cranfield() -> Path:
    return data_dir() / "retrieval" / "cranfield"


def experiment_settings() -> dict[str, Any]:
    """The training config of every run, where it differs from TrainConfig's defaults."""
    return {"objective": "retrieval", "corpus": str(cranfield() / "corpus.tsv.gz"), "batch_size": 32,
            "max_seq_length": 128, "max_steps": 60, "eval_steps": 15, "refresh_steps": 15, "warmup_ratio": 0.1,
            "checkpoint_steps": 0, "device": "cpu"}


@dataclasses.dataclass
class Split:
    seed: int
    folder: Path

    def file(self, split: str, kind: str) -> Path:
        return self.folder / f"{split}.{kind}.tsv"


def make_split(seed: int, runs_dir: Path) -> Split:
    from embedline.training.simcse.retrieval_split import write_split

    folder = runs_dir / f"split-{seed}"
    write_split(str(cranfield() / "queries.tsv.gz"), str(cranfield() / "qrels.tsv.gz"), str(folder), 75, 25, seed)
    return Split(seed, folder)


class Ranker:
    """Exact dense, BM25 and hybrid rankings of the Cranfield corpus, in-process."""

    def __init__(self) -> None:
        from embedline.lexical import Bm25Index
        from embedline.training.retrieval_data import read_corpus

        self.corpus = read_corpus(cranfield() / "corpus.tsv.gz", "title")
        self.bm25 = Bm25Index(self.corpus.texts)

    def dense(self, model: str | None, queries: list[str], depth: int) -> list[list[tuple[int, float]]]:
        """(row, cosine) best first for each query, the model's prompts ("query", "passage") prepended."""
        import torch

        from embedline.tokenization import load_tokenizer
        from embedline.training.diagnostics.retrieval_pairs import side_prompts
        from embedline.training.evaluate import embed_texts, load_any_encoder

        encoder, tokenizer_json, max_len = load_any_encoder(model)
        tokenizer = load_tokenizer(tokenizer_json, max_len)
        query_prompt, passage_prompt = side_prompts(model) if model else ("", "")

        def embed(texts: list[str], prompt: str) -> torch.Tensor:
            vectors = embed_texts(encoder, tokenizer, [prompt + t for t in texts], 64, progress=True)
            return torch.nn.functional.normalize(vectors, dim=-1)

        scores = embed(queries, query_prompt) @ embed(list(self.corpus.texts), passage_prompt).T
        top = torch.topk(scores, depth, dim=1)
        return [list(zip(rows, values)) for rows, values in zip(top.indices.tolist(), top.values.tolist())]

    def scores(self, rankings: dict[str, list[tuple[int, float]]], qrels: dict) -> dict[str, float]:
        from embedline.retrieval import evaluate

        ids = {q: [self.corpus.ids[row] for row, _ in ranked[:DEPTH]] for q, ranked in rankings.items()}
        return {k: round(v, 4) for k, v in evaluate(ids, qrels).items() if k != "queries"}

    def measure(self, model: str | None, split: Split) -> dict[str, dict[str, float]]:
        """{"dense": ..., "hybrid": ...} (and "bm25" for the bundled model) on the split's test queries."""
        from embedline.retrieval import read_qrels, read_queries
        from embedline.search.store import Hit, reciprocal_rank_fusion

        queries = read_queries(split.file("test", "queries"))
        qrels = read_qrels(split.file("test", "qrels"))
        ids, texts = list(queries), list(queries.values())
        dense = dict(zip(ids, self.dense(model, texts, POOL)))
        lexical = dict(zip(ids, self.bm25.search(texts, POOL)))

        def hits(ranked: list[tuple[int, float]]) -> list[Hit]:
            return [Hit(str(row), score, "", {}) for row, score in ranked]

        fused = {q: [(int(h.id), h.score) for h in reciprocal_rank_fusion([hits(dense[q]), hits(lexical[q])], DEPTH)]
                 for q in ids}
        out = {"dense": self.scores(dense, qrels), "hybrid": self.scores(fused, qrels)}
        if model is None:
            out["bm25"] = self.scores(lexical, qrels)
        return out


def stsb_spearman(model: str | None) -> float:
    from embedline.tokenization import load_tokenizer
    from embedline.training.data import read_sts
    from embedline.training.evaluate import load_any_encoder, sts_metrics

    encoder, tokenizer_json, max_len = load_any_encoder(model)
    data = read_sts(data_dir() / "sts" / "stsb_dev.tsv.gz")
    return round(sts_metrics(encoder, load_tokenizer(tokenizer_json, max_len), data)["spearman"], 2)


def train_one(config, split: Split, variant: str, runs_dir: Path) -> dict[str, Any]:
    from embedline.training.plot import read_metrics
    from embedline.training.simcse.trainer import train

    output = runs_dir / f"seed{split.seed}-{variant}"
    shutil.rmtree(output, ignore_errors=True)
    config = dataclasses.replace(
        config, output=str(output), name=f"minilm-cranfield-{variant}-s{split.seed}", seed=split.seed,
        negatives=variant, queries=str(split.file("train", "queries")), qrels=str(split.file("train", "qrels")),
        dev_queries=str(split.file("dev", "queries")), dev_qrels=str(split.file("dev", "qrels")))
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = train(config)
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    curve = [{"step": r["step"], "dev_ndcg@10": round(r["dev_ndcg@10"], 4)}
             for r in read_metrics(output / "run" / "metrics.jsonl") if "dev_ndcg@10" in r]
    keep = ("best_step", "kept_start", "dev_ndcg@10_start", "dev_ndcg@10", "dev_ndcg@10_last", "train_seconds",
            "mining_seconds", "minings", "mined_negatives", "false_negatives_labelled", "false_negatives_margin",
            "mined_labelled_excluded", "train_examples")
    return {"artifact": str(output), "wall_seconds": round(wall, 1), "process_cpu_seconds": round(cpu, 1),
            **{k: result.metrics.get(k) for k in keep}, "curve": curve,
            "train_config": result.artifact.metadata["training"]}  # resolved: the lr, the length, ...


def load_record(name: str) -> dict[str, Any]:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {"baselines": {}, "runs": []}


def run(args: argparse.Namespace, config) -> dict[str, Any]:
    record = load_record(args.name)
    ranker = Ranker()
    settings = comparable(dataclasses.asdict(config))
    for seed in args.seeds:
        split = make_split(seed, args.runs_dir)
        if str(seed) not in record["baselines"]:
            record["baselines"][str(seed)] = {**ranker.measure(None, split), "stsb_dev": stsb_spearman(None)}
            log.info("seed %d, bundled model: %s", seed, record["baselines"][str(seed)])
        for variant in args.variants:
            outcome = train_one(config, split, variant, args.runs_dir)
            outcome.update(test=ranker.measure(outcome["artifact"], split), stsb_dev=stsb_spearman(outcome["artifact"]))
            entry = {"seed": seed, "variant": variant, "settings": settings, "command": command_line(),
                     "cpu_flags": cpu_flags(), "load_average_end": load_average(), **outcome}
            record["runs"] = [r for r in record["runs"] if not (r["seed"] == seed and r["variant"] == variant
                                                                  and comparable(r["settings"]) == settings)] + [entry]
            log.info("seed %d, %s: %s", seed, variant, json.dumps({k: v for k, v in entry.items() if k != "curve"}))
            save_results(args.name, record)
    return record


def _mean(values: list[float], digits: int = 4) -> str:
    if not values:
        return ""
    spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.{digits}f}{spread}"


LABELS = {"none": "in-batch negatives only", "bm25": "+ BM25 hard negatives", "self": "+ self-mined (ANCE) negatives"}


def _rows(record: dict[str, Any], seeds: list[str]) -> list[tuple[str, dict[str, dict], dict[str, float]]]:
    """(label, {seed: metrics}, {seed: STS-B}) for each ranking of the table, baselines first."""
    base = record["baselines"]
    rows = [("BM25 (FTS5, as served)", {s: base[s]["bm25"] for s in seeds}, {}),
            ("all-MiniLM-L6-v2, bundled (dense)", {s: base[s]["dense"] for s in seeds},
             {s: base[s]["stsb_dev"] for s in seeds}),
            ("hybrid: BM25 + bundled (RRF, k 60)", {s: base[s]["hybrid"] for s in seeds}, {})]
    for variant in VARIANTS:
        runs = {str(r["seed"]): r for r in record["runs"] if r["variant"] == variant and str(r["seed"]) in seeds}
        if runs:
            rows.append((f"fine-tuned, {LABELS[variant]} (dense)", {s: r["test"]["dense"] for s, r in runs.items()},
                         {s: r["stsb_dev"] for s, r in runs.items()}))
            rows.append((f"hybrid: BM25 + fine-tuned, {LABELS[variant]}",
                         {s: r["test"]["hybrid"] for s, r in runs.items()}, {}))
    return rows


def quality_table(record: dict[str, Any], seeds: list[str]) -> str:
    bundled = {s: record["baselines"][s]["dense"]["ndcg@10"] for s in seeds}
    table = []
    for label, metrics, sts in _rows(record, seeds):
        ndcg = [metrics[s]["ndcg@10"] for s in seeds if s in metrics]
        delta = [metrics[s]["ndcg@10"] - bundled[s] for s in seeds if s in metrics]
        table.append([label, *[f"{metrics[s]['ndcg@10']:.4f}" if s in metrics else "" for s in seeds], _mean(ndcg),
                      f"{statistics.mean(delta):+.4f}" if delta else "",
                      _mean([metrics[s]["recall@100"] for s in seeds if s in metrics], 3),
                      _mean([metrics[s]["mrr@10"] for s in seeds if s in metrics], 3),
                      _mean([sts[s] for s in seeds if s in sts], 2) if sts else ""])
    return markdown_table(["ranking (75 test queries a seed)", *[f"nDCG@10 seed {s}" for s in seeds], "mean ± sd",
                           "vs bundled dense (paired mean)", "recall@100", "MRR@10", "STS-B dev Spearman"], table)


def runs_table(record: dict[str, Any], seeds: list[str]) -> str:
    rows = []
    for r in sorted(record["runs"], key=lambda r: (VARIANTS.index(r["variant"]), r["seed"])):
        if str(r["seed"]) not in seeds:
            continue
        guard = (f"{r['false_negatives_margin']} / {r['mined_negatives']}" if r["mined_negatives"] else "")
        rows.append([r["variant"], r["seed"], f"{r['dev_ndcg@10_start']:.4f} -> {r['dev_ndcg@10']:.4f}",
                     r["best_step"], r["minings"], r["false_negatives_labelled"], guard,
                     f"{r['train_seconds']:.0f}", f"{r['mining_seconds']:.0f}", f"{r['wall_seconds']:.0f}"])
    return markdown_table(["negatives", "seed", "dev nDCG@10 start -> best", "best step", "minings",
                           "in-batch candidates masked as labelled relevant", "mined negatives dropped by the margin",
                           "training s", "mining s", "wall s (with evaluations)"], rows)


def tried_table(record: dict[str, Any], settings: dict[str, Any], resolved: dict[str, Any]) -> str:
    """Runs with other settings (e.g. the learning rates tried on seed 0): what differs, dev and test nDCG@10."""
    rows = []
    for r in sorted(record["runs"], key=lambda r: (r["seed"], r["variant"])):
        other = comparable(r["settings"])
        if other == settings:
            continue
        differs = ", ".join(f"{k} {r['train_config'].get(k)} (above: {resolved.get(k)})"
                            for k in sorted(set(other) | set(settings)) if other.get(k) != settings.get(k))
        rows.append([r["variant"], r["seed"], differs, f"{r['dev_ndcg@10']:.4f}", r["best_step"],
                     f"{r['test']['dense']['ndcg@10']:.4f}"])
    if not rows:
        return ""
    return ("\n\nOther settings tried (the dev column is the best step's nDCG@10 on the 25 dev queries; the test "
            "column is shown for completeness and chose nothing):\n\n"
            + markdown_table(["negatives", "seed", "differs in", "dev nDCG@10 (best step)", "best step",
                              "test nDCG@10 (dense)"], rows))


def readme_section(record: dict[str, Any], settings: dict[str, Any], name: str = NAME) -> str:
    """The tables over the seeds that have a bundled baseline and the runs with `settings`, the settings tried
    besides, and the commands."""
    seeds = sorted(record["baselines"], key=int)
    full = record
    record = {**record, "runs": [r for r in record["runs"] if comparable(r["settings"]) == settings]}
    runs = [r for r in record["runs"] if str(r["seed"]) in seeds]
    resolved = runs[0]["train_config"] if runs else {}
    shown = ", ".join(f"{k} {resolved[k]}" for k in ("batch_size", "max_steps", "max_seq_length", "lr",
                                                     "warmup_ratio", "eval_steps", "refresh_steps", "mine_depth",
                                                     "negatives_per_query", "fn_margin", "temperature")
                      if k in resolved)
    commands = sorted({r["command"] for r in runs})
    tried = tried_table(full, settings, resolved)
    flags = sorted({flag for r in runs for flag in r["cpu_flags"]})
    return (f"## Retrieval fine-tuning (Cranfield, {len(seeds)} query splits)\n\n"
            + quality_table(record, seeds) + "\n\n" + runs_table(record, seeds)
            + f"\n\nSettings of every run: {shown}. Commands (each wrapped in `flock /tmp/embedline-heavy.lock`): "
            + "; ".join(f"`{c}`" for c in commands)
            + f". CPU flags: {', '.join(flags)}; 2 shared cores (`results/{name}.json`)." + tried)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                        help="hard negatives of the fine-tuned runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "benchmarks" / NAME)
    parser.add_argument("--report", action="store_true", help="only rewrite the README section from the results")
    parser.add_argument("--name", default=NAME, help="results file name (benchmarks/results/NAME.json)")
    parser.add_argument("--no-readme", action="store_true", help="leave benchmarks/README.md as it is")
    args, config = parse_with_train_config(parser, experiment_settings())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pin_threads(args.threads)
    record = load_record(args.name) if args.report else run(args, config)
    if not args.no_readme:
        update_readme_section(NAME, readme_section(record, comparable(dataclasses.asdict(config)), args.name))
        print(f"wrote the {NAME} section of benchmarks/README.md")
    else:
        print(readme_section(record, comparable(dataclasses.asdict(config)), args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
