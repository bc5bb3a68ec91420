"""The suite's targets (speed and quality goals, each a ratio within one run) computed from one suite result,
and the markdown summary for benchmarks/README.md.

Every ratio is taken between numbers of the same run (same machine state, same pinned threads).
A target whose inputs were not measured in the run (quick mode, Infinity not installed, no GPU) is
reported as not measured, with the reason, never guessed.
"""

from __future__ import annotations

import json
from typing import Any

from benchmarks.common import RESULTS, markdown_table


def inprocess_name(variant: str) -> str:
    """The in-process engine that runs a server variant's graph."""
    return "openvino" if variant == "openvino" else f"onnxruntime {variant}"


def _point(results: dict, config: str, request_size: int, concurrency: int, workload: str = "short") -> dict | None:
    server = results["server"].get(config, {})
    for p in server.get("sweep", []) + server.get("points", []):
        if (p["request_size"], p["concurrency"], p.get("workload", "short")) == (request_size, concurrency, workload):
            return p
    return None


def _sequential(results: dict, config: str) -> dict | None:
    """The blocking-client 1-text latency point of a server configuration, when measured."""
    return results["server"].get(config, {}).get("sequential")


def _best(results: dict, config: str, request_size: int, workload: str = "short") -> dict | None:
    server = results["server"].get(config, {})
    points = [p for p in server.get("sweep", []) + server.get("points", [])
              if p["request_size"] == request_size and p.get("workload", "short") == workload]
    return max(points, key=lambda p: p["sentences_per_s"], default=None)


def _inproc(results: dict, engine: str, workload: str, key: str) -> dict | None:
    return results["inprocess"].get(engine, {}).get(workload, {}).get(key)


def _reference(results: dict, variant: str, key: str) -> dict | None:
    """The in-process number measured right around a server variant's sweep (suite.bracket_reference),
    else the one from the in-process phase."""
    bracketed = results["server"].get(variant, {}).get("reference", {}).get(key)
    if bracketed:
        return bracketed
    engine, batch = ("sentence-transformers", key[3:]) if key.startswith("st_") else (inprocess_name(variant), key[4:])
    return _inproc(results, engine, "short", batch)


# One text (or one search query) through the server: at most this much above the engine in-process.
ONE_TEXT_EXTRA_MS = 1.0


def _target(name: str, measured: float | None, goal: str, passed: bool | None, detail: str) -> dict[str, Any]:
    return {"target": name, "measured": None if measured is None else round(measured, 3), "goal": goal,
            "pass": passed, "detail": detail}


def _ratio_target(name: str, num: float | None, den: float | None, minimum: float, detail: str) -> dict:
    if not num or not den:
        return _target(name, None, f">= {minimum}x", None, "not measured in this run: " + detail)
    ratio = num / den
    return _target(name, ratio, f">= {minimum}x", ratio >= minimum, f"{detail}: {num:.1f} / {den:.1f}")


def saved_result(name: str) -> dict | None:
    """benchmarks/results/NAME.json as the last run of that benchmark saved it, or None."""
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


# One search query through the server: at most this much above a one-text embed through it.
SEARCH_OVER_EMBED_MS = 2.0


