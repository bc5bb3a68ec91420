"""The latency/throughput suite, every engine side by side in one run. From the repository root:

    .venv/bin/python -m benchmarks.suite --quick   smoke run, about two minutes (make bench-quick)
    .venv/bin/python -m benchmarks.suite           full run, about 15-20 minutes (make bench)
    .venv/bin/python -m benchmarks.suite --tune    server settings sweep (instances, threads, queue delay...)

Engines: sentence-transformers (torch) in-process; raw ONNX Runtime in-process for each exported CPU
variant and OpenVINO (the ceiling a server on that engine can approach); our Triton server for each
variant under closed-loop load (1- and 32-text requests, concurrency 1..64) on short / medium / mixed
texts; the server with length grouping off and with dynamic batching off (the baselines of the targets);
Triton's perf_analyzer as an independent load generator; Infinity (torch) as the Python-server peer.
Plus scaling curves (batch 1..256, sequence 16..512), and a corpus call: `client.embed(N texts)` through the
server against `SentenceTransformer.encode(N texts)` in-process, in alternating rounds (`--only corpus`
runs that stage alone). Results: benchmarks/results/suite[_quick].json,
PNG plots, and a section of benchmarks/README.md (full mode). Everything heavy runs under the shared
lock /tmp/embedline-heavy.lock (the machine is shared), with threads pinned everywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from benchmarks.common import (
    README, REPO, RESULTS, command_line, data_dir, load_average, machine_info, measured_settings, pin_threads,
    update_readme_section,
)
from benchmarks.workloads import CORPUS_WORKLOADS, MEDIUM, MIXED, SHORT, build_workloads

log = logging.getLogger(__name__)

LOCK_FILE = "/tmp/embedline-heavy.lock"
BENCH_DIR = REPO / ".bench"
DEFAULT_ARTIFACT = BENCH_DIR / "artifacts" / "all-MiniLM-L6-v2"
CPU_VARIANTS = ("fp32", "fused", "int8", "openvino")  # fp16 is the GPU graph


@dataclass(frozen=True)
class Mode:
    """How much of everything a run measures; `full` is bounded to ~15-20 minutes on 2 cores."""

    name: str
    texts: int
    point_seconds: float
    warmup_seconds: float
    concurrency: tuple[int, ...]
    request_sizes: tuple[int, ...]
    all_variants: bool
    scaling_batch: tuple[int, ...]
    scaling_sequence: tuple[int, ...]
    scaling_seconds: float
    perf_analyzer_concurrency: tuple[int, ...]
    infinity_concurrency: tuple[int, ...]
    sentence_transformers_scaling: bool
    scaling_cap_seconds: float
    classify_requests: int  # timed requests per (embed|classify, request size) in the classification stage
    corpus_rounds: int = 2  # alternating rounds of the corpus stage (client.embed(N) vs encode(N) in-process)


MODES = {
    "quick": Mode("quick", texts=320, point_seconds=1.0, warmup_seconds=0.3, concurrency=(1, 16),
                  request_sizes=(1, 32), all_variants=False, scaling_batch=(1, 32, 128),
                  scaling_sequence=(16, 128, 512), scaling_seconds=0.3, perf_analyzer_concurrency=(16,),
                  infinity_concurrency=(), sentence_transformers_scaling=False, scaling_cap_seconds=0.5,
                  classify_requests=30, corpus_rounds=2),
    "full": Mode("full", texts=1000, point_seconds=3.0, warmup_seconds=0.5, concurrency=(1, 2, 4, 8, 16, 32, 64),
                 request_sizes=(1, 32), all_variants=True, scaling_batch=(1, 2, 4, 8, 16, 32, 64, 128, 256),
                 scaling_sequence=(16, 32, 64, 128, 256, 512), scaling_seconds=1.0,
                 perf_analyzer_concurrency=(1, 4, 16, 64), infinity_concurrency=(1, 4),
                 sentence_transformers_scaling=True, scaling_cap_seconds=2.0,
                 classify_requests=200, corpus_rounds=9),
}
# (request size, concurrency) of the mixed-length comparison (length grouping on vs off).
MIXED_POINTS = ((32, 2), (1, 32))


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="smoke run (~2 minutes): fewer points, shorter windows")
    parser.add_argument("--tune", action="store_true",
                        help="server settings sweep for the default variant instead of the suite")
    parser.add_argument("--artifact", default=None,
                        help=f"exported artifact (default: {DEFAULT_ARTIFACT.relative_to(REPO)}, exported from the "
                             "bundled all-MiniLM-L6-v2 with --openvino and the STS-B dev Spearman when missing)")
    parser.add_argument("--threads", type=int, default=2, help="threads for every engine (pinned)")
    parser.add_argument("--variants", default=None, help="comma-separated server variants (default: by mode)")
    parser.add_argument("--no-infinity", action="store_true", help="skip Infinity")
    parser.add_argument("--infinity-venv", default=str(BENCH_DIR / "infinity-venv"),
                        help="virtual environment with infinity-emb installed")
    parser.add_argument("--no-lock", action="store_true", help=f"do not take {LOCK_FILE} (others' numbers suffer)")
    parser.add_argument("--output", default=None, help="results JSON (default: benchmarks/results/suite[_quick].json)")
    parser.add_argument("--no-readme", action="store_true", help="do not update benchmarks/README.md")
    parser.add_argument("--only", choices=("corpus",), default=None,
                        help="run one stage alone: corpus (client.embed(N) vs SentenceTransformer.encode(N)); "
                             "results in benchmarks/results/corpus[_quick].json")


@contextlib.contextmanager
def heavy_lock(enabled: bool):
    """The lock every heavy measurement on this shared machine takes (same as `flock LOCK_FILE cmd`)."""
    if not enabled:
        yield
        return
    with open(LOCK_FILE, "a") as handle:
        log.info("waiting for %s", LOCK_FILE)
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def lock_is_held() -> bool:
    """True when LOCK_FILE is held now (by this run, or by a `flock LOCK_FILE ... -m benchmarks.suite --no-lock`)."""
    try:
        with open(LOCK_FILE, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False
    except OSError:
        return True


def prepare_artifact(path: str | None):
    """The artifact to benchmark: the given one, or the bundled model exported once into .bench/."""
    from embedline import artifact as art
    from embedline.export.pipeline import export_artifact
    from embedline.variants import openvino_runtime_available

    if path:
        artifact = art.load_artifact(path)
        return artifact if artifact.metadata.get("export") else export_artifact(artifact)
    if art.is_artifact(DEFAULT_ARTIFACT):
        artifact = art.load_artifact(DEFAULT_ARTIFACT)
        if artifact.metadata.get("export"):
            return artifact
    else:
        artifact = art.import_model_dir(art.bundled_model_dir(), DEFAULT_ARTIFACT, name="all-MiniLM-L6-v2")
    data = data_dir(required=False)
    return export_artifact(
        artifact, threads=2,
        sts_file=data / "sts" / "stsb_dev.tsv.gz" if data else None,
        openvino=openvino_runtime_available(),
        calibration_file=data / "corpus" / "unsup_corpus.txt.gz" if data else None,
    )


def server_variants(artifact, mode: Mode, requested: str | None, default_variant: str) -> list[str]:
    from embedline.variants import openvino_runtime_available, servable_variants

    available = [v for v in servable_variants(artifact) if v in CPU_VARIANTS]
    if "openvino" in available and not openvino_runtime_available():
        available.remove("openvino")
    if requested:
        return [v for v in requested.split(",") if v in available]
    if mode.all_variants:
        return available
    return list(dict.fromkeys([default_variant, "fp32"]))


@contextlib.contextmanager
def triton(artifact, tmp: Path, settings, index: str | None = None):
    from embedline.serving.repository import build_repository
    from embedline.serving.triton import TritonServer, free_port

    repository = build_repository(artifact, Path(tempfile.mkdtemp(dir=tmp)) / "models", settings, index=index)
    with TritonServer(repository, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port()) as server:
        yield server


# ---- the measurements ------------------------------------------------------------------------------


def engine_names(variants: list[str]) -> list[str]:
    from benchmarks.report import inprocess_name

    return ["sentence-transformers", *[inprocess_name(v) for v in variants]]


def measure_inprocess(artifact, names: list[str], workloads_file: Path, mode: Mode, threads: int,
                      bar) -> tuple[dict, dict]:
    """(results by engine and workload, scaling curves), each engine alone in its own process."""
    from benchmarks.engine_process import EngineProcess

    results: dict[str, Any] = {}
    batch_curves: dict[str, list] = {}
    sequence_curves: dict[str, list] = {}
    for name in names:
        bar.set_postfix_str(f"in-process {name}")
        try:
            with EngineProcess(artifact.path, name, threads, workloads_file) as engine:
                entry = results[name] = {}
                for workload, key, batch in ((SHORT, "b32", 32), (SHORT, "b1", 1), (MEDIUM, "b32", 32),
                                             (MIXED, "b32", 32)):
                    entry.setdefault(workload, {})[key] = engine.batches(workload, batch, mode.point_seconds)
                if name != "sentence-transformers" or mode.sentence_transformers_scaling:
                    bar.set_postfix_str(f"scaling {name}")
                    batch_curves[name] = engine.curve("batch", mode.scaling_batch, mode.scaling_seconds,
                                                      mode.scaling_cap_seconds)
                    sequence_curves[name] = engine.curve("sequence", mode.scaling_sequence, mode.scaling_seconds,
                                                         mode.scaling_cap_seconds)
        except Exception as exc:  # noqa: BLE001 - record why an engine is missing, measure the rest
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        bar.update(1)
    scaling = {"batch": batch_curves, "sequence": {k: v for k, v in sequence_curves.items() if v},
               "sequence_batch_size": 16,
               "note": "batch: real short texts, tokenization included; sequence: fixed-shape token batches, "
                       "engine only; each engine in its own process"}
    return results, scaling


def sweep_points(server, workloads, combos, mode: Mode) -> list[dict]:
    from benchmarks.load import measure_point

    points = []
    for workload, size, concurrency in combos:
        w = workloads[workload]
        point = measure_point(server, w.texts, w.tokens, size, concurrency, mode.point_seconds, mode.warmup_seconds)
        points.append({"workload": workload, **point})
        log.info("%s %s-text c%d: %.1f sentences/s, p50 %.2f ms, avg batch %s", workload, size, concurrency,
                 point["sentences_per_s"], point["p50_ms"], point.get("avg_dynamic_batch"))
    return points


def sequential_point(server, workloads, mode: Mode) -> dict:
    """1 short text at a time through the SDK's blocking client: the latency the c1 target reads."""
    from benchmarks.load import sequential_latency

    w = workloads[SHORT]
    point = sequential_latency(server.grpc_url, w.texts, w.tokens, mode.point_seconds, mode.warmup_seconds)
    log.info("short 1-text sequential (sync client): p50 %.2f ms", point["p50_ms"])
    return {"workload": SHORT, **point}


