"""A 2-D picture of an embedding space coloured by label, before vs after contrastive fine-tuning.

    embedline plot-space --artifact my-classifier --data test.tsv --output space.png [--before DIR]
                         [--method tsne|umap] [--max-points 1500]

The labelled texts (a text/label TSV or CSV, e.g. the test split) are embedded by the starting encoder
("before": --before, by default the base model recorded in the classifier artifact) and by the
artifact's encoder ("after"), each projected to 2-D (t-SNE from scikit-learn, or UMAP when umap-learn
is installed) and drawn side by side. Each panel's title gives two numbers measured in the original
embedding space, so the picture comes with numbers that do not depend on the projection:
  * 10-NN agreement: the share of each text's 10 nearest neighbours (cosine) that carry its label,
    averaged (what the served `neighbour_labels` show per text; chance = the label distribution);
  * silhouette (cosine, -1..1): how far apart whole classes are relative to their spread.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedline import artifact as art
from embedline.errors import EmbedlineError
from embedline.tokenization import load_tokenizer
from embedline.training.evaluate import embed_texts, load_any_encoder
from embedline.training.labeled_data import LabeledData, read_labeled
from embedline.training.plot import save_figure

log = logging.getLogger(__name__)

METHODS = ("tsne", "umap")


class PlotError(EmbedlineError):
    """A projection method that is not installed, or nothing to draw."""


@dataclass(frozen=True)
class SpacePanel:
    """One encoder's embeddings of the texts, projected to 2-D."""

    title: str
    points: np.ndarray  # (n, 2)
    silhouette: float
    knn_agreement: float


def subsample(data: LabeledData, max_points: int, seed: int) -> LabeledData:
    """At most `max_points` examples, the same share of every class (so small classes stay visible)."""
    if len(data) <= max_points:
        return data
    rng = np.random.default_rng(seed)
    labels = np.array(data.labels)
    keep: list[int] = []
    for label in data.classes:
        members = np.flatnonzero(labels == label)
        take = max(1, round(len(members) * max_points / len(data)))
        keep += rng.choice(members, size=min(take, len(members)), replace=False).tolist()
    keep.sort()
    return LabeledData(data.path, tuple(data.texts[i] for i in keep), tuple(data.labels[i] for i in keep))


