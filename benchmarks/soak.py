"""Soak: concurrent SDK callers against `embedline serve` as users run it, memory as PSS over minutes.

Two request mixes:

    shapes     every request a new shape: a (texts, longest text in words) pair not sent before, 1-64 texts,
               longest 3-40 words in 4 of 5 requests and 40-300 words (past max_seq_length) in the fifth
    realistic  70% one text of 3-25 words, 25% 8-32 texts of 3-40 words, 5% 1-4 texts of 150-300 words

Every 10 s it samples the server's memory (PSS of tritonserver and its model processes, summed: the python
backend's shared memory counted once), the window's p50/p99 call latency, calls and errors. The verdict:
zero errors, memory under `serving/memory.py`'s bound for the layout, and at most 10% growth over the
second half of the run (the first half is warm-up: allocator pools and kernel caches fill).

    .venv/bin/python -m benchmarks.soak [--minutes 10] [--concurrency 64] [--mix shapes] [--variant int8]
                                        [--instances 1 --threads 2]

Writes benchmarks/results/soak-MIX-VARIANT[-INSTANCESxTHREADS].json and .png, and the row of that run in the
"soak" table of benchmarks/README.md (one row per mix, variant and layout).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time

from benchmarks.common import (
    RESULTS,
    markdown_table,
    percentile,
    save_results,
    sts_sentences,
    update_readme_section,
)

SAMPLE_S = 10.0
MAX_GROWTH = 0.10
MIXES = ("shapes", "realistic")


class Texts:
    """Texts of a chosen word count, cut from real sentences strung together."""

    def __init__(self, seed: int):
        self.words = " ".join(sts_sentences(2000)).split()
        self.rng = random.Random(seed)

    def text(self, words: int) -> str:
        start = self.rng.randrange(len(self.words) - words)
        return " ".join(self.words[start:start + words])

    def batch(self, count: int, low: int, high: int) -> list[str]:
        return [self.text(self.rng.randint(low, high)) for _ in range(count)]


class ShapeMix:
    """Every request a (texts, longest) pair not drawn before, shared by all callers."""

    def __init__(self, seed: int):
        rng = random.Random(seed)
        short = [(n, w) for n in range(1, 65) for w in range(3, 41)]
        long = [(n, w) for n in range(1, 65) for w in range(41, 301)]
        rng.shuffle(short)
        rng.shuffle(long)
        self.short, self.long, self.drawn = short, long, 0

    def request(self, texts: Texts) -> list[str]:
        self.drawn += 1
        pool = self.long if self.drawn % 5 == 0 else self.short
        count, longest = pool[self.drawn % len(pool)]  # wraps only past ~16,000 requests
        return [texts.text(longest)] + texts.batch(count - 1, 3, longest)


def realistic_request(texts: Texts) -> list[str]:
    roll = texts.rng.random()
    if roll < 0.70:
        return texts.batch(1, 3, 25)
    if roll < 0.95:
        return texts.batch(texts.rng.randint(8, 32), 3, 40)
    return texts.batch(texts.rng.randint(1, 4), 150, 300)


def start_launcher(variant: str | None, layout_args: list[str]) -> tuple[subprocess.Popen, str, list[str]]:
    """`embedline serve` as users start it (its default layout unless `layout_args` name one), on free ports;
    -> (process, url, banner)."""
    from embedline.serving.triton import free_port

    ports = [free_port() for _ in range(3)]
    command = [sys.executable, "-m", "embedline.cli", "serve", "--grpc-port", str(ports[0]),
               "--http-port", str(ports[1]), "--metrics-port", str(ports[2]), "--openai-port", "0"]
    if variant:
        command += ["--variant", variant]
    command += layout_args
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    banner = []
    for line in launcher.stdout:
        print(line, end="", flush=True)
        banner.append(line.rstrip())
        if "Ctrl-C to stop" in line:
            return launcher, f"127.0.0.1:{ports[0]}", banner
    raise SystemExit(f"embedline serve exited with code {launcher.wait()}")


def tritonserver_pid(launcher: subprocess.Popen) -> int:
    import psutil

    return next(p.pid for p in psutil.Process(launcher.pid).children() if p.name() == "tritonserver")


async def soak(url: str, server_pid: int, minutes: float, concurrency: int, mix: str) -> tuple[list[dict], list]:
    from embedline.client import AsyncEmbeddingClient
    from embedline.serving.memory import tree_pss_mib

    texts = Texts(seed=0)
    shapes = ShapeMix(seed=0)
    latencies: list[float] = []
    every_latency: list[float] = []
    errors: list[str] = []
    end = time.monotonic() + minutes * 60

    async def caller(client) -> None:
        while time.monotonic() < end:
            batch = shapes.request(texts) if mix == "shapes" else realistic_request(texts)
            began = time.monotonic()
            try:
                await client.embed(batch)
                latencies.append(time.monotonic() - began)
            except Exception as exc:  # every error is a finding; keep calling
                errors.append(f"{type(exc).__name__}: {exc}")

    async def sampler() -> list[dict]:
        samples = []
        started = time.monotonic()
        while time.monotonic() < end:
            await asyncio.sleep(SAMPLE_S)
            window, latencies[:] = list(latencies), []
            every_latency.extend(window)
            sample = {
                "t_s": round(time.monotonic() - started, 1),
                "pss_mib": tree_pss_mib(server_pid),
                "calls": len(window),
                "errors": len(errors),
                "p50_ms": round(percentile(window, 50) * 1000, 1) if window else None,
                "p99_ms": round(percentile(window, 99) * 1000, 1) if window else None,
            }
            samples.append(sample)
            print(sample, flush=True)
        return samples

    async with AsyncEmbeddingClient(url, timeout=60.0) as client:
        tasks = [asyncio.create_task(caller(client)) for _ in range(concurrency)]
        samples = await sampler()
        await asyncio.gather(*tasks)
    every_latency.extend(latencies)
    if errors:
        print(f"{len(errors)} errors, first: {errors[:3]}")
    return samples, every_latency


def verdict(samples: list[dict], latencies: list[float], bound_mib: int) -> dict:
    second_half = samples[len(samples) // 2:]
    pss = [s["pss_mib"] for s in second_half]
    growth = (pss[-1] - pss[0]) / pss[0] if pss and pss[0] else float("nan")
    peak = max(s["pss_mib"] for s in samples) if samples else float("nan")
    errors = samples[-1]["errors"] if samples else 0
    return {
        "calls": len(latencies),
        "errors": errors,
        "pss_peak_mib": peak,
        "pss_start_second_half_mib": pss[0] if pss else None,
        "pss_end_mib": pss[-1] if pss else None,
        "pss_growth_second_half": round(growth, 4),
        "bound_mib": bound_mib,
        "p50_ms": round(percentile(latencies, 50) * 1000, 1) if latencies else None,
        "p99_ms": round(percentile(latencies, 99) * 1000, 1) if latencies else None,
        "passed": bool(samples) and errors == 0 and growth <= MAX_GROWTH and peak <= bound_mib,
    }


def plot(samples: list[dict], title: str, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t_s"] / 60 for s in samples]
    fig, (memory, latency) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    memory.plot(t, [s["pss_mib"] for s in samples], marker=".")
    memory.set_ylabel("server PSS (MiB)")
    memory.set_ylim(bottom=0)
    latency.plot(t, [s["p50_ms"] for s in samples], marker=".", label="p50")
    latency.plot(t, [s["p99_ms"] for s in samples], marker=".", label="p99")
    latency.set_ylabel("call latency (ms)")
    latency.set_xlabel("minutes")
    latency.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def readme_rows() -> list[list]:
    """One row per saved soak result (mix, variant), so the table keeps every variant's run; each judged
    against the bound `serve` prints today for its layout."""
    from embedline.serving.memory import memory_plan

    rows = []
    for path in sorted(RESULTS.glob("soak-*.json")):
        run = json.loads(path.read_text())
        v = run["verdict"]
        bound = memory_plan([run["variant"]], int(run["layout"].split()[0])).need_mib
        passed = v["errors"] == 0 and v["pss_growth_second_half"] <= MAX_GROWTH and v["pss_peak_mib"] <= bound
        rows.append([run["mix"], run["variant"], run["layout"], f"{run['minutes']:g}", run["concurrency"],
                     v["calls"], v["errors"], v["p50_ms"], v["p99_ms"], v["pss_peak_mib"],
                     f"{v['pss_start_second_half_mib']} -> {v['pss_end_mib']} ({v['pss_growth_second_half']:+.1%})",
                     bound, "pass" if passed else "FAIL", " ".join(run["machine"].get("cpu_flags", []))])
    return rows


def write_readme() -> None:
    """The "soak" section of benchmarks/README.md from every saved run (`--readme-only` rewrites just it)."""
    update_readme_section("soak", (
        "## Soak\n\n"
        "`embedline serve` as users run it (its default layout; `--variant` where named), concurrent async SDK "
        "callers for the minutes shown, memory as PSS of tritonserver and its model processes summed, sampled "
        "every 10 s. Mix `shapes`: every request a new (texts, longest) shape, 1-64 texts, one request in "
        "five with a 40-300-word text; `realistic`: 70% one text of 3-25 words, 25% 8-32 texts of 3-40 "
        "words, 5% 1-4 texts of 150-300 words. Bound: `serving/memory.py`'s plan for the layout, which "
        "`serve` prints. Pass: no errors, peak under the bound, at most 10% growth over the second half. "
        "The realistic mix at 64 callers is the tail goal: p99 at most 2 s with 0 errors. "
        "`.venv/bin/python -m benchmarks.soak --mix MIX [--variant V]` (plots: `results/soak-MIX-VARIANT.png`)\n\n"
        + markdown_table(["mix", "variant", "layout", "min", "callers", "calls", "errors", "p50 ms", "p99 ms",
                          "peak PSS MiB", "PSS second half", "bound MiB", "verdict", "CPU flags"],
                         readme_rows())))


def main() -> None:
    from embedline.serving.memory import memory_plan

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--mix", choices=MIXES, default="shapes")
    parser.add_argument("--variant", default=None, help="served variant (default: the launcher's choice)")
    parser.add_argument("--instances", type=int, default=None,
                        help="serve's --instances, with --threads: another layout `serve` runs (e.g. the one "
                             "instance it falls back to under a small memory limit)")
    parser.add_argument("--threads", type=int, default=None, help="serve's --threads")
    parser.add_argument("--readme-only", action="store_true", help="rewrite the README table from saved runs")
    args = parser.parse_args()
    if args.readme_only:
        write_readme()
        return

    layout_args = [f"--{name}={value}" for name, value in (("instances", args.instances), ("threads", args.threads))
                   if value is not None]
    launcher, url, banner = start_launcher(args.variant, layout_args)
    served = next(line for line in banner if line.startswith("embedline: serving"))
    variant = served.split("(", 1)[1].split(",", 1)[0]
    layout = next(line.split(None, 1)[1] for line in banner if line.strip().startswith("engine"))
    instances = int(layout.split()[0])
    bound = memory_plan([variant], instances).need_mib
    try:
        samples, latencies = asyncio.run(soak(url, tritonserver_pid(launcher), args.minutes, args.concurrency,
                                              args.mix))
    finally:
        launcher.terminate()
        launcher.wait(120)
    result = verdict(samples, latencies, bound)
    print(result)
    # The default layout's run is soak-MIX-VARIANT; another layout's adds INSTANCESxTHREADS.
    name = f"soak-{args.mix}-{variant}" + (f"-{instances}x{layout.split()[3]}" if layout_args else "")
    save_results(name, {"mix": args.mix, "variant": variant, "layout": layout, "minutes": args.minutes,
                        "concurrency": args.concurrency, "samples": samples, "verdict": result})
    plot(samples, f"soak ({args.mix}, {variant}, {layout}): {args.concurrency} callers", RESULTS / f"{name}.png")
    write_readme()

if __name__ == "__main__":
    main()
