"""The GPU part of the suite (runs only where onnxruntime has the CUDA execution provider).

At batch 128 of short texts, in-process: ORT fp16 (the fused fp16 graph on CUDA), ORT fp32 on CUDA, and
sentence-transformers in fp16 on CUDA; then the server (`embed` on a GPU instance, fp16 variant, IO binding
in engines.py) under closed-loop 32-text requests against the in-process fp16 number. The published
reference for all-MiniLM-L6-v2 is 14,200 sentences/s on a V100 (sentence-transformers' model table).
On a CPU-only machine it returns {"measured": False, "reason": ...} and costs nothing.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

log = logging.getLogger(__name__)

GPU_BATCH = 128
PUBLISHED_V100_MINILM = 14200  # sentences/s, all-MiniLM-L6-v2, sentence-transformers' pretrained-models table


def cuda_available() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _st_fp16_engine(artifact):
    import torch
    from sentence_transformers import SentenceTransformer

    from benchmarks.inprocess import InProcessEngine

    model = SentenceTransformer(str(artifact.path), device="cuda").half()

    def encode(texts):
        with torch.inference_mode():
            return model.encode(texts, batch_size=len(texts), show_progress_bar=False, convert_to_numpy=True)

    return InProcessEngine("sentence-transformers fp16 (CUDA)", encode)


def measure_gpu(artifact, workloads, mode, threads: int, tmp: Path) -> dict:
    if not cuda_available():
        return {"measured": False, "reason": "no CUDA GPU on this machine (onnxruntime has no CUDAExecutionProvider)"}
    from benchmarks import inprocess
    from benchmarks.suite import sweep_points, triton
    from benchmarks.workloads import SHORT
    from embedline.serving.settings import RepositorySettings

    short = workloads[SHORT]
    texts = short.texts * (1 + GPU_BATCH // len(short.texts))
    tokens = __import__("numpy").resize(short.tokens, len(texts))
    factories = {
        "onnxruntime fp16 (CUDA)": lambda: inprocess.onnxruntime_engine(artifact, "fp16", threads,
                                                                        "CUDAExecutionProvider"),
        "onnxruntime fp32 (CUDA)": lambda: inprocess.onnxruntime_engine(artifact, "fp32", threads,
                                                                        "CUDAExecutionProvider"),
        "sentence-transformers fp16 (CUDA)": lambda: _st_fp16_engine(artifact),
    }
    inproc = {}
    for name, factory in factories.items():
        try:
            inproc[name] = inprocess.measure_batches(factory(), texts, tokens, GPU_BATCH, mode.point_seconds)
        except Exception as exc:  # noqa: BLE001 - record and go on
            inproc[name] = {"error": f"{type(exc).__name__}: {exc}"}
    settings = replace(RepositorySettings(intra_op_threads=threads), variant="fp16", device="gpu",
                       group_overhead_tokens=2048)  # a GPU run costs far more than a few padded tokens
    try:
        with triton(artifact, tmp, settings) as server:
            points = sweep_points(server, workloads, [(SHORT, 32, c) for c in (4, 16, 64)], mode)
    except Exception as exc:  # noqa: BLE001
        points = [{"error": f"{type(exc).__name__}: {exc}"}]
    import torch

    return {"measured": True, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cuda",
            "batch_size": GPU_BATCH, "inprocess": inproc, "server": points,
            "published_v100_minilm_sentences_per_s": PUBLISHED_V100_MINILM}


def gpu_targets(gpu: dict) -> list[dict]:
    """The GPU rows of the targets table (report.compute_targets adds them when measured)."""
    from benchmarks.report import _ratio_target

    inproc = gpu.get("inprocess", {})

    def rate(name):
        return inproc.get(name, {}).get("sentences_per_s")

    fp16 = rate("onnxruntime fp16 (CUDA)")
    best_server = max((p.get("sentences_per_s", 0) for p in gpu.get("server", [])), default=None)
    return [
        _ratio_target("GPU in-process fp16 / ORT fp32 (batch 128)", fp16, rate("onnxruntime fp32 (CUDA)"), 2.0,
                      gpu.get("device", "")),
        _ratio_target("GPU in-process fp16 / sentence-transformers fp16 (batch 128)", fp16,
                      rate("sentence-transformers fp16 (CUDA)"), 2.0, gpu.get("device", "")),
        _ratio_target("GPU server fp16 / in-process fp16", best_server, fp16, 0.9, "32-text requests, best c"),
        _ratio_target("GPU in-process fp16 / published V100 all-MiniLM-L6-v2 (14,200/s)", fp16,
                      PUBLISHED_V100_MINILM, 0.0, "for comparison only"),
    ]
