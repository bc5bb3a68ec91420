"""`train-classifier --pairs-file / --pairs-weight / --hard-schedule`: user-written contrast pairs in stage 1,
the hard-negative curriculum, and the guarantee that the pairs never reach the head."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import write_labeled_tsv
from embedline.cli import main as embedline_main
from embedline.training.fewshot.classifier import ClassifierConfig, ClassifierConfigError, stage1_examples, trainer_order
from embedline.training.data import DataError, TrainingData, batch_indices, steps_per_epoch
from embedline.training.fewshot.head import load_train_examples
from embedline.training.labeled_data import LabeledData, read_contrast_pairs
from embedline.training.fewshot.pairs import PairSettings, add_user_pairs, hard_share, make_class_pairs, make_pairs


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


TRIPLES_TSV = "anchor\tpositive\tnegative\nbook a table\treserve a seat\tbook a flight\ncancel it\tcall it off\tcancel the card\n"
PAIRS_CSV = 'text_a,text_b,same\n"hi, there",hello,1\nrefund please,refund status,false\nok,okay,TRUE\n'


def _labelled(n_per_class: int = 4) -> LabeledData:
    texts = tuple(f"{label}{i}" for label in "abc" for i in range(n_per_class))
    return LabeledData(Path("t.tsv"), texts, tuple(t[0] for t in texts))


# ---- the pairs file -----------------------------------------------------------------------------------


def test_reads_both_formats(tmp_path):
    triples = read_contrast_pairs(write(tmp_path / "p.tsv", TRIPLES_TSV))
    assert triples.is_triples and len(triples) == 2
    assert triples.columns == (("book a table", "cancel it"), ("reserve a seat", "call it off"),
                               ("book a flight", "cancel the card"))
    pairs = read_contrast_pairs(write(tmp_path / "p.csv", PAIRS_CSV))
    assert not pairs.is_triples and pairs.same == (1.0, 0.0, 1.0)
    assert pairs.columns == (("hi, there", "refund please", "ok"), ("hello", "refund status", "okay"))


@pytest.mark.parametrize("name, content, problem", [
    ("p.tsv", "anchor\tpositive\tnegative\na\tb\tc\nd\te\n", ":3: expected 3 fields"),
    ("p.tsv", "anchor\tpositive\tnegative\na\t \tc\n", ":2: empty positive"),
    ("p.csv", "text_a,text_b,same\na,b,1\nc,d,maybe\n", ":3: same must be 1/0"),
    ("p.csv", "text_a,text_b,same\n,b,0\n", ":2: empty text_a"),
    ("p.csv", "sent0,sent1\na,b\n", ":1: a pairs file needs the columns"),
    ("p.csv", "text_a,text_b,same\n", "no pairs"),
    ("p.txt", "anything\n", "expected a .tsv or .csv"),
])
def test_bad_pairs_files_name_the_file_and_line(tmp_path, name, content, problem):
    path = write(tmp_path / name, content)
    with pytest.raises(DataError) as error:
        read_contrast_pairs(path)
    assert str(path) in str(error.value) and problem in str(error.value)


def test_label_column_is_read_and_checked_against_the_training_labels(tmp_path, capsys, tiny_model_dir):
    pairs = read_contrast_pairs(write(tmp_path / "p.tsv", "anchor\tpositive\tnegative\tlabel\n"
                                      "great film\tsuperb movie\tawful film\tpositive\n"
                                      "dull song\tboring tune\tlovely song\t\n"))
    assert pairs.labels == ("positive", "") and pairs.lines == (2, 3)
    with pytest.raises(DataError, match=r"p.csv:3: label 'x' on a row with same = 0"):
        read_contrast_pairs(write(tmp_path / "p.csv", "text_a,text_b,same,label\na,b,1,positive\nc,d,0,x\n"))
    bad = write(tmp_path / "bad.tsv", "anchor\tpositive\tnegative\tlabel\na\tb\tc\tpositive\nd\te\tf\tpostive\n")
    errors = _cli_errors(tmp_path, capsys, tiny_model_dir, bad)
    assert len(errors) == 1 and f"{bad}:3: label 'postive' is not in the training file" in errors[0], errors
    assert "negative, neutral, positive" in errors[0]
    # supcon takes pairs rows only with their class.
    unlabelled = write(tmp_path / "nolabel.tsv", TRIPLES_TSV)
    errors = _cli_errors(tmp_path, capsys, tiny_model_dir, unlabelled, "--loss", "supcon")
    assert "nolabel.tsv:2: --loss supcon needs a label column" in errors[0]


def _cli_errors(tmp_path, capsys, model_dir, pairs, *options) -> list[str]:
    """The error lines of a train-classifier run with `pairs` that must fail before training."""
    train = write_labeled_tsv(tmp_path / "train.tsv", per_class=4)
    argv = ["train-classifier", "--model", str(model_dir), "--train-file", str(train),
            "--output", str(tmp_path / "out"), "--pairs-file", str(pairs), *options]
    assert embedline_main(argv) == 1
    assert not (tmp_path / "out").exists()
    return [line for line in capsys.readouterr().err.splitlines() if "error:" in line]


def test_cli_bad_pairs_row_is_a_one_line_error_before_training(tmp_path, capsys, tiny_model_dir):
    pairs = write(tmp_path / "pairs.csv", "text_a,text_b,same\na,b,1\nc,d,2\n")
    errors = _cli_errors(tmp_path, capsys, tiny_model_dir, pairs)
    assert len(errors) == 1 and f"{pairs}:3: same must be" in errors[0], errors


def test_help_lists_the_new_options(capsys):
    with pytest.raises(SystemExit):
        embedline_main(["train-classifier", "--help"])
    shown = capsys.readouterr().out
    for flag in ("--pairs-file", "--pairs-weight", "--hard-schedule"):
        assert flag in shown


@pytest.mark.parametrize("changes, problem", [
    ({"pairs_weight": 0.0}, "--pairs-weight must be > 0"),
    ({"pairs_file": "p.tsv", "frozen_body": True}, "cannot go with --frozen-body"),
    ({"hard_schedule": "linear", "epochs": 2}, "use --epochs 1"),
    ({"loss": "supcon", "hard_schedule": "linear"}, "--hard-schedule does not apply"),
])
def test_inconsistent_settings(changes, problem):
    with pytest.raises(ClassifierConfigError, match=problem):
        ClassifierConfig(train_file="t.tsv", output="o", **changes).validate()


# ---- mixing into stage 1 ------------------------------------------------------------------------------


def test_user_rows_join_stage1_weighted(tmp_path):
    data = _labelled()
    triples = read_contrast_pairs(write(tmp_path / "p.tsv", TRIPLES_TSV))
    config = ClassifierConfig(train_file="t.tsv", output="o", iterations=4, hard_fraction=0.0, seed=3)
    plain, record = stage1_examples(config, data, None)
    assert "pairs_file" not in record
    mixed, record = stage1_examples(config, data, None, triples)
    # Each anchor/positive/negative row: round(1.0 x 4) = 4 repeats, each (a, p, 1) + (a, n, 0).
    assert len(mixed) == len(plain) + 2 * 4 * 2 and record["pairs_file"]["repeats"] == 4
    rows = list(zip(*mixed.columns, mixed.labels))
    assert rows.count(("book a table", "reserve a seat", 1.0)) == 4
    assert rows.count(("book a table", "book a flight", 0.0)) == 4
    i = rows.index(("cancel it", "call it off", 1.0))
    assert rows[i + 1] == ("cancel it", "cancel the card", 0.0)  # kept adjacent
    # The label-drawn examples are unchanged, in order, around the inserted rows.
    user = {("book a table",), ("cancel it",)}
    assert [r for r in rows if (r[0],) not in user] == list(zip(*plain.columns, plain.labels))
    heavier, record = stage1_examples(dataclasses.replace(config, pairs_weight=2.5), data, None, triples)
    assert record["pairs_file"]["repeats"] == 10 and len(heavier) == len(plain) + 2 * 10 * 2
    assert record["pairs_file"]["share"] == pytest.approx(40 / len(heavier), abs=1e-4)
    light, record = stage1_examples(dataclasses.replace(config, pairs_weight=0.01), data, None, triples)
    assert record["pairs_file"]["repeats"] == 1  # at least once


def test_same_rows_become_labelled_pairs_and_need_the_pair_loss(tmp_path):
    pairs = read_contrast_pairs(write(tmp_path / "p.csv", PAIRS_CSV))
    base = make_pairs(list(_labelled().texts), list(_labelled().labels), settings=PairSettings(iterations=1), seed=0)
    mixed = add_user_pairs(base, pairs.columns, pairs.same, repeats=2, seed=0)
    rows = list(zip(*mixed.columns, mixed.labels))
    assert rows.count(("hi, there", "hello", 1.0)) == 2 and rows.count(("refund please", "refund status", 0.0)) == 2
    triples = TrainingData(Path("x"), ("sent0", "sent1", "hard_neg"), (("a",), ("b",), ("c",)), None, 0)
    with pytest.raises(DataError, match=r"need a pair loss \(--loss contrastive or cosine\)"):
        add_user_pairs(triples, pairs.columns, pairs.same, repeats=1, seed=0)


def test_triplet_loss_takes_user_triples(tmp_path):
    triples = read_contrast_pairs(write(tmp_path / "p.tsv", TRIPLES_TSV))
    config = ClassifierConfig(train_file="t.tsv", output="o", iterations=2, loss="triplet", hard_fraction=0.0)
    mixed, _ = stage1_examples(config, _labelled(), None, triples)
    assert list(zip(*mixed.columns)).count(("book a table", "reserve a seat", "book a flight")) == 2


# ---- the curriculum ------------------------------------------------------------------------------------


def test_hard_share_schedules():
    assert hard_share("constant", 0.5, 0.0) == hard_share("constant", 0.5, 1.0) == 0.5
    assert hard_share("linear", 0.6, 0.0) == 0.0 and hard_share("linear", 0.6, 1.0) == pytest.approx(0.6)
    assert hard_share("linear", 0.6, 0.5) == pytest.approx(0.3)
    with pytest.raises(DataError, match="hard_schedule"):
        PairSettings(hard_schedule="cosine")


def _circle():
    # Anchors on a circle, labels alternating: each anchor's single closest other-label example is known,
    # and with 10 classes a uniform negative is that one only 1 time in 18.
    n = 40
    angles = np.arange(n) * 2 * np.pi / n
    embeddings = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    texts, labels = [f"t{i}" for i in range(n)], [f"c{i % 10}" for i in range(n)]
    closest = {texts[i]: {texts[(i - 1) % n], texts[(i + 1) % n]} for i in range(n)}
    return texts, labels, embeddings, closest


def test_linear_schedule_starts_easy_and_ends_at_the_fraction():
    texts, labels, embeddings, closest = _circle()
    settings = PairSettings(iterations=30, hard_fraction=0.8, hard_pool=2, hard_schedule="linear")
    pairs = make_pairs(texts, labels, embeddings, settings, seed=0)
    negatives = [(a, b) for a, b, y in zip(*pairs.columns, pairs.labels) if y == 0.0]
    hard = np.array([b in closest[a] for a, b in negatives], dtype=float)
    tenth = len(hard) // 10
    assert hard[:tenth].mean() < 0.15  # ~0.04 drawn hard + ~0.06 uniform hits
    assert 0.7 < hard[-tenth:].mean() < 0.95  # ~0.76 drawn hard + uniform hits
    constant = make_pairs(texts, labels, embeddings, PairSettings(30, 0, 0.8, 2), seed=0)
    neg = [(a, b) for a, b, y in zip(*constant.columns, constant.labels) if y == 0.0]
    flat = np.array([b in closest[a] for a, b in neg], dtype=float)
    assert abs(flat[:tenth].mean() - flat[-tenth:].mean()) < 0.1


def test_constant_is_the_default_and_unchanged():
    texts, labels, embeddings, _ = _circle()
    default = make_pairs(texts, labels, embeddings, PairSettings(iterations=3, hard_fraction=0.5), seed=1)
    explicit = make_pairs(texts, labels, embeddings,
                          PairSettings(iterations=3, hard_fraction=0.5, hard_schedule="constant"), seed=1)
    assert default == explicit and ClassifierConfig(train_file="t", output="o").hard_schedule == "constant"


def test_trainer_order_makes_the_trainer_visit_rows_in_sequence():
    n, batch, seed = 23, 4, 7
    examples = TrainingData(Path("x"), ("sent0", "sent1"), (tuple(f"a{i}" for i in range(n)),
                            tuple(f"b{i}" for i in range(n))), tuple(float(i % 2) for i in range(n)), 0)
    laid = trainer_order(examples, batch, seed)
    visited = [laid.columns[0][i] for s in range(steps_per_epoch(n, batch)) for i in batch_indices(n, batch, seed, s)]
    assert visited == [f"a{i}" for i in range(len(visited))]
    assert sorted(zip(*laid.columns, laid.labels)) == sorted(zip(*examples.columns, examples.labels))


# ---- a tiny run ---------------------------------------------------------------------------------------


def test_tiny_run_with_pairs_and_linear_schedule(tiny_model_dir, tmp_path):
    from embedline.training.fewshot.classifier import train_classifier

    train_file = write_labeled_tsv(tmp_path / "train.tsv", per_class=4)
    # The classifier has no dev/eval split: the head is fit on the labelled texts, and the user pairs are
    # stage-1 data only.
    pairs_file = write(tmp_path / "pairs.tsv", "anchor\tpositive\tnegative\n"
                       "zz user anchor\tzz user positive\tzz user negative\n")
    artifact = train_classifier(ClassifierConfig(
        train_file=str(train_file), output=str(tmp_path / "out"), model=str(tiny_model_dir), iterations=3,
        batch_size=8, lr=1e-3, neighbours=3, device="cpu", pairs_file=str(pairs_file), pairs_weight=1.0,
        hard_schedule="linear", hard_fraction=1.0,
    ))
    record = artifact.metadata["classifier"]
    stage1 = record["stage1"]
    assert stage1["hard_schedule"] == "linear" and stage1["pairs_file"]["examples"] == 2 * 3
    with open(artifact.path / "run" / "pairs.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))[1:]
    assert sum(r[0] == "zz user anchor" for r in rows) == 6
    assert len(rows) == stage1["drawn_examples"] + 6
    # The head sees the labelled texts only: 12 examples, their labels, no user text.
    assert record["head"]["train_examples"] == 12
    embeddings, labels = load_train_examples(artifact.head_dir)
    assert len(embeddings) == 12 and set(labels) == {"positive", "negative", "neutral"}
    assert json.loads((artifact.head_dir / "labels.json").read_text()) == sorted({"positive", "negative", "neutral"})


def test_class_pairs_share_a_class_and_carry_its_id():
    texts = [f"t{i}" for i in range(9)]
    labels = ["b", "b", "b", "a", "a", "a", "c", "c", "solo"]
    pairs = make_class_pairs(texts, labels, PairSettings(iterations=2), seed=1)
    by_text = dict(zip(texts, labels))
    ids = {"a": 0.0, "b": 1.0, "c": 2.0, "solo": 3.0}
    assert len(pairs) == 2 * 8  # every anchor with a classmate, each round; "solo" has none
    for anchor, positive, class_id in zip(*pairs.columns, pairs.labels):
        assert anchor != positive and by_text[anchor] == by_text[positive] and ids[by_text[anchor]] == class_id
    assert len(make_class_pairs(texts, labels, PairSettings(iterations=2, max_pairs=5), seed=1)) == 5


def test_tiny_supcon_run(tiny_model_dir, tmp_path):
    from embedline.training.fewshot.classifier import train_classifier

    train_file = write_labeled_tsv(tmp_path / "train.tsv", per_class=4)
    artifact = train_classifier(ClassifierConfig(
        train_file=str(train_file), output=str(tmp_path / "out"), model=str(tiny_model_dir), loss="supcon",
        iterations=2, batch_size=8, lr=1e-3, neighbours=0, device="cpu", head_c=0, pairs_weight=1.0,
        pairs_file=str(write(tmp_path / "p.tsv", "anchor\tpositive\tnegative\tlabel\n"
                                                 "zz great\tzz superb\tzz awful\tpositive\n")),
    ))
    with open(artifact.path / "run" / "pairs.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["sent0", "sent1", "label"] and len(rows) - 1 == 2 * 12 + 2
    assert {row[2] for row in rows[1:]} == {"0", "1", "2"}
    assert artifact.metadata["training"]["objective"] == "supcon"
    # Labelled user rows join as (anchor, positive, class id): "positive" is class 2 of negative/neutral/positive.
    user = [r for r in rows[1:] if r[0] == "zz great"]
    assert len(user) == 2 and all(r[1] == "zz superb" and r[2] == "2" for r in user)
    head = artifact.metadata["classifier"]["head"]  # --head-c 0: chosen by cross-validation, both recorded
    assert head["c"] in (0.1, 1.0, 10.0, 100.0) and set(head["cv_accuracy_by_c"]) == {"0.1", "1", "10", "100"}
