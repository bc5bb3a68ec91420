"""Chaos: two `embedline serve` replicas under load while a random fault hits one of them every N seconds.

    flock /tmp/embedline-heavy.lock .venv/bin/python -m benchmarks.chaos [--minutes 10] [--fault-every 30] [--seed 0]

Load, for the whole run:

    SDK     8 threads calling `EmbeddingClient([r1, r2]).embed` (default settings: 30 s deadline, retries,
            failover) on 1-8 texts drawn from a fixed pool
    route   2 threads POSTing /v1/embeddings (base64) to the two replicas' OpenAI routes in turn, as an
            OpenAI client behind a load balancer would: a 503 or 429 with Retry-After, a refused
            connection or one cut mid-request is retried on the other replica (each counted); any other
            answer, or no answer within 60 s, fails the call

Every vector of every answer is compared with the text's reference vector, computed once at the start:
cosine < 0.999 is a wrong answer.

Faults, one at a time, on the two replicas in turn, their kinds drawn with a seeded RNG; the first five are
a shuffle of all kinds, so a run of five faults or more sees each of them:

    model process  SIGKILL of a python-backend stub (the OOM killer)
    tritonserver   SIGKILL of tritonserver alone (its model processes must not outlive it)
    route          SIGKILL of the OpenAI-route process
    pod            SIGKILL of the whole `serve` process group; the harness starts `serve` again at once, on
                   the same ports, as Kubernetes restarts a crashed container
    deploy         SIGTERM of `serve` (a rolling deploy); started again as soon as it exits

A fault waits until both replicas are ready (as a PodDisruptionBudget holds voluntary disruptions back), so
one replica always serves; the delay is recorded. Per fault: the time until the replica served correct
answers again (gRPC and route), how long any process of what was killed outlived it, and every start of
`serve` that failed.

Writes benchmarks/results/chaos.json and the "chaos" table in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FAULTS = ("model process", "tritonserver", "route", "pod", "deploy")
MIN_COSINE = 0.999
ROUTE_CALL_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 300.0
LINGER_WATCH_S = 60.0
DOWN_WAIT_S = 10.0
# Faults that end a replica's route process: a route call's connection cut mid-request is theirs.
ROUTE_ENDING_FAULTS = ("route", "pod", "deploy")


def text_pool() -> list[str]:
    """The texts calls draw from: short and edge-case sentences and one long passage (cut by the model)."""
    from embedline.export.parity import PARITY_TEXTS

    return [text for text in PARITY_TEXTS if text.strip()]


def fault_plan(count: int, seed: int) -> list[tuple[str, int]]:
    """(fault kind, replica index) for `count` faults: the first five are a shuffle of all kinds, the rest
    drawn at random; the replicas take turns, so each gets half of every run."""
    rng = random.Random(seed)
    kinds = list(FAULTS)
    rng.shuffle(kinds)
    kinds += [rng.choice(FAULTS) for _ in range(count - len(kinds))]
    first = rng.randrange(2)
    return [(kind, (first + k) % 2) for k, kind in enumerate(kinds[:count])]


def fault_times(minutes: float, fault_every: float) -> list[float]:
    """Seconds after the load starts at which faults are due: every `fault_every`, the last one at least
    `fault_every` before the end, so each fault is followed by a full interval of load."""
    duration = minutes * 60
    return [fault_every * k for k in range(1, int(duration // fault_every))]


# ---- processes ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    """A process as /proc showed it when it was listed: its name stays known after it is gone, and its start
    time (clock ticks after boot) tells a reused pid apart."""

    pid: int
    name: str
    start: int

    @classmethod
    def of(cls, process) -> Proc | None:
        """From a psutil.Process; None if it is gone already."""
        stat = _stat(process.pid)
        return None if stat is None else cls(process.pid, process.name(), int(stat[19]))

    def ended(self) -> bool:
        """Gone, a zombie (dead: no memory, ports or CPU; reaped when its parent gets to it) or its pid reused."""
        stat = _stat(self.pid)
        return stat is None or stat[0] in ("Z", "X") or int(stat[19]) != self.start


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


# ---- replicas -----------------------------------------------------------------------------------------


class Replica:
    """One `embedline serve` on fixed ports, started in a process group of its own (a pod)."""

    def __init__(self, index: int, serve_args: list[str], log_dir: Path):
        from embedline.serving.triton import free_port

        self.index = index
        self.serve_args = serve_args
        self.ports = {name: free_port() for name in ("grpc", "http", "metrics", "openai")}
        self.log_file = log_dir / f"replica{index}.log"
        self.process: subprocess.Popen | None = None
        self.failed_starts: list[str] = []
        self.starts = 0
        # This start of `serve` printed its banner and was not told to stop: a load balancer would send to it
        # (Kubernetes takes a pod out of its Service when it sends SIGTERM).
        self.in_service = False

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    def start(self) -> bool:
        """Start `serve` and wait for its banner; False (recorded) if it exits or hangs first."""
        command = [sys.executable, "-m", "embedline.cli", "serve", *self.serve_args]
        for name, port in self.ports.items():
            command += [f"--{name}-port", str(port)]
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        self.in_service = False
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.starts += 1
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            text = self._log_since(offset)
            if "Ctrl-C to stop" in text:
                self.in_service = True
                return True
            if self.process.poll() is not None:
                lines = [line for line in text.splitlines() if line.strip()]
                self.failed_starts.append(f"exit {self.process.returncode}: {lines[-1] if lines else ''}"[:300])
                return False
            time.sleep(0.1)
        self.failed_starts.append(f"no banner within {READY_TIMEOUT_S:.0f} s")
        self.process.kill()
        self.process.wait()
        return False

    def _log_since(self, offset: int) -> str:
        with open(self.log_file, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def processes(self) -> dict[str, list[Proc]]:
        """The launcher, tritonserver, its model processes, what those started, and the route."""
        import psutil

        try:
            launcher = psutil.Process(self.process.pid)
            children = launcher.children()
            servers = [p for p in children if p.name() == "tritonserver"]
            stubs = [p for server in servers for p in server.children() if "triton_python_backend_stub" in p.name()]
            tree = {"launcher": [launcher], "tritonserver": servers, "stubs": stubs,
                    "helpers": [p for stub in stubs for p in stub.children(recursive=True)],
                    "route": [p for p in children if p.name() != "tritonserver"]}
        except psutil.NoSuchProcess:  # changing under our feet: the caller waited for readiness first
            return {"launcher": [], "tritonserver": [], "stubs": [], "helpers": [], "route": []}
        return {group: [proc for proc in map(Proc.of, processes) if proc is not None]
                for group, processes in tree.items()}

    def ready(self) -> bool:
        """Triton ready and the route's /health 200 (the route checks Triton too)."""
        return (http_status(self.ports["http"], "/v2/health/ready") == 200
                and http_status(self.ports["openai"], "/health") == 200)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def http_status(port: int, path: str, timeout: float = 2.0) -> int | None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    except OSError:
        return None
    finally:
        connection.close()


