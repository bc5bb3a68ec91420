"""A report on an embedding space, with its pathologies named: the `embedline diagnose` verb.

    embedline diagnose --artifact DIR --data FILE --output DIR [--dev-pairs TSV] [--baseline DIR]
                       [--method tsne|umap] [--max-points 1500]
    embedline diagnose --artifact DIR --corpus FILE --queries FILE --qrels FILE --output DIR [...]

The texts of FILE (the classifier trainer's text/label TSV or CSV; the label column is optional) are embedded
in-process by the artifact's torch encoder and measured in the original space (no projection involved):

  * alignment and uniformity (Wang & Isola 2020): alignment = E ||f(x) - f(y)||^2 over positive pairs,
    uniformity = log E exp(-2 ||f(x) - f(y)||^2) over all pairs (unit vectors; lower is better for both).
    With --dev-pairs (an STS TSV) the positives are the dev pairs whose gold score is in the top quartile and
    uniformity is over the dev sentences (plus the dev Spearman x100); otherwise the positives are same-label
    pairs of FILE and uniformity is over FILE's texts;
  * collapse: mean pairwise cosine, effective rank (RankMe: exp of the entropy of the L1-normalized singular
    values of the unit embeddings) and the share of variance of the top principal components;
  * class structure (with labels): silhouette (cosine), 5-NN label purity (leave-one-out, with its chance
    level), the most-confused class pairs with an example text and its nearest other-class neighbour,
    cross-label near-duplicates and class counts.

With --corpus/--queries/--qrels instead of --data (a retrieval model), the texts are the queries and relevant
passages of the qrels, each side embedded with the model's prompt for it, the positives are the (query,
relevant passage) pairs, and uniformity is also reported per side (retrieval_pairs.py, `pair_measures`).

Pathologies are flagged by name with the usual fix (`FLAG_FIXES`); the thresholds are the constants below.
Written to OUTPUT/diagnosis.json (machines) and OUTPUT/diagnosis.png (2-D t-SNE/UMAP by label + histogram of
same-class vs different-class cosines), summarized on the terminal. --baseline DIR (another artifact or model
directory, e.g. the base model) gets the same measures, and the deltas (artifact - baseline) are recorded:
run it before and after fine-tuning to see what training changed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedline.errors import EmbedlineError
from embedline.sts import spearman
from embedline.tokenization import load_tokenizer
from embedline.training.data import read_sts
from embedline.training.diagnostics.plot_space import project
from embedline.training.evaluate import embed_texts
from embedline.training.evaluate import load_any_encoder
from embedline.training.plot import save_figure
from embedline.training.data import DataError
from embedline.training import labeled_data
from embedline.training.diagnostics import plot_space
from embedline.training.diagnostics.retrieval_pairs import QueryPassagePairs, embed_pairs, read_pairs

log = logging.getLogger(__name__)

# --- thresholds -----------------------------------------------------------------------------------------------

# collapse: unrelated texts of a healthy sentence encoder sit at mean cosine ~0.1-0.4 (even anisotropic raw
# BERT mean pooling stays under ~0.8); above 0.9 every text looks like every other one.
COLLAPSE_MEAN_COSINE = 0.9
# collapse: fewer than 2 effective directions (RankMe) means the space is essentially a line; a k-class
# classifier trained with cosine targets 0 for negatives keeps ~k orthogonal directions, so this stays quiet.
COLLAPSE_EFFECTIVE_RANK = 2.0
# class_overlap: cosine silhouette near 0 means texts are as close to other classes as to their own;
# well-separated fine-tuned classes reach 0.2 and more.
CLASS_OVERLAP_SILHOUETTE = 0.05
# class_overlap: k-NN purity less than halfway from chance to perfect, (purity - chance) / (1 - chance) < 0.5,
# i.e. the served neighbour_labels are mostly noise (a relative floor: chance depends on the class count).
CLASS_OVERLAP_PURITY_LIFT = 0.5
KNN_K = 5  # neighbours for k-NN purity and the confused pairs (leave-one-out)
# false_negatives_in_batch: two texts with cosine above this are near-duplicates (paraphrases, templates);
# under different labels they become in-batch negatives that contradict each other.
NEAR_DUPLICATE_COSINE = 0.95
# false_negatives_in_batch: at least 2% of the examples with a near-duplicate under another label (a batch
# of 32 then holds such a pair often); the same text under two labels fires at once (a labelling conflict).
FALSE_NEGATIVE_SHARE = 0.02
# class_imbalance: the largest class more than 3x the smallest, or (3+ classes) more than half the examples;
# with two classes "more than half" is any imbalance at all, so there only the ratio counts.
IMBALANCE_RATIO = 3.0
IMBALANCE_SHARE = 0.5
# lost_general_semantics: STS Spearman x100 on the dev pairs; general-purpose encoders score 75-85 on STS-B,
# a random-init encoder ~20-40: below 50 the model no longer ranks general similarity sensibly.
STS_SPEARMAN_FLOOR = 50.0
# lost_general_semantics: a drop of more than 3 Spearman points vs --baseline is more than seed noise (~1).
STS_DROP_POINTS = 3.0
DEV_POSITIVE_QUANTILE = 0.75  # dev pairs with a gold score in the top quartile are alignment's positives
UNIFORMITY_SAMPLE = 2000  # uniformity and the histograms are O(n^2): larger sets use a fixed subset
TOP_COMPONENTS = 10  # explained variance of the first components
CONFUSED_PAIRS_SHOWN = 3

FLAG_FIXES = {
    "collapse": "check that negatives exist, increase batch diversity",
    "class_overlap": "add hard negatives at the boundary",
    "false_negatives_in_batch": "de-duplicate, or mask same-label in-batch negatives",
    "class_imbalance": "balance the pairs",
    "lost_general_semantics": "lower lr, start from a strong base",
}

METHODS = plot_space.METHODS
JSON_FILE = "diagnosis.json"
PNG_FILE = "diagnosis.png"


class DiagnoseError(EmbedlineError):
    """Nothing to diagnose (too few texts) or an unusable option."""


@dataclass(frozen=True)
class Flag:
    """A named pathology: what was measured and the usual fix."""

    name: str
    evidence: str
    fix: str


@dataclass(frozen=True)
class DevPairs:
    """STS dev pairs as embeddings: unique sentences (m, dim), rows of each pair's sides, gold scores."""

    embeddings: np.ndarray
    left: np.ndarray
    right: np.ndarray
    scores: np.ndarray


