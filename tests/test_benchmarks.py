"""The benchmark suite's pieces, on the tiny model: structure of what they measure, never speed.

Workloads, the in-process engines, the closed-loop load generator and Triton metrics against a real
server, perf_analyzer, and the targets table. Every measurement window here is a fraction of a second.
"""

from __future__ import annotations

import math

import numpy as np
import pytest


@pytest.fixture(scope="module")
def workloads(tiny_fp32):
    from benchmarks.workloads import build_workloads

    return build_workloads(tiny_fp32.tokenizer_path, tiny_fp32.max_seq_length, n=60)


def test_workloads_have_the_length_mixes(workloads, tiny_fp32):
    from benchmarks.workloads import LONG_FRACTION

    assert set(workloads) == {"short", "medium", "mixed", "sentences", "passages"}
    assert len(workloads["sentences"].texts) == 60 and len(workloads["passages"].texts) == 15
    assert workloads["passages"].tokens.mean() >= workloads["medium"].tokens.mean() > workloads["short"].tokens.mean()
    short, medium, mixed = workloads["short"], workloads["medium"], workloads["mixed"]
    assert len(short.texts) == len(mixed.texts) == 60 and len(short.tokens) == 60
    assert all(isinstance(t, str) and t for t in short.texts)
    assert medium.tokens.mean() > short.tokens.mean()
    # 10% of the mixed texts are long (here cut to the tiny model's max_seq_length).
    longest = int(round(len(mixed.texts) * LONG_FRACTION))
    assert (mixed.tokens == tiny_fp32.max_seq_length).sum() >= longest
    summary = mixed.summary()
    assert {"texts", "source", "mean_tokens", "p90_tokens", "max_tokens"} <= set(summary)


def test_workloads_are_reproducible(tiny_fp32, workloads):
    from benchmarks.workloads import build_workloads

    again = build_workloads(tiny_fp32.tokenizer_path, tiny_fp32.max_seq_length, n=60)
    assert again["mixed"].texts == workloads["mixed"].texts


def test_inprocess_engine_measurements(tiny_fp32, workloads):
    from benchmarks import inprocess

    engine = inprocess.onnxruntime_engine(tiny_fp32, "fp32", threads=1)
    short = workloads["short"]
    result = inprocess.measure_batches(engine, short.texts, short.tokens, 8, seconds=0.05)
    assert result["sentences_per_s"] > 0 and result["tokens_per_s"] > result["sentences_per_s"]
    assert 0 < result["p50_ms"] <= result["p99_ms"] and result["batches"] >= 3
    tokens = inprocess.measure_tokens(engine, inprocess.token_batch(tiny_fp32.tokenizer_path, 4, 16), seconds=0.05)
    assert tokens["tokens_per_s"] == pytest.approx(16 * tokens["sentences_per_s"], rel=1e-3)


def test_length_sorted_batches_pad_the_least():
    from benchmarks import inprocess

    seen = []
    engine = inprocess.InProcessEngine("recorder", lambda texts: seen.append(texts))
    texts = [f"t{i}" for i in range(6)]
    tokens = np.array([9, 3, 7, 1, 5, 2])
    inprocess.measure_batches(engine, texts, tokens, 2, seconds=0.0, min_batches=3, sort_by_length=True)
    # warm-up, then the three batches in token-count order: (1, 2), (3, 5), (7, 9)
    assert seen[1:4] == [["t3", "t5"], ["t1", "t4"], ["t2", "t0"]]
    seen.clear()
    inprocess.measure_batches(engine, texts, tokens, 2, seconds=0.0, min_batches=3)
    assert seen[1:4] == [["t0", "t1"], ["t2", "t3"], ["t4", "t5"]]


@pytest.fixture(scope="module")
def served(start_server, tiny_fp32):
    # No queue policy: perf_analyzer records no request from a model that has one.
    return start_server(tiny_fp32, variant="fp32", max_batch_size=32, max_queue_size=0)