def bracket_reference(engines: dict, variant: str, mode: Mode, with_st: bool) -> dict:
    """The in-process numbers a server variant's targets compare with, measured right next to its sweep.

    On a shared machine the load changes by the minute; measuring the reference just before and just
    after the server (and using the mean) keeps each ratio's two sides under the same conditions.
    `engines`: name -> a running EngineProcess (idle while the server is measured).
    """
    from benchmarks.report import inprocess_name

    seconds = max(1.0, mode.point_seconds / 2)
    reference = {}
    engine = engines.get(inprocess_name(variant))
    if engine is not None:
        reference["raw_b32"] = engine.batches(SHORT, 32, seconds)
        reference["raw_b1"] = engine.batches(SHORT, 1, seconds)
    if with_st and "sentence-transformers" in engines:
        reference["st_b32"] = engines["sentence-transformers"].batches(SHORT, 32, seconds)
    return reference


def _merge_brackets(before: dict, after: dict) -> dict:
    """Mean of the before/after measurements (throughput and p50), both kept for the record."""
    merged = {}
    for key in before:
        if key in after:
            merged[key] = {
                "sentences_per_s": round((before[key]["sentences_per_s"] + after[key]["sentences_per_s"]) / 2, 1),
                "p50_ms": round((before[key]["p50_ms"] + after[key]["p50_ms"]) / 2, 3),
                "before": before[key], "after": after[key],
            }
    return merged


