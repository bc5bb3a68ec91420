"""The few-shot classifier without a server: data checks, pair sampling, the head and its ONNX graph,
`embedline train-classifier` end to end on the tiny model, and its one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import write_labeled_tsv
from embedline.cli import main as embedline_main
from embedline.training.data import DataError
from embedline.training.fewshot.head import (
    choose_c, fit_head, head_to_onnx, load_head, load_train_examples, nearest_labels, save_head,
)
from embedline.training.labeled_data import read_labeled, sample_shots
from embedline.training.fewshot.pairs import PairSettings, make_pairs, make_triples


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---- data -------------------------------------------------------------------------------------------


def test_reads_tsv_and_quoted_csv_and_skips_blank_lines(tmp_path):
    tsv = read_labeled(write(tmp_path / "a.tsv", 'text\tlabel\n"quoted" start\tx\n\nsecond\ty\n'))
    assert tsv.texts == ('"quoted" start', "second") and tsv.classes == ("x", "y")
    csv_data = read_labeled(write(tmp_path / "a.csv", 'id,label,text\n1,x,"a, b"\n2,y,"c ""d"""\n'))
    assert csv_data.texts == ("a, b", 'c "d"') and csv_data.labels == ("x", "y")


@pytest.mark.parametrize("content, problem", [
    ("sentence\tlabel\nhello\tx\n", "missing column(s) text"),
    ("text\tcategory\nhello\tx\n", "missing column(s) label"),
    ("text\tlabel\nhello\tx\n\tx\nbye\ty\n", ":3: empty text"),
    ("text\tlabel\nhello\tx\nbye\t\n", ":3: empty label"),
    ("text\tlabel\nhello\tx\nbye\tx\n", "only the label 'x'"),
    ("text\tlabel\nhello\tx\textra\n", "expected 2 fields"),
])
def test_bad_files_name_the_file_and_the_problem(tmp_path, content, problem):
    path = write(tmp_path / "bad.tsv", content)
    with pytest.raises(DataError) as error:
        read_labeled(path)
    assert str(path) in str(error.value) and problem in str(error.value)


def test_shots_are_per_class_seeded_and_short_classes_are_named(tmp_path):
    data = read_labeled(write_labeled_tsv(tmp_path / "t.tsv", per_class=10))
    first, again, other = (sample_shots(data, 4, seed) for seed in (3, 3, 4))
    assert first == again and first != other
    assert first.counts() == {"negative": 4, "neutral": 4, "positive": 4}
    uneven = read_labeled(write(tmp_path / "u.tsv", "text\tlabel\na\tx\nb\tx\nc\ty\n"))
    with pytest.raises(DataError, match=r"u\.tsv: --shots 2 needs 2 examples per class, but 'y' has 1"):
        sample_shots(uneven, 2, 0)


# ---- pairs ------------------------------------------------------------------------------------------


def test_pairs_are_balanced_and_labelled_by_class():
    texts = [f"t{i}" for i in range(12)]
    labels = ["a", "b", "c"] * 4
    label_of = dict(zip(texts, labels))
    pairs = make_pairs(texts, labels, settings=PairSettings(iterations=3, hard_fraction=0.0), seed=0)
    assert len(pairs) == 2 * 3 * 12 and pairs.labels.count(1.0) == pairs.labels.count(0.0)
    for a, b, y in zip(*pairs.columns, pairs.labels):
        assert (label_of[a] == label_of[b]) == (y == 1.0) and a != b
    capped = make_pairs(texts, labels, settings=PairSettings(iterations=3, max_pairs=10), seed=0)
    assert len(capped) == 10 and capped.labels.count(1.0) == 5


def test_hard_negatives_are_the_closest_other_label_examples():
    # 1-D "embeddings" on a circle: for each anchor the closest other-label example is known.
    angles = np.array([0.0, 0.1, 1.0, 1.1, 2.0, 2.1])
    embeddings = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    texts, labels = [f"t{i}" for i in range(6)], ["a", "b", "a", "b", "a", "b"]
    settings = PairSettings(iterations=5, hard_fraction=1.0, hard_pool=1)
    triples = make_triples(texts, labels, embeddings, settings, seed=0)
    closest_other = {"t0": "t1", "t1": "t0", "t2": "t3", "t3": "t2", "t4": "t5", "t5": "t4"}
    for anchor, positive, negative in zip(*triples.columns):
        assert negative == closest_other[anchor] and labels[texts.index(positive)] == labels[texts.index(anchor)]


# ---- head -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blobs():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16))
    labels = ["cat"] * 30 + ["dog"] * 8 + ["eel"] * 4  # imbalanced
    x = np.stack([centres["cat dog eel".split().index(y)] + 0.8 * rng.normal(size=16) for y in labels])
    return x.astype(np.float32), labels