def test_closed_loop_against_the_real_server(served, workloads):
    from benchmarks.load import measure_point

    short = workloads["short"]
    point = measure_point(served.server, short.texts, short.tokens, request_size=1, concurrency=4,
                          seconds=0.4, warmup=0.1)
    assert point["requests"] >= 5 and point["errors"] == 0
    assert point["sentences_per_s"] > 0 and point["p50_ms"] <= point["p99_ms"]
    assert point["avg_dynamic_batch"] is not None and point["avg_dynamic_batch"] >= 1.0
    assert point["server_rss_mb"] > 0
    big = measure_point(served.server, short.texts, short.tokens, request_size=8, concurrency=2, seconds=0.3,
                        warmup=0.1)
    assert big["sentences_per_s"] == pytest.approx(8 * big["requests_per_s"], rel=0.01)


def test_sequential_latency_with_the_blocking_client(served, workloads):
    from benchmarks.load import sequential_latency

    short = workloads["short"]
    point = sequential_latency(served.server.grpc_url, short.texts, short.tokens, seconds=0.3, warmup=0.05)
    assert point["client"] == "sync" and point["concurrency"] == 1 and point["request_size"] == 1
    assert point["requests"] >= 5 and point["errors"] == 0
    assert 0 < point["p50_ms"] <= point["p99_ms"]
    # one request in flight: the rate is the inverse of the mean latency
    assert point["requests_per_s"] == pytest.approx(1000 / point["mean_ms"], rel=0.2)


def test_perf_analyzer_runs_against_the_server(served, workloads, tmp_path):
    from benchmarks import perf_analyzer

    try:
        perf_analyzer.binary()
    except perf_analyzer.PerfAnalyzerUnavailable as exc:
        pytest.skip(str(exc))
    result = perf_analyzer.run(served.grpc_url, workloads["short"].texts[:20], concurrency=2, workdir=tmp_path,
                               measurement_ms=300, timeout_s=60)
    assert "error" not in result, result
    assert result["sentences_per_s"] > 0 and result["p50_ms"] > 0


def _synthetic_results() -> dict:
    def point(size, conc, rate, p50=2.0, workload="short"):
        return {"workload": workload, "request_size": size, "concurrency": conc, "sentences_per_s": rate,
                "p50_ms": p50, "avg_dynamic_batch": 4.0}

    def ref(rate, p50=1.0):
        return {"sentences_per_s": rate, "p50_ms": p50}

    return {
        "default_variant": "int8",
        "server_variants": ["int8", "fp32"],
        "inprocess": {"sentence-transformers": {"short": {"b32": ref(100)}},
                      "onnxruntime int8": {"short": {"b32": ref(500), "b1": ref(400, 1.0)}},
                      "onnxruntime fp32": {"short": {"b32": ref(300)}}},
        "server": {
            "int8": {"sweep": [point(32, 2, 490), point(1, 16, 460), point(1, 1, 300, p50=2.0)],
                     "points": [point(32, 2, 400, workload="mixed")],
                     "reference": {"raw_b32": ref(500), "raw_b1": ref(400, 1.0), "st_b32": ref(90)}},
            "int8 length grouping off": {"points": [point(32, 2, 250, workload="mixed")]},
            "int8 dynamic batching off": {"points": [point(1, 16, 120)]},
            "fp32": {"sweep": [point(32, 2, 280)]},
        },
        "mixed_points": [[32, 2]],
        "sts": {"loss": {"int8": 0.27}},
        "infinity": {"error": "not installed"},
        "gpu": {"measured": False, "reason": "no GPU"},
    }


def test_targets_from_one_run():
    from benchmarks.report import compute_targets

    targets = {t["target"]: t for t in compute_targets(_synthetic_results())}
    assert all({"target", "measured", "goal", "pass", "detail"} <= set(t) for t in targets.values())
    by_start = {name.split(":")[0]: t for name, t in targets.items()}
    assert math.isclose(by_start["32-text requests, int8"]["measured"], 0.98) and by_start["32-text requests, int8"]["pass"]
    dyn = next(t for n, t in targets.items() if "dynamic batching on / off" in n)
    assert dyn["measured"] == pytest.approx(460 / 120, abs=1e-3) and dyn["pass"]
    assert "batch 32 / batch 1: 500.0 / 400.0 = 1.25" in dyn["detail"]  # the engine's own batching headroom
    latency = next(t for n, t in targets.items() if n.startswith("1 short text c1"))
    assert latency["measured"] == pytest.approx(1.0) and latency["pass"]
    mixed = next(t for n, t in targets.items() if n.startswith("mixed lengths"))
    assert mixed["measured"] == pytest.approx(1.6) and mixed["pass"]
    st = next(t for n, t in targets.items() if "sentence-transformers" in n)
    assert st["measured"] == pytest.approx(490 / 90, abs=1e-3)  # the bracketed reference, not the early one
    infinity = next(t for n, t in targets.items() if "Infinity" in n)
    assert infinity["pass"] is None and "not installed" in infinity["detail"]
    gpu = next(t for n, t in targets.items() if n.startswith("GPU"))
    assert gpu["pass"] is None


def test_latency_target_reads_the_blocking_client_point():
    from benchmarks.report import compute_targets

    results = _synthetic_results()
    results["server"]["int8"]["sequential"] = {"client": "sync", "request_size": 1, "concurrency": 1,
                                               "p50_ms": 3.0}
    latency = next(t for t in compute_targets(results) if t["target"].startswith("1 short text c1"))
    assert latency["measured"] == pytest.approx(2.0) and latency["pass"] is False
    assert "sync client" in latency["detail"] and "asyncio closed loop c1 p50 2.00" in latency["detail"]


def _cache_record(embedding_cache_rps: float, embedding_cache_right: bool = True) -> dict:
    right = {"sdk_gets_its_outputs": embedding_cache_right, "answer_after_publish_is_version_2": True}
    return {"speed": {"repeat_rate": {"c1": 0.31, "c16": 0.32},
                      "median": {"no cache": {"c16_requests_per_s": 200.0},
                                 "embedding cache": {"c16_requests_per_s": embedding_cache_rps},
                                 "Triton response cache": {"c16_requests_per_s": 300.0}}},
            "checks": {"embedding cache": right,
                       "Triton response cache": {"sdk_gets_its_outputs": False,
                                                 "answer_after_publish_is_version_2": True}}}


def test_the_repeated_queries_target_needs_a_gain_and_right_answers():
    from benchmarks.report import repeated_queries_target

    paying = repeated_queries_target(_cache_record(240.0))
    assert paying["measured"] == pytest.approx(1.2) and paying["pass"] is True
    assert "Triton's response cache 1.50x, wrong outputs" in paying["detail"]
    assert repeated_queries_target(_cache_record(190.0))["pass"] is False
    assert repeated_queries_target(_cache_record(240.0, embedding_cache_right=False))["pass"] is False
    assert repeated_queries_target(None)["pass"] is None


def test_the_search_query_targets_read_the_search_benchmarks_rounds():
    from benchmarks.report import search_query_targets

    served = {"rounds": [{}, {}, {}], "embed_50_ms": 7.0, "search_50_ms": 8.8, "inprocess_engine_50_ms": 4.0,
              "inprocess_search_50_ms": 1.0, "search_minus_embed_p50_ms": 1.8, "search_minus_inprocess_p50_ms": 3.8}
    in_process, over_embed = search_query_targets({"variant": "openvino", "embedded": served})
    assert in_process["measured"] == pytest.approx(3.8) and in_process["pass"] is False
    assert "engine 4.00 + store search 1.00 ms in-process" in in_process["detail"]
    assert over_embed["measured"] == pytest.approx(1.8) and over_embed["pass"] is True
    assert "medians of 3 rounds" in over_embed["detail"]
    served["search_minus_embed_p50_ms"] = 2.3
    assert search_query_targets({"variant": "openvino", "embedded": served})[1]["pass"] is False
    # a record from before the in-process reference, or none: visible, not measured
    assert [t["pass"] for t in search_query_targets({"embedded": {"search_minus_embed_p50_ms": 1.0}})] == [None, None]
    assert [t["pass"] for t in search_query_targets(None)] == [None, None]


def test_the_engine_ceiling_tables_compare_each_engine_with_sentence_transformers():
    from benchmarks.engine_ceiling import short_rows, sorted_rows

    results = {
        "sentence-transformers": {"short": {"request order": 100.0, "length-sorted": 200.0},
                                  "passages": {"request order": 20.0, "length-sorted": 25.0}},
        "openvino": {"short": {"request order": 300.0, "length-sorted": 800.0},
                     "passages": {"request order": 80.0, "length-sorted": 100.0}},
        "openvino, 2 processes x 1 thread (the served layout)": {"short": {"length-sorted": 1000.0},
                                                                 "passages": {"length-sorted": 110.0}},
        "onnxruntime int8": {"error": "EngineUnavailable: no int8 graph"},
    }
    # short texts against sentence-transformers in request order; the layout row has no request order
    assert short_rows(results, "short") == [
        ["sentence-transformers", 100.0, 200.0, "1.00x", "2.00x", ""],
        ["openvino", 300.0, 800.0, "3.00x", "8.00x", ""],
        ["onnxruntime int8", "-", "-", "-", "-", "EngineUnavailable: no int8 graph"]]
    # every workload length-sorted against sentence-transformers length-sorted
    rows = sorted_rows(results, ("short", "passages"))
    assert rows[1] == ["openvino", 800.0, "4.00x", 100.0, "4.00x", ""]
    assert rows[2] == ["openvino, 2 processes x 1 thread (the served layout)", 1000.0, "5.00x", 110.0, "4.40x", ""]
    assert rows[3] == ["onnxruntime int8", "-", "-", "-", "-", "EngineUnavailable: no int8 graph"]


def test_the_repeat_stream_repeats_popular_texts_at_the_rate_it_reports():
    from benchmarks.response_cache import repeat_rate, repeat_stream

    pool = [f"sentence {i}" for i in range(1000)]
    stream = repeat_stream(pool, 1000, 0.4, seed=1)
    assert stream == repeat_stream(pool, 1000, 0.4, seed=1) and set(stream) <= set(pool)
    assert 0.3 < repeat_rate(stream) < 0.5
    assert repeat_rate(["a", "b", "a", "a"]) == 0.5
    assert stream.count(pool[0]) > stream.count(pool[-1])


def test_markdown_summary_renders(tmp_path):
    from benchmarks.report import compute_targets, markdown

    results = _synthetic_results()
    results.update({
        "mode": "quick", "model": "tiny", "result_file": "suite_quick.json", "perf_analyzer": {},
        "machine": {"cpu_count": 2, "processor": "", "git_revision": "abc", "date": "today"},
        "conditions": {"threads": 2, "load_before": [1, 1, 1], "load_after": [1, 1, 1], "seconds": 10.0},
        "workloads": {"short": {"texts": 10, "mean_tokens": 12.0, "p90_tokens": 20}},
    })
    results["targets"] = compute_targets(results)
    text = markdown(results, ".venv/bin/python -m benchmarks.suite --quick", ["suite_quick/scaling.png"])
    assert "### Targets" in text and "| target |" in text and ".venv/bin/python -m benchmarks.suite --quick" in text


def test_plots_are_written(tmp_path):
    from benchmarks import plots

    results = _synthetic_results()
    for server in results["server"].values():
        for p in server.get("sweep", []):
            p.update({"p95_ms": 3.0, "p99_ms": 4.0})
    results["scaling"] = {"batch": {"onnxruntime int8": [{"batch_size": 1, "sentences_per_s": 10, "p50_ms": 1.0},
                                                         {"batch_size": 8, "sentences_per_s": 40, "p50_ms": 2.0}]},
                          "sequence": {"onnxruntime int8": [{"length": 16, "tokens_per_s": 100, "p50_ms": 1.0},
                                                            {"length": 64, "tokens_per_s": 90, "p50_ms": 5.0}]},
                          "sequence_batch_size": 16}
    written = plots.write_all(results, tmp_path, "int8")
    assert [p.name for p in written] == ["throughput_vs_concurrency.png", "latency_vs_concurrency.png", "scaling.png"]
    assert all(p.stat().st_size > 1000 for p in written)
    assert np.frombuffer(written[0].read_bytes()[:8], dtype=np.uint8).tolist()[1:4] == list(b"PNG")


@pytest.mark.processes
def test_engine_in_its_own_process(tiny_fp32, workloads, tmp_path):
    from benchmarks.engine_process import EngineProcess, EngineUnavailable, write_workloads

    path = write_workloads(workloads, tmp_path / "workloads.json")
    with EngineProcess(tiny_fp32.path, "onnxruntime fp32", 1, path) as engine:
        result = engine.batches("short", 8, seconds=0.05)
        assert result["sentences_per_s"] > 0 and result["batches"] >= 3
        assert engine.batches("short", 8, seconds=0.05, sort_by_length=True)["batches"] >= 3
        curve = engine.curve("sequence", (8, 16, 32), seconds=0.02, cap_seconds=60)
        assert [p["length"] for p in curve] == [8, 16, 32] and all("tokens_per_s" in p for p in curve)
        skipped = engine.curve("batch", (1, 2), seconds=0.02, cap_seconds=0.0)
        assert "skipped" in skipped[1]
    with pytest.raises(EngineUnavailable, match="int8"):
        with EngineProcess(tiny_fp32.path, "onnxruntime int8", 1, path):
            pass


@pytest.mark.processes
def test_the_served_layout_sums_its_one_thread_processes(tiny_fp32, workloads, tmp_path):
    from benchmarks.engine_ceiling import measure_served_layout
    from benchmarks.engine_process import write_workloads

    path = write_workloads(workloads, tmp_path / "workloads.json")
    result = measure_served_layout(tiny_fp32, path, "onnxruntime fp32", ("short",), 2, seconds=0.05, rounds=2)
    assert len(result["short"]["rounds"]["length-sorted"]) == 2 and result["short"]["length-sorted"] > 0
    assert "int8" in measure_served_layout(tiny_fp32, path, "onnxruntime int8", ("short",), 2, 0.05, 1)["error"]


@pytest.mark.processes
def test_classify_latency_stage_against_the_real_server(tiny_classifier, tmp_path):
    from benchmarks.classify_latency import latency_table, measure_classify_latency
    from benchmarks.report import markdown

    texts = [f"the song is good number {i}" for i in range(70)]
    latency, labels = measure_classify_latency(tiny_classifier, "fp32", 1, 3, texts, tmp_path)
    assert labels == 3
    assert set(latency) == {"embed x1", "classify x1", "embed x32", "classify x32"}
    assert all(entry["requests"] == 3 and 0 < entry["p50_ms"] <= entry["p95_ms"] for entry in latency.values())
    assert "| texts / request |" in latency_table(latency)

    results = _synthetic_results()
    results.update({
        "mode": "quick", "model": "tiny", "result_file": "suite_quick.json", "perf_analyzer": {}, "targets": [],
        "machine": {"cpu_count": 2, "processor": "", "git_revision": "abc", "date": "today"},
        "conditions": {"threads": 2, "load_before": [1, 1, 1], "load_after": [1, 1, 1], "seconds": 10.0},
        "workloads": {"short": {"texts": 10, "mean_tokens": 12.0, "p90_tokens": 20}},
        "classify": {"variant": "fp32", "labels": labels, "requests": 3, "latency": latency},
    })
    assert "### `classify` beside `embed`" in markdown(results, ".venv/bin/python -m benchmarks.suite --quick", [])


