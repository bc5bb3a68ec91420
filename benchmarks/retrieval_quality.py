"""Retrieval quality on Cranfield through the served index, against sentence-transformers' own evaluator.

    .venv/bin/python -m benchmarks.retrieval_quality [--artifact DIR] [--variants fp32,openvino]

For each variant: a server of that variant serving a fresh embedded store, the Cranfield corpus indexed
through it (title + " " + text, as BEIR and sentence-transformers join them; the 2 empty documents skipped),
then `embedline eval-retrieval`'s four rankings of the 225 queries (dense through the served index, dense by
exact scan, BM25, hybrid). Beside them, sentence-transformers' InformationRetrievalEvaluator on the same
1,398 documents and queries with the same model in-process (fp32 torch): its nDCG@10 has binary gains, so it
is compared with our binary nDCG@10 (our headline nDCG@10 has graded gains, as BEIR computes it).

Goals (issue "semantic search", point 5): served dense within 0.005 nDCG@10 of exact search; equal to the
evaluator within 0.005 served as fp32 and 0.01 as the default variant.
Writes benchmarks/results/retrieval_quality.json and the "retrieval_quality" section of benchmarks/README.md.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.common import data_dir, markdown_table, measured_settings
from benchmarks.experiment import Experiment


def cranfield() -> Path:
    return data_dir() / "retrieval" / "cranfield"


def sentence_transformers_scores(model_dir: Path) -> dict:
    """InformationRetrievalEvaluator on Cranfield (the same documents `index` keeps) with the model in-process."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.evaluation import InformationRetrievalEvaluator

    from embedline.documents import CorpusFormat, read_documents
    from embedline.retrieval import read_qrels, read_queries

    documents = read_documents(cranfield() / "corpus.tsv.gz", CorpusFormat(title_field="title", skip_empty=True))
    corpus = {d.id: d.text for d in documents}
    qrels = read_qrels(cranfield() / "qrels.tsv.gz")
    relevant = {q: {d for d, score in docs.items() if score > 0} for q, docs in qrels.items()}
    queries = {q: text for q, text in read_queries(cranfield() / "queries.tsv.gz").items() if relevant.get(q)}
    evaluator = InformationRetrievalEvaluator(queries, corpus, relevant, name="cranfield", mrr_at_k=[10],
                                              ndcg_at_k=[10], accuracy_at_k=[1], precision_recall_at_k=[100],
                                              map_at_k=[100], show_progress_bar=False)
    scores = evaluator(SentenceTransformer(str(model_dir), device="cpu"))
    return {"ndcg@10_binary": scores["cranfield_cosine_ndcg@10"], "mrr@10": scores["cranfield_cosine_mrr@10"],
            "recall@100": scores["cranfield_cosine_recall@100"], "documents": len(corpus), "queries": len(queries)}


def served_scores(experiment: Experiment, variant: str, tmp: Path) -> dict:
    """eval-retrieval's rankings through a server of `variant` over a freshly indexed store."""
    from embedline.client import EmbeddingClient
    from embedline.client.cli import Progress
    from embedline.documents import CorpusFormat
    from embedline.search.evaluate import labelled_queries, rank, rankers
    from embedline.search.indexer import index_corpus
    from embedline.retrieval import evaluate, read_qrels, read_queries
    from embedline.search.store import open_store

    from benchmarks.suite import triton

    store = open_store(str(tmp / f"store-{variant}"))
    qrels = read_qrels(cranfield() / "qrels.tsv.gz")
    queries = labelled_queries(read_queries(cranfield() / "queries.tsv.gz"), qrels)
    with triton(experiment.artifact, tmp, measured_settings(variant, experiment.threads), index=store.uri) as server:
        with EmbeddingClient(server.grpc_url, timeout=600) as client:
            index_corpus(client, store, "cranfield", str(cranfield() / "corpus.tsv.gz"),
                         CorpusFormat(title_field="title", skip_empty=True), progress=Progress(1400, enabled=False))
            collection = store.open("cranfield")
            results = {label: evaluate(rank(queries, search, label), qrels)
                       for label, search in rankers(client, collection, 100).items()}
    print(variant, results, flush=True)
    return results


def main() -> None:
    experiment = Experiment.from_command_line(__doc__, one_variant=False, options=lambda parser: parser.add_argument(
        "--variants", default=None, help="comma-separated (default: fp32 and the one `serve` picks)"))
    from embedline.variants import choose_variant

    default = choose_variant(experiment.artifact, "cpu")
    variants = (experiment.args.variants or ",".join(dict.fromkeys(["fp32", default]))).split(",")
    reference = sentence_transformers_scores(experiment.artifact.path)
    print("sentence-transformers", reference, flush=True)
    with tempfile.TemporaryDirectory(prefix="embedline-retrieval-") as tmp:
        served = {variant: served_scores(experiment, variant, Path(tmp)) for variant in variants}
    record = experiment.record(default_variant=default, sentence_transformers=reference, served=served)
    experiment.save("retrieval_quality", record)
    experiment.report("retrieval_quality", readme_section(record))


def readme_section(record: dict) -> str:
    reference = record["sentence_transformers"]
    rows = [["sentence-transformers InformationRetrievalEvaluator (fp32 torch, exact)", "", "",
             f"{reference['ndcg@10_binary']:.4f}", f"{reference['mrr@10']:.4f}", f"{reference['recall@100']:.4f}", ""]]
    for variant, results in record["served"].items():
        for label, m in results.items():
            gap = (f"{m['ndcg@10_binary'] - reference['ndcg@10_binary']:+.4f}" if label.startswith("dense") else "")
            rows.append([f"{variant}: {label}", f"{m['ndcg@10']:.4f}", "", f"{m['ndcg@10_binary']:.4f}",
                         f"{m['mrr@10']:.4f}", f"{m['recall@100']:.4f}", gap])
    return ("## Retrieval quality (Cranfield, 225 queries, 1,398 documents)\n\n"
            + markdown_table(["ranking", "nDCG@10 (graded)", "", "nDCG@10 (binary)", "MRR@10", "recall@100",
                              "binary nDCG@10 - evaluator"], rows)
            + f"\n\nModel {record['artifact']}; `serve`'s default variant here: {record['default_variant']}. Graded "
            "nDCG@10 uses the qrels' 1-4 scores as gains (BEIR, trec_eval); the evaluator's nDCG is binary. "
            f"Command: `{record['command']}`; CPU flags {', '.join(record['cpu_flags'])} "
            "(`results/retrieval_quality.json`).")


if __name__ == "__main__":
    main()