# --- measures: functions of an embeddings matrix (+ labels) -------------------------------------------------------


def unit(embeddings: np.ndarray) -> np.ndarray:
    x = np.asarray(embeddings, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _sample(n: int, size: int, seed: int = 0) -> np.ndarray:
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def uniformity(embeddings: np.ndarray) -> float:
    """log E exp(-2 ||f(x) - f(y)||^2) over all pairs of distinct rows (unit vectors)."""
    x = unit(embeddings)[_sample(len(embeddings), UNIFORMITY_SAMPLE)]
    if len(x) < 2:
        return math.nan
    squared = np.maximum(2.0 - 2.0 * (x @ x.T), 0.0)[np.triu_indices(len(x), k=1)]
    return float(np.log(np.exp(-2.0 * squared).mean()))


def alignment(left: np.ndarray, right: np.ndarray) -> float:
    """E ||f(x) - f(y)||^2 over positive pairs (rows of `left` and `right`, unit vectors)."""
    if len(left) == 0:
        return math.nan
    return float((np.linalg.norm(unit(left) - unit(right), axis=1) ** 2).mean())


def collapse_measures(embeddings: np.ndarray) -> dict[str, Any]:
    """mean_cosine (distinct pairs), effective_rank (RankMe) and explained_variance of the top components."""
    x = unit(embeddings)
    n = len(x)
    sample = x[_sample(n, UNIFORMITY_SAMPLE)]
    m = len(sample)
    mean_cosine = float(((sample @ sample.T).sum() - m) / (m * (m - 1))) if m > 1 else math.nan
    singular = np.linalg.svd(x, compute_uv=False)
    p = singular / max(singular.sum(), 1e-12)
    p = p[p > 0]
    effective_rank = float(np.exp(-(p * np.log(p)).sum()))
    centred = x - x.mean(axis=0)
    variance = np.linalg.svd(centred, compute_uv=False) ** 2
    ratio = variance / variance.sum() if variance.sum() > 0 else np.zeros_like(variance)
    top = ratio[:TOP_COMPONENTS]
    return {
        "mean_cosine": mean_cosine,
        "effective_rank": effective_rank,
        "effective_rank_max": int(min(x.shape)),
        "explained_variance": [float(v) for v in top],
        "explained_variance_top1": float(top[:1].sum()),
        f"explained_variance_top{TOP_COMPONENTS}": float(top.sum()),
    }


def _similarity(embeddings: np.ndarray) -> np.ndarray:
    x = unit(embeddings)
    return x @ x.T


def same_label_alignment(embeddings: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """(alignment over all same-label pairs, number of such pairs)."""
    similarity = _similarity(embeddings)
    upper = np.triu(labels[:, None] == labels[None, :], k=1)
    if not upper.any():
        return math.nan, 0
    return float((np.maximum(2.0 - 2.0 * similarity[upper], 0.0)).mean()), int(upper.sum())


def knn_purity(similarity: np.ndarray, labels: np.ndarray, k: int = KNN_K) -> tuple[float, float, np.ndarray]:
    """(mean share of each row's k nearest others with its label, that share by chance, the neighbours)."""
    n = len(labels)
    k = min(k, n - 1)
    scores = similarity.copy()
    np.fill_diagonal(scores, -np.inf)
    nearest = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    purity = float((labels[nearest] == labels[:, None]).mean())
    counts = np.array(list(Counter(labels.tolist()).values()), dtype=np.float64)
    chance = float((counts * (counts - 1)).sum() / (n * (n - 1)))
    return purity, chance, nearest


def confused_pairs(similarity: np.ndarray, labels: np.ndarray, nearest: np.ndarray,
                   texts: list[str] | None = None, shown: int = CONFUSED_PAIRS_SHOWN) -> list[dict[str, Any]]:
    """Class pairs ranked by the share of their members' k-NN slots taken by the other class, with the closest
    cross pair as the example (a text and its nearest neighbour of the other class)."""
    counts: Counter[tuple[str, str]] = Counter()
    for i, row in enumerate(nearest):
        for j in row:
            if labels[i] != labels[j]:
                counts[tuple(sorted((str(labels[i]), str(labels[j]))))] += 1
    size = Counter(labels.tolist())
    k = nearest.shape[1]
    ranked = sorted(counts.items(), key=lambda item: -item[1] / (k * (size[item[0][0]] + size[item[0][1]])))
    out = []
    for (a, b), count in ranked[:shown]:
        rows_a, rows_b = np.flatnonzero(labels == a), np.flatnonzero(labels == b)
        block = similarity[np.ix_(rows_a, rows_b)]
        i, j = np.unravel_index(int(np.argmax(block)), block.shape)
        example: dict[str, Any] = {"label": a, "neighbour_label": b, "cosine": float(block[i, j])}
        if texts is not None:
            example.update(text=texts[rows_a[i]], neighbour=texts[rows_b[j]])
        out.append({"classes": [a, b], "neighbour_share": count / (k * (size[a] + size[b])), "example": example})
    return out


def _normal_text(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().casefold())


def near_duplicates(similarity: np.ndarray, labels: np.ndarray, texts: list[str] | None = None) -> dict[str, Any]:
    """Cross-label near-duplicates (cosine > NEAR_DUPLICATE_COSINE) and texts filed under two labels."""
    cross = np.triu((labels[:, None] != labels[None, :]) & (similarity > NEAR_DUPLICATE_COSINE), k=1)
    pairs = np.argwhere(cross)
    involved = np.zeros(len(labels), dtype=bool)
    involved[pairs.ravel()] = True
    conflicts: dict[str, set[str]] = {}
    if texts is not None:
        by_text: dict[str, set[str]] = {}
        for text, label in zip(texts, labels.tolist()):
            by_text.setdefault(_normal_text(text), set()).add(label)
        conflicts = {text: found for text, found in by_text.items() if len(found) > 1}
    order = pairs[np.argsort(-similarity[pairs[:, 0], pairs[:, 1]])] if len(pairs) else pairs
    examples = []
    for i, j in order[:CONFUSED_PAIRS_SHOWN]:
        example: dict[str, Any] = {"labels": [str(labels[i]), str(labels[j])], "cosine": float(similarity[i, j])}
        if texts is not None:
            example["texts"] = [texts[i], texts[j]]
        examples.append(example)
    return {
        "cross_label_pairs": int(len(pairs)),
        "share": float(involved.mean()) if len(labels) else 0.0,
        "same_text_two_labels": len(conflicts),
        "same_text_examples": [{"text": text, "labels": sorted(found)}
                               for text, found in list(conflicts.items())[:CONFUSED_PAIRS_SHOWN]],
        "examples": examples,
    }


def class_balance(labels: np.ndarray) -> dict[str, Any]:
    counts = Counter(labels.tolist())
    largest, smallest = max(counts.values()), min(counts.values())
    return {
        "class_counts": dict(sorted(counts.items())),
        "imbalance_ratio": largest / smallest,
        "largest_class_share": largest / len(labels),
    }


def dev_measures(dev: DevPairs) -> dict[str, Any]:
    """sts_spearman (x100), alignment over the top-quartile gold pairs, uniformity over the dev sentences."""

    x = unit(dev.embeddings)
    left, right = x[dev.left], x[dev.right]
    cosine = (left * right).sum(axis=1)
    cutoff = float(np.quantile(dev.scores, DEV_POSITIVE_QUANTILE))
    positive = dev.scores >= cutoff
    return {
        "sts_spearman": 100.0 * spearman(cosine, dev.scores),
        "alignment": alignment(left[positive], right[positive]),
        "uniformity": uniformity(x),
        "alignment_positives": int(positive.sum()),
        "alignment_source": f"dev pairs, gold score >= {cutoff:g} (top quartile)",
    }


def pair_measures(embeddings: np.ndarray, pairs: QueryPassagePairs) -> dict[str, Any]:
    """Alignment over the query-passage pairs, uniformity over both sides and each alone, the positive pairs'
    mean cosine beside random pairs' (retrieval_pairs.py); `embeddings` in the order of `pairs.texts`."""
    x = unit(embeddings)
    queries, passages = x[:len(pairs.queries)], x[len(pairs.queries):]
    left, right = queries[pairs.left], passages[pairs.right]
    other = passages[pairs.right[np.random.default_rng(0).permutation(len(pairs.right))]]
    return {
        "alignment": alignment(left, right),
        "uniformity": uniformity(x),
        "uniformity_queries": uniformity(queries),
        "uniformity_passages": uniformity(passages),
        "positive_cosine": float((left * right).sum(axis=1).mean()),
        "random_pair_cosine": float((left * other).sum(axis=1).mean()),
        "alignment_positives": int(len(pairs.left)),
        "alignment_source": f"query-passage pairs of {pairs.source.name} (score > 0)",
        "queries": len(pairs.queries),
        "passages": len(pairs.passages),
    }


def measure(embeddings: np.ndarray, labels: list[str] | tuple[str, ...] | None = None,
            texts: list[str] | None = None, dev: DevPairs | None = None) -> dict[str, Any]:
    """Every measure of one embedding space (keys as in diagnosis.json, flags excluded)."""
    embeddings = np.asarray(embeddings)
    if len(embeddings) < 3:
        raise DiagnoseError(f"{len(embeddings)} texts: diagnosing a space needs at least 3")
    out: dict[str, Any] = {"texts": int(len(embeddings)), "dim": int(embeddings.shape[1])}
    out.update(collapse_measures(embeddings))
    label_array = np.asarray(labels) if labels is not None else None
    if dev is not None:
        out.update(dev_measures(dev))
    elif label_array is not None:
        value, count = same_label_alignment(embeddings, label_array)
        out.update(alignment=value, uniformity=uniformity(embeddings), alignment_positives=count,
                   alignment_source="same-label pairs of the data")
    else:
        out.update(alignment=None, uniformity=uniformity(embeddings), alignment_positives=0,
                   alignment_source="none (no labels and no --dev-pairs)")
    if label_array is not None:
        out.update(class_balance(label_array))
        similarity = _similarity(embeddings)
        if 2 <= len(out["class_counts"]) < len(embeddings):  # silhouette needs 2..n-1 classes
            from sklearn.metrics import silhouette_score

            out["silhouette"] = float(silhouette_score(unit(embeddings), label_array, metric="cosine"))
            purity, chance, nearest = knn_purity(similarity, label_array)
            out.update(knn_purity=purity, knn_chance=chance,
                       confused_pairs=confused_pairs(similarity, label_array, nearest, texts))
            out["near_duplicates"] = near_duplicates(similarity, label_array, texts)
    return out


# --- flags -------------------------------------------------------------------------------------------------------


def _flag(name: str, evidence: str) -> Flag:
    return Flag(name, evidence, FLAG_FIXES[name])


def find_flags(measures: dict[str, Any], baseline: dict[str, Any] | None = None) -> list[Flag]:
    """The pathologies `measures` (from `measure`) show, each with its evidence and fix."""
    flags = []
    collapsed = []
    if measures.get("mean_cosine") is not None and measures["mean_cosine"] > COLLAPSE_MEAN_COSINE:
        collapsed.append(f"mean pairwise cosine {measures['mean_cosine']:.3f} > {COLLAPSE_MEAN_COSINE}")
    if measures["effective_rank"] < COLLAPSE_EFFECTIVE_RANK:
        collapsed.append(f"effective rank {measures['effective_rank']:.2f} < {COLLAPSE_EFFECTIVE_RANK} "
                         f"(of at most {measures['effective_rank_max']})")
    if collapsed:
        flags.append(_flag("collapse", "; ".join(collapsed)))

    if "silhouette" in measures:
        overlap = []
        if measures["silhouette"] < CLASS_OVERLAP_SILHOUETTE:
            overlap.append(f"silhouette {measures['silhouette']:.3f} < {CLASS_OVERLAP_SILHOUETTE}")
        chance = measures["knn_chance"]
        lift = (measures["knn_purity"] - chance) / max(1.0 - chance, 1e-12)
        if lift < CLASS_OVERLAP_PURITY_LIFT:
            overlap.append(f"{KNN_K}-NN purity {measures['knn_purity']:.3f} is {lift:.2f} of the way from chance "
                           f"({chance:.3f}) to 1 (< {CLASS_OVERLAP_PURITY_LIFT})")
        if overlap:
            worst = measures["confused_pairs"][0]["classes"] if measures.get("confused_pairs") else None
            flags.append(_flag("class_overlap", "; ".join(overlap) + (f"; most confused: {worst[0]} / {worst[1]}"
                                                                     if worst else "")))

    duplicates = measures.get("near_duplicates")
    if duplicates:
        found = []
        if duplicates["same_text_two_labels"]:
            example = duplicates["same_text_examples"][0]
            found.append(f"{duplicates['same_text_two_labels']} text(s) under two labels, e.g. {example['text']!r} "
                         f"as {' and '.join(example['labels'])}")
        # In a collapsed space every pair is a "near-duplicate": that is the collapse, not the data.
        if not collapsed and duplicates["share"] >= FALSE_NEGATIVE_SHARE:
            found.append(f"{100 * duplicates['share']:.1f}% of the texts have a near-duplicate (cosine > "
                         f"{NEAR_DUPLICATE_COSINE}) under another label (>= {100 * FALSE_NEGATIVE_SHARE:g}%)")
        if found:
            flags.append(_flag("false_negatives_in_batch", "; ".join(found)))

    if "class_counts" in measures and len(measures["class_counts"]) >= 2:
        counts = measures["class_counts"]
        largest = max(counts, key=counts.get)
        smallest = min(counts, key=counts.get)
        found = []
        if measures["imbalance_ratio"] > IMBALANCE_RATIO:
            found.append(f"{largest!r} has {counts[largest]} examples, {measures['imbalance_ratio']:.1f}x "
                         f"{smallest!r} ({counts[smallest]}; > {IMBALANCE_RATIO:g}x)")
        if len(counts) >= 3 and measures["largest_class_share"] > IMBALANCE_SHARE:
            found.append(f"{largest!r} is {100 * measures['largest_class_share']:.0f}% of the examples "
                         f"(> {100 * IMBALANCE_SHARE:.0f}%)")
        if found:
            flags.append(_flag("class_imbalance", "one class dominating: " + "; ".join(found)))

    if measures.get("sts_spearman") is not None:
        found = []
        if measures["sts_spearman"] < STS_SPEARMAN_FLOOR:
            found.append(f"dev STS Spearman {measures['sts_spearman']:.1f} < {STS_SPEARMAN_FLOOR:g}")
        if baseline is not None and baseline.get("sts_spearman") is not None:
            drop = baseline["sts_spearman"] - measures["sts_spearman"]
            if drop > STS_DROP_POINTS:
                found.append(f"dev STS Spearman {measures['sts_spearman']:.1f} is {drop:.1f} points below the "
                             f"baseline's {baseline['sts_spearman']:.1f} (> {STS_DROP_POINTS:g})")
        if found:
            flags.append(_flag("lost_general_semantics", "; ".join(found)))
    return flags


DELTA_KEYS = ("alignment", "uniformity", "uniformity_queries", "uniformity_passages", "positive_cosine",
              "random_pair_cosine", "sts_spearman", "mean_cosine", "effective_rank", "explained_variance_top1",
              f"explained_variance_top{TOP_COMPONENTS}", "silhouette", "knn_purity")


def deltas(after: dict[str, Any], before: dict[str, Any]) -> dict[str, float]:
    """after - before for every scalar measure both have."""
    out = {}
    for key in DELTA_KEYS:
        a, b = after.get(key), before.get(key)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isfinite(a) and math.isfinite(b):
            out[key] = float(a) - float(b)
    return out


# --- data, embedding, picture ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Texts:
    path: Path
    texts: tuple[str, ...]
    labels: tuple[str, ...] | None  # None: the file has no label column


def read_texts(path: str | os.PathLike) -> Texts:
    """The texts (and labels, when there is a `label` column) of a classifier TSV/CSV; one class is allowed."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise DataError(f"{path}: file does not exist")
    path, texts, labels = labeled_data.read_texts(path, label_required=False)
    if len(texts) < 3:
        raise DataError(f"{path}: {len(texts)} texts; diagnosing a space needs at least 3")
    return Texts(path, tuple(texts), tuple(labels) if labels is not None else None)


def subsample(data: Texts, max_points: int, seed: int) -> Texts:
    """At most `max_points` texts, the same share of every class."""
    if len(data.texts) <= max_points:
        return data
    rng = np.random.default_rng(seed)
    groups = np.array(data.labels) if data.labels is not None else np.zeros(len(data.texts), dtype=int)
    keep: list[int] = []
    for group in np.unique(groups):
        members = np.flatnonzero(groups == group)
        take = max(1, round(len(members) * max_points / len(data.texts)))
        keep += rng.choice(members, size=min(take, len(members)), replace=False).tolist()
    keep.sort()
    return Texts(data.path, tuple(data.texts[i] for i in keep),
                 tuple(data.labels[i] for i in keep) if data.labels is not None else None)


class Embedder:
    """An artifact's (or model directory's) torch encoder, embedding in-process by length groups."""

    def __init__(self, source: str | os.PathLike):

        self.source = str(source)
        self.encoder, tokenizer_json, max_seq_length = load_any_encoder(source)
        self.tokenizer = load_tokenizer(tokenizer_json, max_seq_length)

    def __call__(self, texts: list[str], batch_size: int = 64) -> np.ndarray:

        return embed_texts(self.encoder, self.tokenizer, texts, batch_size).numpy()


def embed_dev(embedder: Embedder, path: str | os.PathLike) -> DevPairs:

    pairs = read_sts(path)
    sentences = pairs.unique_sentences()
    left, right = pairs.rows(sentences)
    return DevPairs(embedder(sentences), np.array(left), np.array(right), np.asarray(pairs.scores, dtype=np.float64))


def draw(panels: list[tuple[str, np.ndarray, np.ndarray]], labels: tuple[str, ...] | None, output: Path,
         title: str) -> Path:
    """One row per model: the 2-D projection coloured by label, and the histogram of pairwise cosines."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt


    classes = sorted(set(labels)) if labels is not None else []
    colours = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    label_array = np.array(labels) if labels is not None else None
    figure, axes = plt.subplots(len(panels), 2, figsize=(13, 5.5 * len(panels)), squeeze=False)
    for (name, points, embeddings), (scatter, histogram) in zip(panels, axes):
        if label_array is None:
            scatter.scatter(points[:, 0], points[:, 1], s=6, alpha=0.7)
        else:
            for i, label in enumerate(classes):
                at = label_array == label
                scatter.scatter(points[at, 0], points[at, 1], s=6, alpha=0.7, label=label,
                                color=colours(i % colours.N))
            if len(classes) <= 20:
                scatter.legend(markerscale=3, fontsize=8, loc="best")
        scatter.set_title(f"{name}: {len(points)} texts")
        scatter.set_xticks([])
        scatter.set_yticks([])
        rows = _sample(len(embeddings), UNIFORMITY_SAMPLE)
        similarity = _similarity(embeddings[rows])
        upper = np.triu_indices(len(rows), k=1)
        bins = np.linspace(-1, 1, 81)
        if label_array is not None and len(classes) >= 2:
            same = (label_array[rows][:, None] == label_array[rows][None, :])[upper]
            histogram.hist(similarity[upper][same], bins=bins, alpha=0.6, density=True, label="same class")
            histogram.hist(similarity[upper][~same], bins=bins, alpha=0.6, density=True, label="different class")
            histogram.legend(fontsize=8)
        else:
            histogram.hist(similarity[upper], bins=bins, alpha=0.8, density=True, label="all pairs")
        histogram.axvline(NEAR_DUPLICATE_COSINE, color="grey", linestyle=":", linewidth=1)
        histogram.set_title(f"{name}: pairwise cosine similarity")
        histogram.set_xlabel("cosine")
    figure.suptitle(title)
    return save_figure(figure, output, dpi=100)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


@dataclass(frozen=True)
class RetrievalFiles:
    """The files of a labelled query set: its query-passage pairs are the positives (retrieval_pairs.py)."""

    corpus: str
    queries: str
    qrels: str
    title_field: str = "auto"


@dataclass(frozen=True)
class Space:
    """What is embedded: the texts, their labels (measured) and their plot colours, or query-passage pairs."""

    path: Path
    texts: list[str]
    labels: tuple[str, ...] | None
    colours: tuple[str, ...] | None
    texts_in_file: int
    pairs: QueryPassagePairs | None = None


def read_space(data_file: str | os.PathLike | None, retrieval: RetrievalFiles | None, max_points: int,
               seed: int) -> Space:
    """A text/label file (a per-class subsample of at most max_points), or the pairs of a labelled query set."""
    if (data_file is None) == (retrieval is None):
        raise DiagnoseError("diagnose a text file (--data) or query-passage pairs (--corpus, --queries, --qrels), "
                            "one of the two")
    if retrieval is not None:
        pairs = read_pairs(retrieval.corpus, retrieval.queries, retrieval.qrels, retrieval.title_field,
                           max_texts=max_points, seed=seed)
        return Space(Path(retrieval.qrels).resolve(), pairs.texts, None, pairs.sides, len(pairs.texts), pairs)
    full = read_texts(data_file)
    data = subsample(full, max_points, seed)
    return Space(data.path, list(data.texts), data.labels, data.labels, len(full.texts))


def diagnose(artifact: str | os.PathLike, data_file: str | os.PathLike | None, output: str | os.PathLike,
             dev_pairs: str | os.PathLike | None = None, baseline: str | os.PathLike | None = None,
             method: str = "tsne", max_points: int = 1500, seed: int = 0,
             retrieval: RetrievalFiles | None = None) -> dict[str, Any]:
    """Measure, flag, write diagnosis.json and diagnosis.png under `output`; returns the JSON's content."""

    if method not in METHODS:
        raise DiagnoseError(f"--method must be one of {', '.join(METHODS)}")
    if max_points < 3:
        raise DiagnoseError("--max-points must be at least 3")
    space = read_space(data_file, retrieval, max_points, seed)
    output = Path(output)
    results: dict[str, dict[str, Any]] = {}
    panels = []
    for role, source in ([("baseline", baseline)] if baseline else []) + [("artifact", artifact)]:
        embedder = Embedder(source)
        log.info("%s %s: embedding %d texts", role, source, len(space.texts))
        embeddings = embed_pairs(embedder, source, space.pairs) if space.pairs else embedder(space.texts)
        dev = embed_dev(embedder, dev_pairs) if dev_pairs else None
        measures = measure(embeddings, space.labels, space.texts, dev)
        if space.pairs is not None:
            measures.update(pair_measures(embeddings, space.pairs))
        results[role] = {"source": str(Path(source).expanduser().resolve()), **measures}
        panels.append((f"{role}: {Path(source).name}", project(embeddings, method, seed), embeddings))
    report = dict(results["artifact"])
    report["data"] = str(space.path)
    report["texts_in_file"] = space.texts_in_file  # measures are over the texts (a subsample when larger)
    report["dev_pairs"] = str(Path(dev_pairs).resolve()) if dev_pairs else None
    report["method"] = method
    report["flags"] = [asdict(f) for f in find_flags(results["artifact"], results.get("baseline"))]
    if baseline:
        report["baseline"] = {**results["baseline"],
                              "flags": [asdict(f) for f in find_flags(results["baseline"])]}
        report["deltas"] = deltas(results["artifact"], results["baseline"])
    report["thresholds"] = {name: globals()[name] for name in (
        "COLLAPSE_MEAN_COSINE", "COLLAPSE_EFFECTIVE_RANK", "CLASS_OVERLAP_SILHOUETTE", "CLASS_OVERLAP_PURITY_LIFT",
        "KNN_K", "NEAR_DUPLICATE_COSINE", "FALSE_NEGATIVE_SHARE", "IMBALANCE_RATIO", "IMBALANCE_SHARE",
        "STS_SPEARMAN_FLOOR", "STS_DROP_POINTS")}
    output.mkdir(parents=True, exist_ok=True)
    report["png"] = str(draw(panels, space.colours, output / PNG_FILE,
                             f"{space.path.name}: {method.upper()} of the embeddings and pairwise cosines"))
    report = _json_safe(report)
    (output / JSON_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return report


def summary(report: dict[str, Any]) -> str:
    """The terminal summary: measures (with deltas vs the baseline), then the flags and their fixes."""
    delta = report.get("deltas", {})

    def show(key: str, name: str, fmt: str = ".3f") -> str | None:
        value = report.get(key)
        if value is None:
            return None
        line = f"  {name:<28} {value:{fmt}}"
        if key in delta:
            line += f"   ({delta[key]:+{fmt}} vs baseline {report['baseline'][key]:{fmt}})"
        return line

    lines = [f"{report['source']} on {report['data']}: {report['texts']} texts, dim {report['dim']}"]
    lines += filter(None, [
        show("alignment", "alignment (lower better)"), show("uniformity", "uniformity (lower better)"),
        show("uniformity_queries", "  of the queries"), show("uniformity_passages", "  of the passages"),
        show("positive_cosine", "query-passage cosine"), show("random_pair_cosine", "  random pairs' cosine"),
        show("sts_spearman", "dev STS Spearman x100", ".1f"), show("mean_cosine", "mean pairwise cosine"),
        show("effective_rank", "effective rank", ".1f"),
        show(f"explained_variance_top{TOP_COMPONENTS}", f"variance in top {TOP_COMPONENTS} PCs"),
        show("silhouette", "silhouette (cosine)"), show("knn_purity", f"{KNN_K}-NN label purity"),
    ])
    lines.append(f"  alignment positives: {report.get('alignment_source')}")
    if "class_counts" in report:
        lines.append("  classes: " + ", ".join(f"{k} {v}" for k, v in report["class_counts"].items()))
    for pair in report.get("confused_pairs") or []:
        example = pair["example"]
        lines.append(f"  confused {pair['classes'][0]} / {pair['classes'][1]} ({100 * pair['neighbour_share']:.1f}% "
                     f"of their {KNN_K}-NN): {example.get('text', '?')!r} [{example['label']}] ~ "
                     f"{example.get('neighbour', '?')!r} [{example['neighbour_label']}] cos {example['cosine']:.3f}")
    if report["flags"]:
        for flag in report["flags"]:
            lines.append(f"FLAG {flag['name']}: {flag['evidence']} -> {flag['fix']}")
    else:
        lines.append("no pathology flagged")
    if "baseline" in report:
        before = [f["name"] for f in report["baseline"]["flags"]]
        lines.append(f"baseline flags: {', '.join(before) if before else 'none'}")
    return "\n".join(lines)


# --- the `embedline diagnose` verb ------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--artifact", required=True, help="the artifact (or model directory) to diagnose")
    parser.add_argument("--data", default=None, help="TSV or CSV with a text column and an optional label column")
    parser.add_argument("--output", required=True, help=f"directory for {JSON_FILE} and {PNG_FILE}")
    parser.add_argument("--dev-pairs", default=None,
                        help="STS TSV: alignment over its top-quartile pairs, uniformity, dev Spearman")
    parser.add_argument("--baseline", default=None,
                        help="another artifact or model directory (e.g. the base model): same measures + deltas")
    pairs = parser.add_argument_group(
        "query-passage pairs (instead of --data): alignment over the qrels' relevant pairs, each side with the "
        "model's prompt, uniformity over queries and passages")
    pairs.add_argument("--corpus", default=None, help="corpus file (id, [title,] text), as `embedline index` reads it")
    pairs.add_argument("--queries", default=None, help="queries file (query_id, text)")
    pairs.add_argument("--qrels", default=None, help="judgments (query_id, doc_id, score; > 0 = relevant)")
    pairs.add_argument("--title-field", default="auto", help="corpus title column; auto: 'title' when there is one")
    plot_space.add_space_options(parser, threads=2)


def run(args: argparse.Namespace) -> int:
    plot_space.set_threads(args.threads)
    named = [name for name in ("corpus", "queries", "qrels") if getattr(args, name)]
    if named and len(named) < 3:
        raise DiagnoseError("query-passage pairs need --corpus, --queries and --qrels together")
    retrieval = RetrievalFiles(args.corpus, args.queries, args.qrels, args.title_field) if named else None
    report = diagnose(args.artifact, args.data, args.output, args.dev_pairs, args.baseline, args.method,
                      args.max_points, args.seed, retrieval)
    print(summary(report))
    print(f"wrote {Path(args.output) / JSON_FILE} and {report['png']}")
    return 0
