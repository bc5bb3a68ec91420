"""Helpers shared by the benchmark scripts: data, statistics, machine info, and writing results.

The scripts run from the repository root as modules of the top-level package `benchmarks`
(`.venv/bin/python -m benchmarks.suite`); nothing of this folder is installed with embedline.
Results go to benchmarks/results/<name>.json (numbers + machine + versions + git revision) and a
markdown table into benchmarks/README.md between `<!-- <name>:start -->` / `<!-- <name>:end -->` markers.
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from embedline.artifact import library_versions

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
README = REPO / "benchmarks" / "README.md"


def data_dir(required: bool = True) -> Path | None:
    """The shared data folder (../shared/data next to the repository), or $EMBEDLINE_DATA.

    Missing: an error when `required`, else None (the suite then builds its workloads from built-in texts).
    """
    path = Path(os.environ.get("EMBEDLINE_DATA") or REPO.parent / "shared" / "data")
    if path.is_dir():
        return path
    if required:
        raise SystemExit(f"data folder {path} not found; set EMBEDLINE_DATA to the shared data directory")
    return None


def read_tsv(path: Path) -> list[dict[str, str]]:
    """The shared TSVs: header line, TAB-separated, no quoting (see shared/data/README.md)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        return [dict(zip(header, line.rstrip("\n").split("\t"))) for line in f if line.strip()]


def stsb_dev_sentences(data: Path) -> list[str]:
    """The distinct sentences of STS-B dev in file order (~22 tokens on average)."""
    rows = read_tsv(data / "sts" / "stsb_dev.tsv.gz")
    return list(dict.fromkeys(s for row in rows for s in (row["sentence1"], row["sentence2"])))


def sts_sentences(n: int = 1000, seed: int = 13) -> list[str]:
    """n distinct real English sentences from STS-B dev, shuffled with a seed."""
    sentences = stsb_dev_sentences(data_dir())
    random.Random(seed).shuffle(sentences)
    return sentences[:n]


def percentile(values, q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between ranks (numpy's default): the one
    definition every latency and token-count percentile of the benchmarks uses."""
    return float(np.percentile(values, q))


def load_average() -> list[float]:
    """The 1/5/15-minute load average, recorded beside measurements taken on a shared machine."""
    return [round(x, 2) for x in os.getloadavg()]


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (robust to other jobs on the shared cores)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def command_line() -> str:
    """The command that is running, as a results file records it: `.venv/bin/python -m benchmarks.X ARGS`."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    target = ["-m", spec.name] if spec is not None else [sys.argv[0]]
    return " ".join([".venv/bin/python", *target, *sys.argv[1:]])


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


def other_group_size(size: int) -> int:
    """The length-group size a comparison sets against `size`: 32 and 64, the two `serve` gives a variant
    (serving/settings.py: group_size_for)."""
    return 32 if size == 64 else 64


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


def parse_with_train_config(parser, settings: dict[str, Any], argv: list[str] | None = None):
    """(the experiment's own options, its `TrainConfig`) from the command line.

    `parser` declares only what the experiment itself varies (threads, output names, the values it
    compares); every other `--key=value` / `--key value` is a TrainConfig field, applied over the
    experiment's `settings` exactly as `embedline train` takes it (`--batch_size=512` or `--batch-size 512`).
    """
    from embedline.training.simcse.config import ConfigError, TrainConfig, apply_overrides, parse_overrides

    parser.allow_abbrev = False  # --lr must never be taken for a prefix of the experiment's own options
    parser.epilog = "Any other option is a training-config field (the list: `embedline train --help`)."
    args, rest = parser.parse_known_args(argv)
    try:
        return args, apply_overrides(TrainConfig(**settings), parse_overrides(rest))
    except ConfigError as exc:
        parser.error(str(exc))


def measured_settings(variant: str, threads: int | None = None, **overrides):
    """The settings `embedline serve` runs `variant` with (`served_settings`), without the embedding cache:
    the benchmarks send the same texts again and again, and a cache would turn their numbers into the
    cache's. benchmarks/response_cache.py measures the cache itself, on a realistic repeat rate."""
    from embedline.serving.settings import served_settings

    overrides.setdefault("embedding_cache_entries", 0)
    return served_settings(variant, threads, **overrides)