class Keeper:
    """Starts a replica's `serve` again as soon as it exits, as a kubelet restarts a container."""

    def __init__(self, replica: Replica):
        self.replica = replica
        self.exits: list[tuple[float, int]] = []  # (monotonic time seen, exit code)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            code = self.replica.process.poll()
            if code is None:
                time.sleep(0.05)
                continue
            self.exits.append((time.monotonic(), code))
            while not self._stop.is_set() and not self.replica.start():
                time.sleep(0.1)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(READY_TIMEOUT_S + 10)


# ---- load ---------------------------------------------------------------------------------------------


@dataclass
class Outcomes:
    """What callers saw, counted under one lock."""

    ok: int = 0
    wrong: int = 0
    failed: list[str] = field(default_factory=list)
    retried: Counter = field(default_factory=Counter)  # route: 503/429 with Retry-After, refused, cut
    cut: list[tuple[float, int]] = field(default_factory=list)  # route: (time, replica) of a cut connection
    latencies: list[float] = field(default_factory=list)
    min_cosine: float = 1.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answered(self, vectors: np.ndarray, reference: np.ndarray, seconds: float) -> None:
        cosine = float(np.min(np.sum(vectors * reference, axis=1)))
        with self.lock:
            self.ok += 1
            self.latencies.append(seconds)
            self.min_cosine = min(self.min_cosine, cosine)
            if cosine < MIN_COSINE:
                self.wrong += 1

    def fail(self, what: str) -> None:
        with self.lock:
            self.failed.append(what[:300])

    def summary(self) -> dict:
        latencies = np.array(self.latencies or [0.0])
        return {"ok": self.ok, "failed": len(self.failed), "wrong": self.wrong, "failures": self.failed[:20],
                "retried": dict(self.retried), "min_cosine": round(self.min_cosine, 5),
                "p50_s": round(float(np.percentile(latencies, 50)), 3),
                "p99_s": round(float(np.percentile(latencies, 99)), 3),
                "max_s": round(float(latencies.max()), 3)}


