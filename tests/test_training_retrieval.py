"""`embedline train --objective retrieval` on a tiny model and a tiny collection: the guarded loss, mining (BM25
and self), the false-negative guard in a batch, model selection by nDCG@10 with the start as a candidate, the
prompts in the artifact, GradCache, bad input as file:line errors, the query split and `diagnose` on pairs."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from embedline import artifact as art
from embedline.cli import main
from embedline.documents import CorpusError
from embedline.retrieval import QrelsError
from embedline.training.data import DataError
from embedline.training.simcse.config import ConfigError, TrainConfig, resolve_config
from embedline.training.simcse.losses import guarded_info_nce_loss, info_nce_loss
from embedline.training.simcse.mining import (
    bm25_candidates, dense_candidates, draw_negatives, interleave, step_generator,
)
from embedline.training.simcse.retrieval import RetrievalTask
from embedline.training.simcse.trainer import train

from tiny_model import WORDS

STOP = {"the", "a", "an", "and", "or", "of", "to", "in", "on", "for", "with", "is", "are", "was", "were", "be",
        "been", "it", "this", "that", "these", "those"}
TOPICS = 10


def write_collection(folder, rng: random.Random) -> dict:
    """10 topics of 4 words; 3 passages and 2 queries a topic, each query judging its topic's passages.

    Beside them: a query without judgments (reported, skipped) and an empty passage that one query judges
    (the judgment skipped), as in Cranfield. Training queries are each topic's first, dev queries its second."""
    content = [w for w in WORDS if w not in STOP]
    rng.shuffle(content)
    topics = [content[4 * t:4 * t + 4] for t in range(TOPICS)]
    filler = content[4 * TOPICS:]
    corpus, train_q, dev_q, train_qrels, dev_qrels = ["doc_id\ttitle\ttext"], ["query_id\ttext"], ["query_id\ttext"], \
        ["query_id\tdoc_id\tscore"], ["query_id\tdoc_id\tscore"]
    for t, words in enumerate(topics):
        for d in range(3):
            body = rng.sample(words, 3) + rng.sample(filler, 5)
            rng.shuffle(body)
            corpus.append(f"d{t}-{d}\t{words[d]} {rng.choice(filler)}\t{' '.join(body)}")
        for role, queries, qrels in (("a", train_q, train_qrels), ("b", dev_q, dev_qrels)):
            queries.append(f"q{t}{role}\t{' '.join(rng.sample(words, 2))} {rng.choice(filler)}")
            qrels += [f"q{t}{role}\td{t}-{d}\t{3 - d}" for d in range(3)]
    corpus.append("d-empty\t\t")
    train_q.append("q-unjudged\tnothing judged here")
    train_qrels.append("q0a\td-empty\t1")
    files = {}
    for name, lines in (("corpus", corpus), ("queries", train_q), ("qrels", train_qrels), ("dev_queries", dev_q),
                        ("dev_qrels", dev_qrels)):
        files[name] = folder / f"{name}.tsv"
        files[name].write_text("\n".join(lines) + "\n")
    return files


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    return write_collection(tmp_path_factory.mktemp("retrieval"), random.Random(0))


def _config(tiny_model_dir, collection, output, **overrides) -> TrainConfig:
    values = dict(objective="retrieval", model=str(tiny_model_dir), output=str(output),
                  **{key: str(path) for key, path in collection.items()}, batch_size=8, max_steps=6, eval_steps=2,
                  log_steps=1, lr=1e-3, device="cpu", mine_depth=5, refresh_steps=2, eval_batch_size=32)
    values.update(overrides)
    return TrainConfig(**values)


# --- the loss ----------------------------------------------------------------------------------------------


def test_guarded_loss_is_info_nce_over_the_candidates_it_keeps():
    torch.manual_seed(0)
    anchors, candidates = torch.randn(3, 8), torch.randn(7, 8)
    excluded = torch.zeros(3, 7, dtype=torch.bool)
    excluded[0, 4] = excluded[2, 1] = True
    excluded[1, 1] = True  # anchor 1's own positive: never taken out
    loss, dropped = guarded_info_nce_loss(anchors, candidates, 0.05, 0, excluded)
    assert dropped == 0
    expected = torch.stack([
        info_nce_loss(anchors[i:i + 1], candidates[[c for c in range(7) if not excluded[i, c] or c == i]],
                      0.05, positive_offset=i - sum(bool(excluded[i, c]) for c in range(i)))
        for i in range(3)]).mean()
    torch.testing.assert_close(loss, expected)
    plain, _ = guarded_info_nce_loss(anchors, candidates, 0.05, 0, torch.zeros(3, 7, dtype=torch.bool))
    torch.testing.assert_close(plain, info_nce_loss(anchors, candidates, 0.05))


