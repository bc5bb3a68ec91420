"""Search speed: indexing against `client.embed`, a search through the server against a one-text embed, and
the ANN step alone at a million vectors.

    .venv/bin/python -m benchmarks.search [--documents 100000] [--index-texts 20000] [--ann-vectors 1000000]
                                          [--rounds 3] [--store milvus://HOST:PORT]

One server of the variant `embedline serve` picks, serving an embedded store (`--index`). Stages:

1. Indexing: alternating rounds of `client.embed(texts)` and `embedline index`'s `index_corpus` into a new
   collection, on the same INDEX_TEXTS real sentences (shared data's unlabeled corpus): documents/s each,
   and their ratio (the goal: indexing >= 0.8x embedding, so the store is never the bottleneck).
2. Serving: DOCUMENTS real sentences indexed, then STS-B dev sentences as queries. One caller, per query in
   turn: the served variant in this process embeds it and the collection, opened in this process, searches
   that vector (the in-process reference), then a one-text `client.embed` and a `client.search(k=10)` through
   the server; p50 and p90 per round, medians of ROUNDS rounds. Then searches from 16 concurrent callers for a
   few seconds (queries/s). Goals: search p50 <= embed p50 + 2 ms, and <= the in-process engine + search
   p50s + 1 ms (the suite's targets table reads both).
3. The ANN step alone (faiss, the embedded store's HNSW parameters) over ANN_VECTORS 384-d vectors, made from
   the served collection's real embeddings plus small noise (no million-sentence corpus is on this machine):
   build time, memory, one-query p50 on one thread, and recall@10 against exact search on 200 queries.

`--stages` picks stages; the others keep their last saved results. Stage 2 saves the served collection's and the
queries' embeddings under runs/benchmarks/search/, so `--stages ann` alone builds its graphs from them without
a server. `--store milvus://HOST:PORT` also runs stage 2 against that Milvus server. Writes benchmarks/results/search.json
and the "search" section of benchmarks/README.md.
"""

from __future__ import annotations

import gzip
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (REPO, RESULTS, command_line, data_dir, markdown_table, measured_settings, percentile,
                               read_tsv, stsb_dev_sentences)
from benchmarks.experiment import Experiment


# The served collection's embeddings, kept between runs (runs/ is not tracked), named by model and size.
EMBEDDINGS_CACHE = REPO / "runs" / "benchmarks" / "search" / "embeddings.npz"


def options(parser) -> None:
    parser.add_argument("--documents", type=int, default=100_000, help="documents the served collection holds")
    parser.add_argument("--index-texts", type=int, default=20_000, help="texts per indexing round")
    parser.add_argument("--ann-vectors", type=int, default=1_000_000, help="vectors of the ANN-alone stage (0: skip)")
    parser.add_argument("--queries", type=int, default=300, help="one-caller queries per measure")
    parser.add_argument("--store", default=None, help="also measure stage 2 against this Milvus URI")
    parser.add_argument("--stages", default="indexing,serving,ann",
                        help="which stages to measure (the others keep their last saved results)")


def corpus_sentences(n: int) -> list[str]:
    """n distinct real sentences: the unlabeled corpus (98k), then the emotion and banking77 training texts."""
    data = data_dir()
    sentences: list[str] = []
    for name in ("unsup_corpus.txt.gz", "wiki1m_head.txt.gz"):
        with gzip.open(data / "corpus" / name, "rt", encoding="utf-8") as f:
            sentences += [line.strip() for line in f if line.strip()]
    for name in ("emotion_train.tsv.gz", "banking77_train.tsv.gz"):
        sentences += [row["text"].strip() for row in read_tsv(data / "classification" / name) if row["text"].strip()]
    sentences = list(dict.fromkeys(sentences))
    if len(sentences) < n:
        raise SystemExit(f"only {len(sentences)} distinct sentences in the shared corpus; asked for {n}")
    return sentences[:n]


def write_lines(path: Path, texts: list[str]) -> str:
    path.write_text("".join(t.replace("\n", " ") + "\n" for t in texts), encoding="utf-8")
    return str(path)


def indexing_rounds(url: str, store, texts: list[str], tmp: Path, rounds: int) -> dict:
    """Alternating client.embed and index_corpus rounds on the same texts: documents/s each."""
    from embedline.client import EmbeddingClient
    from embedline.client.cli import Progress
    from embedline.search.indexer import index_corpus

    lines = write_lines(tmp / "index-texts.txt", texts)
    measured: dict[str, list[float]] = {"embed": [], "index": []}
    with EmbeddingClient(url, timeout=600) as client:
        client.embed(texts[:2000])  # untimed: the engine's first runs of each shape
        for k in range(rounds):
            started = time.perf_counter()
            client.embed(texts)
            measured["embed"].append(len(texts) / (time.perf_counter() - started))
            started = time.perf_counter()
            index_corpus(client, store, f"indexing{k}", lines, progress=Progress(len(texts), enabled=False))
            measured["index"].append(len(texts) / (time.perf_counter() - started))
            store.drop(f"indexing{k}")
            print(f"indexing round {k}: embed {measured['embed'][-1]:.0f}/s, index {measured['index'][-1]:.0f}/s",
                  flush=True)
    median = {name: round(statistics.median(values), 1) for name, values in measured.items()}
    return {"rounds": measured, "median": median, "ratio": round(median["index"] / median["embed"], 3)}


def one_caller(url: str, queries: list[str], collection: str, engine, local, rounds: int) -> dict:
    """One caller, per query in turn: `engine` (the served variant in this process) embeds it, `local` (the
    served collection opened in this process) searches that vector, then a one-text embed and a k=10 search
    through the server. p50 and p90 per round (ms); each number is the median over the rounds, and so is each
    gap, taken within its round (the machine is shared: a gap between rounds would measure the load)."""
    from embedline.client import EmbeddingClient

    prompt = local.model.prompts.get(local.model.query_prompt or "", "")  # what the SDK prepends to a query
    per_round: list[dict] = []
    with EmbeddingClient(url) as client:
        for query in queries[:20]:  # warm: channels, configs, the search model's first searches
            client.embed([query])
            client.search(query, k=10, collection=collection)
        for _ in range(rounds):
            times: dict[str, list[float]] = {"inprocess_engine": [], "inprocess_search": [], "embed": [], "search": []}
            for query in queries:
                marks = [time.perf_counter()]
                vector = engine.encode([prompt + query])
                marks.append(time.perf_counter())
                local.search(vector, 10)
                marks.append(time.perf_counter())
                client.embed([query])
                marks.append(time.perf_counter())
                client.search(query, k=10, collection=collection)
                marks.append(time.perf_counter())
                for values, start, end in zip(times.values(), marks, marks[1:]):
                    values.append((end - start) * 1000)
            measured = {f"{name}_{q}_ms": percentile(values, q) for name, values in times.items() for q in (50, 90)}
            measured["search_minus_embed_p50_ms"] = measured["search_50_ms"] - measured["embed_50_ms"]
            measured["search_minus_inprocess_p50_ms"] = measured["search_50_ms"] - (
                measured["inprocess_engine_50_ms"] + measured["inprocess_search_50_ms"])
            per_round.append(measured)
            print("one caller:", {k: round(v, 2) for k, v in measured.items()}, flush=True)
    result = {key: round(statistics.median(r[key] for r in per_round), 2) for key in per_round[0]}
    result["rounds"] = [{key: round(value, 2) for key, value in r.items()} for r in per_round]
    return result


def concurrent_searches(url: str, queries: list[str], collection: str, callers: int = 16, seconds: float = 8.0) -> dict:
    """Searches from `callers` threads, each with its own client, for `seconds`: queries/s and p50."""
    from embedline.client import EmbeddingClient

    latencies: list[float] = []
    lock, stop = threading.Lock(), threading.Event()

    def caller(offset: int) -> None:
        with EmbeddingClient(url) as client:
            client.search(queries[offset], k=10, collection=collection)
            i = offset
            while not stop.is_set():
                started = time.perf_counter()
                client.search(queries[i % len(queries)], k=10, collection=collection)
                with lock:
                    latencies.append((time.perf_counter() - started) * 1000)
                i += callers

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    with lock:
        latencies.clear()
    started = time.perf_counter()
    time.sleep(seconds)
    with lock:
        done, elapsed = len(latencies), time.perf_counter() - started
        p50 = percentile(latencies, 50)
    stop.set()
    for thread in threads:
        thread.join()
    return {"callers": callers, "queries_per_s": round(done / elapsed, 1), "p50_ms": round(p50, 2)}


def grown(vectors: np.ndarray, n: int) -> np.ndarray:
    """n unit vectors on the real embeddings' manifold: each a mix of two random real ones (0.6 / 0.4) plus a
    little noise. No million-sentence corpus is on this machine; copies of real vectors would make every
    query's neighbours its own copies (recall for free), mixtures do not."""
    rng = np.random.default_rng(0)
    first, second = rng.integers(0, len(vectors), n), rng.integers(0, len(vectors), n)
    mixed = 0.6 * vectors[first] + 0.4 * vectors[second]
    mixed += rng.normal(scale=0.05 / np.sqrt(vectors.shape[1]), size=mixed.shape).astype(np.float32)
    return (mixed / np.linalg.norm(mixed, axis=1, keepdims=True)).astype(np.float32)


def ann_alone(data: np.ndarray, queries: np.ndarray) -> dict:
    """The embedded store's HNSW (same parameters) over `data`: build time, index size, one-query p50 on one
    thread and recall@10 against exact search for held-out `queries`, at several beam widths."""
    import faiss

    from embedline.search.embedded import EF_CONSTRUCTION, HNSW_LINKS, beam_width, new_graph

    index = new_graph(data.shape[1])
    started = time.perf_counter()
    index.add(data)
    build_s = time.perf_counter() - started
    index_mib = len(faiss.serialize_index(index)) / 2**20
    exact = faiss.IndexFlatIP(data.shape[1])
    exact.add(data)
    _, truth = exact.search(queries, 10)
    del exact
    faiss.omp_set_num_threads(1)
    served = beam_width(len(data))  # the beam the store searches a collection of this size with
    sweep = {ef: one_query_at_a_time(index, queries, truth, ef) for ef in sorted({64, 128, 256, 512, served})}
    return {"vectors": len(data), "dim": int(data.shape[1]), "build_s": round(build_s, 1),
            "index_mib": round(index_mib), **sweep[served], "ef_search_sweep": sweep,
            "hnsw": {"M": HNSW_LINKS, "efConstruction": EF_CONSTRUCTION, "efSearch": served, "vectors": "float16"}}


def one_query_at_a_time(index, queries: np.ndarray, truth: np.ndarray, ef: int) -> dict:
    """p50/p90 of one-query searches and recall@10 against `truth`, at beam width `ef`."""
    import faiss

    params = faiss.SearchParametersHNSW(efSearch=ef)
    found, times = [], []
    for query in queries:
        started = time.perf_counter()
        _, ids = index.search(query[None], 10, params=params)
        times.append((time.perf_counter() - started) * 1000)
        found.append(ids[0])
    recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]))
    return {"p50_ms": round(percentile(times, 50), 3), "p90_ms": round(percentile(times, 90), 3),
            "recall_at_10": round(recall, 4)}