def search_query_targets(record: dict | None) -> list[dict]:
    """One search query at c1 over the served 100k-document collection (benchmarks/search.py, its own run):
    against the engine and the store in-process, and against a one-text embed through the same server."""
    served = (record or {}).get("embedded") or {}
    inprocess = "1 search query c1 over 100k documents: server p50 - (raw batch-1 p50 + in-process search p50) (ms)"
    over_embed = "1 search query c1 over 100k documents: search p50 - one-text embed p50 (ms)"
    if "search_minus_inprocess_p50_ms" not in served:
        missing = "not measured (python -m benchmarks.search)"
        return [_target(inprocess, None, f"<= {ONE_TEXT_EXTRA_MS} ms", None, missing),
                _target(over_embed, None, f"<= {SEARCH_OVER_EMBED_MS} ms", None, missing)]
    how = f"benchmarks/search.py, {record['variant']}, medians of {len(served['rounds'])} rounds of one caller"
    extra, gap = served["search_minus_inprocess_p50_ms"], served["search_minus_embed_p50_ms"]
    return [_target(inprocess, extra, f"<= {ONE_TEXT_EXTRA_MS} ms", extra <= ONE_TEXT_EXTRA_MS,
                    f"{how}: search {served['search_50_ms']:.2f} ms vs engine {served['inprocess_engine_50_ms']:.2f} "
                    f"+ store search {served['inprocess_search_50_ms']:.2f} ms in-process"),
            _target(over_embed, gap, f"<= {SEARCH_OVER_EMBED_MS} ms", gap <= SEARCH_OVER_EMBED_MS,
                    f"{how}: search {served['search_50_ms']:.2f} ms vs embed {served['embed_50_ms']:.2f} ms")]


def repeated_queries_target(record: dict | None) -> dict:
    """The cache serve runs by default on repeated queries (benchmarks/response_cache.py): on only if it pays
    at 16 callers and every answer is right; Triton's response cache in the detail."""
    name = "repeated queries (~30% repeats), 1-text c16: embedding cache / no cache"
    if not record:
        return _target(name, None, "> 1x, right answers", None, "not measured (python -m benchmarks.response_cache)")
    median, checks = record["speed"]["median"], record["checks"]
    key = "c16_requests_per_s"
    ratio = median["embedding cache"][key] / median["no cache"][key]
    from benchmarks.response_cache import CHECKS

    right = all(checks["embedding cache"][c] for c in CHECKS)
    triton = median["Triton response cache"][key] / median["no cache"][key]
    triton_right = checks["Triton response cache"]["sdk_gets_its_outputs"]
    detail = (f"{record['speed']['repeat_rate']['c16']:.0%} repeats; right answers: {right}; Triton's response "
              f"cache {triton:.2f}x, {'right' if triton_right else 'wrong'} outputs when callers ask for different "
              "ones (benchmarks/response_cache.py)")
    return _target(name, ratio, "> 1x, right answers", ratio > 1 and right, detail)