def test_the_margin_drops_own_mined_negatives_that_score_near_the_positive():
    """Anchor 0's positive has cosine 0.8; its mined negatives 0.9 (above: dropped), 0.78 (within 0.05: dropped)
    and 0.5 (kept). Another anchor's negative at 0.99 is not anchor 0's to guard: only `guarded` ones are."""
    def unit_at(cosine: float) -> list[float]:
        return [cosine, (1 - cosine ** 2) ** 0.5, 0.0]

    anchors = torch.tensor([[1.0, 0.0, 0.0]])
    candidates = torch.tensor([unit_at(0.8), unit_at(0.9), unit_at(0.78), unit_at(0.5), unit_at(0.99)])
    guarded = torch.tensor([[False, True, True, True, False]])
    none = torch.zeros(1, 5, dtype=torch.bool)
    loss, dropped = guarded_info_nce_loss(anchors, candidates, 0.1, 0, none, guarded, margin=0.05)
    assert dropped == 2
    torch.testing.assert_close(loss, info_nce_loss(anchors, candidates[[0, 3, 4]], 0.1))
    _, dropped = guarded_info_nce_loss(anchors, candidates, 0.1, 0, none, guarded, margin=None)
    assert dropped == 0
    # The guard's decision carries no gradient, the loss does.
    anchors.requires_grad_()
    loss, _ = guarded_info_nce_loss(anchors, candidates, 0.1, 0, none, guarded, margin=0.05)
    loss.backward()
    assert anchors.grad is not None and torch.isfinite(anchors.grad).all()


# --- mining ------------------------------------------------------------------------------------------------


def test_bm25_mining_leaves_each_querys_relevant_passages_out():
    texts = ["wing lift drag", "wing lift", "lift coefficient", "boundary layer", "shock wave", "wing flutter"]
    relevant = {"q": {0: 2, 1: 1}}
    rows, excluded = bm25_candidates(texts, {"q": "wing lift"}, relevant, depth=3)
    assert excluded == 2  # the two relevant passages were the top of BM25's list
    assert rows["q"] == [5, 2] or rows["q"] == [2, 5]  # the other passages with a query word, nothing else
    assert not set(rows["q"]) & set(relevant["q"])


def test_dense_mining_interleaving_and_draws():
    passages = np.eye(5, dtype=np.float32)
    queries = np.array([[0.9, 0.3, 0.2, 0.1, 0.0]], dtype=np.float32)
    rows, excluded = dense_candidates(queries, passages, ["q"], {"q": {0: 1}}, depth=2)
    assert rows == {"q": [1, 2]} and excluded == 1
    assert interleave({"q": [1, 2, 3]}, {"q": [4, 2]}, depth=4) == {"q": [1, 4, 2, 3]}
    first = draw_negatives([7, 8, 9], {0: 1}, 2, 10, step_generator(1, 5))
    assert first == draw_negatives([7, 8, 9], {0: 1}, 2, 10, step_generator(1, 5))  # a pure function of seed, step
    assert len(set(first)) == 2 and set(first) <= {7, 8, 9}
    topped_up = draw_negatives([7], {0: 1, 1: 1}, 3, 10, step_generator(1, 5))  # too few candidates: random others
    assert len(set(topped_up)) == 3 and 7 in topped_up and not {0, 1} & set(topped_up)


