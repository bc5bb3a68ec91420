"""The classifier head: multinomial logistic regression on L2-normalized sentence embeddings, as ONNX.

Fit (stage 2 of the few-shot classifier): minimize the class-weighted cross-entropy plus an L2 penalty,

    sum_i w_i CE(softmax(W x_i + b), y_i) / sum_i w_i  +  ||W||^2 / (2 C n)

with full-batch L-BFGS in float64 (deterministic, converges in well under a second for few-shot sets).
w_i = n / (K n_{y_i}) ("balanced" class weights), so a rare class counts as much as a common one.
C is the inverse regularization strength, as in scikit-learn's LogisticRegression (same optimum).

Stored as a tiny ONNX graph, `head.onnx`: sentence_embedding (float32 [batch, dim]) -> L2 normalize ->
MatMul + Add -> Softmax -> probabilities (float32 [batch, num_labels]), with `labels.json` giving the
order of the probabilities. The graph is the only copy of the weights (no pickle): `load_head` reads them
back from its initializers. For uncertainty from neighbours the head directory can also keep the
training embeddings and their labels (`train_embeddings.npy`, `train_labels.json`).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedline import artifact as art
from embedline.errors import EmbedlineError

log = logging.getLogger(__name__)

INPUT_NAME = "sentence_embedding"
OUTPUT_NAME = "probabilities"
OPSET = 17
NORM_EPSILON = 1e-12


class HeadError(EmbedlineError):
    """A head that cannot be fitted (bad inputs) or a head directory that cannot be read."""


@dataclass(frozen=True)
class LogisticHead:
    """probabilities = softmax(normalize(x) @ weight + bias); columns in the order of `labels`."""

    weight: np.ndarray  # (dim, num_labels) float32
    bias: np.ndarray  # (num_labels,) float32
    labels: tuple[str, ...]

    @property
    def dim(self) -> int:
        return int(self.weight.shape[0])

    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        """(n, dim) -> (n, num_labels) float32: the in-Python reference of head.onnx."""
        x = np.asarray(embeddings, dtype=np.float32)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), NORM_EPSILON)
        logits = x @ self.weight + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)

    def predict(self, embeddings: np.ndarray) -> list[str]:
        return [self.labels[i] for i in self.probabilities(embeddings).argmax(axis=1)]


def normalize_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), NORM_EPSILON)


def balanced_class_weights(targets: np.ndarray, num_labels: int) -> np.ndarray:
    """(num_labels,) weights n / (K n_k); a class absent from `targets` gets 0."""
    counts = np.bincount(targets, minlength=num_labels).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_labels)
    weights[present] = len(targets) / (present.sum() * counts[present])
    return weights


def fit_head(embeddings: np.ndarray, labels: list[str], classes: tuple[str, ...] | None = None,
             c: float = 1.0, class_weight: bool = True, max_iter: int = 500) -> LogisticHead:
    """Fit the logistic-regression head on (n, dim) embeddings and their string labels."""
    import torch

    classes = tuple(sorted(set(labels))) if classes is None else tuple(classes)
    if len(classes) < 2:
        raise HeadError(f"a classifier head needs at least 2 classes, got {list(classes)}")
    if c <= 0:
        raise HeadError(f"C must be > 0, got {c}")
    index = {label: i for i, label in enumerate(classes)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise HeadError(f"labels {unknown} are not among the classes {list(classes)}")
    x_np = normalize_rows(embeddings)
    if x_np.ndim != 2 or len(x_np) != len(labels) or len(labels) == 0:
        raise HeadError(f"expected (n, dim) embeddings for {len(labels)} labels, got shape {x_np.shape}")
    targets_np = np.array([index[label] for label in labels])
    n, dim = x_np.shape
    sample_weight_np = (balanced_class_weights(targets_np, len(classes))[targets_np] if class_weight
                        else np.ones(n))

    x = torch.from_numpy(x_np)
    targets = torch.from_numpy(targets_np)
    sample_weight = torch.from_numpy(sample_weight_np / sample_weight_np.sum())
    weight = torch.zeros(dim, len(classes), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    penalty = 1.0 / (2.0 * c * n)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        losses = torch.nn.functional.cross_entropy(x @ weight + bias, targets, reduction="none")
        loss = (losses * sample_weight).sum() + penalty * weight.pow(2).sum()
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    log.debug("head fitted: %d examples, %d classes, C=%g, loss %.4f", n, len(classes), c, float(loss.detach()))
    return LogisticHead(
        weight=weight.detach().numpy().astype(np.float32),
        bias=bias.detach().numpy().astype(np.float32),
        labels=classes,
    )


C_CANDIDATES = (0.1, 1.0, 10.0, 100.0)


def choose_c(embeddings: np.ndarray, labels: list[str], classes: tuple[str, ...] | None = None,
             candidates: tuple[float, ...] = C_CANDIDATES, folds: int = 4,
             class_weight: bool = True) -> tuple[float, dict[str, float]]:
    """C chosen by stratified k-fold cross-validation on the training examples alone: (best C, mean
    held-out-fold accuracy per C). Each class's examples are dealt round-robin over the folds, in file
    order (deterministic); a tie goes to the stronger regularization (the smaller C). With fewer than 2
    examples in every class there is nothing to hold out, and the middle candidate is returned."""
    labels = list(labels)
    classes = tuple(sorted(set(labels))) if classes is None else tuple(classes)
    folds = min(folds, max(Counter(labels).values()))
    if folds < 2:
        middle = sorted(candidates)[len(candidates) // 2]
        return middle, {}
    fold_of = np.empty(len(labels), dtype=np.int64)
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        fold_of[i] = seen.get(label, 0) % folds
        seen[label] = seen.get(label, 0) + 1
    x = np.asarray(embeddings)
    y = np.asarray(labels)
    scores: dict[str, float] = {}
    for c in sorted(candidates):
        correct = 0
        for fold in range(folds):
            held = fold_of == fold
            head = fit_head(x[~held], list(y[~held]), classes, c=c, class_weight=class_weight)
            correct += int(np.sum(np.array(head.predict(x[held])) == y[held]))
        scores[f"{c:g}"] = correct / len(labels)
    best = max(sorted(candidates), key=lambda c: scores[f"{c:g}"])  # max keeps the first (smallest) of ties
    log.info("head C by %d-fold cross-validation on the training examples: %g (%s)", folds, best,
             ", ".join(f"C={k}: {v:.3f}" for k, v in scores.items()))
    return best, scores


def head_to_onnx(head: LogisticHead) -> Any:
    """The head as an onnx.ModelProto: sentence_embedding [batch, dim] -> probabilities [batch, K]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        # normalize(x) = x / max(||x||, eps): the head was fitted on unit vectors.
        helper.make_node("ReduceL2", [INPUT_NAME], ["norm"], keepdims=1, axes=[1]),
        helper.make_node("Max", ["norm", "epsilon"], ["safe_norm"]),
        helper.make_node("Div", [INPUT_NAME, "safe_norm"], ["unit"]),
        helper.make_node("MatMul", ["unit", "weight"], ["scores"]),
        helper.make_node("Add", ["scores", "bias"], ["logits"]),
        helper.make_node("Softmax", ["logits"], [OUTPUT_NAME], axis=-1),
    ]
    initializers = [
        numpy_helper.from_array(head.weight.astype(np.float32), "weight"),
        numpy_helper.from_array(head.bias.astype(np.float32), "bias"),
        numpy_helper.from_array(np.array(NORM_EPSILON, dtype=np.float32), "epsilon"),
    ]
    graph = helper.make_graph(
        nodes, "classifier_head",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", head.dim])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", len(head.labels)])],
        initializer=initializers,
    )
    # ReduceL2 takes `axes` as an attribute up to opset 17.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="embedline", doc_string="multinomial logistic regression head")
    helper.set_model_props(model, {"labels": json.dumps(list(head.labels))})
    onnx.checker.check_model(model, full_check=True)
    return model