def measure_servers(artifact, variants, default_variant, workloads, mode: Mode, threads: int, tmp: Path,
                    workloads_file: Path, bar) -> dict:
    """Every server configuration: the default variant (+ extra workloads), its two baselines right after
    it (pad-to-longest, no dynamic batching), then the other variants; in-process references bracket each."""
    from dataclasses import asdict

    base = measured_settings(default_variant, threads)
    sweep = [(SHORT, size, c) for size in mode.request_sizes for c in mode.concurrency]
    extra = [(MEDIUM, 32, 2), (MEDIUM, 1, 16)] + [(MIXED, s, c) for s, c in MIXED_POINTS]
    if 16 not in mode.concurrency:
        extra.append((SHORT, 1, 16))
    # (name, settings, sweep points, extra points, bracket with references)
    configs = [(default_variant, base, sweep, extra, True),
               (f"{default_variant} length grouping off", replace(base, length_grouping=False), [],
                [(MIXED, s, c) for s, c in MIXED_POINTS], False),
               (f"{default_variant} dynamic batching off", replace(base, dynamic_batching=False), [],
                [(SHORT, 1, 1), (SHORT, 1, 16), (SHORT, 32, 2)], False)]
    configs += [(v, measured_settings(v, threads), sweep, [], True) for v in variants if v != default_variant]

    from benchmarks.engine_process import EngineProcess
    from benchmarks.report import inprocess_name

    results: dict[str, Any] = {}
    for name, settings, sweep_combos, extra_combos, bracket in configs:
        bar.set_postfix_str(f"triton {name}")
        entry = results[name] = {"settings": asdict(settings)}
        with_st = name == default_variant
        try:
            with contextlib.ExitStack() as stack:
                engines = {}
                if bracket:
                    for engine in [inprocess_name(settings.variant)] + (["sentence-transformers"] if with_st else []):
                        engines[engine] = stack.enter_context(
                            EngineProcess(artifact.path, engine, threads, workloads_file))
                before = bracket_reference(engines, settings.variant, mode, with_st) if bracket else {}
                with triton(artifact, tmp, settings) as server:
                    entry["sweep"] = sweep_points(server, workloads, sweep_combos, mode)
                    entry["points"] = sweep_points(server, workloads, extra_combos, mode)
                    if bracket:
                        entry["sequential"] = sequential_point(server, workloads, mode)
                if bracket:
                    entry["reference"] = _merge_brackets(before, bracket_reference(engines, settings.variant, mode,
                                                                                   with_st))
        except Exception as exc:  # noqa: BLE001 - one configuration failing must not lose the others
            log.exception("server %s failed", name)
            entry["error"] = f"{type(exc).__name__}: {exc}"
        bar.update(1)
    return results