def test_head_onnx_reproduces_the_python_head(blobs, tmp_path):
    import onnxruntime as ort

    x, labels = blobs
    head = fit_head(x, labels, c=10.0)
    session = ort.InferenceSession(head_to_onnx(head).SerializeToString(), providers=["CPUExecutionProvider"])
    queries = np.concatenate([x, 3.0 * x[:5]])  # unnormalized inputs: the graph normalizes like the head
    (onnx_probabilities,) = session.run(["probabilities"], {"sentence_embedding": queries})
    np.testing.assert_allclose(onnx_probabilities, head.probabilities(queries), atol=1e-6)
    assert onnx_probabilities.shape == (len(queries), 3)

    save_head(head, tmp_path / "head", train_embeddings=x, train_labels=labels)
    assert json.loads((tmp_path / "head" / "labels.json").read_text()) == ["cat", "dog", "eel"]
    assert not list((tmp_path / "head").glob("*.pkl"))
    reloaded = load_head(tmp_path / "head")
    np.testing.assert_array_equal(reloaded.weight, head.weight)
    train_x, train_labels = load_train_examples(tmp_path / "head")
    np.testing.assert_allclose(np.linalg.norm(train_x, axis=1), 1.0, atol=1e-6)
    assert train_labels == labels


def test_head_matches_scikit_learn_and_class_weights_help_the_rare_class(blobs):
    from sklearn.linear_model import LogisticRegression

    x, labels = blobs
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    reference = LogisticRegression(C=10.0, class_weight="balanced", tol=1e-10, max_iter=5000).fit(unit, labels)
    np.testing.assert_allclose(fit_head(x, labels, c=10.0).probabilities(x), reference.predict_proba(unit), atol=1e-4)
    rare = np.array(labels) == "eel"
    weighted = fit_head(x, labels, c=0.5).probabilities(x)[rare, 2].mean()
    unweighted = fit_head(x, labels, c=0.5, class_weight=False).probabilities(x)[rare, 2].mean()
    assert weighted > unweighted


def test_head_c_is_chosen_by_cross_validation_on_the_training_examples(blobs):
    from sklearn.linear_model import LogisticRegression

    x, labels = blobs
    candidates = (0.01, 1.0, 100.0)
    best, scores = choose_c(x, labels, candidates=candidates, folds=4)
    # The same folds by hand (each class dealt round-robin in file order), scored with scikit-learn.
    y = np.array(labels)
    fold = np.empty(len(y), dtype=int)
    for label in set(labels):
        members = np.flatnonzero(y == label)
        fold[members] = np.arange(len(members)) % 4
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    for c in candidates:
        correct = sum(int((LogisticRegression(C=c, class_weight="balanced", max_iter=5000)
                           .fit(unit[fold != k], y[fold != k]).predict(unit[fold == k]) == y[fold == k]).sum())
                      for k in range(4))
        assert scores[f"{c:g}"] == pytest.approx(correct / len(y))
    top = max(scores.values())
    assert best == min(c for c in candidates if scores[f"{c:g}"] == top)  # ties: the stronger regularization
    # Nothing to hold out (one example per class): the middle candidate, C = 10, and no scores.
    assert choose_c(x[[0, 30, 38]], ["cat", "dog", "eel"]) == (10.0, {})


def test_knn_agreement_counts_same_label_neighbours():
    from embedline.training.diagnostics.plot_space import knn_agreement

    points = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert knn_agreement(points, ("a", "a", "b", "b"), k=1) == 1.0
    assert knn_agreement(points, ("a", "b", "a", "b"), k=1) == 0.0


def test_nearest_labels_are_ordered_by_similarity():
    train = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    assert nearest_labels(np.array([[1.0, 0.1]]), train, ["x", "y", "z"], k=2) == [["x", "z"]]
    assert nearest_labels(np.array([[0.0, 1.0]]), train, ["x", "y", "z"], k=9) == [["y", "z", "x"]]


# ---- the trainer ------------------------------------------------------------------------------------