def test_a_batch_keeps_labelled_passages_out_of_each_querys_negatives(tiny_model_dir, collection, tmp_path):
    """Two pairs of the same query in one batch: each one's positive is the other's labelled false negative;
    each query's mined negatives are guarded (the margin), nobody else's."""
    task = RetrievalTask(resolve_config(_config(tiny_model_dir, collection, tmp_path / "out", negatives="bm25")))
    assert task.data.train.skipped_queries == 1 and task.data.train.skipped_judgments == 1
    assert task.data.corpus.empty_ids == {"d-empty"}
    task.before_step(None, None, 0)  # BM25 needs no model

    def pair(query_id: str, k: int) -> int:
        return [i for i, (q, _) in enumerate(task.pairs) if q == query_id][k]

    indices = [pair("q0a", 0), pair("q0a", 1), pair("q1a", 0), pair("q2a", 0)]
    batch, _ = task.batch(0, indices, slice(0, 4))
    assert len(batch.columns) == 3 and len(batch.columns[2]) == 4  # one mined negative a query
    pairs = [task.pairs[i] for i in indices]
    far = task.data.corpus.row["d9-0"]  # relevant to none of them
    excluded, guarded = task._masks(pairs, slice(0, 4), [row for _, row in pairs] + [far] * 4, 1)
    assert excluded[0, 1] and excluded[1, 0]  # the same query's other positive
    assert not excluded[0, 0] and not excluded[1, 1]  # their own positives
    assert not excluded[2, 3] and not excluded[3, 2]  # other topics' positives: true in-batch negatives
    assert guarded[0].nonzero().flatten().tolist() == [4] and guarded[3].nonzero().flatten().tolist() == [7]
    near = task.data.corpus.row["d1-2"]  # a mined negative of another query, relevant to q1a
    excluded, _ = task._masks(pairs, slice(0, 4), [row for _, row in pairs] + [far, far, far, near], 1)
    assert excluded[2, 7] and not excluded[0, 7]
    assert not set(task.data.train.relevant["q0a"]) & set(task.candidates.rows["q0a"])


# --- training end to end -----------------------------------------------------------------------------------