def serving_stage(url: str, store, texts: list[str], queries: list[str], tmp: Path, collection: str, engine,
                  rounds: int) -> dict:
    from embedline.client import EmbeddingClient
    from embedline.client.cli import Progress
    from embedline.search.indexer import index_corpus

    lines = write_lines(tmp / f"{collection}.txt", texts)
    with EmbeddingClient(url, timeout=3600) as client:
        report = index_corpus(client, store, collection, lines, progress=Progress(len(texts), enabled=False))
    print(f"{collection}: {report.collection_size} documents indexed in {report.seconds:.0f} s", flush=True)
    result = {"documents": report.collection_size, "index_s": round(report.seconds, 1)}
    local = store.open(collection)
    try:
        result.update(one_caller(url, queries, collection, engine, local, rounds))
    finally:
        local.close()
    result["c16"] = concurrent_searches(url, queries, collection)
    print(collection, result, flush=True)
    return result


def main() -> None:
    experiment = Experiment.from_command_line(__doc__, rounds=3, options=options)
    from embedline.search.store import open_store

    from benchmarks.inprocess import named_engine
    from benchmarks.report import inprocess_name
    from benchmarks.suite import triton

    args = experiment.args
    stages = set(args.stages.split(","))
    texts = corpus_sentences(max(args.documents, args.index_texts))
    queries = stsb_dev_sentences(data_dir())[: args.queries]
    cache = EMBEDDINGS_CACHE.with_name(f"embeddings-{experiment.artifact.fingerprint.split(':')[-1][:16]}-"
                                       f"{args.documents}.npz")
    serve = bool(stages & {"indexing", "serving"}) or ("ann" in stages and not cache.is_file())
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="embedline-search-bench-") as tmp_name:
        tmp = Path(tmp_name)
        store = open_store(str(tmp / "store"))
        # The served variant in this process: the reference a search through the server is compared with.
        engine = named_engine(experiment.artifact, inprocess_name(experiment.variant), experiment.threads) \
            if serve and stages & {"serving", "ann"} else None
        if serve:
            with triton(experiment.artifact, tmp, measured_settings(experiment.variant, experiment.threads),
                        index=store.uri) as server:
                if "indexing" in stages:
                    results["indexing"] = indexing_rounds(server.grpc_url, store, texts[: args.index_texts], tmp,
                                                          experiment.rounds)
                if stages & {"serving", "ann"}:
                    results["embedded"] = serving_stage(server.grpc_url, store, texts[: args.documents], queries,
                                                        tmp, "bench", engine, experiment.rounds)
                    save_embeddings(cache, server.grpc_url, store.open("bench"), queries)
        if args.store and "serving" in stages:
            milvus = open_store(args.store)
            with triton(experiment.artifact, tmp, measured_settings(experiment.variant, experiment.threads),
                        index=args.store) as server:
                results["milvus"] = serving_stage(server.grpc_url, milvus, texts[: args.documents], queries, tmp,
                                                  "bench", engine, experiment.rounds)
    if args.ann_vectors and "ann" in stages:
        with np.load(cache) as saved:
            # the served collection's vectors; STS-B sentences as queries: none of them is in the collection
            vectors, held_out = saved["documents"], saved["queries"]
        results["ann_real"] = ann_alone(vectors, held_out)
        print("ann over the real embeddings", results["ann_real"], flush=True)
        results["ann"] = ann_alone(grown(vectors, args.ann_vectors), held_out)
        print("ann", results["ann"], flush=True)
    for stage in results.values():
        stage["command"] = command_line()  # a later run of some stages keeps the others' results
    record = experiment.record(**{**previous_stages(), **results})
    experiment.save("search", record)
    experiment.report("search", readme_section(record))


def save_embeddings(path: Path, url: str, collection, queries: list[str]) -> None:
    """The served collection's vectors and the queries' (embedded by the server), for the ANN stage: a later
    `--stages ann` reads them instead of indexing the documents again."""
    from embedline.client import EmbeddingClient

    documents = np.frombuffer(b"".join(v for (v,) in collection._db.execute("SELECT vector FROM docs ORDER BY row")),
                              np.float32).reshape(-1, collection.model.dim)
    with EmbeddingClient(url, timeout=600) as client:
        query_vectors = client.embed(queries)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, documents=documents, queries=query_vectors)


