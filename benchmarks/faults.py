"""Fault injection against `embedline serve` with the bundled model: what SDK callers see, and recovery time.

Each fault runs under steady load (4 threads calling `client.embed` on 3 texts, default SDK settings):

    model process killed   SIGKILL of the python-backend stub (what the OOM killer or a segfault does)
    tritonserver killed    SIGKILL of tritonserver alone: its model processes must not outlive it
    OpenAI route killed    SIGKILL of the route process, under route load (2 HTTP callers, no retries)
    `serve` killed         SIGKILL of the whole `serve` process group, started again at once on the same
                           ports (as Kubernetes restarts a crashed container)
    SIGTERM (deploy)       the launcher drains and exits; measured with raw clients that never retry
    replica killed         two servers, SDK given both; SIGKILL of one

Recovery is the time from the fault to the first correct answer of a fresh call on the same server (for the
route: through the route). "Ended" is when the last process of what was killed had exited (a zombie counts).

    .venv/bin/python -m benchmarks.faults

Writes benchmarks/results/faults.json and the "faults" table in benchmarks/README.md.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np

from benchmarks.common import cpu_flags, markdown_table, save_results, update_readme_section

TEXTS = ["A man is eating food.", "A woman is playing violin.", "Two men pushed carts through the woods."]


class Load:
    """Threads embedding TEXTS in a loop; counts successes, wrong answers and errors by type."""

    def __init__(self, urls, reference=None, threads=4):
        from embedline.client import EmbeddingClient

        self.client = EmbeddingClient(urls)
        self.reference = reference
        self.ok, self.wrong, self.errors = 0, 0, Counter()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]

    def _loop(self):
        while not self._stop.is_set():
            try:
                embeddings = self.client.embed(TEXTS)
            except Exception as exc:  # counted, never hidden
                self.errors[type(exc).__name__] += 1
                continue
            self.ok += 1
            if self.reference is not None and not np.allclose(embeddings, self.reference, atol=1e-3):
                self.wrong += 1

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        self.client.close()

    def seen(self) -> str:
        errors = ", ".join(f"{n} {name}" for name, n in self.errors.items()) or "0 errors"
        return f"{self.ok} calls ok, {errors}, {self.wrong} wrong answers"


def launch(*args):
    from embedline.serving.triton import free_port

    ports = [free_port() for _ in range(3)]
    process = subprocess.Popen(
        [sys.executable, "-m", "embedline.cli", "serve", "--grpc-port", str(ports[0]), "--http-port", str(ports[1]),
         "--metrics-port", str(ports[2]), "--openai-port", "0", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if "Ctrl-C to stop" in line:
            return process, f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}"
    raise SystemExit(f"embedline serve exited with code {process.wait()}")


def ready(http_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{http_url}/v2/health/ready", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def children(pid: int, name: str) -> list:
    import psutil

    return [p for p in psutil.Process(pid).children(recursive=True) if name in p.name()]


def watch_ended(processes: list, since: float) -> dict:
    """Start watching `processes` in a thread; the dict gets "ended_after_s" once all have ended."""
    from benchmarks.chaos import watch_ends

    record: dict = {}
    thread = threading.Thread(target=watch_ends, args=(processes, None, since, record), daemon=True)
    thread.start()
    record["thread"] = thread
    return record


def ended_text(record: dict) -> str:
    record.pop("thread").join(120)
    if record["still_running"]:
        return f"still running 60 s after the kill: {', '.join(record['still_running'])}"
    return f"its processes ended {record['lingered_s']:.1f} s after the kill"


def first_correct_answer(url: str, reference, since: float) -> float:
    from embedline.client import EmbeddingClient

    with EmbeddingClient(url, timeout=60) as client:
        while True:
            try:
                if np.allclose(client.embed(TEXTS, timeout=5), reference, atol=1e-3):
                    return time.monotonic() - since
            except Exception:  # still recovering
                time.sleep(0.05)


def crash(kill) -> dict:
    """Kill something of a running launcher under load; -> what the callers saw and the recovery time."""
    from embedline.client import EmbeddingClient

    process, url, http_url = launch()
    try:
        with EmbeddingClient(url) as client:
            reference = client.embed(TEXTS)
        with Load(url, reference) as load:
            time.sleep(3)
            killed = time.monotonic()
            ended = watch_ended(kill(process), killed)
            not_ready = None
            while not_ready is None and time.monotonic() - killed < 10:
                if not ready(http_url):
                    not_ready = time.monotonic() - killed
                time.sleep(0.01)
            recovered = first_correct_answer(url, reference, killed)
            time.sleep(2)
        return {"callers_saw": load.seen(),
                "readiness": f"not ready {not_ready:.2f} s after the kill" if not_ready else "never seen not ready",
                "recovery": f"correct answers {recovered:.1f} s after the kill; {ended_text(ended)}",
                "not_ready_after_s": not_ready, "recovered_after_s": round(recovered, 2),
                "ended_after_s": ended["lingered_s"]}
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(120)


def server_group(process) -> list:
    """tritonserver, its model processes and what those started, as chaos.Proc records."""
    from benchmarks.chaos import Proc

    server = children(process.pid, "tritonserver")[0]
    return [proc for proc in map(Proc.of, [server, *server.children(recursive=True)]) if proc is not None]


def kill_model_process(process) -> list:
    """-> what must end: the killed stub, and the tritonserver the launcher then kills with the rest."""
    group = server_group(process)
    os.kill(next(p.pid for p in group if p.name == "triton_python_backend_stub"), signal.SIGKILL)
    return group


def kill_tritonserver(process) -> list:
    """SIGKILL of tritonserver alone; -> it and its model processes, which must not outlive it."""
    group = server_group(process)
    os.kill(group[0].pid, signal.SIGKILL)
    return group


def route_killed() -> dict:
    """SIGKILL of the OpenAI route under route load: what its callers saw, and when it answered again."""
    from benchmarks.chaos import Replica, route_attempt

    replica = Replica(0, [], Path(tempfile.mkdtemp(prefix="embedline-faults-")))
    outcomes: Counter = Counter()
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            kind, detail = route_attempt(replica.ports["openai"], TEXTS)
            outcomes["ok" if kind == "ok" else detail] += 1
            if kind != "ok":
                time.sleep(0.05)

    try:
        if not replica.start():
            raise SystemExit(f"embedline serve did not start: {replica.failed_starts}")
        threads = [threading.Thread(target=loop, daemon=True) for _ in range(2)]
        for thread in threads:
            thread.start()
        time.sleep(3)
        route = replica.processes()["route"][0]
        killed = time.monotonic()
        os.kill(route.pid, signal.SIGKILL)
        ended = watch_ended([route], killed)
        while route_attempt(replica.ports["openai"], TEXTS)[0] != "ok":
            time.sleep(0.05)
        recovered = time.monotonic() - killed
        time.sleep(2)
        stop.set()
        for thread in threads:
            thread.join(60)
        ended_text(ended)
        seen = ", ".join(f"{n} {what}" for what, n in outcomes.most_common())
        return {"callers_saw": f"route callers (no retries): {seen}",
                "readiness": "Triton stays ready; calls to the route wait in the accept queue of the socket the "
                             "launcher holds until the restarted route answers them",
                "recovery": f"route answers again {recovered:.1f} s after the kill (restarted by the launcher)",
                "recovered_after_s": round(recovered, 2), "outcomes": dict(outcomes)}
    finally:
        replica.stop()


def serve_killed() -> dict:
    """SIGKILL of `serve`'s process group under SDK load, then `serve` started again at once on its ports."""
    from benchmarks.chaos import Replica
    from embedline.client import EmbeddingClient

    replica = Replica(0, [], Path(tempfile.mkdtemp(prefix="embedline-faults-")))
    try:
        if not replica.start():
            raise SystemExit(f"embedline serve did not start: {replica.failed_starts}")
        with EmbeddingClient(replica.grpc_url) as client:
            reference = client.embed(TEXTS)
        with Load(replica.grpc_url, reference) as load:
            time.sleep(3)
            old = [p for group in replica.processes().values() for p in group]
            killed = time.monotonic()
            os.killpg(replica.process.pid, signal.SIGKILL)
            ended = watch_ended(old, killed)
            replica.process.wait()
            while not replica.start():
                pass
            started = time.monotonic() - killed
            recovered = first_correct_answer(replica.grpc_url, reference, killed)
            time.sleep(2)
        failed = len(replica.failed_starts)
        return {"callers_saw": load.seen(),
                "readiness": f"`serve` started again at once: {failed} failed start{'s' if failed != 1 else ''}, "
                             f"banner {started:.1f} s after the kill",
                "recovery": f"correct answers {recovered:.1f} s after the kill; {ended_text(ended)}",
                "failed_starts": replica.failed_starts, "recovered_after_s": round(recovered, 2),
                "ended_after_s": ended["lingered_s"]}
    finally:
        replica.stop()


