"""`embedline train --objective retrieval`: a dual encoder trained on your own queries (the DPR recipe).

    embedline train --objective retrieval --corpus corpus.tsv --queries queries.tsv --qrels qrels.tsv \\
        [--dev-queries dev.tsv --dev-qrels dev-qrels.tsv] [--query_prompt "query: " --passage_prompt "passage: "] \\
        [--negatives none|bm25|self|bm25+self] --output DIR

One shared encoder embeds queries and passages (each with its prompt, when given). A training example is a
(query, relevant passage) pair, one per relevant judgment; each step's loss is InfoNCE over the batch
(Karpukhin et al., "Dense Passage Retrieval", EMNLP 2020): every other pair's passage is an in-batch negative,
and each query brings `negatives_per_query` hard negatives mined from BM25 and/or from the model's own index,
mined again every `refresh_steps` (ANCE; training/simcse/mining.py). All of them are candidates for every
query, with two exceptions, the false-negative guard:

  * a passage labelled relevant to the query (another query's positive, a mined negative of another query)
    is not its negative; mining already leaves each query's own relevant passages out;
  * a query's own mined negative whose cosine is above its positive's minus `fn_margin` is not used either:
    incomplete judgments make such a passage likely relevant (counted per step, logged, recorded).

The best step is the one with the highest nDCG@10 on the dev queries (exact search over the corpus embedded by
the model, BEIR's nDCG as `eval-retrieval` computes it), the starting model included; the artifact's
config_sentence_transformers.json records the prompts as "query" and "passage", the names `embedline index`
and search look up, so the served model embeds queries and passages as it was trained to.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from embedline import artifact as art
from embedline.encoder import SentenceEncoder
from embedline.retrieval import QUERY_PROMPT, evaluate
from embedline.training.data import Batch, DataError
from embedline.training.evaluate import embed_texts
from embedline.training.simcse import distributed
from embedline.training.simcse.config import TrainConfig
from embedline.training.simcse.losses import ObjectiveLoss, guarded_info_nce_loss
from embedline.training.simcse.mining import (
    Candidates, bm25_candidates, dense_candidates, draw_negatives, interleave, step_generator,
)
from embedline.training.retrieval_data import read_retrieval_data

log = logging.getLogger(__name__)

PASSAGE_PROMPT = "passage"  # the name the prompt is recorded under (the first of the core's PASSAGE_PROMPTS)
RANKING_DEPTH = 100  # passages ranked per dev query: recall@100 needs 100
COUNTS = ("false_negatives_labelled", "false_negatives_margin", "mined_negatives")


class RetrievalTask:
    """The retrieval objective behind the trainer's `task.Task` seam (see the module docstring)."""

    selection = "ndcg@10"
    views = 1
    label = "retrieval"

    def __init__(self, config: TrainConfig):
        self.config = config
        self.data = read_retrieval_data(config.corpus, config.queries, config.qrels, config.dev_queries,
                                        config.dev_qrels, config.title_field)
        self.pairs = self.data.train.pairs()
        self.source, self.dev_source = config.qrels, config.dev_qrels
        self.candidates = Candidates()
        self.window = dict.fromkeys(COUNTS, 0)   # since the last metrics line (summed over processes there)
        self.totals = dict.fromkeys(COUNTS, 0)
        self.minings, self.mined_labelled_excluded, self.mining_seconds = 0, 0, 0.0
        self._bm25: tuple[dict[str, list[int]], int] | None = None
        self._passage_vectors: np.ndarray | None = None  # of the current weights (cleared by each step)
        most_relevant = max(map(len, self.data.train.relevant.values()))
        if config.negatives != "none" and len(self.data.corpus) - most_relevant < config.negatives_per_query:
            raise DataError(f"{config.corpus}: {len(self.data.corpus)} passages leave too few non-relevant ones for "
                            f"--negatives_per_query {config.negatives_per_query}")

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def has_dev(self) -> bool:
        return self.data.dev is not None

    # --- embedding and mining ----------------------------------------------------------------------------

    def _embed(self, encoder: SentenceEncoder, tokenizer: Tokenizer, texts: list[str], prompt: str) -> np.ndarray:
        vectors = embed_texts(encoder, tokenizer, [prompt + text for text in texts], self.config.eval_batch_size)
        return torch.nn.functional.normalize(vectors, dim=-1).numpy()

    def _passages(self, encoder: SentenceEncoder, tokenizer: Tokenizer) -> np.ndarray:
        """The corpus embedded by the current weights: once for a dev evaluation and the mining after it."""
        if self._passage_vectors is None:
            self._passage_vectors = self._embed(encoder, tokenizer, list(self.data.corpus.texts),
                                                self.config.passage_prompt)
        return self._passage_vectors

    def _mining_due(self, step: int) -> bool:
        source, every = self.config.negatives, self.config.refresh_steps
        if source == "none":
            return False
        if self.candidates.step < 0:
            return True
        return "self" in source and every > 0 and step % every == 0 and step > self.candidates.step

    def before_step(self, encoder: SentenceEncoder, tokenizer: Tokenizer, step: int) -> None:
        """Mine the hard negatives when due: at the first step, and for `self` every refresh_steps."""
        if not self._mining_due(step):
            return
        started, config, train = time.perf_counter(), self.config, self.data.train
        found: list[dict[str, list[int]]] = []
        excluded = 0
        if "bm25" in config.negatives:
            if self._bm25 is None:  # the corpus does not change: BM25's lists neither
                self._bm25 = bm25_candidates(self.data.corpus.texts, train.texts, train.relevant, config.mine_depth)
            found.append(self._bm25[0])
            excluded += self._bm25[1]
        if "self" in config.negatives:
            queries = self._embed(encoder, tokenizer, list(train.texts.values()), config.query_prompt)
            rows, passed = dense_candidates(queries, self._passages(encoder, tokenizer), list(train.texts),
                                            train.relevant, config.mine_depth)
            found.append(rows)
            excluded += passed
        rows = found[0] if len(found) == 1 else interleave(found[0], found[1], config.mine_depth)
        self.candidates = Candidates(rows, step, excluded)
        seconds = time.perf_counter() - started
        self.minings, self.mined_labelled_excluded = self.minings + 1, self.mined_labelled_excluded + excluded
        self.mining_seconds += seconds
        log.info("step %d: mined %s hard negatives, the top %d passages of %d queries, in %.1f s (%d labelled "
                 "relevant passages left out)", step, config.negatives, config.mine_depth, len(rows), seconds,
                 excluded)

    # --- batches and the loss ----------------------------------------------------------------------------

    def batch(self, step: int, indices: list[int], rows: slice) -> tuple[Batch, ObjectiveLoss]:
        """This process's share (`rows`) of the step's pairs, their negatives, and the loss that knows them."""
        self._passage_vectors = None  # the step changes the weights
        config, train, corpus = self.config, self.data.train, self.data.corpus
        pairs = [self.pairs[i] for i in indices]
        per_query = config.negatives_per_query if config.negatives != "none" else 0
        generator = step_generator(config.seed, step)  # every process draws the whole batch's, identically
        negatives = [draw_negatives(self.candidates.rows.get(query_id, []), train.relevant[query_id], per_query,
                                    len(corpus), generator) for query_id, _ in pairs] if per_query else []
        local = pairs[rows]
        columns = [[config.query_prompt + train.texts[q] for q, _ in local],
                   [config.passage_prompt + corpus.texts[row] for _, row in local]]
        if per_query:
            columns.append([config.passage_prompt + corpus.texts[row] for drawn in negatives[rows] for row in drawn])
        candidate_rows = [row for _, row in pairs] + [row for drawn in negatives for row in drawn]
        excluded, guarded = self._masks(pairs, rows, candidate_rows, per_query)
        return Batch(columns), self._loss(excluded, guarded, per_query * len(local))

    def _masks(self, pairs: list[tuple[str, int]], rows: slice, candidate_rows: list[int],
               per_query: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(excluded, guarded), (local pairs, candidates) each: the guard's two masks (losses.guarded_info_nce_loss).

        Candidates are the global batch's positives, then its negatives (query-major), as the loss gathers them.
        """
        relevant = self.data.train.relevant
        local = range(len(pairs))[rows]
        excluded = torch.tensor([[row in relevant[pairs[i][0]] for row in candidate_rows] for i in local],
                                dtype=torch.bool).reshape(len(local), len(candidate_rows))
        for k, i in enumerate(local):
            excluded[k, i] = False  # its own positive
        if not per_query:
            return excluded, None
        guarded = torch.zeros_like(excluded)
        for k, i in enumerate(local):
            start = len(pairs) + i * per_query
            guarded[k, start:start + per_query] = True
        return excluded, guarded & ~excluded

    def _loss(self, excluded: torch.Tensor, guarded: torch.Tensor | None, mined: int) -> ObjectiveLoss:
        config = self.config

        def loss(columns: list[torch.Tensor], labels: torch.Tensor | None) -> torch.Tensor:
            candidates, offset = distributed.gather_with_grad(columns[1])
            if len(columns) > 2:
                candidates = torch.cat([candidates, distributed.gather_with_grad(columns[2])[0]])
            device = columns[0].device
            value, dropped = guarded_info_nce_loss(
                columns[0], candidates, config.temperature, offset, excluded.to(device),
                guarded.to(device) if guarded is not None else None, config.fn_margin)
            for key, count in zip(COUNTS, (int(excluded.sum()), dropped, mined)):
                self.window[key] += count
            return value

        return loss

    # --- evaluation, logging, state, artifact ------------------------------------------------------------

    def evaluate(self, encoder: SentenceEncoder, tokenizer: Tokenizer) -> dict[str, float]:
        """nDCG@10, recall@100, MRR@10 of an exact search of the corpus for the dev queries (BEIR's definitions)."""
        dev, corpus = self.data.dev, self.data.corpus
        passages = torch.from_numpy(self._passages(encoder, tokenizer))
        queries = torch.from_numpy(self._embed(encoder, tokenizer, list(dev.texts.values()), self.config.query_prompt))
        top = torch.topk(queries @ passages.T, min(RANKING_DEPTH, len(corpus)), dim=1).indices.tolist()
        rankings = {query_id: [corpus.ids[row] for row in ranked] for query_id, ranked in zip(dev.texts, top)}
        metrics = evaluate(rankings, dev.qrels)
        return {key: metrics[key] for key in ("ndcg@10", "recall@100", "mrr@10")}

    def describe(self, result: dict[str, float]) -> str:
        return (f"dev nDCG@10 {result['ndcg@10']:.4f}, recall@100 {result['recall@100']:.4f}, "
                f"MRR@10 {result['mrr@10']:.4f}")

    def log_record(self) -> dict[str, Any]:
        """The guard's counts since the last metrics line, summed over processes."""
        record = {key: round(distributed.mean_over_processes(float(self.window[key])) * _world_size())
                  for key in COUNTS}
        for key in COUNTS:
            self.totals[key] += record[key]
        self.window = dict.fromkeys(COUNTS, 0)
        return record

    def state_dict(self) -> dict[str, Any]:
        return {"candidates": self.candidates.to_state(), "window": dict(self.window), "totals": dict(self.totals),
                "minings": self.minings, "mined_labelled_excluded": self.mined_labelled_excluded,
                "mining_seconds": self.mining_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.candidates = Candidates.from_state(state["candidates"])
        self.window, self.totals = dict(state["window"]), dict(state["totals"])
        self.minings, self.mined_labelled_excluded = state["minings"], state["mined_labelled_excluded"]
        self.mining_seconds = state["mining_seconds"]

    def artifact_metrics(self) -> dict[str, Any]:
        data = self.data
        metrics = {"train_examples": len(self.pairs), "train_queries": len(data.train.texts),
                   "skipped_queries": data.train.skipped_queries, "skipped_judgments": data.train.skipped_judgments,
                   "corpus_documents": len(data.corpus), "skipped_empty_documents": len(data.corpus.empty_ids),
                   "hard_negatives": self.config.negatives, "minings": self.minings,
                   "mined_labelled_excluded": self.mined_labelled_excluded, **self.totals,
                   "mining_seconds": round(self.mining_seconds, 1)}
        if data.dev is not None:
            metrics["dev_queries"] = len(data.dev.texts)
        return metrics

    def finish_artifact(self, output: Path) -> None:
        """Record the prompts as the artifact's "query" and "passage" prompts (sentence-transformers' config)."""
        prompts = {name: text for name, text in ((QUERY_PROMPT, self.config.query_prompt),
                                                 (PASSAGE_PROMPT, self.config.passage_prompt)) if text}
        if prompts:
            record_prompts(output, prompts)


def _world_size() -> int:
    return torch.distributed.get_world_size() if distributed.is_distributed() else 1


def record_prompts(artifact_dir: Path, prompts: dict[str, str]) -> None:
    """Add `prompts` to the artifact's config_sentence_transformers.json, keeping what it holds (the base's)."""
    path = artifact_dir / art.PROMPTS_FILE
    config = art.read_json(path) if path.is_file() else {}
    config["prompts"] = {**(config.get("prompts") or {}), **prompts}
    art.write_json(path, config)