def sdk_caller(client, pool, reference, outcomes: Outcomes, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        picked = rng.sample(range(len(pool)), rng.randint(1, 8))
        began = time.monotonic()
        try:
            vectors = client.embed([pool[i] for i in picked])
        except Exception as exc:  # every failure is a finding
            outcomes.fail(f"{time.monotonic() - began:.1f} s: {type(exc).__name__}: {exc}")
            continue
        outcomes.answered(vectors, reference[picked], time.monotonic() - began)


def route_attempt(port: int, texts: list[str]) -> tuple[str, object]:
    """One POST /v1/embeddings: ("ok", vectors), ("retry", why), ("cut", why) or ("fail", why)."""
    body = json.dumps({"input": texts, "encoding_format": "base64"})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=ROUTE_CALL_TIMEOUT_S)
    try:
        connection.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        payload = response.read()
    except ConnectionRefusedError:
        return "retry", "connection refused"
    except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected, http.client.IncompleteRead) as exc:
        return "cut", type(exc).__name__
    except OSError as exc:  # a timeout, or anything else
        return "fail", f"{type(exc).__name__}: {exc}"
    finally:
        connection.close()
    if response.status == 200:
        data = json.loads(payload)["data"]
        return "ok", np.stack([np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4") for item in data])
    if response.status in (429, 503) and response.getheader("Retry-After"):
        return "retry", f"{response.status} with Retry-After {response.getheader('Retry-After')}"
    return "fail", f"HTTP {response.status}: {payload[:200]!r}"


def route_caller(ports: list[int], serve_running, pool, reference, outcomes: Outcomes, stop: threading.Event,
                 seed: int) -> None:
    """serve_running(replica) -> whether that replica's `serve` runs and has printed its banner: a refused
    connection is counted apart for a replica whose `serve` is down or still starting (a pod gone or not
    ready, which a load balancer would not send to) and one that serves."""
    rng = random.Random(seed)
    turn = seed
    while not stop.is_set():
        picked = rng.sample(range(len(pool)), rng.randint(1, 8))
        texts = [pool[i] for i in picked]
        began = time.monotonic()
        while True:
            replica = turn % len(ports)
            turn += 1
            kind, detail = route_attempt(ports[replica], texts)
            if kind == "ok":
                outcomes.answered(detail, reference[picked], time.monotonic() - began)
                break
            if kind == "fail" or time.monotonic() - began > ROUTE_CALL_TIMEOUT_S:
                outcomes.fail(f"replica {replica}: {detail}")
                break
            if detail == "connection refused":
                detail += " (serve running)" if serve_running(replica) else " (serve down)"
            with outcomes.lock:
                outcomes.retried[detail if kind == "retry" else f"connection cut ({detail})"] += 1
                if kind == "cut":
                    outcomes.cut.append((time.monotonic(), replica))
            if detail.startswith(("429", "503")):
                time.sleep(1.0)  # Retry-After: 1
            elif kind == "retry":
                time.sleep(0.05)


# ---- faults -------------------------------------------------------------------------------------------


def inject(kind: str, replica: Replica, rng: random.Random) -> tuple[list[Proc], Proc | None]:
    """Do the fault; -> (the processes that must end, the process whose end they must not outlive)."""
    tree = replica.processes()
    server_group = tree["tritonserver"] + tree["stubs"] + tree["helpers"]
    if kind == "model process":
        os.kill(rng.choice(tree["stubs"]).pid, signal.SIGKILL)
        return server_group, None
    if kind == "tritonserver":
        os.kill(tree["tritonserver"][0].pid, signal.SIGKILL)
        return tree["stubs"] + tree["helpers"], tree["tritonserver"][0]
    if kind == "route":
        os.kill(tree["route"][0].pid, signal.SIGKILL)
        return tree["route"], None
    if kind == "pod":
        os.killpg(replica.process.pid, signal.SIGKILL)
    else:
        replica.in_service = False
        replica.process.send_signal(signal.SIGTERM)
    return server_group + tree["route"], tree["launcher"][0]


def watch_ends(processes: list[Proc], anchor: Proc | None, since: float, record: dict) -> None:
    """Record how long the last of `processes` outlived `anchor` (or the fault, without one)."""
    ends: dict[int, float] = {}
    anchor_end = since if anchor is None else None
    deadline = time.monotonic() + LINGER_WATCH_S
    while time.monotonic() < deadline:
        now = time.monotonic()
        if anchor_end is None and anchor.ended():
            anchor_end = now
        for process in processes:
            if process.pid not in ends and process.ended():
                ends[process.pid] = now
        if anchor_end is not None and len(ends) == len(processes):
            break
        time.sleep(0.05)
    record["still_running"] = [f"{p.pid} {p.name}" for p in processes if p.pid not in ends]
    if anchor_end is None:
        record["still_running"].append(f"{anchor.pid} {anchor.name}")
    if record["still_running"]:
        record["lingered_s"] = None  # outlived it by LINGER_WATCH_S and more
        return
    record["lingered_s"] = round(max([0.0, *(t - anchor_end for t in ends.values())]), 2)


def wait_serving(replica: Replica, reference, pool, since: float, seen_down: bool) -> float | None:
    """Seconds from `since` until the replica alone answers correctly over gRPC and its route is healthy.

    seen_down: the fault ended the process at once (a SIGKILL of tritonserver, the route or the pod). Else
    the replica is first waited on to be seen down: a killed model process is noticed within the launcher's
    watch interval (its other instance may answer meanwhile), a SIGTERM starts a drain. A killed route is
    never seen down from outside (calls wait in the accept queue of the socket the launcher holds), so its
    time is how long a call waited for the restarted route."""
    from embedline.client import EmbeddingClient

    while not seen_down and replica.ready() and time.monotonic() - since < DOWN_WAIT_S:
        time.sleep(0.02)
    deadline = since + READY_TIMEOUT_S
    with EmbeddingClient(replica.grpc_url, timeout=5) as client:
        while time.monotonic() < deadline:
            if replica.ready():
                try:
                    vectors = client.embed(pool[:8])
                    if float(np.min(np.sum(vectors * reference[:8], axis=1))) >= MIN_COSINE:
                        return time.monotonic() - since
                except Exception:  # still recovering
                    pass
            time.sleep(0.1)
    return None


# ---- the run ------------------------------------------------------------------------------------------


@dataclass
class ChaosConfig:
    minutes: float = 10.0
    fault_every: float = 30.0
    seed: int = 0
    sdk_threads: int = 8
    route_threads: int = 2
    serve_args: list[str] = field(default_factory=list)
    log_dir: Path | None = None


def run_chaos(config: ChaosConfig) -> dict:
    """Run the load and the faults; -> results (what callers saw, per-fault records, process lifetimes)."""
    log_dir = Path(config.log_dir or tempfile.mkdtemp(prefix="embedline-chaos-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    replicas = [Replica(i, config.serve_args, log_dir) for i in range(2)]
    keepers = []
    try:
        for replica in replicas:
            if not replica.start():
                raise SystemExit(f"replica {replica.index} did not start: {replica.failed_starts[-1]}")
        keepers = [Keeper(replica) for replica in replicas]
        for keeper in keepers:
            keeper.start()
        return _run(config, replicas, keepers, log_dir)
    finally:
        for keeper in keepers:
            keeper.stop()
        for replica in replicas:
            replica.stop()


class Callers:
    """The SDK and route callers of a run, started and stopped together."""

    def __init__(self, config: ChaosConfig, replicas: list[Replica], pool: list[str], reference: np.ndarray):
        from embedline.client import EmbeddingClient

        self.client = EmbeddingClient([r.grpc_url for r in replicas])
        self.sdk, self.route = Outcomes(), Outcomes()
        self.stopping = threading.Event()
        routes = [r.ports["openai"] for r in replicas]

        def serve_running(index: int) -> bool:
            replica = replicas[index]
            return replica.in_service and replica.process.poll() is None

        seed = config.seed * 100
        self.threads = [threading.Thread(target=sdk_caller, daemon=True,
                                         args=(self.client, pool, reference, self.sdk, self.stopping, seed + i))
                        for i in range(config.sdk_threads)]
        self.threads += [threading.Thread(target=route_caller, daemon=True,
                                          args=(routes, serve_running, pool, reference, self.route, self.stopping,
                                                seed + 50 + i))
                         for i in range(config.route_threads)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(ROUTE_CALL_TIMEOUT_S + 10)
        self.client.close()


def fault(kind: str, replica: Replica, replicas: list[Replica], rng: random.Random, began: float, pool,
          reference) -> tuple[dict, threading.Thread, list[Proc]]:
    """Once both replicas are ready, `kind` on `replica`; -> (its record, the thread watching what must end,
    every process the replica ran just before)."""
    waited_from = time.monotonic()
    while not all(r.ready() for r in replicas) and time.monotonic() - waited_from < READY_TIMEOUT_S:
        time.sleep(0.1)
    processes = [p for group in replica.processes().values() for p in group]
    fault_at = time.monotonic()
    # at_s to the millisecond: a connection the fault cuts is cut within milliseconds of it (cut_causes)
    record = {"kind": kind, "replica": replica.index, "at_s": round(fault_at - began, 3),
              "delayed_s": round(fault_at - waited_from, 1)}
    must_end, anchor = inject(kind, replica, rng)
    watcher = threading.Thread(target=watch_ends, args=(must_end, anchor, fault_at, record), daemon=True)
    watcher.start()
    recovered = wait_serving(replica, reference, pool, fault_at, seen_down=kind in ("tritonserver", "route", "pod"))
    record["serving_again_s"] = None if recovered is None else round(recovered, 1)
    held = f" (held {record['delayed_s']} s until both were ready)" if record["delayed_s"] >= 1 else ""
    print(f"{record['at_s']:6.1f} s  {kind:<13} replica {replica.index}: serving again after "
          f"{record['serving_again_s']} s{held}", flush=True)
    return record, watcher, processes


def stop_all(replicas: list[Replica], keepers: list[Keeper], seen: list[Proc]) -> list[str]:
    """Stop the replicas (SIGTERM); -> what of them, or of any server seen during the run, is still running
    a few seconds later."""
    for keeper in keepers:
        keeper.stop()
    for replica in replicas:
        seen = seen + [p for group in replica.processes().values() for p in group]
        replica.stop()
    time.sleep(5)
    return [f"{p.pid} {p.name}" for p in seen if not p.ended()]


def _run(config: ChaosConfig, replicas: list[Replica], keepers: list[Keeper], log_dir: Path) -> dict:
    from embedline.client import EmbeddingClient

    pool = text_pool()
    with EmbeddingClient([r.grpc_url for r in replicas]) as client:
        reference = client.embed(pool)
    callers = Callers(config, replicas, pool, reference)
    rng = random.Random(config.seed)
    times = fault_times(config.minutes, config.fault_every)
    faults, watchers, seen = [], [], []
    began = time.monotonic()
    callers.start()
    for due, (kind, index) in zip(times, fault_plan(len(times), config.seed)):
        time.sleep(max(0.0, began + due - time.monotonic()))
        record, watcher, processes = fault(kind, replicas[index], replicas, rng, began, pool, reference)
        faults.append(record)
        watchers.append(watcher)
        seen += processes
    end = began + max(config.minutes * 60, (times[-1] if times else 0) + config.fault_every)
    time.sleep(max(0.0, end - time.monotonic()))
    callers.stop()
    duration = time.monotonic() - began
    for watcher in watchers:
        watcher.join(LINGER_WATCH_S + 5)
    left_behind = stop_all(replicas, keepers, seen)
    return {
        "config": {"minutes": config.minutes, "fault_every_s": config.fault_every, "seed": config.seed,
                   "sdk_threads": config.sdk_threads, "route_threads": config.route_threads,
                   "serve_args": config.serve_args},
        "duration_s": round(duration, 1),
        "sdk": callers.sdk.summary(),
        "route": {**callers.route.summary(), "cuts": cut_causes(callers.route.cut, faults, began)},
        "faults": faults,
        "failed_serve_starts": [f for r in replicas for f in r.failed_starts],
        "serve_exits": [{"replica": r.index, "exit_codes": [code for _, code in k.exits]}
                        for r, k in zip(replicas, keepers)],
        "left_behind": left_behind,
        "logs": str(log_dir),
    }


def cut_causes(cuts: list[tuple[float, int]], faults: list[dict], began: float) -> list[dict]:
    """Each route connection cut mid-request, with the latest fault on that replica before it (within a
    call's timeout; "none" without one). Only a fault that ends the route process (ROUTE_ENDING_FAULTS)
    may cut one: a SIGKILL drops what the route holds, and a deploy's graceful stop resets connections it
    accepted but never read (nothing ran for them). Any other cut would be the route dropping requests."""
    causes = []
    for t, replica in sorted(cuts):
        at = t - began
        before = [f for f in faults if f["replica"] == replica and -0.001 <= at - f["at_s"] <= ROUTE_CALL_TIMEOUT_S]
        causes.append({"at_s": round(at, 3), "replica": replica, "after": before[-1]["kind"] if before else "none"})
    return causes


# ---- report -------------------------------------------------------------------------------------------


def summarize(results: dict) -> tuple[list[list], list[list]]:
    """(rows of the callers' table, rows of the per-fault table)."""
    sdk, route = results["sdk"], results["route"]
    retried = route["retried"]
    refusals = sum(n for why, n in retried.items() if "Retry-After" in why)
    by_fault = Counter(cut["after"] for cut in route["cuts"])
    cuts = ", ".join(f"{n} after {kind}" for kind, n in sorted(by_fault.items()))
    refused_down = retried.get("connection refused (serve down)", 0)
    refused_up = retried.get("connection refused (serve running)", 0)
    retried = (f"{refusals} 503/429 with Retry-After, {refused_down} refused while a replica's `serve` was down, "
               f"{refused_up} refused while it ran, {len(route['cuts'])} cut mid-request"
               + (f" ({cuts})" if cuts else ""))
    callers = [
        ["SDK, `EmbeddingClient([r1, r2])`", f"{results['config']['sdk_threads']} threads", f"{sdk['ok']:,}",
         sdk["failed"], sdk["wrong"], f"{sdk['min_cosine']:.4f}", f"{sdk['p50_s']} / {sdk['max_s']} s",
         "retried inside the SDK"],
        ["OpenAI route, POST /v1/embeddings", f"{results['config']['route_threads']} threads", f"{route['ok']:,}",
         route["failed"], route["wrong"], f"{route['min_cosine']:.4f}", f"{route['p50_s']} / {route['max_s']} s",
         retried],
    ]
    per_kind = []
    for kind in FAULTS:
        records = [f for f in results["faults"] if f["kind"] == kind]
        if not records:
            continue
        recovery = [f["serving_again_s"] for f in records if f["serving_again_s"] is not None]
        lingered = [f.get("lingered_s") for f in records]
        per_kind.append([
            kind, len(records),
            f"{np.median(recovery):.1f} / {max(recovery):.1f} s" if recovery else "never",
            f"still running after {LINGER_WATCH_S:.0f} s ({lingered.count(None)} of {len(records)})"
            if None in lingered else f"{max(lingered):.1f} s",
            f"{max(f['delayed_s'] for f in records):.1f} s",
        ])
    return callers, per_kind


def main(argv: list[str] | None = None) -> None:
    from benchmarks.common import cpu_flags, markdown_table, save_results, update_readme_section

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--fault-every", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sdk-threads", type=int, default=8)
    parser.add_argument("--route-threads", type=int, default=2)
    parser.add_argument("--name", default="chaos", help="results file and README section name")
    parser.add_argument("serve_args", nargs="*", help="extra `embedline serve` arguments (after --)")
    args = parser.parse_args(argv)
    results = run_chaos(ChaosConfig(args.minutes, args.fault_every, args.seed, args.sdk_threads,
                                    args.route_threads, args.serve_args))
    flags = cpu_flags()
    results["cpu_flags"] = flags
    callers, per_kind = summarize(results)
    caller_header = ["callers", "load", "calls ok", "failed", "wrong", "min cosine", "p50 / max", "retried attempts"]
    fault_header = ["fault", "times", "serving again (median / max)", "old processes outlived it by (max)",
                    "held for readiness (max)"]
    print(markdown_table(caller_header, callers))
    print(markdown_table(fault_header, per_kind))
    print(f"failed `serve` starts: {len(results['failed_serve_starts'])}; left behind: {results['left_behind']}")
    save_results(args.name, results)
    extra = f" {' '.join(args.serve_args)}" if args.serve_args else ""
    update_readme_section(args.name, (
        "## Chaos\n\n"
        f"Two `embedline serve{extra}` replicas (bundled model, the variant `serve` picks) for "
        f"{results['duration_s'] / 60:.1f} minutes; a fault every {args.fault_every:.0f} s on one replica "
        f"({len(results['faults'])} faults, seed {args.seed}); CPU flags: {' '.join(flags) or 'none'}. "
        f"`flock /tmp/embedline-heavy.lock .venv/bin/python -m benchmarks.chaos --minutes {args.minutes:g} "
        f"--fault-every {args.fault_every:g}`. Wrong = cosine to the text's reference vector < {MIN_COSINE}; "
        "route callers retry a 503/429 with Retry-After, a refused connection and one cut mid-request on the "
        "other replica, anything else fails the call.\n\n"
        + markdown_table(caller_header, callers) + "\n\n"
        + markdown_table(fault_header, per_kind) + "\n\n"
        f"`serve` starts that failed (each restarted at once after its crash): {len(results['failed_serve_starts'])}; "
        f"processes of a stopped or crashed `serve` still running 5 s after the run: {len(results['left_behind'])}. "
        "\"Outlived\" is measured from the killed process's end (tritonserver; the launcher for pod and deploy) "
        "or from the fault; a zombie counts as ended. \"Held\": how long a fault waited for both replicas to "
        "be ready. \"Serving again\": from the fault until the replica, seen down first, answered correctly "
        "over gRPC and its route's /health was 200."))


if __name__ == "__main__":
    main()