def test_training_writes_an_artifact_selected_by_ndcg_with_its_prompts(tiny_model_dir, collection, tmp_path, capsys):
    """Through `embedline train`: prompts recorded as the artifact's "query"/"passage" prompts, the names
    `index` and search pick; metrics with start, best and last nDCG@10 and the guard's counts."""
    out = tmp_path / "out"
    args = ["train", "--objective", "retrieval", "--model", str(tiny_model_dir), "--output", str(out),
            "--corpus", str(collection["corpus"]), "--queries", str(collection["queries"]),
            "--qrels", str(collection["qrels"]), "--dev-queries", str(collection["dev_queries"]),
            "--dev-qrels", str(collection["dev_qrels"]), "--query_prompt", "query: ", "--passage_prompt", "passage: ",
            "--negatives=bm25+self", "--batch_size=8", "--max_steps=6", "--eval_steps=2", "--log_steps=1",
            "--lr=1e-3", "--device=cpu", "--mine_depth=5", "--refresh_steps=2", "--eval_batch_size=32"]
    assert main(args) == 0
    assert "dev_ndcg@10:" in capsys.readouterr().err
    artifact = art.load_artifact(out)
    assert artifact.prompts == {"query": "query: ", "passage": "passage: "}
    from embedline.search.store import ModelRecord

    record = ModelRecord.for_model(artifact.name, artifact.dim, artifact.fingerprint, artifact.prompts)
    assert (record.query_prompt, record.passage_prompt) == ("query", "passage")
    meta = artifact.metadata
    training, metrics = meta["training"], meta["metrics"]
    assert training["objective"] == "retrieval" and training["title_field"] == "title"
    assert training["max_seq_length"] == 64 and training["lr"] == 1e-3  # auto: the base model's length (< 256)
    assert {"dev_ndcg@10_start", "dev_ndcg@10", "dev_ndcg@10_last", "dev_recall@100", "dev_mrr@10"} <= metrics.keys()
    assert metrics["best_step"] in (0, 2, 4, 6) and metrics["dev_queries"] == TOPICS
    assert metrics["train_examples"] == 3 * TOPICS and metrics["skipped_queries"] == 1
    assert metrics["minings"] == 3 and metrics["hard_negatives"] == "bm25+self"  # steps 0, 2 and 4
    assert metrics["mined_negatives"] == 6 * 8 and metrics["false_negatives_labelled"] > 0
    records = [json.loads(line) for line in (out / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "dev_ndcg@10" in r] == [0, 2, 4, 6]
    assert all("false_negatives_margin" in r for r in records if "loss" in r)
    from sentence_transformers import SentenceTransformer

    prompts = SentenceTransformer(str(out), device="cpu").prompts  # sentence-transformers reads them as they are
    assert (prompts["query"], prompts["passage"]) == ("query: ", "passage: ")


def test_the_start_is_kept_when_no_step_beats_it(tiny_model_dir, collection, tmp_path, monkeypatch, caplog):
    calls = []

    def falling(self, encoder, tokenizer):
        calls.append(1)
        return {"ndcg@10": 0.5 - 0.01 * len(calls), "recall@100": 0.9, "mrr@10": 0.6}

    monkeypatch.setattr(RetrievalTask, "evaluate", falling)
    with caplog.at_level("WARNING"):
        train(_config(tiny_model_dir, collection, tmp_path / "out", negatives="none"))
    metrics = art.load_artifact(tmp_path / "out").metadata["metrics"]
    assert metrics["best_step"] == 0 and metrics["kept_start"] is True
    assert metrics["dev_ndcg@10_start"] == metrics["dev_ndcg@10"] == 0.49 and metrics["dev_ndcg@10_last"] == 0.46
    assert "no step beat the starting model" in caplog.text
    start, written = load_file(tiny_model_dir / "model.safetensors"), load_file(tmp_path / "out/model.safetensors")
    assert all(torch.equal(start[k], written[k]) for k in start)


def test_gradcache_trains_the_same_weights_as_the_plain_step(tiny_model_dir, collection, tmp_path):
    """Without dropout, the cached (GradCache) step with 5-text chunks equals the plain one: mined negatives and
    the guard's masks ride on the embedding columns, which both steps hand the same loss."""
    common = dict(negatives="bm25", dropout=0.0, max_steps=2, dev_queries="", dev_qrels="")
    train(_config(tiny_model_dir, collection, tmp_path / "plain", **common))
    train(_config(tiny_model_dir, collection, tmp_path / "cached", mini_batch_size=5, **common))
    plain, cached = load_file(tmp_path / "plain/model.safetensors"), load_file(tmp_path / "cached/model.safetensors")
    for name in plain:
        torch.testing.assert_close(plain[name], cached[name], rtol=1e-4, atol=1e-5)


# --- bad input and configuration ---------------------------------------------------------------------------


def _with(collection, tmp_path, name: str, text: str) -> dict:
    files = dict(collection)
    files[name] = tmp_path / f"bad-{name}.tsv"
    files[name].write_text(text)
    return files


@pytest.mark.parametrize("name, text, error, message", [
    ("qrels", "query_id\tdoc_id\tscore\nq0a\td0-0\t1\nq-nope\td0-1\t1\n", QrelsError,
     "bad-qrels.tsv:3: query 'q-nope' is not in the queries file"),
    ("qrels", "query_id\tdoc_id\tscore\nq0a\td0-0\t1\nq0a\td-nope\t1\n", QrelsError,
     "bad-qrels.tsv:3: document 'd-nope' is not in the corpus"),
    ("dev_qrels", "query_id\tdoc_id\tscore\nq1b\td-nope\t2\n", QrelsError,
     "bad-dev_qrels.tsv:2: document 'd-nope' is not in the corpus"),
    ("qrels", "query_id\tdoc_id\tscore\n", QrelsError, "bad-qrels.tsv: no judgments"),
    ("qrels", "", CorpusError, "bad-qrels.tsv: empty file"),
    ("corpus", "", CorpusError, "bad-corpus.tsv: empty file"),
    ("corpus", "doc_id\ttext\n", CorpusError, "bad-corpus.tsv: no documents"),
    ("corpus", "doc_id\ttext\nd1\tsome text\nd1\tagain\n", CorpusError, "bad-corpus.tsv:3: duplicate id 'd1'"),
    ("queries", "query_id\ttext\n", QrelsError, "bad-queries.tsv: no queries"),
    ("qrels", "query_id\tdoc_id\tscore\nq0a\td0-0\t0\n", QrelsError, "no query has a relevant judgment"),
])
def test_bad_input_is_a_clear_error_naming_the_file_and_line(tiny_model_dir, collection, tmp_path, name, text, error,
                                                             message):
    files = _with(collection, tmp_path, name, text)
    config = _config(tiny_model_dir, files, tmp_path / "out", title_field="")
    with pytest.raises(error) as caught:
        train(config)
    assert message in str(caught.value)


def test_the_cli_reports_bad_input_in_one_line(tiny_model_dir, collection, tmp_path, capsys):
    files = _with(collection, tmp_path, "qrels", "query_id\tdoc_id\tscore\nq0a\td-nope\t1\n")
    code = main(["train", "--objective", "retrieval", "--model", str(tiny_model_dir), "--output", str(tmp_path / "o"),
                 "--corpus", str(files["corpus"]), "--queries", str(files["queries"]), "--qrels", str(files["qrels"]),
                 "--device=cpu"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1
    assert last == "embedline train: error: bad-qrels.tsv:2: document 'd-nope' is not in the corpus"


def test_queries_without_judgments_are_reported_and_skipped(tiny_model_dir, collection, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        task = RetrievalTask(resolve_config(_config(tiny_model_dir, collection, tmp_path / "out")))
    assert "1 of 11 queries have no relevant judgment in qrels.tsv: skipped" in caplog.text
    assert "1 relevant judgments name an empty document: skipped" in caplog.text
    assert "q-unjudged" not in task.data.train.texts and len(task) == 3 * TOPICS


@pytest.mark.parametrize("overrides, message", [
    (dict(train_file="x.csv"), "--train_file: not read by --objective retrieval"),
    (dict(qrels=""), "--objective retrieval needs --qrels"),
    (dict(dev_qrels=""), "--dev_queries and --dev_qrels go together"),
    (dict(negatives="random"), "--negatives must be one of none, bm25, self, bm25+self"),
    (dict(mine_depth=1, negatives_per_query=2), "--mine_depth must be >= --negatives_per_query"),
    (dict(fn_margin=-0.1), "--fn_margin must be in [0, 2]"),
    (dict(matryoshka_dims=(16,)), "--matryoshka_dims is not supported with --objective retrieval"),
    (dict(objective="sup", train_file="x.csv"), "--corpus, --queries, --qrels, --dev_queries, --dev_qrels: not "
                                                "read by --objective sup"),
])
def test_config_errors_name_the_option(tiny_model_dir, collection, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("+", r"\+")):
        resolve_config(_config(tiny_model_dir, collection, tmp_path / "out", **overrides))


def test_the_cli_rejects_an_unknown_retrieval_key(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--objective", "retrieval", "--fn-margins=0.1"])
    assert "valid training-config keys" in capsys.readouterr().err


# --- the split and diagnose --------------------------------------------------------------------------------


def test_the_query_split_is_deterministic_and_disjoint(collection, tmp_path):
    from embedline.retrieval import read_qrels, read_queries
    from embedline.training.simcse.retrieval_split import write_split

    first = write_split(collection["dev_queries"], collection["dev_qrels"], tmp_path / "a", test=3, dev=2, seed=7)
    again = write_split(collection["dev_queries"], collection["dev_qrels"], tmp_path / "b", test=3, dev=2, seed=7)
    assert first == again and [len(first[s]) for s in ("train", "dev", "test")] == [5, 2, 3]
    assert set(first["train"]).isdisjoint(first["test"]) and set(first["dev"]).isdisjoint(first["test"])
    assert write_split(collection["dev_queries"], collection["dev_qrels"], tmp_path / "c", 3, 2, seed=8) != first
    assert list(read_queries(tmp_path / "a/test.queries.tsv")) == sorted(first["test"], key=lambda q: int(q[1:-1]))
    assert set(read_qrels(tmp_path / "a/test.qrels.tsv")) == set(first["test"])


def test_diagnose_measures_query_passage_pairs(tiny_model_dir, collection, tmp_path):
    from embedline.training.diagnostics.diagnose import RetrievalFiles, diagnose

    files = RetrievalFiles(str(collection["corpus"]), str(collection["queries"]), str(collection["qrels"]))
    report = diagnose(tiny_model_dir, None, tmp_path / "diag", method="tsne", retrieval=files,
                      baseline=tiny_model_dir)
    assert report["alignment_source"] == "query-passage pairs of qrels.tsv (score > 0)"
    assert report["alignment_positives"] == 3 * TOPICS and report["queries"] == TOPICS
    assert report["passages"] == 3 * TOPICS and report["texts_in_file"] == 4 * TOPICS
    assert 0 < report["alignment"] < 4 and report["uniformity"] < 0
    assert {"uniformity_queries", "uniformity_passages", "positive_cosine", "random_pair_cosine"} <= report.keys()
    assert report["deltas"]["alignment"] == 0.0  # the same model as its baseline
    assert (tmp_path / "diag/diagnosis.json").is_file()
