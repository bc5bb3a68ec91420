"""Triton's own load generator, `perf_analyzer`, against `embed`: an independent check of the suite's client.

The binary ships in the tritonclient 2.51 wheel (<venv>/bin/perf_analyzer). It links libb64 and
libcudart, which the nvidia-pytriton wheel bundles under hashed names in `nvidia_pytriton.libs/`:
symlinked under their plain sonames into a private directory on LD_LIBRARY_PATH, they load
(docs/architecture.md, "Measured decisions", environment facts).
Input is string data from a JSON file (the workload's real texts), one text per request.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)

# soname -> prefix of the bundled file in nvidia_pytriton.libs
_LIBS = {"libb64.so.0d": "libb64-", "libcudart.so.12": "libcudart-"}


class PerfAnalyzerUnavailable(RuntimeError):
    """perf_analyzer or the libraries it needs cannot be found."""


def binary() -> Path:
    path = Path(sys.executable).parent / "perf_analyzer"
    found = path if path.is_file() else shutil.which("perf_analyzer")
    if not found:
        raise PerfAnalyzerUnavailable("no perf_analyzer next to this Python (it ships in the tritonclient wheel)")
    return Path(found)


def library_dir(dest: Path) -> Path:
    """A directory of plain-soname symlinks to the bundled libraries perf_analyzer links against."""
    from embedline.serving.triton import _pytriton_libs

    bundled = _pytriton_libs()
    dest.mkdir(parents=True, exist_ok=True)
    for soname, prefix in _LIBS.items():
        matches = sorted(bundled.glob(f"{prefix}*"))
        if not matches:
            raise PerfAnalyzerUnavailable(f"{bundled} has no {prefix}* to stand in for {soname}")
        link = dest / soname
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(matches[0])
    return dest


def write_input_data(texts: list[str], path: Path) -> Path:
    """perf_analyzer's JSON input format: one step per text, `text` of shape [1]."""
    steps = [{"text": {"content": [t], "shape": [1]}} for t in texts]
    path.write_text(json.dumps({"data": steps}))
    return path


def run(grpc_url: str, texts: list[str], concurrency: int, workdir: Path, measurement_ms: int = 2000,
        timeout_s: float = 120.0) -> dict:
    """One perf_analyzer run at `concurrency` with 1-text requests: throughput and latency percentiles."""
    workdir.mkdir(parents=True, exist_ok=True)
    data = write_input_data(texts, workdir / "input_data.json")
    report = workdir / f"perf_c{concurrency}.csv"
    env = os.environ.copy()
    libs = library_dir(workdir / "libs")
    env["LD_LIBRARY_PATH"] = f"{libs}:{env.get('LD_LIBRARY_PATH', '')}".rstrip(":")
    command = [
        str(binary()), "-m", "embed", "-u", grpc_url, "-i", "grpc", "-b", "1",
        "--input-data", str(data), "--concurrency-range", f"{concurrency}:{concurrency}",
        "--measurement-interval", str(measurement_ms), "--max-trials", "6",
        # A shared 2-core machine rarely gives three windows within perf_analyzer's default 10%.
        "--stability-percentage", "100",
        "-f", str(report),
    ]
    try:
        completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"concurrency": concurrency, "error": f"timed out after {timeout_s:.0f} s"}
    if completed.returncode != 0 or not report.is_file():
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-3:]
        return {"concurrency": concurrency, "error": f"exit {completed.returncode}: {' | '.join(tail)}"}
    with report.open() as f:
        row = next(csv.DictReader(f))

    def ms(column: str) -> float | None:  # perf_analyzer reports microseconds; columns vary by version
        return round(float(row[column]) / 1000, 3) if row.get(column) else None

    return {
        "concurrency": concurrency,
        "sentences_per_s": round(float(row["Inferences/Second"]), 1),
        "p50_ms": ms("p50 latency"),
        "p95_ms": ms("p95 latency"),
        "p99_ms": ms("p99 latency"),
        "mean_ms": ms("Avg latency"),
    }
