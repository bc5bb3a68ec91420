"""The wire encoding of the `embed` / `classify` contract (embedline/wire.py): request tensors in, arrays and
predictions out. tritonclient is passed in as a module, so the sync and asyncio clients share this code.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from embedline import wire
from embedline.client.errors import InvalidInputError, ServerError
from embedline.client.results import EmbedResult, Hit, Prediction, _ModelSpec
from embedline.wire import HITS_OUTPUT, CLASSIFY_MODEL, EMBED_MODEL, EMBEDDING_OUTPUT, LABEL_OUTPUT, NEIGHBOURS_OUTPUT, PROBABILITIES_OUTPUT, TEXT_INPUT, TRUNCATED_OUTPUT


def text_input(grpcclient: Any, texts: list[str]) -> Any:
    """The `text` input: shape [n, 1], BYTES, each element the text's UTF-8 bytes."""
    data = np.empty((len(texts), 1), dtype=np.object_)
    for i, text in enumerate(texts):
        data[i, 0] = text.encode("utf-8")
    infer_input = grpcclient.InferInput(TEXT_INPUT, list(data.shape), "BYTES")
    infer_input.set_data_from_numpy(data)
    return infer_input


# `search`: the most queries one call takes, and the largest k (as the server's store checks).
MAX_SEARCH_QUERIES = 1024
MAX_K = 1000


def search_parameters(queries: Any, k: Any, filter: str | None, collection: str | None,
                      hybrid: bool) -> tuple[list[str], dict[str, Any]]:
    """A search call's queries (one string is one query) and its request parameters, checked here so that a
    bad call fails before it is sent (InvalidInputError); the server checks them again."""
    if isinstance(queries, str):
        queries = [queries]
    queries = list(queries)
    if not queries or len(queries) > MAX_SEARCH_QUERIES:
        raise InvalidInputError(f"search takes 1 to {MAX_SEARCH_QUERIES} queries, got {len(queries)}")
    for index, query in enumerate(queries):
        if not isinstance(query, str) or not query.strip():
            raise InvalidInputError(f"query {index} is {'empty' if isinstance(query, str) else type(query).__name__}: "
                                    "a query is a non-empty string")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise InvalidInputError(f"k must be an integer from 1 to {MAX_K}, got {k!r}")
    if filter is not None and not isinstance(filter, str):
        raise InvalidInputError(f"filter must be a string, got {type(filter).__name__}")
    if collection is not None and not isinstance(collection, str):
        raise InvalidInputError(f"collection must be a string, got {type(collection).__name__}")
    return queries, {"k": k, "filter": filter or "", "collection": collection or "", "hybrid": bool(hybrid)}


def parse_hits(result: Any, n: int, url: str, model: str) -> list[list[Hit]]:
    """The `hits` output of `model`: per query a JSON list of {"id", "score", "text", "metadata"}."""
    rows = _output(result, HITS_OUTPUT, n, model, url).reshape(-1)
    try:
        return [[Hit(str(h["id"]), float(h["score"]), h["text"], h["metadata"]) for h in json.loads(row)]
                for row in rows]
    except (ValueError, KeyError, TypeError) as exc:
        raise ServerError(f"model '{model}' at {url} returned hits that do not parse: {exc}") from None


def requested_outputs(grpcclient: Any, names: tuple[str, ...]) -> list[Any]:
    return [grpcclient.InferRequestedOutput(name) for name in names]


EMBED_OUTPUTS = (EMBEDDING_OUTPUT, TRUNCATED_OUTPUT)
CLASSIFY_OUTPUTS = (LABEL_OUTPUT, PROBABILITIES_OUTPUT, TRUNCATED_OUTPUT)


def _output(result: Any, name: str, n: int, model: str, url: str) -> np.ndarray:
    array = result.as_numpy(name)
    if array is None or len(array) != n:
        got = "nothing" if array is None else f"{len(array)} rows"
        raise ServerError(f"model '{model}' at {url} returned {got} for output '{name}', expected {n} rows")
    return array


def parse_embed(result: Any, n: int, url: str, model: str = EMBED_MODEL) -> tuple[np.ndarray, np.ndarray]:
    """-> embeddings (n, dim) float32, truncated (n,) bool."""
    embeddings = _output(result, EMBEDDING_OUTPUT, n, model, url)
    truncated = _output(result, TRUNCATED_OUTPUT, n, model, url)
    return np.asarray(embeddings, dtype=np.float32).reshape(n, -1), np.asarray(truncated, dtype=bool).reshape(n)