def test_tuning_takes_the_median_of_each_point_over_rounds():
    from benchmarks.tuning import median_points

    def point(concurrency, rate, p50):
        return {"workload": "short", "request_size": 1, "concurrency": concurrency, "sentences_per_s": rate,
                "p50_ms": p50, "avg_dynamic_batch": None}

    rounds = [[point(1, 100, 5.0), point(16, 300, 50.0)],
              [point(1, 180, 3.0), point(16, 200, 70.0)],
              [point(1, 150, 4.0), point(16, 250, 60.0)]]
    merged = median_points(rounds)
    assert [(p["concurrency"], p["sentences_per_s"], p["p50_ms"]) for p in merged] == [(1, 150, 4.0), (16, 250, 60.0)]
    assert merged[0]["workload"] == "short" and merged[0]["avg_dynamic_batch"] is None


def test_tuning_candidates_change_one_setting_each():
    from dataclasses import asdict

    from benchmarks.tuning import candidate_settings
    from embedline.serving.settings import RepositorySettings, served_settings

    base = RepositorySettings(variant="int8")
    candidates = candidate_settings(base, "int8")
    assert "ORT threads spin-wait off" in candidates and not candidates["ORT threads spin-wait off"].spin_wait
    for name, settings in candidates.items():
        changed = {k for k, v in asdict(settings).items() if asdict(base)[k] != v}
        assert len(changed) <= 2, (name, changed)  # instances x threads move together
    # The openvino defaults are two instances (engine_layout): the layout candidate is one using every thread.
    openvino = candidate_settings(served_settings("openvino", 2), "openvino")
    layout = openvino["1 instance x all threads"]
    assert (layout.instances, layout.intra_op_threads) == (1, 2)
    assert "2 instances x 1 thread" not in openvino and "openvino 2 streams per instance" in openvino
    # Its groups are 64 texts (group_size_for): the group candidate is the other size.
    assert openvino["groups of at most 32"].group_size == 32 and "groups of at most 64" not in openvino
    assert candidates["groups of at most 64"].group_size == 64


def test_side_by_side_rounds_won_counts_lower_latency_as_better():
    from benchmarks.side_by_side import medians, rounds_won

    values = {"a": {"client": [10, 30, 20], "client_async": [1, 1, 1], "closed_loop_32x16": [5, 5, 5],
                    "c1_p50_ms": [2.0, 4.0, 3.0]},
              "b": {"client": [20, 20, 20], "client_async": [2, 2, 2], "closed_loop_32x16": [5, 5, 5],
                    "c1_p50_ms": [3.0, 3.0, 3.0]}}
    assert rounds_won(values, "a", "b") == {"client": 1, "client_async": 0, "closed_loop_32x16": 0, "c1_p50_ms": 1}
    assert medians(values)["a"] == {"client": 20, "client_async": 1, "closed_loop_32x16": 5, "c1_p50_ms": 3.0}


def test_experiments_pass_training_config_fields_through():
    import argparse

    from benchmarks.common import parse_with_train_config

    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", nargs="+", default=["hardneg", "pairs"])
    parser.add_argument("--name", default="simcse_sup")
    args, config = parse_with_train_config(
        parser, {"objective": "sup", "eval_steps": 25},
        ["--batch-size", "512", "--mini_batch_size=64", "--lr", "2e-5", "--variants", "hardneg", "--name", "b512"])
    assert args.variants == ["hardneg"] and args.name == "b512"
    assert (config.objective, config.eval_steps, config.batch_size, config.mini_batch_size, config.lr) == \
        ("sup", 25, 512, 64, 2e-5)
    with pytest.raises(SystemExit):  # an unknown key is the parser's error, naming the valid ones
        parse_with_train_config(argparse.ArgumentParser(), {}, ["--learning-rate", "1e-4"])