def measure_perf_analyzer(artifact, variant, workloads, mode: Mode, threads: int, tmp: Path) -> dict:
    from benchmarks import perf_analyzer

    try:
        perf_analyzer.binary()
        # No queue policy (max_queue_size 0): perf_analyzer records no request from a model that has one.
        settings = measured_settings(variant, threads, max_queue_size=0)
        with triton(artifact, tmp, settings) as server:
            points = [perf_analyzer.run(server.grpc_url, workloads[SHORT].texts, c, tmp / "perf_analyzer",
                                        measurement_ms=int(1000 * max(1.0, mode.point_seconds)))
                      for c in mode.perf_analyzer_concurrency]
        return {"variant": variant, "request_size": 1, "workload": SHORT, "points": points}
    except Exception as exc:  # noqa: BLE001 - recorded in the results, the rest of the suite goes on
        return {"variant": variant, "error": f"{type(exc).__name__}: {exc}"}


def measure_infinity(artifact, workloads, mode: Mode, threads: int, venv: Path) -> dict:
    from embedline.serving.triton import free_port

    from benchmarks.infinity import InfinityServer

    if not mode.infinity_concurrency:
        return {"error": "skipped in quick mode"}
    model_dir = Path(artifact.metadata.get("base_model") or artifact.path)
    server = InfinityServer(model_dir, free_port(), threads, venv=venv)
    try:
        with server:
            w = workloads[SHORT]
            points = [server.closed_loop(w.texts, w.tokens, 32, c, mode.point_seconds, mode.warmup_seconds)
                      for c in mode.infinity_concurrency]
            points.append(server.closed_loop(w.texts, w.tokens, 1, 1, mode.point_seconds, mode.warmup_seconds))
        return {"version": server.version(), "model_dir": str(model_dir), "engine": "torch", "device": "cpu",
                "points": points}
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {exc}"}