def drain() -> dict:
    """SIGTERM under raw (never retrying) load: what happens to requests in flight and to new ones."""
    import tritonclient.grpc as grpcclient

    process, url, http_url = launch()
    outcomes: list[tuple[float, float, str]] = []
    stop = threading.Event()

    def loop():
        client = grpcclient.InferenceServerClient(url)
        data = np.array([[t.encode()] for t in TEXTS * 10], dtype=np.object_)
        while not stop.is_set():
            text = grpcclient.InferInput("text", list(data.shape), "BYTES")
            text.set_data_from_numpy(data)
            began = time.monotonic()
            try:
                client.infer("embed", [text], client_timeout=60)
                outcomes.append((began, time.monotonic(), "ok"))
            except Exception as exc:
                outcomes.append((began, time.monotonic(), f"{exc.status()}".replace("StatusCode.", "")))
                time.sleep(0.05)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(3)
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    not_ready = None
    while process.poll() is None:
        if not_ready is None and not ready(http_url):
            not_ready = time.monotonic() - signalled
        time.sleep(0.01)
    exited = time.monotonic() - signalled
    stop.set()
    for thread in threads:
        thread.join(60)
    in_flight = Counter(kind for began, ended, kind in outcomes if began < signalled < ended)
    after = Counter(kind for began, _, kind in outcomes if began >= signalled)
    return {"readiness": f"not ready {not_ready:.2f} s after SIGTERM" if not_ready else "",
            "recovery": f"exit {process.returncode} after {exited:.1f} s (replaced by the orchestrator)",
            "exit_code": process.returncode, "not_ready_after_s": not_ready,
            "exited_after_s": round(exited, 2), "in_flight_at_sigterm": dict(in_flight), "sent_after": dict(after),
            "callers_saw": f"{in_flight.get('ok', 0)} of {sum(in_flight.values())} in-flight requests finished; "
                           f"new ones got {', '.join(f'{n} {k}' for k, n in after.items())}"}