def test_one_percentile_definition():
    from benchmarks.common import percentile

    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and percentile([1.0, 2.0, 3.0, 4.0], 95) == pytest.approx(3.85)


def test_the_suite_runs_from_the_checkout_and_is_not_packaged():
    import tomllib
    from pathlib import Path

    from embedline.cli import VERBS

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    setuptools = pyproject["tool"]["setuptools"]
    assert not any("benchmarks" in name for name in setuptools["packages"])
    assert not any("benchmarks" in folder for folder in setuptools["package-dir"].values())
    assert not any("benchmarks" in module for module, _ in VERBS.values())


def test_corpus_stage_against_the_real_server(served, workloads, tiny_fp32, tmp_path, monkeypatch):
    """The corpus stage's structure: the server side is real, sentence-transformers is stood in for (the
    stage's in-process side is EngineProcess.batches, tested above)."""
    import contextlib

    from benchmarks import engine_process, suite
    from benchmarks.report import compute_targets, corpus_markdown

    calls = []

    class FakeST:
        def __init__(self, *args):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def batches(self, workload, batch_size, seconds, min_batches=3, sort_by_length=False):
            calls.append((workload, batch_size, min_batches, sort_by_length))
            return {"sentences_per_s": 100.0}

    @contextlib.contextmanager
    def fake_triton(artifact, tmp, settings):
        yield served.server

    monkeypatch.setattr(engine_process, "EngineProcess", FakeST)
    monkeypatch.setattr(suite, "triton", fake_triton)
    mode = suite.Mode("test", texts=60, point_seconds=0.3, warmup_seconds=0.1, concurrency=(1,), request_sizes=(1,),
                      all_variants=False, scaling_batch=(1,), scaling_sequence=(16,), scaling_seconds=0.1,
                      perf_analyzer_concurrency=(), infinity_concurrency=(), sentence_transformers_scaling=False,
                      scaling_cap_seconds=0.1, classify_requests=1, corpus_rounds=2)
    corpus = suite.measure_corpus(tiny_fp32, "fp32", workloads, mode, 1, tmp_path, tmp_path / "unused.json")
    assert "error" not in corpus, corpus
    n = len(workloads["short"].texts)
    # 1 untimed pass + 2 rounds on each workload, the short texts first
    assert corpus["texts"] == n and calls == [
        (name, 32, math.ceil(len(workloads[name].texts) / 32), True) for name in ("short", "sentences", "passages")
        for _ in range(3)]
    assert set(corpus["rounds"]) == {"sentence_transformers", "client", "client_async", "client_other_plan",
                                     "closed_loop_32x16"}
    assert all(len(values) == 2 and all(v > 0 for v in values) for values in corpus["rounds"].values())
    assert corpus["plan"]["in_flight"] >= 1 and corpus["plan"]["batch_size"] >= 1
    assert corpus["ratio_client_to_st"] == pytest.approx(corpus["median"]["client"] / 100.0, rel=1e-2)
    assert corpus["cpu_flags"] is not None and len(corpus["load"]) == 3
    assert set(corpus["lengths"]) == {"sentences", "passages"}
    for entry in corpus["lengths"].values():
        assert len(entry["rounds"]["client"]) == 2 and entry["median"]["client"] > 0
        assert entry["ratio_client_to_st"] == pytest.approx(entry["median"]["client"] / 100.0, rel=1e-2)

    results = _synthetic_results()
    results["corpus"] = corpus
    sync_target, async_target, *against_st = [t for t in compute_targets(results)
                                              if t["target"].startswith("corpus call")]
    assert [t["target"].split(" texts")[0] for t in against_st] == [
        "corpus call on short", "corpus call on sentences", "corpus call on passages"]
    assert all(t["goal"] == ">= 5.0x" and t["measured"] > 0 for t in against_st)
    assert "Longer texts" in "\n".join(corpus_markdown(corpus))
    assert sync_target["measured"] == pytest.approx(corpus["ratio_client_to_closed_loop"], abs=1e-2)
    assert async_target["measured"] == pytest.approx(corpus["ratio_async_to_closed_loop"], abs=1e-2)
    assert "AsyncEmbeddingClient" in async_target["target"]
    assert "### Corpus call" in "\n".join(corpus_markdown(corpus))
    results["corpus"] = {"error": "boom"}
    assert next(t for t in compute_targets(results) if t["target"].startswith("corpus call"))["pass"] is None
    assert corpus_markdown({}) == []


