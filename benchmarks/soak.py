"""Soak: 64 concurrent SDK callers with mixed request sizes against `embedline serve` for 10 minutes.

Every 10 s it samples the server's resident memory (tritonserver and its model processes), the window's
p50/p99 call latency, calls and errors. The verdict: zero errors, and server RSS growing at most 10% over
the second half of the run (the first half is warm-up: allocator pools and caches fill).

    .venv/bin/python -m benchmarks.soak [--minutes 10] [--concurrency 64] [--variant int8]

Writes benchmarks/results/soak.json, benchmarks/results/soak.png and the "soak" table in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import subprocess
import sys
import time

import numpy as np

from benchmarks.common import (
    RESULTS,
    cpu_flags,
    markdown_table,
    percentile,
    save_results,
    sts_sentences,
    update_readme_section,
)
from benchmarks.load import server_rss_mb

SAMPLE_S = 10.0
REQUEST_SIZES = (1, 1, 4, 8, 16, 32, 64)  # texts per call: mostly small, some corpus-sized
MAX_RSS_GROWTH = 0.10


def start_launcher(args) -> tuple[subprocess.Popen, str]:
    from embedline.serving.triton import free_port

    ports = [free_port() for _ in range(3)]
    command = [sys.executable, "-m", "embedline.cli", "serve", "--grpc-port", str(ports[0]),
               "--http-port", str(ports[1]), "--metrics-port", str(ports[2]), "--openai-port", "0"]
    if args.variant:
        command += ["--variant", args.variant]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in launcher.stdout:
        print(line, end="", flush=True)
        if "Ctrl-C to stop" in line:
            return launcher, f"127.0.0.1:{ports[0]}"
    raise SystemExit(f"embedline serve exited with code {launcher.wait()}")


def tritonserver_pid(launcher: subprocess.Popen) -> int:
    import psutil

    return next(p.pid for p in psutil.Process(launcher.pid).children() if p.name() == "tritonserver")


async def soak(url: str, server_pid: int, minutes: float, concurrency: int) -> list[dict]:
    from embedline.client import AsyncEmbeddingClient

    sentences = sts_sentences(2000)
    latencies: list[float] = []
    errors: list[str] = []
    calls = 0
    end = time.monotonic() + minutes * 60

    async def caller(client, seed: int) -> None:
        nonlocal calls
        rng = random.Random(seed)
        while time.monotonic() < end:
            size = rng.choice(REQUEST_SIZES)
            start = rng.randrange(len(sentences) - size)
            began = time.monotonic()
            try:
                await client.embed(sentences[start:start + size])
                latencies.append(time.monotonic() - began)
                calls += 1
            except Exception as exc:  # every error is a finding; keep calling
                errors.append(f"{type(exc).__name__}: {exc}")

    async def sampler() -> list[dict]:
        samples = []
        started = time.monotonic()
        while time.monotonic() < end:
            await asyncio.sleep(SAMPLE_S)
            window, latencies[:] = list(latencies), []
            sample = {
                "t_s": round(time.monotonic() - started, 1),
                "rss_mb": server_rss_mb(server_pid),
                "calls": len(window),
                "errors": len(errors),
                "p50_ms": round(percentile(window, 50) * 1000, 1) if window else None,
                "p99_ms": round(percentile(window, 99) * 1000, 1) if window else None,
            }
            samples.append(sample)
            print(sample, flush=True)
        return samples

    async with AsyncEmbeddingClient(url, timeout=30.0) as client:
        tasks = [asyncio.create_task(caller(client, seed)) for seed in range(concurrency)]
        samples = await sampler()
        await asyncio.gather(*tasks)
    if errors:
        print(f"{len(errors)} errors, first: {errors[:3]}")
    return samples


def verdict(samples: list[dict]) -> dict:
    second_half = samples[len(samples) // 2:]
    rss = [s["rss_mb"] for s in second_half]
    growth = (rss[-1] - rss[0]) / rss[0] if rss and rss[0] else float("nan")
    return {
        "calls": sum(s["calls"] for s in samples),
        "errors": samples[-1]["errors"] if samples else 0,
        "rss_start_second_half_mb": rss[0] if rss else None,
        "rss_end_mb": rss[-1] if rss else None,
        "rss_growth_second_half": round(growth, 4),
        "p50_ms_median": float(np.median([s["p50_ms"] for s in samples if s["p50_ms"]])),
        "p99_ms_max": max(s["p99_ms"] for s in samples if s["p99_ms"]),
        "passed": bool(samples) and samples[-1]["errors"] == 0 and growth <= MAX_RSS_GROWTH,
    }


def plot(samples: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t_s"] / 60 for s in samples]
    fig, (memory, latency) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    memory.plot(t, [s["rss_mb"] for s in samples], marker=".")
    memory.set_ylabel("server RSS (MiB)")
    latency.plot(t, [s["p50_ms"] for s in samples], marker=".", label="p50")
    latency.plot(t, [s["p99_ms"] for s in samples], marker=".", label="p99")
    latency.set_ylabel("call latency (ms)")
    latency.set_xlabel("minutes")
    latency.legend()
    fig.suptitle("soak: 64 concurrent callers, mixed request sizes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--variant", default=None, help="served variant (default: the launcher's choice)")
    args = parser.parse_args()

    launcher, url = start_launcher(args)
    try:
        samples = asyncio.run(soak(url, tritonserver_pid(launcher), args.minutes, args.concurrency))
    finally:
        launcher.terminate()
        launcher.wait(120)
    result = verdict(samples)
    print(result)
    save_results("soak", {"minutes": args.minutes, "concurrency": args.concurrency,
                          "request_sizes": REQUEST_SIZES, "samples": samples, "verdict": result})
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(samples, RESULTS / "soak.png")
    update_readme_section("soak", (
        "## Soak\n\n"
        f"{args.concurrency} concurrent async SDK callers, request sizes {REQUEST_SIZES} texts, "
        f"{args.minutes:g} min, sampled every {SAMPLE_S:g} s; CPU flags: {' '.join(cpu_flags()) or 'none'}. "
        "`.venv/bin/python -m benchmarks.soak` ([plot](results/soak.png))\n\n" + markdown_table(
            ["calls", "errors", "p50 ms (median window)", "p99 ms (worst window)", "RSS second half MiB",
             "RSS growth", "verdict"],
            [[result["calls"], result["errors"], result["p50_ms_median"], result["p99_ms_max"],
              f"{result['rss_start_second_half_mb']} -> {result['rss_end_mb']}",
              f"{result['rss_growth_second_half']:.1%}", "pass" if result["passed"] else "FAIL"]])))


if __name__ == "__main__":
    main()