def project(embeddings: np.ndarray, method: str, seed: int) -> np.ndarray:
    """(n, dim) -> (n, 2) with t-SNE or UMAP on cosine distances."""
    if method == "umap":
        try:
            import umap
        except ImportError as exc:
            raise PlotError("--method umap needs umap-learn (pip install umap-learn); --method tsne needs "
                            "only scikit-learn") from exc
        return umap.UMAP(n_components=2, metric="cosine", random_state=seed).fit_transform(embeddings)
    from sklearn.manifold import TSNE

    perplexity = float(min(30, max(2, (len(embeddings) - 1) // 3)))
    return TSNE(n_components=2, metric="cosine", init="pca", perplexity=perplexity,
                random_state=seed).fit_transform(embeddings)


def silhouette(embeddings: np.ndarray, labels: tuple[str, ...]) -> float:
    from sklearn.metrics import silhouette_score

    return float(silhouette_score(embeddings, np.array(labels), metric="cosine"))


def knn_agreement(embeddings: np.ndarray, labels: tuple[str, ...], k: int = 10) -> float:
    """Mean share of each text's k nearest other texts (cosine) with the same label."""
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit.T  # (n, n)
    np.fill_diagonal(similarity, -np.inf)
    k = min(k, len(labels) - 1)
    nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    label_array = np.array(labels)
    return float((label_array[nearest] == label_array[:, None]).mean())


def display_name(source: str | os.PathLike) -> str:
    """A short name for a model directory (the bundled model's directory is just called `model`)."""
    path = Path(source)
    try:
        if path.resolve() == art.bundled_model_dir().resolve():
            return "all-MiniLM-L6-v2 (bundled)"
    except art.ArtifactError:
        pass
    return path.name


def embed(source: str | os.PathLike, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """(n, dim) embeddings of `texts` by an artifact's or a model directory's torch encoder."""

    encoder, tokenizer_json, max_seq_length = load_any_encoder(source)
    tokenizer = load_tokenizer(tokenizer_json, max_seq_length)
    return embed_texts(encoder, tokenizer, texts, batch_size, progress=True).numpy()


def draw(panels: list[SpacePanel], labels: tuple[str, ...], output: str | os.PathLike, title: str) -> Path:
    """Side-by-side scatter plots, one colour per label, written to a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    classes = sorted(set(labels))
    colours = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "gist_ncar")
    figure, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 6), squeeze=False)
    label_array = np.array(labels)
    for axis, panel in zip(axes[0], panels):
        for i, label in enumerate(classes):
            at = label_array == label
            axis.scatter(panel.points[at, 0], panel.points[at, 1], s=6, alpha=0.7, label=label,
                         color=colours(i / max(1, len(classes) - 1)) if len(classes) > 20 else colours(i))
        axis.set_title(f"{panel.title}\n10-NN label agreement {100 * panel.knn_agreement:.1f}%, "
                       f"silhouette {panel.silhouette:.3f} ({panel.points.shape[0]} texts)")
        axis.set_xticks([])
        axis.set_yticks([])
    if len(classes) <= 20:
        axes[0][-1].legend(markerscale=3, fontsize=8, loc="best")
    figure.suptitle(title)
    return save_figure(figure, output, dpi=110)


def default_before(artifact: art.Artifact) -> str | None:
    """The model a classifier artifact started from (recorded by train-classifier), if it still exists."""
    record = artifact.metadata.get("classifier") or {}
    source = (record.get("config") or {}).get("model") or artifact.metadata.get("base_model")
    return source if source and Path(source).is_dir() else None


def plot_space(artifact_dir: str | os.PathLike, data_file: str | os.PathLike, output: str | os.PathLike,
               before: str | None = None, method: str = "tsne", max_points: int = 1500, seed: int = 0) -> list[SpacePanel]:
    """Draw the before/after picture; returns the panels (with their silhouette scores)."""
    if method not in METHODS:
        raise PlotError(f"--method must be one of {', '.join(METHODS)}")
    artifact = art.load_artifact(artifact_dir)
    data = subsample(read_labeled(data_file), max_points, seed)
    before = before or default_before(artifact)
    sources = ([("before: " + display_name(before), before)] if before else []) + [
        ("after: " + artifact.name, str(artifact.path))]
    panels = []
    for title, source in sources:
        embeddings = embed(source, list(data.texts))
        panels.append(SpacePanel(title, project(embeddings, method, seed), silhouette(embeddings, data.labels),
                                 knn_agreement(embeddings, data.labels)))
        log.info("%s: 10-NN agreement %.3f, silhouette %.3f", title, panels[-1].knn_agreement, panels[-1].silhouette)
    draw(panels, data.labels, output, f"{Path(data_file).name}: {method.upper()} of the embeddings, by label")
    return panels


# --- the `embedline plot-space` verb ------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--artifact", required=True, help="the artifact whose space to draw (e.g. a classifier)")
    parser.add_argument("--data", required=True, help="TSV or CSV with text and label columns")
    parser.add_argument("--output", required=True, help="PNG file to write")
    parser.add_argument("--before", default=None,
                        help="model to compare with (default: the base model recorded in the artifact)")
    add_space_options(parser, threads=0)


def add_space_options(parser: argparse.ArgumentParser, threads: int) -> None:
    """The options `plot-space` and `diagnose` share: projection, subsampling, seed, torch threads."""
    parser.add_argument("--method", choices=METHODS, default="tsne", help="2-D projection (umap needs umap-learn)")
    parser.add_argument("--max-points", type=int, default=1500, help="subsample larger files per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=threads, help=f"torch CPU threads (default {threads}; "
                        "0: torch's default)")


def set_threads(threads: int) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    panels = plot_space(args.artifact, args.data, args.output, args.before, args.method, args.max_points, args.seed)
    for panel in panels:
        print(f"{panel.title}: 10-NN label agreement {panel.knn_agreement:.3f}, silhouette {panel.silhouette:.3f}")
    print(f"wrote {args.output}")
    return 0