def test_the_openai_route_stage_is_a_target_and_a_table():
    from benchmarks.report import openai_route_markdown, openai_route_target

    route = {"variant": "int8", "texts": "STS-B dev sentences", "concurrency": 16, "request_texts": 32,
             "latency_ms": {"gRPC SDK": {"p50": 2.0, "p99": 5.0, "n": 10, "added_p50": 0.0}},
             "throughput": {"route, AsyncOpenAI (base64)": {"texts_per_s_median": 300.0, "vs_grpc_median_of_rounds": 0.75,
                                                            "route_cpu_ms_per_request": 2.5,
                                                            "server_cpu_ms_per_request": 60.0}}}
    target = openai_route_target(route)
    assert target["measured"] == 0.75 and target["pass"] is False  # below the 0.8 goal
    text = "\n".join(openai_route_markdown(route))
    assert "OpenAI-compatible route beside gRPC" in text and "0.75x" in text


def test_setfit_comparison_pairs_the_same_seeds(tmp_path, monkeypatch):
    import json

    from benchmarks import setfit_library

    monkeypatch.setattr(setfit_library, "RESULTS", tmp_path)
    ours = {"runs": {"minilm/sst5/contrastive": {"seeds": {"0": {"accuracy_by_c": {"10": 29.0}},
                                                           "1": {"accuracy_by_c": {"10": 29.0}}}}}}
    (tmp_path / "ours.json").write_text(json.dumps(ours))
    setfit = {"runs": {"sst5": {"0": {"accuracy": 28.0}, "1": {"accuracy": 30.0}, "2": {"accuracy": 25.0}}}}
    table = setfit_library.build_table(setfit, "ours", "10")
    # Seed 2 has no run of ours: it is left out of both means and of the count.
    assert "| sst5 | 2 | 29.0 ± 1.4 | 29.0 ± 0.0 | +0.00 | 1 of 2 | 29.8 |" in table


def test_setfit_comparison_names_the_missing_venv(tmp_path):
    from benchmarks.setfit_library import run_setfit

    with pytest.raises(SystemExit, match="make bench-setfit-deps"):
        run_setfit(tmp_path / "no-venv", {"threads": 1})


def test_an_experiment_resolves_the_shared_options_and_records_its_conditions(tiny_fp32):
    from benchmarks.experiment import Experiment

    experiment = Experiment.from_command_line("d", rounds=3, argv=["--artifact", str(tiny_fp32.path), "--no-readme"],
                                              options=lambda parser: parser.add_argument("--texts", type=int, default=5))
    # The variant `serve` would pick for this artifact here, the script's default rounds, its own option.
    assert (experiment.variant, experiment.rounds, experiment.threads, experiment.args.texts) == ("fp32", 3, 2, 5)
    record = experiment.record(median={"a": 1.0})
    assert record["median"] == {"a": 1.0} and record["variant"] == "fp32" and record["artifact"] == "tiny"
    assert {"cpu_flags", "load_before", "load_after", "command"} <= set(record)
    experiment.report("never-written", "## nothing")  # --no-readme: the README is left alone
    from benchmarks.common import README

    assert "never-written" not in README.read_text()
