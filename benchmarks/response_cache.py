"""Repeated queries: serve's embedding cache and Triton's response cache, their speed and their answers.

    .venv/bin/python -m benchmarks.response_cache [--requests 1000] [--zipf 0.4] [--rounds 3]

Three servers as `embedline serve` runs them (its variant and instance layout), the SDK as the caller:
- no cache (`serve --embedding-cache 0`);
- the embedding cache (serve's default): each embed model instance keeps its most recent texts' embeddings
  and answers a repeated text without the engine (model_repository/python/embed/1/embedding_cache.py);
- Triton's response cache as a user would turn it on by hand (`--cache-config local,size=64MiB` on the server,
  `response_cache { enable: true }` in the embed model's config): a request whose model, version and input
  tensors hash to a cached entry is answered by Triton without running the model.

1. Speed on a realistic repeat rate: one-text requests whose texts are drawn from real sentences (STS-B dev)
   with Zipf-distributed popularity (exponent ZIPF: about 3 in 10 requests repeat an earlier text, as in
   query logs), from empty caches. One caller (p50, mean) and 16 concurrent callers (requests/s), each on its
   own half of the sentences, the modes in alternating rounds (a fresh server each).
2. Answers, each a check that can fail:
   - requested outputs: a text asked for with one output (a tritonclient caller asking for the embedding only),
     then through the SDK (embedding and truncation flags): does the SDK get what it asked for?
   - `publish`: a text embedded by version 1, the artifact published as version 2 (another variant, so its
     embeddings differ) and loaded: is the answer version 2's? (Version 2's own answer for the text comes
     from the same text plus a trailing space: the same tokens, another cache key.)

Writes benchmarks/results/response_cache.json and the "response_cache" section of benchmarks/README.md.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.common import data_dir, markdown_table, measured_settings, percentile, stsb_dev_sentences
from benchmarks.experiment import Experiment

TRITON_CACHE_BYTES = 64 * 2**20
CALLERS = 16


def options(parser) -> None:
    parser.add_argument("--requests", type=int, default=1000, help="requests per measure")
    parser.add_argument("--zipf", type=float, default=0.4, help="popularity exponent of the request stream")


def repeat_stream(pool: list[str], n: int, exponent: float, seed: int) -> list[str]:
    """n texts drawn from `pool` with Zipf popularity (the first texts most popular)."""
    weights = 1.0 / np.arange(1, len(pool) + 1) ** exponent
    picks = np.random.default_rng(seed).choice(len(pool), n, p=weights / weights.sum())
    return [pool[i] for i in picks]


def repeat_rate(stream: list[str]) -> float:
    """The share of requests whose text an earlier request already sent."""
    seen: set[str] = set()
    repeats = 0
    for text in stream:
        repeats += text in seen
        seen.add(text)
    return repeats / len(stream)


# What a server answers repeated texts with: nothing, the embed model's own cache of embeddings (serve's
# default), or Triton's response cache on the embed model (as a user would turn it on by hand).
MODES = ("no cache", "embedding cache", "Triton response cache")
# The answers each cache is checked for (`checks`): every one must hold for a cache to be right.
CHECKS = ("sdk_gets_its_outputs", "answer_after_publish_is_version_2")


def start_server(mode: str, artifact, variant: str, threads: int, tmp: Path, explicit_model_control: bool = False):
    """-> (TritonServer, its repository): the server `embedline serve` runs, with `mode`'s cache."""
    from embedline.serving.repository import build_repository
    from embedline.serving.settings import served_settings
    from embedline.serving.triton import TritonServer, _pytriton_dir, free_port

    settings = (served_settings if mode == "embedding cache" else measured_settings)(variant, threads)
    repository = build_repository(artifact, Path(tempfile.mkdtemp(dir=tmp)) / "models", settings)
    extra = []
    if mode == "Triton response cache":
        config = repository / "embed" / "config.pbtxt"
        config.write_text(config.read_text(encoding="utf-8") + "\nresponse_cache { enable: true }\n", encoding="utf-8")
        extra = [f"--cache-config=local,size={TRITON_CACHE_BYTES}", f"--cache-directory={_pytriton_dir() / 'caches'}"]

    class Server(TritonServer):
        def command(self, backend_dir):
            return super().command(backend_dir) + extra

    server = Server(repository, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                    explicit_model_control=explicit_model_control)
    return server, repository