def test_trained_artifact_has_a_head_that_predicts_like_in_process(tiny_classifier):
    from embedline.encoder import load_encoder
    from embedline.tokenization import load_tokenizer
    from embedline.training.evaluate import embed_texts

    assert tiny_classifier.has_head()
    record = tiny_classifier.metadata["classifier"]
    assert record["labels"] == ["negative", "neutral", "positive"]
    assert record["head"]["class_counts"] == {"negative": 6, "neutral": 6, "positive": 6}
    assert tiny_classifier.metadata["training"]["objective"] == "contrastive"  # the SimCSE trainer ran stage 1
    pairs = (tiny_classifier.path / "run" / "pairs.csv").read_text().splitlines()
    assert pairs[0] == "sent0,sent1,label" and len(pairs) == 1 + 2 * 4 * 18
    head = load_head(tiny_classifier.head_dir)
    train_x, train_labels = load_train_examples(tiny_classifier.head_dir)
    tokenizer = load_tokenizer(tiny_classifier.tokenizer_path, tiny_classifier.max_seq_length)
    probabilities = head.probabilities(embed_texts(load_encoder(tiny_classifier), tokenizer, ["the song is good"]).numpy())
    assert probabilities.shape == (1, 3) and abs(float(probabilities.sum()) - 1.0) < 1e-5
    assert len(train_labels) == 18 and train_x.shape == (18, tiny_classifier.dim)


def test_frozen_body_keeps_the_encoder_and_adds_a_head(tiny_artifact, tmp_path):
    from embedline.training.fewshot.classifier import ClassifierConfig, train_classifier

    train_file = write_labeled_tsv(tmp_path / "train.tsv", per_class=4)
    artifact = train_classifier(ClassifierConfig(train_file=str(train_file), output=str(tmp_path / "out"),
                                                 model=str(tiny_artifact.path), frozen_body=True, neighbours=0))
    assert artifact.has_head() and load_train_examples(artifact.head_dir) is None
    assert (artifact.path / "model.safetensors").read_bytes() == (tiny_artifact.path / "model.safetensors").read_bytes()
    assert not (artifact.path / "run").exists()


@pytest.mark.parametrize("content, shots, problem", [
    ("text\tlabel\na\tx\nb\tx\n", 0, "only the label 'x'"),
    ("text\tlabel\na\tx\nb\tx\nc\ty\n", 2, "'y' has 1"),
    ("text\tlabel\na\tx\n \ty\n", 0, ":3: empty text"),
    ("text\ttag\na\tx\n", 0, "missing column(s) label"),
])
def test_cli_bad_input_is_a_one_line_error_naming_the_file(tmp_path, capsys, tiny_model_dir, content, shots, problem):
    path = write(tmp_path / "train.tsv", content)
    argv = ["train-classifier", "--model", str(tiny_model_dir), "--train-file", str(path),
            "--output", str(tmp_path / "out"), "--shots", str(shots)]
    assert embedline_main(argv) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("embedline train-classifier: error:")]
    assert len(errors) == 1 and str(path) in errors[0] and problem in errors[0], errors
    assert not (tmp_path / "out").exists()


def test_cli_options_are_the_config_fields_with_their_help():
    import argparse
    import dataclasses

    from embedline.training.fewshot.classifier import ClassifierConfig, configure

    parser = argparse.ArgumentParser()
    configure(parser)
    options = {action.dest: action for action in parser._actions if action.option_strings}
    fields = [f.name for f in dataclasses.fields(ClassifierConfig)]
    assert set(fields) <= options.keys() and all(options[name].help for name in fields)
    assert options["frozen_body"].option_strings == ["--frozen-body"]
    assert options["class_weight"].option_strings == ["--no-class-weight"]
    args = parser.parse_args(["--train-file", "t.tsv", "--output", "o", "--shots", "8", "--frozen-body",
                              "--loss", "triplet", "--max-seq-length", "32", "--head-c", "1", "--no-class-weight"])
    config = ClassifierConfig(**{name: getattr(args, name) for name in fields})
    assert config == ClassifierConfig(train_file="t.tsv", output="o", shots=8, frozen_body=True, loss="triplet",
                                      max_seq_length=32, head_c=1.0, class_weight=False)
    assert args.threads == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["--output", "o"])  # --train-file is required


def test_cli_missing_file_is_a_one_line_error(tmp_path, capsys):
    argv = ["train-classifier", "--train-file", str(tmp_path / "nope.tsv"), "--output", str(tmp_path / "out")]
    assert embedline_main(argv) == 1
    assert "nope.tsv: file does not exist" in capsys.readouterr().err


def test_plot_space_draws_before_and_after(tiny_classifier, tmp_path, capsys):
    data = write_labeled_tsv(tmp_path / "test.tsv", per_class=8, seed=5)
    out = tmp_path / "space.png"
    argv = ["plot-space", "--artifact", str(tiny_classifier.path), "--data", str(data), "--output", str(out)]
    assert embedline_main(argv) == 0
    printed = capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "before: model: 10-NN label agreement" in printed
    assert f"after: {tiny_classifier.name}: 10-NN label agreement" in printed