def measure_classify(mode: Mode, threads: int, tmp: Path) -> dict:
    """`classify` vs `embed` latency through the server: the bundled model + a frozen-body emotion head (fp32)."""
    from benchmarks.classify_latency import classifier_artifact, emotion_texts, measure_classify_latency

    try:
        artifact = classifier_artifact(tmp / "classifier")
        latency, labels = measure_classify_latency(artifact, "fp32", threads, mode.classify_requests,
                                                   emotion_texts(), tmp)
    except Exception as exc:  # a missing extra (scikit-learn) or data must not lose the rest of the run
        log.warning("classification latency not measured: %s", exc)
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"variant": "fp32", "labels": labels, "requests": mode.classify_requests, "latency": latency}


def _corpus_call(url: str, texts: list[str], **client_settings) -> dict:
    """One `client.embed(texts)` through the sync SDK (a fresh client, its channel and config look-up
    warmed up by a one-request call first); -> sentences/s and the request plan it used."""
    from embedline.client import EmbeddingClient

    with EmbeddingClient(url, timeout=600.0, **client_settings) as client:
        client.embed(texts[:8])
        started = time.perf_counter()
        client.embed(texts)
        seconds = time.perf_counter() - started
        spec = client._specs[client.embed_model]
        plan = client._plan(spec, len(texts))
    return {"sentences_per_s": round(len(texts) / seconds, 1), "seconds": round(seconds, 3),
            "batch_size": plan.batch_size, "in_flight": plan.in_flight}


def _async_corpus_call(url: str, texts: list[str]) -> float:
    """`await client.embed(texts)` through the asyncio SDK, warmed up the same way; -> sentences/s."""
    import asyncio

    from embedline.client import AsyncEmbeddingClient

    async def call() -> float:
        async with AsyncEmbeddingClient(url, timeout=600.0) as client:
            await client.embed(texts[:8])
            started = time.perf_counter()
            await client.embed(texts)
            return time.perf_counter() - started

    return round(len(texts) / asyncio.run(call()), 1)


