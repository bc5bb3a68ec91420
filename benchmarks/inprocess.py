"""In-process engines for the suite: texts -> embeddings in this Python process, tokenization included.

    sentence-transformers   torch, the library users start from (`SentenceTransformer.encode`)
    onnxruntime <variant>   the artifact's ONNX graph on ONNX Runtime: the ceiling a server on the same
                            engine can approach (the server runs exactly this plus its own overhead)
    openvino                the NNCF int8 OpenVINO IR (when exported and the runtime is installed)

`measure_batches` times consecutive batches of a workload; `measure_tokens` times fixed-shape token
batches (the sequence-length scaling curve, engine only). Threads are pinned for every engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from benchmarks.common import percentile

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]


@dataclass
class InProcessEngine:
    """encode(texts) -> embeddings; run_tokens(batch) -> embeddings (None when the engine cannot)."""

    name: str
    encode: Callable[[list[str]], np.ndarray]
    run_tokens: Callable[[Batch], np.ndarray] | None = None


def sentence_transformers_engine(artifact, threads: int, device: str = "cpu") -> InProcessEngine:
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    model = SentenceTransformer(str(artifact.path), device=device)

    def encode(texts: list[str]) -> np.ndarray:
        return model.encode(texts, batch_size=len(texts), show_progress_bar=False, convert_to_numpy=True)

    def run_tokens(batch: Batch) -> np.ndarray:
        features = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
        features["token_type_ids"] = torch.zeros_like(features["input_ids"])
        with torch.inference_mode():
            return model(features)["sentence_embedding"].cpu().numpy()

    return InProcessEngine("sentence-transformers", encode, run_tokens)


def _tokenizer(artifact):
    from embedline.tokenization import load_tokenizer

    return load_tokenizer(artifact.tokenizer_path, artifact.max_seq_length)


def onnxruntime_session(path, threads: int, provider: str = "CPUExecutionProvider"):
    """An ORT session with the server's options (model_repository/python/embed/1/engines.py): pinned
    intra-op threads, one inter-op thread, the server's default spin-wait. The same options make the
    in-process number the ceiling the server can approach on the same engine."""
    import onnxruntime as ort

    from embedline.model_repository.common.ort_options import session_options
    from embedline.serving.settings import RepositorySettings

    options = session_options(ort, threads, RepositorySettings.spin_wait, quiet=True)
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    return ort.InferenceSession(str(path), options, providers=providers)


def onnxruntime_engine(artifact, variant: str, threads: int, provider: str = "CPUExecutionProvider") -> InProcessEngine:
    from embedline.tokenization import encode

    session = onnxruntime_session(artifact.onnx_path(variant), threads, provider)
    tokenizer = _tokenizer(artifact)

    def run_tokens(batch: Batch) -> np.ndarray:
        return session.run(["sentence_embedding"], batch)[0]

    return InProcessEngine(f"onnxruntime {variant}", lambda texts: run_tokens(encode(tokenizer, texts)), run_tokens)


def openvino_engine(artifact, threads: int, fp32: bool = False) -> InProcessEngine:
    """The NNCF int8 IR on OpenVINO CPU, or with fp32=True the fp32 ONNX graph (OpenVINO reads it directly)."""
    from embedline.export.openvino_int8 import runner
    from embedline.tokenization import encode

    run_tokens = runner(artifact.onnx_path("fp32") if fp32 else artifact.openvino_files()[0], threads)
    tokenizer = _tokenizer(artifact)
    name = "openvino fp32" if fp32 else "openvino"
    return InProcessEngine(name, lambda texts: run_tokens(encode(tokenizer, texts)), run_tokens)


def named_engine(artifact, name: str, threads: int) -> InProcessEngine:
    """The engine called `name`: "sentence-transformers", "openvino", "openvino fp32" or "onnxruntime VARIANT"
    (report.inprocess_name gives the one a server variant runs)."""
    if name == "sentence-transformers":
        return sentence_transformers_engine(artifact, threads)
    if name in ("openvino", "openvino fp32"):
        return openvino_engine(artifact, threads, fp32=name == "openvino fp32")
    if name.startswith("onnxruntime "):
        return onnxruntime_engine(artifact, name.split(" ", 1)[1], threads)
    raise ValueError(f"unknown engine {name!r}")


def _summarise(latencies: list[float], items: int, elapsed: float, tokens: int) -> dict:
    return {
        "sentences_per_s": round(items / elapsed, 1),
        "tokens_per_s": round(tokens / elapsed, 1),
        "p50_ms": round(1000 * percentile(latencies, 50), 3),
        "p95_ms": round(1000 * percentile(latencies, 95), 3),
        "p99_ms": round(1000 * percentile(latencies, 99), 3),
        "batches": len(latencies),
    }


def measure_batches(engine: InProcessEngine, texts: list[str], tokens: np.ndarray, batch_size: int,
                    seconds: float, min_batches: int = 3, sort_by_length: bool = False) -> dict:
    """Run consecutive batch_size-text batches of `texts` (wrapping around) for about `seconds`.

    One untimed warm-up batch first. Throughput counts all timed batches; latency is per batch.
    sort_by_length: cut the batches from the texts ordered by token count, the least padding a batch can
    have (what `SentenceTransformer.encode` does with a list); otherwise in workload order, as requests come.
    """
    order = np.argsort(tokens[: len(texts)], kind="stable") if sort_by_length else np.arange(len(texts))
    batches = [order[i : i + batch_size].tolist() for i in range(0, len(texts), batch_size)]
    engine.encode([texts[i] for i in batches[0]])
    latencies, items, token_count, k = [], 0, 0, 0
    started = time.perf_counter()
    while k < min_batches or time.perf_counter() - started < seconds:
        indices = batches[k % len(batches)]
        t0 = time.perf_counter()
        engine.encode([texts[i] for i in indices])
        latencies.append(time.perf_counter() - t0)
        items += len(indices)
        token_count += int(tokens[indices].sum())
        k += 1
    return _summarise(latencies, items, sum(latencies), token_count)


def token_batch(tokenizer_json, batch_size: int, length: int, seed: int = 0) -> Batch:
    """A (batch, length) batch of random word-piece ids framed by [CLS] ... [SEP], no padding.

    Fixed shapes isolate the engine's cost of sequence length from tokenization and padding.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    vocab = tokenizer.get_vocab_size()
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    rng = np.random.default_rng(seed)
    # Skip the first ids: special and unused tokens in BERT vocabularies.
    ids = rng.integers(min(1000, vocab // 2), vocab, size=(batch_size, length), dtype=np.int64)
    ids[:, 0] = 101 if cls_id is None else cls_id
    ids[:, -1] = 102 if sep_id is None else sep_id
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def measure_tokens(engine: InProcessEngine, batch: Batch, seconds: float, min_runs: int = 2) -> dict:
    """Time engine.run_tokens on one fixed batch for about `seconds` (after one warm-up run)."""
    engine.run_tokens(batch)
    latencies = []
    started = time.perf_counter()
    while len(latencies) < min_runs or time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        engine.run_tokens(batch)
        latencies.append(time.perf_counter() - t0)
    n, length = batch["input_ids"].shape
    return _summarise(latencies, n * len(latencies), sum(latencies), n * length * len(latencies))