def compute_targets(results: dict) -> list[dict]:
    variant = results["default_variant"]
    targets = []

    # 1. 32-text requests: server vs raw in-process of the same variant, for every variant served.
    for served in results["server_variants"]:
        best32 = _best(results, served, 32)
        in32 = _reference(results, served, "raw_b32")
        targets.append(_ratio_target(
            f"32-text requests, {served}: server / raw in-process", best32 and best32["sentences_per_s"],
            in32 and in32["sentences_per_s"], 0.95,
            f"best over concurrency (c{best32['concurrency'] if best32 else '?'}) vs {inprocess_name(served)} batch 32"))

    # 2. 1-text requests at concurrency 16.
    c16 = _point(results, variant, 1, 16)
    in32 = _reference(results, variant, "raw_b32")
    targets.append(_ratio_target(f"1-text requests c16, {variant}: server / raw in-process batch-32",
                                 c16 and c16["sentences_per_s"], in32 and in32["sentences_per_s"], 0.9,
                                 f"avg dynamic batch {c16.get('avg_dynamic_batch') if c16 else '?'}"))
    off = _point(results, f"{variant} dynamic batching off", 1, 16)
    in1 = _reference(results, variant, "raw_b1")
    # What batching can give at most: the engine's own batch-32 over batch-1 throughput, same run.
    dynamic = _ratio_target(f"1-text requests c16, {variant}: dynamic batching on / off",
                            c16 and c16["sentences_per_s"], off and off["sentences_per_s"], 3.0,
                            "same server settings but the dynamic batcher")
    if in32 and in1 and in1["sentences_per_s"]:
        dynamic["detail"] += (f" (the engine in-process, batch 32 / batch 1: "
                              f"{in32['sentences_per_s']:.1f} / {in1['sentences_per_s']:.1f} = "
                              f"{in32['sentences_per_s'] / in1['sentences_per_s']:.2f})")
    targets.append(dynamic)

    # 3. Latency of one short text at concurrency 1.
    # Read from the blocking client (load.sequential_latency); older results have only the asyncio point.
    c1 = _sequential(results, variant) or _point(results, variant, 1, 1)
    if c1 and in1:
        extra = c1["p50_ms"] - in1["p50_ms"]
        loop = _point(results, variant, 1, 1)
        detail = f"{c1['p50_ms']:.2f} ms vs {in1['p50_ms']:.2f} ms ({c1.get('client', 'asyncio')} client"
        detail += f"; asyncio closed loop c1 p50 {loop['p50_ms']:.2f} ms)" if loop and loop is not c1 else ")"
        targets.append(_target(f"1 short text c1, {variant}: server p50 - raw batch-1 p50 (ms)", extra,
                               f"<= {ONE_TEXT_EXTRA_MS} ms", extra <= ONE_TEXT_EXTRA_MS, detail))
    else:
        targets.append(_target("1 short text c1: server p50 - raw p50", None, f"<= {ONE_TEXT_EXTRA_MS} ms", None,
                               "not measured"))
    targets += search_query_targets(saved_result("search"))
    targets.append(repeated_queries_target(saved_result("response_cache")))

    # 4. Mixed lengths: length-aware batching vs pad-to-longest, same server otherwise.
    for size, conc in results.get("mixed_points", []):
        on = _point(results, variant, size, conc, "mixed")
        pad = _point(results, f"{variant} length grouping off", size, conc, "mixed")
        targets.append(_ratio_target(f"mixed lengths, {size}-text requests c{conc}: length-aware / pad-to-longest",
                                     on and on["sentences_per_s"], pad and pad["sentences_per_s"], 1.3,
                                     f"{variant}, 90% short + 10% at 256+ tokens"))

    # 5. Best CPU variant through the server vs sentence-transformers and Infinity.
    best = max((b for v in results["server_variants"] if (b := _best(results, v, 32))),
               key=lambda p: p["sentences_per_s"], default=None)
    best_variant = next((v for v in results["server_variants"] if _best(results, v, 32) is best), None)
    st = _reference(results, results["default_variant"], "st_b32")
    targets.append(_ratio_target(f"best CPU server ({best_variant}) / sentence-transformers in-process",
                                 best and best["sentences_per_s"], st and st["sentences_per_s"], 5.0,
                                 "32-text requests vs SentenceTransformer.encode batch 32"))
    sts = results.get("sts") or {}
    loss = sts.get("loss", {}).get(best_variant) if best_variant else None
    targets.append(_target(f"STS-B dev Spearman loss of {best_variant} vs fp32", loss, "<= 0.5",
                           None if loss is None else loss <= 0.5,
                           "measured at export" if loss is not None else "not measured (no STS file at export)"))
    infinity = results.get("infinity", {})
    inf_best = max((p for p in infinity.get("points", []) if p["request_size"] == 32),
                   key=lambda p: p["sentences_per_s"], default=None)
    targets.append(_ratio_target(f"best CPU server ({best_variant}) / Infinity (torch)",
                                 best and best["sentences_per_s"], inf_best and inf_best["sentences_per_s"], 3.0,
                                 infinity.get("error") or "32-text requests, best concurrency each"))

    # 6. A corpus call (client.embed(N texts)) vs the same server's closed-loop best, same rounds.
    corpus = results.get("corpus") or {}
    median = corpus.get("median") or {}
    targets.append(_ratio_target(
        f"corpus call, {corpus.get('variant', variant)}: client.embed(N) / closed-loop best (32-text c16)",
        median.get("client"), median.get("closed_loop_32x16"), 0.9,
        corpus.get("error") or (f"N={corpus.get('texts')}, plan {corpus.get('plan', {}).get('batch_size')}-text "
                                f"requests x {corpus.get('plan', {}).get('in_flight')} in flight, "
                                f"median of {len(corpus.get('rounds', {}).get('client', []))} alternating rounds")))
    targets.append(_ratio_target(
        f"corpus call, {corpus.get('variant', variant)}: AsyncEmbeddingClient.embed(N) / closed-loop best",
        median.get("client_async"), median.get("closed_loop_32x16"), 0.9,
        corpus.get("error") or "the same rounds, asyncio SDK"))
    # ... and against sentence-transformers in-process on each length of text.
    for workload, entry in [("short", {"texts": corpus.get("texts"), "median": median}),
                            *(corpus.get("lengths") or {}).items()]:
        tokens = (results.get("workloads") or {}).get(workload, {}).get("mean_tokens") or entry.get("mean_tokens")
        targets.append(_ratio_target(
            f"corpus call on {workload} texts ({tokens} tokens): client.embed(N) / SentenceTransformer.encode(N)",
            (entry.get("median") or {}).get("client"), (entry.get("median") or {}).get("sentence_transformers"), 5.0,
            corpus.get("error") or f"N={entry.get('texts')}, the same threads, medians of alternating rounds"))

    # 7. The OpenAI-compatible route beside gRPC on the same server, same rounds.
    targets.append(openai_route_target(results.get("openai_route") or {}))

    gpu = results.get("gpu") or {}
    if gpu.get("measured"):
        from benchmarks.gpu import gpu_targets

        targets += gpu_targets(gpu)
    else:
        targets.append(_target("GPU targets (fp16 vs fp32 / sentence-transformers at batch 128, server / in-process)",
                               None, ">= 2x, >= 2x, >= 0.9x", None, gpu.get("reason", "not measured")))
    return targets