def save_head(head: LogisticHead, head_dir: str | os.PathLike, *, train_embeddings: np.ndarray | None = None,
              train_labels: list[str] | None = None, record: dict[str, Any] | None = None) -> Path:
    """Write head.onnx + labels.json (+ the training embeddings/labels for neighbours, + head.json)."""
    import onnx

    head_dir = Path(head_dir)
    head_dir.mkdir(parents=True, exist_ok=True)
    for stale in (art.TRAIN_EMBEDDINGS_FILE, art.TRAIN_LABELS_FILE):
        (head_dir / stale).unlink(missing_ok=True)
    onnx.save(head_to_onnx(head), str(head_dir / art.HEAD_FILE))
    art.write_json(head_dir / art.LABELS_FILE, list(head.labels))
    if train_embeddings is not None:
        if train_labels is None or len(train_labels) != len(train_embeddings):
            raise HeadError("train_labels must give one label per training embedding")
        np.save(head_dir / art.TRAIN_EMBEDDINGS_FILE, normalize_rows(train_embeddings).astype(np.float32),
                allow_pickle=False)
        art.write_json(head_dir / art.TRAIN_LABELS_FILE, list(train_labels))
    art.write_json(head_dir / art.HEAD_RECORD_FILE, {"type": "logistic_regression", "num_labels": len(head.labels),
                                                     "dim": head.dim, **(record or {})})
    return head_dir