def previous_stages() -> dict:
    """The stages of the last saved run (each with its own command), so one stage can be measured again."""
    path = RESULTS / "search.json"
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    return {key: saved[key] for key in ("indexing", "embedded", "milvus", "ann", "ann_real") if key in saved}


def readme_section(record: dict) -> str:
    indexing, served = record["indexing"], record["embedded"]
    rows = [["`client.embed(texts)`", indexing["median"]["embed"], 1.0],
            ["`embedline index` (`index_corpus`): embed + store", indexing["median"]["index"], indexing["ratio"]]]
    text = (f"## Search ({record['variant']}, {record['threads']} cores)\n\n"
            f"Indexing {len(indexing['rounds']['embed'])} alternating rounds of the same texts (documents/s, medians):\n\n"
            + markdown_table(["", "documents/s", "/ client.embed"], rows) + "\n\n")
    stores = [("embedded (SQLite + FAISS HNSW)", served)] + (
        [("Milvus Lite 3.2 server (pure Python: the tests' stand-in for a cluster)", record["milvus"])]
        if "milvus" in record else [])
    rows = [[name, f"{s['documents']:,}", s["embed_50_ms"], s["search_50_ms"], s["search_minus_embed_p50_ms"],
             s.get("inprocess_engine_50_ms", "-"), s.get("inprocess_search_50_ms", "-"),
             s.get("search_minus_inprocess_p50_ms", "-"), s["search_90_ms"], s["c16"]["queries_per_s"],
             s["c16"]["p50_ms"]] for name, s in stores]
    text += ("Serving (one caller, per query: the engine and the store in this process, then a one-text embed and a "
             f"k=10 search through the server; medians of {len(served.get('rounds', [])) or 1} rounds; then 16 "
             "concurrent callers):\n\n"
             + markdown_table(["store", "documents", "embed p50 ms", "search p50 ms", "search - embed p50 ms",
                               "in-process engine p50 ms", "in-process store search p50 ms",
                               "search - in-process p50 ms", "search p90 ms", "c16 queries/s", "c16 p50 ms"], rows)
             + "\n\n")
    sets = [("the served collection's real embeddings", record.get("ann_real")),
            ("grown from them (each a mix of two real ones plus noise)", record.get("ann"))]
    rows = [[f"{ann['vectors']:,} {ann['dim']}-d, {name}", ann["build_s"], ann["index_mib"],
             f"**{ef}**" if int(ef) == ann["hnsw"]["efSearch"] else ef, m["p50_ms"], m["p90_ms"], m["recall_at_10"]]
            for name, ann in sets if ann and "ef_search_sweep" in ann for ef, m in ann["ef_search_sweep"].items()]
    if rows:
        hnsw = next(ann for _, ann in sets if ann)["hnsw"]
        text += (f"The ANN step alone (HNSW M={hnsw['M']}, efConstruction={hnsw['efConstruction']}, "
                 f"{hnsw.get('vectors', 'float32')} vectors; in bold the "
                 "beam the store searches a graph of that size with, `embedded.beam_width`), queried with 300 "
                 "held-out STS-B sentences (in no collection), one query at a time on one thread; built on "
                 f"{record['threads']} cores:\n\n"
                 + markdown_table(["vectors", "build s", "index MiB", "efSearch", "p50 ms", "p90 ms",
                                   "recall@10 vs exact"], rows) + "\n\n")
    commands = sorted({stage["command"] for key, stage in record.items()
                       if key in ("indexing", "embedded", "milvus", "ann", "ann_real") and "command" in stage})
    text += (f"Commands: {'; '.join(f'`{c}`' for c in commands)}; load average of the last run "
             f"{record['load_before']} -> {record['load_after']}; CPU flags {', '.join(record['cpu_flags'])} "
             "(`results/search.json`).")
    return text


if __name__ == "__main__":
    main()