def openai_route_target(route: dict) -> dict[str, Any]:
    """Throughput through the route (the official AsyncOpenAI client) over the gRPC SDK's, same rounds."""
    via_openai = (route.get("throughput") or {}).get("route, AsyncOpenAI (base64)") or {}
    ratio = via_openai.get("vs_grpc_median_of_rounds")
    return _target("OpenAI route / gRPC SDK throughput (32-text requests, c16, AsyncOpenAI)", ratio, ">= 0.8",
                   None if ratio is None else ratio >= 0.8, route.get("error") or "median of the per-round ratios")


def openai_route_markdown(route: dict) -> list[str]:
    """The OpenAI route's table (benchmarks/openai_route.py): added latency and throughput beside gRPC."""
    if not route or route.get("error"):
        return [f"OpenAI route: {route.get('error', 'not measured')}", ""]
    from benchmarks.openai_route import markdown

    return [f"### OpenAI-compatible route beside gRPC ({route['variant']}, {route['texts']})", "", markdown(route), ""]


def corpus_markdown(corpus: dict) -> list[str]:
    """The corpus stage's table: sentences/s of each side (median over alternating rounds) and the ratios."""
    if corpus.get("error"):
        return [f"corpus call: {corpus['error']}", ""]
    median = corpus.get("median")
    if not median:
        return []
    plan, other = corpus.get("plan", {}), corpus.get("other_plan", {})
    server = corpus.get("server") or {}
    flags = ", ".join(f for f in corpus.get("cpu_flags", []) if "avx512" in f or "vnni" in f or "amx" in f) or "none"

    def row(name: str, key: str) -> list:
        value, st = median.get(key), median.get("sentence_transformers")
        return [name, _fmt(value), _fmt(round(value / st, 3) if value and st else None)]

    rows = [
        ["SentenceTransformer.encode(N) in-process (batch 32, length-sorted)", _fmt(median.get("sentence_transformers")),
         "-"],
        row(f"client.embed(N) via the server ({plan.get('batch_size')}-text requests, {plan.get('in_flight')} in flight)",
            "client"),
        row("await AsyncEmbeddingClient.embed(N), the same plan", "client_async"),
        row(f"client.embed(N), the other plan ({other.get('batch_size')}-text requests, {other.get('in_flight')} in flight)",
            "client_other_plan"),
        row("closed-loop best: 16 concurrent 32-text requests (asyncio SDK)", "closed_loop_32x16"),
    ]
    return [f"### Corpus call: `client.embed(N)` vs `SentenceTransformer.encode(N)` ({corpus.get('variant')}, "
            f"N={corpus.get('texts')} {corpus.get('workload')} texts, {corpus.get('threads')} threads each, "
            f"median of {len(corpus.get('rounds', {}).get('client', []))} alternating rounds; server "
            f"{server.get('instances', 1)} instance(s) x {server.get('threads_per_instance')} thread(s))", "",
            markdown_table(["", "sentences/s", "/ sentence-transformers"], rows), "",
            f"client.embed(N) / closed-loop best: {_fmt(corpus.get('ratio_client_to_closed_loop'))}, asyncio "
            f"{_fmt(corpus.get('ratio_async_to_closed_loop'))} (the other plan: "
            f"{_fmt(corpus.get('ratio_other_plan_to_closed_loop'))}). CPU int8 flags: {flags}; "
            f"load average {corpus.get('load')}.", ""] + corpus_lengths_markdown(corpus)


