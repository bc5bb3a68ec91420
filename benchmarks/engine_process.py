"""Run one in-process engine in a Python process of its own, and measure it there.

Runtimes disturb each other inside one process: measured here, ONNX Runtime ran ~30% slower in a process
where sentence-transformers (torch's OpenMP pool) had run. A user's service loads one engine, so each
engine is measured alone: `EngineProcess` starts `python -m benchmarks.engine_process` for one
engine (workload texts passed in a JSON file) and sends it measurement jobs, one JSON line each way.
The worker keeps library output off the protocol channel (its stdout goes to stderr).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPO


class EngineUnavailable(RuntimeError):
    """The engine could not be loaded or its worker died."""


def write_workloads(workloads: dict, path: Path) -> Path:
    path.write_text(json.dumps({name: {"texts": w.texts, "tokens": [int(t) for t in w.tokens]}
                                for name, w in workloads.items()}))
    return path


class EngineProcess:
    """A worker process holding one engine ("sentence-transformers", "onnxruntime <variant>", "openvino",
    "openvino fp32")."""

    def __init__(self, artifact_path: Path, engine: str, threads: int, workloads_file: Path):
        self.args = {"artifact": str(artifact_path), "engine": engine, "threads": threads,
                     "workloads": str(workloads_file)}
        self.engine = engine
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "EngineProcess":
        # `benchmarks` is a folder of the checkout, not an installed package: the worker finds it from the root.
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "OMP_NUM_THREADS": str(self.args["threads"]), "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": path}
        self.process = subprocess.Popen([sys.executable, "-m", "benchmarks.engine_process",
                                         json.dumps(self.args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True, env=env)
        self._reply()  # {"ready": true} once the engine is loaded and warm
        return self

    def _reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise EngineUnavailable(f"{self.engine}: the worker exited (code {self.process.poll()})")
        reply = json.loads(line)
        if "error" in reply:
            raise EngineUnavailable(f"{self.engine}: {reply['error']}")
        return reply

    def request(self, job: dict) -> Any:
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        return self._reply()["result"]

    def batches(self, workload: str, batch_size: int, seconds: float, min_batches: int = 3,
                sort_by_length: bool = False) -> dict:
        return self.request({"op": "batches", "workload": workload, "batch_size": batch_size, "seconds": seconds,
                             "min_batches": min_batches, "sort_by_length": sort_by_length})

    def curve(self, kind: str, xs: tuple[int, ...], seconds: float, cap_seconds: float,
              sequence_batch: int = 16) -> list[dict]:
        return self.request({"op": "curve", "kind": kind, "xs": list(xs), "seconds": seconds,
                             "cap_seconds": cap_seconds, "sequence_batch": sequence_batch})

    def __exit__(self, *exc_info) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.process.stdin.flush()
                self.process.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()


# ---- the worker ------------------------------------------------------------------------------------


def bounded_curve(key: str, xs: list[int], cap_seconds: float, measure) -> list[dict]:
    """Measure a curve in increasing x; once one batch takes longer than cap_seconds, skip the rest
    (bounds the run's time on a slow or busy machine; the skipped points are listed as such)."""
    points: list[dict] = []
    for x in xs:
        if points and points[-1].get("p50_ms", 0) / 1000 > cap_seconds:
            points.append({key: x, "skipped": f"a batch took over {cap_seconds:g} s at the previous point"})
            continue
        points.append({key: x, **measure(x)})
    return points


def _load_engine(args: dict):
    from embedline import artifact as art
    from benchmarks import inprocess

    artifact = art.load_artifact(args["artifact"])
    return artifact, inprocess.named_engine(artifact, args["engine"], int(args["threads"]))


def _serve(args: dict, send) -> None:
    from benchmarks import inprocess

    artifact, engine = _load_engine(args)
    workloads = {name: (w["texts"], np.array(w["tokens"])) for name, w in
                 json.loads(Path(args["workloads"]).read_text()).items()}
    engine.encode(workloads["short"][0][:8])  # first-call allocations outside any timing
    send({"ready": True})
    for line in sys.stdin:
        job = json.loads(line)
        if job["op"] == "exit":
            return
        if job["op"] == "batches":
            texts, tokens = workloads[job["workload"]]
            result = inprocess.measure_batches(engine, texts, tokens, job["batch_size"], job["seconds"],
                                               job["min_batches"], job.get("sort_by_length", False))
        elif job["op"] == "curve" and job["kind"] == "batch":
            texts, tokens = workloads["short"]
            reps = 1 + max(job["xs"]) // len(texts)
            texts, tokens = texts * reps, np.resize(tokens, len(texts) * reps)
            result = bounded_curve("batch_size", job["xs"], job["cap_seconds"], lambda b: inprocess.measure_batches(
                engine, texts[: max(b, 256)], tokens, b, job["seconds"], min_batches=2))
        elif job["op"] == "curve" and job["kind"] == "sequence":
            if engine.run_tokens is None:
                result = []
            else:
                result = bounded_curve("length", job["xs"], job["cap_seconds"], lambda n: inprocess.measure_tokens(
                    engine, inprocess.token_batch(artifact.tokenizer_path, job["sequence_batch"], n), job["seconds"]))
        else:
            raise ValueError(f"unknown job {job}")
        send({"result": result})


def main() -> None:
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # library prints must not corrupt the protocol

    def send(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    try:
        _serve(json.loads(sys.argv[1]), send)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which records it
        send({"error": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    main()