def measure_corpus(artifact, variant: str, workloads, mode: Mode, threads: int, tmp: Path,
                   workloads_file: Path) -> dict:
    """A corpus call: `client.embed(N texts)` through the server against `SentenceTransformer.encode(N texts)`
    in-process (the same N short texts, the same threads), in alternating rounds.

    After one untimed pass of each side, each round runs: sentence-transformers over the N texts
    (batches of 32 cut from the length-sorted list: what `encode` does with a list), the SDK's corpus
    call with its automatic request plan, the same call through the asyncio SDK, the sync call with the
    other plan (what the SDK plans for this server with the other length-group size), and the server's
    closed-loop best (16 concurrent 32-text requests from the asyncio SDK), which the corpus call should
    approach. Then the longer workloads (`lengths`: sentences, passages), each in its own alternating rounds
    of sentence-transformers and the SDK's corpus call.
    """
    import math
    import statistics

    from embedline.client.planning import plan_requests

    from benchmarks.common import cpu_flags, other_group_size
    from benchmarks.engine_process import EngineProcess
    from benchmarks.load import closed_loop

    w = workloads[SHORT]
    texts = list(w.texts)
    rounds: dict[str, list[float]] = {"sentence_transformers": [], "client": [], "client_async": [],
                                      "client_other_plan": [], "closed_loop_32x16": []}
    plan: dict[str, int] = {}
    try:
        settings = measured_settings(variant, threads)  # within the thread budget of the in-process side
        other = plan_requests(len(texts), settings.max_batch_size, instances=settings.instances,
                              group_size=other_group_size(settings.group_size),
                              max_queue_size=settings.max_queue_size)
        with EngineProcess(artifact.path, "sentence-transformers", threads, workloads_file) as st, \
                triton(artifact, tmp, settings) as server:
            # min_batches = every batch once, seconds 0: exactly one pass over the N texts.
            one_pass = {"min_batches": math.ceil(len(texts) / 32), "sort_by_length": True}
            # One untimed pass each first: torch's first batches and OpenVINO's first run of every input
            # shape (~10 ms more than a repeat) are start-up costs a running server has already paid.
            st.batches(SHORT, 32, 0.0, **one_pass)
            _corpus_call(server.grpc_url, texts)
            for _ in range(mode.corpus_rounds):
                point = st.batches(SHORT, 32, 0.0, **one_pass)
                rounds["sentence_transformers"].append(point["sentences_per_s"])
                call = _corpus_call(server.grpc_url, texts)
                plan = {"batch_size": call["batch_size"], "in_flight": call["in_flight"]}
                rounds["client"].append(call["sentences_per_s"])
                rounds["client_async"].append(_async_corpus_call(server.grpc_url, texts))
                rounds["client_other_plan"].append(_corpus_call(
                    server.grpc_url, texts, batch_size=other.batch_size,
                    max_concurrency=other.in_flight)["sentences_per_s"])
                rounds["closed_loop_32x16"].append(closed_loop(
                    server.grpc_url, texts, w.tokens, 32, 16, mode.point_seconds, mode.warmup_seconds)["sentences_per_s"])
            lengths = {name: _corpus_beside_st(st, server.grpc_url, workloads[name], mode.corpus_rounds)
                       for name in CORPUS_WORKLOADS if name != SHORT and name in workloads}
    except Exception as exc:  # noqa: BLE001 - recorded in the results, the rest of the suite goes on
        log.exception("corpus stage failed")
        return {"variant": variant, "error": f"{type(exc).__name__}: {exc}"}
    median = {name: round(statistics.median(values), 1) for name, values in rounds.items()}

    def ratio(a: str, b: str) -> float | None:
        return round(median[a] / median[b], 3) if median[b] else None

    return {"variant": variant, "texts": len(texts), "workload": SHORT, "threads": threads,
            "server": {"instances": settings.instances, "threads_per_instance": settings.intra_op_threads},
            "rounds": rounds, "median": median, "plan": plan,
            "other_plan": {"batch_size": other.batch_size, "in_flight": other.in_flight},
            "ratio_client_to_st": ratio("client", "sentence_transformers"),
            "ratio_client_to_closed_loop": ratio("client", "closed_loop_32x16"),
            "ratio_async_to_closed_loop": ratio("client_async", "closed_loop_32x16"),
            "ratio_other_plan_to_closed_loop": ratio("client_other_plan", "closed_loop_32x16"),
            "lengths": lengths, "cpu_flags": cpu_flags(), "load": load_average()}


def _corpus_beside_st(st, url: str, workload, rounds: int) -> dict:
    """SentenceTransformer.encode(N) (batch 32, length-sorted) and client.embed(N) on one workload, in
    alternating rounds after one untimed pass each: sentences/s medians and their ratio."""
    import math
    import statistics

    texts = list(workload.texts)
    one_pass = {"min_batches": math.ceil(len(texts) / 32), "sort_by_length": True}
    st.batches(workload.name, 32, 0.0, **one_pass)
    _corpus_call(url, texts)
    measured: dict[str, list[float]] = {"sentence_transformers": [], "client": []}
    for _ in range(rounds):
        measured["sentence_transformers"].append(st.batches(workload.name, 32, 0.0, **one_pass)["sentences_per_s"])
        measured["client"].append(_corpus_call(url, texts)["sentences_per_s"])
    median = {name: round(statistics.median(values), 1) for name, values in measured.items()}
    return {"texts": len(texts), "mean_tokens": round(float(workload.tokens.mean()), 1), "rounds": measured,
            "median": median, "ratio_client_to_st": round(median["client"] / median["sentence_transformers"], 3)}


def sts_record(artifact) -> dict | None:
    """Spearman per variant from the artifact's export, and each variant's loss to fp32."""
    variants = artifact.parity().get("variants", {})
    scores = {v: e.get("sts_spearman") for v, e in variants.items() if e.get("sts_spearman") is not None}
    if "fp32" not in scores:
        return None
    sts = artifact.parity().get("sts") or {}
    return {"spearman": scores, "torch": sts.get("torch_spearman"), "file": sts.get("file"),
            "loss": {v: round(scores["fp32"] - s, 2) for v, s in scores.items()}}