def classify_outputs(spec: _ModelSpec) -> tuple[str, ...]:
    """The outputs to request from `classify`: neighbour labels too when its config says it has them."""
    try:
        neighbours = wire.read(spec.parameters, "neighbours", 0)
    except ValueError:
        neighbours = 0
    return CLASSIFY_OUTPUTS + ((NEIGHBOURS_OUTPUT,) if neighbours > 0 else ())


def _decode(raw: Any) -> str:
    return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)


def parse_classify(result: Any, n: int, labels: tuple[str, ...], url: str,
                   model: str = CLASSIFY_MODEL, neighbours: bool = False) -> list[Prediction]:
    raw_labels = _output(result, LABEL_OUTPUT, n, model, url).reshape(n)
    neighbour_rows = _output(result, NEIGHBOURS_OUTPUT, n, model, url).reshape(n, -1) if neighbours else None
    probabilities = np.asarray(_output(result, PROBABILITIES_OUTPUT, n, model, url), dtype=np.float32).reshape(n, -1)
    truncated = np.asarray(_output(result, TRUNCATED_OUTPUT, n, model, url), dtype=bool).reshape(n)
    if probabilities.shape[1] != len(labels):
        raise ServerError(f"model '{model}' at {url} returned {probabilities.shape[1]} probabilities "
                          f"but its config lists {len(labels)} labels")
    predictions = []
    for i, (row, raw, cut) in enumerate(zip(probabilities, raw_labels, truncated)):
        label = _decode(raw)
        by_label = {name: float(p) for name, p in zip(labels, row)}
        # The server names the label; its probability is the score (argmax if the names disagree).
        score = by_label.get(label, float(row.max()))
        near = tuple(_decode(x) for x in neighbour_rows[i]) if neighbour_rows is not None else ()
        predictions.append(Prediction(label=label, score=score, probabilities=by_label, truncated=bool(cut),
                                      neighbour_labels=near))
    return predictions


def assemble_embeddings(n: int, dim: int, chunks: list[list[int]],
                        parts: list[tuple[np.ndarray, np.ndarray]]) -> EmbedResult:
    """Put per-request results back in input order."""
    embeddings = np.empty((n, dim), dtype=np.float32)
    truncated = np.zeros(n, dtype=bool)
    for indices, (chunk_embeddings, chunk_truncated) in zip(chunks, parts):
        if chunk_embeddings.shape[1] != dim:
            raise ServerError(f"server returned {chunk_embeddings.shape[1]}-d embeddings, config says {dim}")
        embeddings[indices] = chunk_embeddings
        truncated[indices] = chunk_truncated
    return EmbedResult(embeddings=embeddings, truncated=truncated)


def check_dimensions(dimensions: int | None, dim: int) -> int | None:
    """`dimensions` as an int from 1 to `dim` (None stays None), checked before anything is sent."""
    if dimensions is None:
        return None
    if isinstance(dimensions, bool) or not isinstance(dimensions, (int, np.integer)) or not 1 <= dimensions <= dim:
        raise ValueError(f"dimensions must be an int from 1 to the model's dim {dim}, got {dimensions!r}")
    return int(dimensions)


def truncate_dimensions(result: EmbedResult, dimensions: int | None, dim: int) -> EmbedResult:
    """Matryoshka truncation: the first `dimensions` components of each row, re-normalized to unit length.

    None keeps all `dim` components. Anything but an int from 1 to `dim` is a ValueError naming the
    model's dim. A row whose first components are all zero stays zero (no division by zero). How well
    a shortened vector works depends on the model: one trained with a Matryoshka loss keeps most of its
    quality at a fraction of its dim, others lose more.
    """
    dimensions = check_dimensions(dimensions, dim)
    if dimensions is None or dimensions == dim:
        return result
    head = result.embeddings[:, :dimensions]
    norms = np.linalg.norm(head, axis=1, keepdims=True)
    embeddings = (head / np.where(norms > 0, norms, 1.0)).astype(np.float32)
    return EmbedResult(embeddings=embeddings, truncated=result.truncated)


def assemble_predictions(n: int, chunks: list[list[int]], parts: list[list[Prediction]]) -> list[Prediction]:
    predictions: list[Prediction | None] = [None] * n
    for indices, chunk_predictions in zip(chunks, parts):
        for i, prediction in zip(indices, chunk_predictions):
            predictions[i] = prediction
    return predictions  # type: ignore[return-value]  # every index is covered by exactly one chunk