def one_caller(url: str, stream: list[str]) -> dict:
    from embedline.client import EmbeddingClient

    times = []
    with EmbeddingClient(url) as client:
        client.embed(["warm the channel and the model config"])
        for text in stream:
            started = time.perf_counter()
            client.embed([text])
            times.append((time.perf_counter() - started) * 1000)
    return {"p50_ms": round(percentile(times, 50), 2), "p90_ms": round(percentile(times, 90), 2),
            "mean_ms": round(statistics.fmean(times), 2)}


def many_callers(url: str, stream: list[str], callers: int = CALLERS) -> dict:
    """`callers` threads, each with its own client, sending the stream's texts one per request."""
    from embedline.client import EmbeddingClient

    position, lock = iter(range(len(stream))), threading.Lock()

    def caller() -> None:
        with EmbeddingClient(url) as client:
            client.embed(["warm"])
            barrier.wait()
            while True:
                with lock:
                    index = next(position, None)
                if index is None:
                    return
                client.embed([stream[index]])

    barrier = threading.Barrier(callers + 1)
    threads = [threading.Thread(target=caller) for _ in range(callers)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    return {"requests_per_s": round(len(stream) / (time.perf_counter() - started), 1)}


def speed(experiment: Experiment, pool: list[str], tmp: Path) -> dict:
    args = experiment.args
    half = len(pool) // 2
    streams = {"c1": repeat_stream(pool[:half], args.requests, args.zipf, seed=1),
               f"c{CALLERS}": repeat_stream(pool[half:], args.requests, args.zipf, seed=2)}
    rounds: dict[str, list] = {mode: [] for mode in MODES}
    for _ in range(experiment.rounds):
        for mode in MODES:
            server, _ = start_server(mode, experiment.artifact, experiment.variant, experiment.threads, tmp)
            with server:
                measured = {"c1": one_caller(server.grpc_url, streams["c1"]),
                            f"c{CALLERS}": many_callers(server.grpc_url, streams[f"c{CALLERS}"])}
            print(mode, measured, flush=True)
            rounds[mode].append(measured)
    median = {mode: {"c1_p50_ms": statistics.median(r["c1"]["p50_ms"] for r in runs),
                     "c1_mean_ms": round(statistics.median(r["c1"]["mean_ms"] for r in runs), 2),
                     f"c{CALLERS}_requests_per_s": round(statistics.median(r[f"c{CALLERS}"]["requests_per_s"]
                                                                          for r in runs), 1)}
              for mode, runs in rounds.items()}
    return {"repeat_rate": {name: round(repeat_rate(s), 3) for name, s in streams.items()},
            "zipf": args.zipf, "requests": args.requests, "rounds": rounds, "median": median}


def requested_outputs_check(url: str) -> dict:
    """A cached entry made by a caller that asked for the embedding alone, then the SDK's call."""
    import tritonclient.grpc as grpcclient

    from embedline.client import EmbeddingClient
    from embedline.client.encoding import text_input
    from embedline.client.errors import EmbeddingClientError

    text = "a text first asked for by a caller that wants only the embedding"
    raw = grpcclient.InferenceServerClient(url)
    raw.infer("embed", [text_input(grpcclient, [text])],
              outputs=[grpcclient.InferRequestedOutput("sentence_embedding")])
    with EmbeddingClient(url, max_retries=0) as client:
        try:
            client.embed_with_details([text])
        except EmbeddingClientError as exc:
            return {"sdk_gets_its_outputs": False, "sdk_error": str(exc).splitlines()[0]}
    return {"sdk_gets_its_outputs": True}


def publish_check(mode: str, experiment: Experiment, tmp: Path) -> dict:
    """Is a text embedded by version 1 answered by version 2 after `publish`?"""
    from embedline.client import EmbeddingClient
    from embedline.serving.publish import publish

    other = "int8" if experiment.variant != "int8" else "fp32"
    text = "a text embedded before the model is published again"
    server, repository = start_server(mode, experiment.artifact, experiment.variant, experiment.threads, tmp,
                                      explicit_model_control=True)
    with server, EmbeddingClient(server.grpc_url) as client:
        before = client.embed([text])
        publish(experiment.artifact, repository, variant=other)
        server.load_model("embed")
        after = client.embed([text])
        version_2 = client.embed([text + " "])  # same tokens, another cache key: version 2's own answer
    return {"published_variant": other, "versions_differ": not np.array_equal(before, version_2),
            "answer_after_publish_is_version_2": bool(np.array_equal(after, version_2))}


def checks(mode: str, experiment: Experiment, tmp: Path) -> dict:
    server, _ = start_server(mode, experiment.artifact, experiment.variant, experiment.threads, tmp)
    with server:
        result = requested_outputs_check(server.grpc_url)
    return {**result, **publish_check(mode, experiment, tmp)}


def readme_section(record: dict) -> str:
    speed_, median = record["speed"], record["speed"]["median"]
    throughput = f"c{CALLERS}_requests_per_s"
    rows = []
    for mode in MODES:
        row, checked = median[mode], record["checks"].get(mode)
        answers = [("yes" if checked[key] else "**no**") if checked else "-" for key in CHECKS]
        rows.append([mode, row["c1_p50_ms"], row["c1_mean_ms"], row[throughput],
                     f"{row[throughput] / median['no cache'][throughput]:.2f}x", *answers])
    return (f"## Response cache ({record['variant']}, {record['threads']} cores)\n\n"
            f"One-text SDK requests drawn from STS-B dev sentences with Zipf popularity (exponent {speed_['zipf']}: "
            f"{speed_['repeat_rate']['c1']:.0%} of one caller's and {speed_['repeat_rate'][f'c{CALLERS}']:.0%} of "
            f"{CALLERS} callers' {speed_['requests']} requests repeat an earlier text, as in query logs), each mode "
            f"on a fresh server (empty caches), medians of {len(speed_['rounds']['no cache'])} alternating rounds. "
            "\"Right outputs\": a text first asked for by a caller that wants only the embedding, then through the "
            "SDK (embedding and truncation flags). \"Version 2 after publish\": a text embedded by version 1, the "
            "artifact published as version 2 in another variant: the same text's answer is version 2's.\n\n"
            + markdown_table(["cache", "c1 p50 ms", "c1 mean ms", f"c{CALLERS} requests/s", "/ no cache",
                              "right outputs", "version 2 after publish"], rows) + "\n\n"
            "Triton's response cache keys on the model, its version and the input tensors, not on the outputs a "
            "caller asks for nor on request parameters (a search's k, filter, collection): a hit returns what "
            "its first caller asked for. The embedding cache keys on the text inside the embed model, so every "
            "caller gets its own outputs and a search ranks afresh.\n\n"
            f"CPU flags: {', '.join(record['cpu_flags'])}. Command: `{record['command']}`\n")


def main() -> None:
    experiment = Experiment.from_command_line(__doc__, rounds=3, options=options)
    pool = stsb_dev_sentences(data_dir())
    with tempfile.TemporaryDirectory(prefix="embedline-cache-bench-") as tmp_name:
        tmp = Path(tmp_name)
        results = {"speed": speed(experiment, pool, tmp),
                   "checks": {mode: checks(mode, experiment, tmp) for mode in MODES[1:]}}
        print("checks", results["checks"], flush=True)
    record = experiment.record(**results)
    experiment.save("response_cache", record)
    experiment.report("response_cache", readme_section(record))
    print(readme_section(record))


if __name__ == "__main__":
    main()