def load_head(head_dir: str | os.PathLike) -> LogisticHead:
    """Read a head back from head.onnx's initializers and labels.json."""
    import onnx
    from google.protobuf.message import DecodeError
    from onnx import numpy_helper

    head_dir = Path(head_dir)
    onnx_path, labels_path = head_dir / art.HEAD_FILE, head_dir / art.LABELS_FILE
    if not onnx_path.is_file() or not labels_path.is_file():
        raise HeadError(f"{head_dir}: not a classifier head (expected {art.HEAD_FILE} and {art.LABELS_FILE})")
    try:
        graph = onnx.load(str(onnx_path)).graph
        labels = json.loads(labels_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, DecodeError) as exc:
        raise HeadError(f"{head_dir}: cannot read the head ({exc})") from exc
    weights = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    if "weight" not in weights or "bias" not in weights:
        raise HeadError(f"{onnx_path}: no 'weight'/'bias' initializers; not an embedline head")
    head = LogisticHead(weight=weights["weight"], bias=weights["bias"], labels=tuple(labels))
    if head.weight.shape[1] != len(head.labels):
        raise HeadError(f"{head_dir}: {head.weight.shape[1]} outputs but {len(head.labels)} labels "
                        f"in {art.LABELS_FILE}")
    return head


def load_train_examples(head_dir: str | os.PathLike) -> tuple[np.ndarray, list[str]] | None:
    """(embeddings (n, dim) float32, labels) kept for neighbours, or None when the head has none."""
    head_dir = Path(head_dir)
    embeddings_path, labels_path = head_dir / art.TRAIN_EMBEDDINGS_FILE, head_dir / art.TRAIN_LABELS_FILE
    if not embeddings_path.is_file() or not labels_path.is_file():
        return None
    embeddings = np.load(embeddings_path, allow_pickle=False)
    labels = json.loads(labels_path.read_text(encoding="utf-8"))
    if len(labels) != len(embeddings):
        raise HeadError(f"{head_dir}: {len(embeddings)} training embeddings but {len(labels)} labels")
    return embeddings, labels


def nearest_labels(embeddings: np.ndarray, train_embeddings: np.ndarray, train_labels: list[str],
                   k: int) -> list[list[str]]:
    """The labels of each row's k most cosine-similar training examples, nearest first."""
    k = min(k, len(train_labels))
    similarity = normalize_rows(embeddings) @ normalize_rows(train_embeddings).T  # (n, n_train)
    top = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(similarity, top, axis=1).argsort(axis=1)[:, ::-1]
    return [[train_labels[j] for j in row] for row in np.take_along_axis(top, order, axis=1)]