# ---- the run ---------------------------------------------------------------------------------------


def run_suite(args: argparse.Namespace, mode: Mode) -> dict:
    from embedline.variants import choose_variant

    from benchmarks import report
    from benchmarks.gpu import measure_gpu

    started = time.perf_counter()
    load_before = load_average()
    artifact = prepare_artifact(args.artifact)
    default_variant = choose_variant(artifact, "cpu")
    variants = server_variants(artifact, mode, args.variants, default_variant)
    if default_variant not in variants:
        variants.insert(0, default_variant)
    inprocess_variants = variants
    workloads = build_workloads(artifact.tokenizer_path, artifact.max_seq_length, n=mode.texts)
    # progress steps: the in-process engines (sentence-transformers + variants); the server configurations
    # (each variant, + dynamic batching off, + pad-to-longest); perf_analyzer, Infinity, GPU, classify, corpus,
    # the OpenAI route
    steps = (1 + len(inprocess_variants)) + (len(variants) + 2) + 6
    with tempfile.TemporaryDirectory(prefix="embedline-bench-") as tmp_dir, \
            tqdm(total=steps, desc=f"bench ({mode.name})", unit="step") as bar:
        tmp = Path(tmp_dir)
        from benchmarks.engine_process import write_workloads

        workloads_file = write_workloads(workloads, tmp / "workloads.json")
        inproc, scaling = measure_inprocess(artifact, engine_names(inprocess_variants), workloads_file, mode,
                                            args.threads, bar)
        servers = measure_servers(artifact, variants, default_variant, workloads, mode, args.threads, tmp,
                                  workloads_file, bar)
        bar.set_postfix_str("perf_analyzer")
        pa = measure_perf_analyzer(artifact, default_variant, workloads, mode, args.threads, tmp)
        bar.update(1)
        bar.set_postfix_str("infinity")
        infinity = ({"error": "skipped (--no-infinity)"} if args.no_infinity
                    else measure_infinity(artifact, workloads, mode, args.threads, Path(args.infinity_venv)))
        bar.update(1)
        bar.set_postfix_str("gpu")
        gpu = measure_gpu(artifact, workloads, mode, args.threads, tmp)
        bar.update(1)
        bar.set_postfix_str("classify")
        classify = measure_classify(mode, args.threads, tmp)
        bar.update(1)
        bar.set_postfix_str("corpus")
        corpus = measure_corpus(artifact, default_variant, workloads, mode, args.threads, tmp, workloads_file)
        bar.update(1)
        bar.set_postfix_str("openai route")
        openai_route = measure_openai_route(artifact, default_variant, mode, args.threads)
        bar.update(1)
    results = {
        "suite": "benchmarks.suite",
        "mode": mode.name,
        "machine": machine_info(),
        "conditions": {"threads": args.threads, "load_before": load_before, "load_after": load_average(),
                       "seconds": round(time.perf_counter() - started, 1), "lock": LOCK_FILE if lock_is_held() else None,
                       "shared_machine": True},
        "model": artifact.name,
        "artifact": str(artifact.path),
        "default_variant": default_variant,
        "server_variants": [v for v in variants if "error" not in servers.get(v, {})],
        "mode_settings": mode.__dict__,
        "workloads": {name: w.summary() for name, w in workloads.items()},
        "sts": sts_record(artifact),
        "inprocess": inproc,
        "plot_inprocess": [report.inprocess_name(default_variant)],
        "scaling": scaling,
        "server": servers,
        "mixed_points": [list(p) for p in MIXED_POINTS],
        "perf_analyzer": pa,
        "infinity": infinity,
        "gpu": gpu,
        "classify": classify,
        "corpus": corpus,
        "openai_route": openai_route,
        "export": artifact.metadata.get("export"),
    }
    results["targets"] = report.compute_targets(results)
    return results