def replica() -> dict:
    from embedline.client import EmbeddingClient

    first, url1, _ = launch()
    second, url2, _ = launch()
    try:
        with EmbeddingClient(url1) as client:
            reference = client.embed(TEXTS)
        with Load([url1, url2], reference) as load:
            time.sleep(3)
            kill_tritonserver(first)  # the launcher restarts it; the survivor serves meanwhile
            first.send_signal(signal.SIGKILL)  # and the launcher too: the replica is gone for good
            time.sleep(5)
        return {"callers_saw": load.seen(), "readiness": "the survivor stays ready",
                "recovery": "none needed: calls fail over at once"}
    finally:
        for process in (first, second):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(120)


def main() -> None:
    results = {
        "model process killed (SIGKILL of the stub)": crash(kill_model_process),
        "tritonserver killed (SIGKILL of it alone)": crash(kill_tritonserver),
        "OpenAI route killed (SIGKILL)": route_killed(),
        "`serve` killed (SIGKILL of its process group), started again at once": serve_killed(),
        "SIGTERM to embedline serve (deploy)": drain(),
        "one of two replicas killed (SIGKILL)": replica(),
    }
    for fault, result in results.items():
        print(f"{fault}: {result}", flush=True)
    save_results("faults", {"results": results})
    rows = [[fault, r["callers_saw"], r["readiness"], r["recovery"]] for fault, r in results.items()]
    update_readme_section("faults", (
        "## Fault injection\n\n"
        f"Bundled model, default `embedline serve`, load from 4 SDK threads (default settings), for the route "
        f"2 HTTP callers and for SIGTERM 8 raw tritonclient threads, neither retrying; "
        f"CPU flags: {' '.join(cpu_flags()) or 'none'}. "
        "`.venv/bin/python -m benchmarks.faults`\n\n"
        + markdown_table(["fault", "what callers saw", "readiness", "recovery"], rows)))


if __name__ == "__main__":
    main()