def corpus_lengths_markdown(corpus: dict) -> list[str]:
    """The corpus call on the longer workloads: sentences/s of each side and the ratio."""
    lengths = corpus.get("lengths") or {}
    if not lengths:
        return []
    rows = [[f"{name} ({entry['texts']} texts, mean {entry['mean_tokens']} tokens)",
             _fmt(entry["median"]["sentence_transformers"]), _fmt(entry["median"]["client"]),
             _fmt(entry["ratio_client_to_st"])] for name, entry in lengths.items()]
    return ["Longer texts, the same server and sentence-transformers process (medians of "
            f"{len(next(iter(lengths.values()))['rounds']['client'])} alternating rounds):", "",
            markdown_table(["workload", "SentenceTransformer.encode(N) sent/s", "client.embed(N) sent/s",
                            "/ sentence-transformers"], rows), ""]


def _cpu_model() -> str:
    """The CPU's model name (platform.processor() is empty on Linux); the report runs on the measured machine."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "CPU")
    except OSError:
        return "CPU"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.2f}"
    return str(value)


def markdown(results: dict, command: str, plots: list[str]) -> str:
    """The README section: conditions, targets, engines side by side, the default variant's sweep."""
    cond = results["conditions"]
    lines = [
        f"## Benchmark suite ({results['mode']} mode)",
        "",
        "`make bench` (full, ~15-20 min; installs the `openvino` extra and Infinity's own venv first) or "
        "`make bench-quick` (~2 min smoke run); `.venv/bin/python -m benchmarks.suite --tune` measures the server "
        "settings. "
        "Every ratio below is taken between numbers of this one run; the in-process reference of each server "
        "variant is measured just before and just after its load sweep (mean of the two), so both sides of a "
        "ratio see the same machine load. In-process ONNX Runtime uses the server's session options.",
        "",
        f"Machine: {results['machine']['cpu_count']} cores, {results['machine']['processor'] or _cpu_model()}; "
        f"git {results['machine']['git_revision']}; {results['machine']['date']}. Threads pinned to "
        f"{cond['threads']} everywhere. Load average before / after: {cond['load_before']} / {cond['load_after']} "
        f"(a shared machine: other work ran beside this one). Run time {cond['seconds']:.0f} s.",
        f"Model {results['model']}; default CPU variant **{results['default_variant']}**. "
        f"Workloads: " + "; ".join(f"{k}: {v['texts']} texts, mean {v['mean_tokens']} tokens (p90 {v['p90_tokens']})"
                                   for k, v in results["workloads"].items()) + ".",
        "",
        "### Targets",
        "",
        markdown_table(["target", "measured", "goal", "pass", "how"],
                       [[t["target"], _fmt(t["measured"]), t["goal"],
                         {True: "yes", False: "**no**", None: "not measured"}[t["pass"]], t["detail"]]
                        for t in results["targets"]]),
        "",
        "### Engines side by side (short texts, sentences/s)",
        "",
    ]
    rows = []
    for name, engine in results["inprocess"].items():
        short = engine.get("short", {})
        rows.append([f"{name} (in-process)", _fmt(short.get("b32", {}).get("sentences_per_s")),
                     _fmt(short.get("b1", {}).get("p50_ms")),
                     _fmt(engine.get("medium", {}).get("b32", {}).get("sentences_per_s")),
                     _fmt(engine.get("mixed", {}).get("b32", {}).get("sentences_per_s"))])
    for variant in results["server_variants"]:
        best32 = _best(results, variant, 32)
        c1 = _sequential(results, variant) or _point(results, variant, 1, 1)
        rows.append([f"triton {variant} (32-text requests, best c)", _fmt(best32 and best32["sentences_per_s"]),
                     _fmt(c1 and c1["p50_ms"]), _fmt((_best(results, variant, 32, "medium") or {}).get("sentences_per_s")),
                     _fmt((_best(results, variant, 32, "mixed") or {}).get("sentences_per_s"))])
    infinity = results.get("infinity", {})
    if infinity.get("points"):
        best_inf = max((p for p in infinity["points"] if p["request_size"] == 32), key=lambda p: p["sentences_per_s"])
        one = next((p for p in infinity["points"] if p["request_size"] == 1 and p["concurrency"] == 1), None)
        rows.append(["Infinity torch (32-text requests, best c)", _fmt(best_inf["sentences_per_s"]),
                     _fmt(one and one["p50_ms"]), "-", "-"])
    elif infinity.get("error"):
        rows.append([f"Infinity: {infinity['error']}", "-", "-", "-", "-"])
    lines += [markdown_table(["engine", "batch/request of 32", "1 text p50 ms", "medium, 32", "mixed, 32"], rows), ""]

    variant = results["default_variant"]
    sweep = results["server"].get(variant, {}).get("sweep", [])
    if sweep:
        lines += [f"### Triton `{variant}` under closed-loop load (short texts)", "",
                  markdown_table(["request", "concurrency", "sentences/s", "tokens/s", "p50 ms", "p95 ms", "p99 ms",
                                  "avg dynamic batch", "server RSS MiB"],
                                 [[f"{p['request_size']} text(s)", p["concurrency"], _fmt(p.get("sentences_per_s")),
                                   _fmt(p.get("tokens_per_s")), _fmt(p.get("p50_ms")), _fmt(p.get("p95_ms")),
                                   _fmt(p.get("p99_ms")),
                                   _fmt(p.get("avg_dynamic_batch")), _fmt(p.get("server_rss_mb"))]
                                  for p in sorted(sweep, key=lambda p: (p["request_size"], p["concurrency"]))]), ""]
    pa = results.get("perf_analyzer", {})
    if pa.get("points"):
        lines += ["perf_analyzer (Triton's C++ load generator, 1-text requests, string input data): " + ", ".join(
            f"c{p['concurrency']} {_fmt(p.get('sentences_per_s'))}/s p50 {_fmt(p.get('p50_ms'))} ms"
            if "error" not in p else f"c{p['concurrency']} error: {p['error']}" for p in pa["points"]) + ".", ""]
    elif pa.get("error"):
        lines += [f"perf_analyzer: {pa['error']}", ""]
    classify = results.get("classify", {})
    if classify.get("latency"):
        from benchmarks.classify_latency import latency_table

        lines += [f"### `classify` beside `embed` ({classify['variant']}, a {classify['labels']}-label emotion head, "
                  f"one request in flight, {classify['requests']} requests each)", "",
                  latency_table(classify["latency"]), ""]
    elif classify.get("error"):
        lines += [f"classify latency: {classify['error']}", ""]
    lines += corpus_markdown(results.get("corpus") or {})
    lines += openai_route_markdown(results.get("openai_route") or {})
    lines += [" ".join(f"![{p}]({p})" for p in plots), "",
              f"Command: `{command}`. Everything measured: `results/{results['result_file']}`."]
    return "\n".join(lines)
