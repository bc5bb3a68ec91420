"""`embedline diagnose`: each flag fires on embeddings built to show its pathology and stays quiet on a healthy
space; the measures on known geometry; one end-to-end run on the tiny classifier."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import write_labeled_tsv
from embedline.cli import main as embedline_main
from embedline.training.diagnostics import diagnose as dg


def names(measures, baseline=None) -> set[str]:
    return {flag.name for flag in dg.find_flags(measures, baseline)}


def clusters(per_class=(30, 30, 30), dim=32, spread=0.15, seed=0):
    """Well-separated classes: orthogonal centres plus small noise."""
    rng = np.random.default_rng(seed)
    labels, rows = [], []
    for c, n in enumerate(per_class):
        centre = np.zeros(dim)
        centre[c] = 1.0
        rows.append(centre + spread * rng.normal(size=(n, dim)) / np.sqrt(dim))
        labels += [f"c{c}"] * n
    return np.concatenate(rows), labels


@pytest.fixture(scope="module")
def healthy():
    x, labels = clusters()
    return dg.measure(x, labels, [f"text {i}" for i in range(len(labels))])


def test_healthy_space_has_no_flag(healthy):
    assert names(healthy) == set()
    assert healthy["silhouette"] > 0.5 and healthy["knn_purity"] == 1.0
    assert 2.5 < healthy["effective_rank"] and healthy["mean_cosine"] < 0.4  # 1/3 of the pairs share a class
    assert healthy["alignment_source"] == "same-label pairs of the data" and healthy["alignment"] < 0.1
    assert healthy["near_duplicates"]["cross_label_pairs"] == 0


def test_collapse_fires_when_rows_are_nearly_equal():
    rng = np.random.default_rng(1)
    x = np.ones(32) + 0.01 * rng.normal(size=(90, 32))
    measures = dg.measure(x, clusters()[1])
    assert measures["mean_cosine"] > 0.99
    assert "collapse" in names(measures)
    # a collapsed space has every pair "near-duplicate": that is the collapse, not false negatives in the data
    assert "false_negatives_in_batch" not in names(measures)


def test_collapse_fires_on_a_line_through_the_origin():
    rng = np.random.default_rng(2)
    direction = rng.normal(size=32)
    x = np.outer(rng.choice([-1.0, 1.0], size=60), direction)
    measures = dg.measure(x)
    assert measures["effective_rank"] < dg.COLLAPSE_EFFECTIVE_RANK and abs(measures["mean_cosine"]) < 0.5
    assert names(measures) == {"collapse"}
    assert measures["explained_variance_top1"] > 0.99


def test_class_overlap_fires_when_classes_share_a_distribution(healthy):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(120, 32))
    labels = ["a", "b"] * 60
    measures = dg.measure(x, labels)
    assert abs(measures["silhouette"]) < 0.05 and measures["knn_purity"] < 0.65
    assert "class_overlap" in names(measures)
    assert "class_overlap" not in names(healthy)
    pair = measures["confused_pairs"][0]
    assert pair["classes"] == ["a", "b"] and pair["example"]["label"] != pair["example"]["neighbour_label"]


def test_confused_pairs_name_the_closest_classes_with_example_texts():
    x, labels = clusters()
    x = x.copy()
    x[np.array(labels) == "c1"] = x[np.array(labels) == "c0"] + 0.001  # c1 sits on top of c0
    texts = [f"{label} text {i}" for i, label in enumerate(labels)]
    measures = dg.measure(x, labels, texts)
    top = measures["confused_pairs"][0]
    assert top["classes"] == ["c0", "c1"]
    assert top["example"]["text"].startswith("c0") and top["example"]["neighbour"].startswith("c1")


def test_false_negatives_fire_on_duplicates_under_other_labels(healthy):
    x, labels = clusters()
    x = np.concatenate([x, x[:10]])  # ten c0 rows again, labelled c1
    labels = labels + ["c1"] * 10
    measures = dg.measure(x, labels, [f"text {i}" for i in range(len(labels))])
    assert measures["near_duplicates"]["share"] >= dg.FALSE_NEGATIVE_SHARE
    assert "false_negatives_in_batch" in names(measures)
    assert "false_negatives_in_batch" not in names(healthy)


def test_false_negatives_fire_on_one_text_under_two_labels():
    x, labels = clusters()
    texts = [f"text {i}" for i in range(len(labels))]
    texts[-1] = "Text  0"  # the same text (case and spaces aside) as row 0, under another label
    flags = dg.find_flags(dg.measure(x, labels, texts))
    evidence = next(flag.evidence for flag in flags if flag.name == "false_negatives_in_batch")
    assert "1 text(s) under two labels" in evidence and "c0 and c2" in evidence


def test_class_imbalance_fires_on_90_10_and_on_one_dominant_class(healthy):
    x, labels = clusters(per_class=(90, 10))
    assert "class_imbalance" in names(dg.measure(x, labels))
    x, labels = clusters(per_class=(60, 30, 30))  # 2x the smallest, exactly half the examples: no flag
    assert "class_imbalance" not in names(dg.measure(x, labels))
    x, labels = clusters(per_class=(70, 30, 30))  # 54% of the examples
    flag = next(f for f in dg.find_flags(dg.measure(x, labels)) if f.name == "class_imbalance")
    assert "one class dominating" in flag.evidence and flag.fix == "balance the pairs"
    x, labels = clusters(per_class=(60, 40))  # two classes: more than half is not enough
    assert "class_imbalance" not in names(dg.measure(x, labels))
    assert "class_imbalance" not in names(healthy)


def dev_pairs(agreement: float, n=40, dim=16, seed=4) -> dg.DevPairs:
    """Pairs whose cosine follows (agreement 1) or ignores (0) the gold score."""
    rng = np.random.default_rng(seed)
    scores = np.linspace(0, 5, n)
    left = rng.normal(size=(n, dim))
    noise = rng.normal(size=(n, dim))
    mix = (agreement * scores / 5)[:, None]
    right = mix * left + (1 - mix) * noise + (1 - agreement) * rng.normal(size=(n, dim))
    embeddings = np.concatenate([left, right])
    return dg.DevPairs(embeddings, np.arange(n), np.arange(n, 2 * n), scores)


def test_lost_general_semantics_fires_below_the_floor_and_on_a_drop():
    x, labels = clusters()
    good = dg.measure(x, labels, dev=dev_pairs(1.0))
    bad = dg.measure(x, labels, dev=dev_pairs(0.0))
    assert good["sts_spearman"] > 80 and bad["sts_spearman"] < dg.STS_SPEARMAN_FLOOR
    assert good["alignment_source"].startswith("dev pairs") and good["alignment_positives"] == 10
    assert "lost_general_semantics" not in names(good)
    assert "lost_general_semantics" in names(bad)
    slightly_worse = dict(good, sts_spearman=good["sts_spearman"] - 1)
    much_worse = dict(good, sts_spearman=good["sts_spearman"] - 10)
    assert "lost_general_semantics" not in names(slightly_worse, baseline=good)
    flag = next(f for f in dg.find_flags(much_worse, baseline=good) if f.name == "lost_general_semantics")
    assert "points below the baseline" in flag.evidence and flag.fix == "lower lr, start from a strong base"
    assert dg.deltas(much_worse, good)["sts_spearman"] == pytest.approx(-10)


def test_alignment_and_uniformity_on_known_geometry():
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert dg.alignment(a, a) == 0.0
    assert dg.alignment(a[:1], a[1:]) == pytest.approx(2.0)  # orthogonal unit vectors: ||x - y||^2 = 2
    assert dg.uniformity(a) == pytest.approx(-4.0)  # log exp(-2 * 2)
    assert dg.uniformity(np.ones((5, 3))) == pytest.approx(0.0)  # one point: the worst uniformity


def test_unlabelled_data_gets_the_label_free_measures():
    x, _ = clusters()
    measures = dg.measure(x)
    assert measures["alignment"] is None and "silhouette" not in measures and "class_counts" not in measures
    assert np.isfinite(measures["uniformity"]) and names(measures) == set()


def test_cli_end_to_end_on_the_tiny_classifier(tiny_classifier, tmp_path, capsys):
    data = write_labeled_tsv(tmp_path / "test.tsv", per_class=8, seed=5)
    dev = tmp_path / "dev.tsv"
    dev.write_text("score\tsentence1\tsentence2\n" + "".join(
        f"{s}\tthe song is good\t{t}\n" for s, t in
        [(5, "the song is great"), (4, "the film is good"), (2, "the food is cold"), (0, "the road is a door"),
         (1, "the chair is sad"), (3, "the game is happy")]), encoding="utf-8")
    out = tmp_path / "report"
    argv = ["diagnose", "--artifact", str(tiny_classifier.path), "--data", str(data), "--output", str(out),
            "--dev-pairs", str(dev), "--baseline", str(tiny_classifier.path)]
    assert embedline_main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "diagnosis.json").read_text())
    assert {"alignment", "uniformity", "sts_spearman", "mean_cosine", "effective_rank", "explained_variance",
            "silhouette", "knn_purity", "confused_pairs", "class_counts", "near_duplicates", "flags",
            "baseline", "deltas"} <= report.keys()
    assert report["texts"] == 24 and report["class_counts"] == {"negative": 8, "neutral": 8, "positive": 8}
    assert all({"name", "evidence", "fix"} == flag.keys() for flag in report["flags"])
    assert report["deltas"]["silhouette"] == pytest.approx(0.0, abs=1e-6)  # the artifact is its own baseline
    assert (out / "diagnosis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "5-NN label purity" in printed and "wrote" in printed


def test_cli_unlabelled_file_and_bad_input(tiny_classifier, tmp_path, capsys):
    data = tmp_path / "texts.tsv"
    data.write_text("text\n" + "".join(f"sentence number {i}\n" for i in range(12)), encoding="utf-8")
    out = tmp_path / "report"
    argv = ["diagnose", "--artifact", str(tiny_classifier.path), "--data", str(data), "--output", str(out)]
    assert embedline_main(argv) == 0
    report = json.loads((out / "diagnosis.json").read_text())
    assert report["alignment"] is None and "silhouette" not in report and (out / "diagnosis.png").is_file()
    missing = ["diagnose", "--artifact", str(tiny_classifier.path), "--data", str(tmp_path / "nope.tsv"),
               "--output", str(out)]
    capsys.readouterr()
    assert embedline_main(missing) == 1
    assert "nope.tsv: file does not exist" in capsys.readouterr().err