def measure_openai_route(artifact, variant: str, mode: Mode, threads: int) -> dict:
    """The OpenAI-compatible route beside gRPC on the same server (benchmarks/openai_route.py)."""
    from benchmarks.openai_route import measure

    try:
        quick = mode.name == "quick"
        return measure(artifact, variant, requests=40 if quick else 200, seconds=1.0 if quick else 3.0,
                       rounds=2 if quick else 5, threads=threads)
    except Exception as exc:  # noqa: BLE001 - recorded in the results, the rest of the suite goes on
        return {"error": f"{type(exc).__name__}: {exc}"}


def run_corpus_only(args: argparse.Namespace, mode: Mode) -> dict:
    """The corpus stage alone (`--only corpus`), with the run's conditions."""
    from embedline.variants import choose_variant

    from benchmarks.engine_process import write_workloads

    started = time.perf_counter()
    load_before = load_average()
    artifact = prepare_artifact(args.artifact)
    variant = (args.variants or "").split(",")[0] or choose_variant(artifact, "cpu")
    workloads = build_workloads(artifact.tokenizer_path, artifact.max_seq_length, n=mode.texts)
    with tempfile.TemporaryDirectory(prefix="embedline-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        corpus = measure_corpus(artifact, variant, workloads, mode, args.threads, tmp,
                                write_workloads(workloads, tmp / "workloads.json"))
    return {"suite": "benchmarks.suite --only corpus", "mode": mode.name, "machine": machine_info(),
            "conditions": {"threads": args.threads, "load_before": load_before, "load_after": load_average(),
                           "seconds": round(time.perf_counter() - started, 1),
                           "lock": LOCK_FILE if lock_is_held() else None, "shared_machine": True},
            "model": artifact.name, "default_variant": variant, "corpus": corpus}


def write_results(results: dict, args: argparse.Namespace, command: str) -> Path:
    from benchmarks import plots, report

    name = "suite" if results["mode"] == "full" else "suite_quick"
    path = Path(args.output) if args.output else RESULTS / f"{name}.json"
    results["result_file"] = path.name
    plot_dir = path.parent / name
    written = plots.write_all(results, plot_dir, results["default_variant"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    if results["mode"] == "full" and not args.no_readme and path.parent == RESULTS:
        rel = [str(p.relative_to(README.parent)) for p in written]
        update_readme_section("suite", report.markdown(results, command, rel))
    return path


def print_targets(results: dict) -> None:
    print(f"\n{'target':<84} {'measured':>9}  {'goal':<10} pass")
    for t in results["targets"]:
        measured = "-" if t["measured"] is None else f"{t['measured']:.2f}"
        verdict = {True: "yes", False: "NO", None: "n/a"}[t["pass"]]
        print(f"{t['target'][:84]:<84} {measured:>9}  {t['goal']:<10} {verdict}  ({t['detail']})")


def run(args: argparse.Namespace) -> int:
    pin_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the load generator's threads share 2 cores
    logging.getLogger("embedline").setLevel(logging.WARNING)
    logging.getLogger("benchmarks").setLevel(logging.WARNING)
    mode = MODES["quick" if args.quick else "full"]
    command = command_line()
    with heavy_lock(not args.no_lock):
        if args.tune:
            from benchmarks import tuning

            path = tuning.run_tuning(args, prepare_artifact(args.artifact), mode)
            print(f"saved {path}")
            return 0
        if args.only == "corpus":
            results = run_corpus_only(args, mode)
            path = Path(args.output) if args.output else RESULTS / f"corpus{'' if mode.name == 'full' else '_quick'}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=2, default=str) + "\n")
            print(json.dumps({k: results["corpus"].get(k) for k in ("median", "plan", "ratio_client_to_st",
                                                                    "ratio_client_to_closed_loop",
                                                                    "ratio_other_plan_to_closed_loop", "error")}))
            print(json.dumps({name: {k: entry[k] for k in ("mean_tokens", "median", "ratio_client_to_st")}
                              for name, entry in results["corpus"].get("lengths", {}).items()}))
            print(f"\nsaved {path}")
            return 0
        results = run_suite(args, mode)
    path = write_results(results, args, command)
    print_targets(results)
    print(f"\nsaved {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.suite", description=__doc__.split("\n\n")[0])
    configure(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
