"""Helpers shared by the benchmark scripts: data, timing, machine info, and writing results.

Results go to benchmarks/results/<name>.json (numbers + machine + versions + git revision) and a
markdown table into benchmarks/README.md between `<!-- <name>:start -->` / `<!-- <name>:end -->` markers.
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from embedline.artifact import library_versions

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
README = REPO / "benchmarks" / "README.md"


def data_dir() -> Path:
    """The shared data folder (../shared/data next to the repository), or $EMBEDLINE_DATA."""
    path = Path(os.environ.get("EMBEDLINE_DATA") or REPO.parent / "shared" / "data")
    if not path.is_dir():
        raise SystemExit(f"data folder {path} not found; set EMBEDLINE_DATA to the shared data directory")
    return path


def read_tsv(path: Path) -> list[dict[str, str]]:
    """The shared TSVs: header line, TAB-separated, no quoting (see shared/data/README.md)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        return [dict(zip(header, line.rstrip("\n").split("\t"))) for line in f if line.strip()]


def sts_sentences(n: int = 1000, seed: int = 13) -> list[str]:
    """n distinct real English sentences from STS-B dev (~22 tokens on average), shuffled with a seed."""
    rows = read_tsv(data_dir() / "sts" / "stsb_dev.tsv.gz")
    sentences = list(dict.fromkeys(s for row in rows for s in (row["sentence1"], row["sentence2"])))
    random.Random(seed).shuffle(sentences)
    return sentences[:n]


def timed_rounds(fn: Callable[[], Any], rounds: int) -> list[float]:
    """Wall-clock seconds of `rounds` calls of fn (after one untimed warm-up call)."""
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def throughput(n_items: int, seconds: list[float]) -> dict[str, float]:
    """items/s from the best round (least disturbed by the shared machine) and the median round."""
    return {
        "best": round(n_items / min(seconds), 1),
        "median": round(n_items / statistics.median(seconds), 1),
        "rounds": len(seconds),
    }


VECTOR_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def cpu_flags() -> list[str]:
    """The CPU's vector extensions that decide int8/bf16 kernel speed (VNNI, AMX), from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [flag for flag in VECTOR_FLAGS if flag in flags]


def machine_info() -> dict[str, Any]:
    try:
        revision = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                  capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        revision = "unknown"
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor(),
        "cpu_flags": cpu_flags(),
        "git_revision": revision,
        "versions": library_versions(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def save_results(name: str, results: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine_info(), **results}, indent=2) + "\n")
    return path


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def update_readme_section(name: str, markdown: str) -> None:
    """Replace (or append) the section between this benchmark's markers in benchmarks/README.md."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = README.read_text() if README.is_file() else "# Benchmarks\n"
    block = f"{start}\n{markdown.strip()}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    README.write_text(text)


def pin_threads(threads: int) -> None:
    """Pin torch's thread pool (unpinned torch collapsed to a fifth of its speed on 2 shared cores)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass
