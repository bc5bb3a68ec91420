"""Production faults against the real launcher and tritonserver: processes are really killed.

- a killed model process (the python-backend stub, as the OOM killer would) turns the server not-ready
  and the launcher restarts it; the SDK's calls all succeed across the restart;
- a killed tritonserver is restarted, with bounded restarts, then the launcher exits non-zero;
- SIGTERM drains: readiness goes false, every accepted request finishes, the launcher exits 0;
- a full queue refuses at once with UNAVAILABLE, and the SDK's deadline travels with each request;
- a killed OpenAI route is restarted like tritonserver, with its own bounded restarts;
- nothing of a crashed `serve` outlives it by more than a few seconds, whichever process died first, and
  a `serve` started again at once on the same ports comes up.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter

import numpy as np
import pytest

from embedline.client import EmbeddingClient, ServerOverloadedError, ServerUnavailableError

TEXTS = ["a man plays the guitar", "the cat sits on the red chair", "we transfer money to the bank"]


class Load:
    """Threads calling client.embed(TEXTS) in a loop until stopped; records every outcome."""

    def __init__(self, url, threads=4, timeout=30.0, expected=None, **client_args):
        self.client = EmbeddingClient(url, timeout=timeout, **client_args)
        self.expected = expected
        self.ok = 0
        self.errors: list[BaseException] = []
        self.wrong = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]

    def _loop(self):
        while not self._stop.is_set():
            try:
                embeddings = self.client.embed(TEXTS)
            except Exception as exc:  # every failure is a finding
                with self._lock:
                    self.errors.append(exc)
                continue
            with self._lock:
                self.ok += 1
                if self.expected is not None and not np.allclose(embeddings, self.expected, atol=1e-4):
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


def wait_until(predicate, timeout, interval=0.05):
    """Seconds until predicate() held; AssertionError past `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(interval)
    raise AssertionError(f"not within {timeout} s")


def pending_requests(served) -> int:
    """Requests tritonserver holds for `embed` now (queued or executing), from its metrics endpoint."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{served.metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("nv_inference_pending_request_count") and 'model="embed"' in line)


def test_a_killed_model_process_turns_not_ready_restarts_and_loses_no_call(launch_serve, tiny_fp32):
    served = launch_serve("--artifact", str(tiny_fp32.path), "--variant", "fp32")
    with EmbeddingClient(served.grpc_url) as client:
        reference = client.embed(TEXTS)
    (stub,) = served.model_processes()
    with Load(served.grpc_url, expected=reference) as load:
        wait_until(lambda: load.ok >= 20, timeout=30)
        killed_at = time.monotonic()
        stub.kill()  # SIGKILL, as the OOM killer does
        not_ready_after = wait_until(lambda: not served.ready(), timeout=10, interval=0.01)
        served.read_until("restarted", timeout=60)
        wait_until(served.ready, timeout=30)
        recovered_after = time.monotonic() - killed_at
        calls_before = load.ok
        wait_until(lambda: load.ok >= calls_before + 20, timeout=30)
    print(f"stub killed: not ready after {not_ready_after:.2f} s, ready again {recovered_after:.2f} s after the kill")
    assert load.errors == [], load.errors[:3]
    assert load.wrong == 0
    assert served.process.poll() is None  # the launcher keeps serving


def test_a_killed_tritonserver_is_restarted_until_the_restarts_run_out(launch_serve, tiny_fp32):
    served = launch_serve("--artifact", str(tiny_fp32.path), "--variant", "fp32", "--max-restarts", "1")
    first = served.tritonserver()
    os.killpg(first.pid, signal.SIGKILL)  # tritonserver and its model processes, as a crash would
    served.read_until("restarted", timeout=60)
    with EmbeddingClient(served.grpc_url) as client:
        assert client.embed(TEXTS).shape == (3, 32)
    second = served.tritonserver()
    assert second.pid != first.pid
    os.killpg(second.pid, signal.SIGKILL)
    output = served.read_until("restarts in a row are used up", timeout=60)
    assert served.process.wait(30) == 1, output
    assert "tritonserver exited" in output


def test_sigterm_drains_accepted_requests_and_exits_zero(launch_serve, minilm_artifact):
    """Every request the server accepted before SIGTERM finishes.

    One instance runs one 64-text request at a time (max_batch_size 64), so with all 8 accepted the pending
    gauge, which counts queued requests only, reads 7 while the first executes. The drain timeout is set far
    above the work (8 requests took 40 s with one core busy elsewhere): what is cut at --drain-timeout is
    the bound doing its job (measured: the 8th request got UNAVAILABLE "GOAWAY" at the default 30 s), not
    what this test checks.
    """
    served = launch_serve("--artifact", str(minilm_artifact.path), "--variant", "fp32", "--instances", "1",
                          "--threads", "2", "--drain-timeout", "600")
    long_texts = [" ".join(f"word{i} number {j}" for j in range(60)) for i in range(64)]
    outcomes: list[object] = []
    started = threading.Barrier(9)

    def request():
        # A raw Triton client: no retries, so every refusal is visible.
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(served.grpc_url)
        data = np.array([[t.encode()] for t in long_texts], dtype=np.object_)
        text = grpcclient.InferInput("text", list(data.shape), "BYTES")
        text.set_data_from_numpy(data)
        started.wait()
        try:
            outcomes.append(client.infer("embed", [text], client_timeout=600).as_numpy("sentence_embedding").shape)
        except Exception as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=request) for _ in range(8)]
    for thread in threads:
        thread.start()
    started.wait()
    wait_until(lambda: pending_requests(served) >= 7 or outcomes, timeout=60)
    assert not outcomes, f"a request finished before all were accepted; make the requests longer: {outcomes}"
    served.process.send_signal(signal.SIGTERM)
    wait_until(lambda: not served.ready(), timeout=5, interval=0.01)
    for thread in threads:
        thread.join(600)
    assert served.process.wait(60) == 0
    assert outcomes == [(64, 384)] * 8


def test_new_requests_during_a_drain_get_a_retryable_error(launch_serve, tiny_fp32):
    served = launch_serve("--artifact", str(tiny_fp32.path), "--variant", "fp32")
    with Load(served.grpc_url, threads=4, timeout=2.0, max_retries=0) as load:
        wait_until(lambda: load.ok >= 20, timeout=30)
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(60) == 0
        time.sleep(0.5)
    assert load.errors, "no request arrived during the drain"
    unexpected = [e for e in load.errors if not isinstance(e, ServerUnavailableError)]
    assert unexpected == [], unexpected[:3]


def test_a_full_queue_refuses_at_once_with_overloaded(start_server, tiny_fp32):
    """Queue of 1 request: a burst of 64 concurrent raw requests mostly gets the fast UNAVAILABLE."""
    import tritonclient.grpc as grpcclient

    served = start_server(tiny_fp32, max_queue_size=1, max_batch_size=64, intra_op_threads=1)
    # Different texts: the embed model computes each distinct text of a batch once.
    data = np.array([[(" ".join([f"word{row}"] * 60)).encode()] for row in range(64)], dtype=np.object_)
    outcomes = []
    barrier = threading.Barrier(64)

    def request():
        client = grpcclient.InferenceServerClient(served.grpc_url)
        text = grpcclient.InferInput("text", list(data.shape), "BYTES")
        text.set_data_from_numpy(data)
        barrier.wait()
        start = time.monotonic()
        try:
            client.infer("embed", [text], client_timeout=60)
            outcomes.append(("ok", time.monotonic() - start))
        except Exception as exc:
            outcomes.append((f"{exc.status()} {exc.message()}", time.monotonic() - start))

    threads = [threading.Thread(target=request) for _ in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    refused = [o for o in outcomes if "Exceeds maximum queue size" in o[0]]
    assert refused, outcomes[:5]
    assert all(o[0] == "ok" or ("UNAVAILABLE" in o[0] and "maximum queue size" in o[0]) for o in outcomes)

    # The SDK classifies the refusal and retries it inside the deadline: a burst through it succeeds.
    with EmbeddingClient(served.grpc_url, timeout=60) as client:
        results = []

        def sdk_call():
            try:
                results.append(client.embed([t.decode() for t in data[:, 0]]).shape)
            except ServerOverloadedError as exc:  # allowed only once the deadline's retries ran out
                results.append(exc)

        sdk_threads = [threading.Thread(target=sdk_call) for _ in range(16)]
        for thread in sdk_threads:
            thread.start()
        for thread in sdk_threads:
            thread.join(120)
    assert results.count((64, 32)) == 16, results


def test_a_queued_request_whose_deadline_passed_is_dropped_by_the_server(served_minilm):
    """Triton's per-request timeout (which the SDK sets from its deadline) drops work nobody waits for."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(served_minilm.grpc_url)
    # 64 different texts: the embed model computes each distinct text of a batch once.
    long_texts = np.array([[" ".join(f"token{i}x{row}" for i in range(300)).encode()] for row in range(64)],
                          dtype=np.object_)

    def text_input(data):
        text = grpcclient.InferInput("text", list(data.shape), "BYTES")
        text.set_data_from_numpy(data)
        return [text]

    busy = [threading.Thread(target=lambda: client.infer("embed", text_input(long_texts), client_timeout=120))
            for _ in range(2)]
    for thread in busy:
        thread.start()
    time.sleep(0.3)  # the model is busy with the first, the second waits in the queue
    with pytest.raises(Exception) as info:
        client.infer("embed", text_input(long_texts[:1]), timeout=1000, client_timeout=60)  # 1 ms budget
    for thread in busy:
        thread.join(120)
    assert "timeout" in info.value.message().lower(), info.value.message()


def ended(process) -> bool:
    """Gone, or a zombie: dead, holding no memory or port, reaped whenever its parent gets to it."""
    import psutil

    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# A pod's init that never reaps (PR_SET_CHILD_SUBREAPER and no wait): `serve`'s orphans become its children
# and stay zombies, so kill(parent, 0) keeps succeeding for a stub whose tritonserver died. It prints the
# pids of everything `serve` runs, SIGKILLs `serve` when told to (a line on stdin) and waits for EOF.
NO_REAP_INIT = """
import ctypes, json, os, signal, subprocess, sys
import psutil
ctypes.CDLL(None).prctl(36, 1)
serve = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, text=True)
for line in serve.stdout:
    if "Ctrl-C to stop" in line:
        break
print(json.dumps([p.pid for p in psutil.Process(serve.pid).children(recursive=True)]), flush=True)
sys.stdin.readline()
os.kill(serve.pid, signal.SIGKILL)
sys.stdin.read()
"""


@pytest.mark.processes
def test_a_killed_launcher_leaves_nothing_behind_even_under_an_init_that_does_not_reap(tiny_fp32):
    """tritonserver, its model processes (busy with requests) and the route all end within seconds of a
    SIGKILLed launcher, with no init reaping the dead."""
    import json
    import subprocess
    import sys

    import psutil

    from embedline.serving.triton import free_port

    ports = [str(free_port()) for _ in range(4)]
    init = subprocess.Popen(
        [sys.executable, "-c", NO_REAP_INIT, sys.executable, "-m", "embedline.cli", "serve",
         "--artifact", str(tiny_fp32.path), "--variant", "fp32", "--instances", "2", "--threads", "1",
         "--grpc-port", ports[0], "--http-port", ports[1], "--metrics-port", ports[2], "--openai-port", ports[3]],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        processes = [psutil.Process(pid) for pid in json.loads(init.stdout.readline())]
        names = [p.name() for p in processes]  # tritonserver, the route, 2 stubs and their parent watches
        assert names.count("triton_python_backend_stub") == 2 and names.count("tritonserver") == 1, names
        with Load(f"127.0.0.1:{ports[0]}", threads=4, timeout=2.0, max_retries=0) as load:
            wait_until(lambda: load.ok >= 20, timeout=30)
            init.stdin.write("kill\n")
            init.stdin.flush()
            ended_after = wait_until(lambda: all(ended(p) for p in processes), timeout=5, interval=0.05)
    finally:
        init.stdin.close()
        init.wait(30)
    print(f"every process of the killed launcher ended within {ended_after:.2f} s")


def test_serve_started_again_at_once_after_a_crash_serves(launch_serve, tiny_fp32):
    """A SIGKILLed launcher, started again at once on the same ports (a pod's restart), comes up."""
    import psutil

    args = ("--artifact", str(tiny_fp32.path), "--variant", "fp32", "--instances", "2")
    first = launch_serve(*args)
    old = psutil.Process(first.process.pid).children(recursive=True)
    first.process.kill()
    first.process.wait(10)
    second = launch_serve(*args, ports=(first.grpc_port, first.http_port, first.metrics_port, first.openai_port))
    assert all(ended(p) for p in old), [p for p in old if not ended(p)]
    with EmbeddingClient(second.grpc_url) as client:
        assert client.embed(TEXTS).shape == (3, 32)


def test_a_killed_tritonserver_leaves_no_model_process_behind(launch_serve, tiny_fp32):
    served = launch_serve("--artifact", str(tiny_fp32.path), "--variant", "fp32", "--instances", "2")
    server = served.tritonserver()
    stubs = served.model_processes()
    assert len(stubs) == 2
    server.kill()  # tritonserver alone: its model processes must not outlive it
    ended_after = wait_until(lambda: all(ended(p) for p in stubs), timeout=5, interval=0.05)
    served.read_until("restarted", timeout=60)
    print(f"the model processes ended {ended_after:.2f} s after tritonserver was killed")


def route_health(served) -> int | None:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{served.openai_port}/health", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def route_embeddings(served, texts: list[str], timeout: float) -> dict:
    import json
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{served.openai_port}/v1/embeddings", method="POST",
                                     data=json.dumps({"input": texts}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def test_a_killed_route_is_restarted_until_its_restarts_run_out(launch_serve, tiny_fp32):
    """The route is supervised like tritonserver: restarted with backoff, bounded by --max-restarts."""
    import psutil

    served = launch_serve("--artifact", str(tiny_fp32.path), "--variant", "fp32", "--max-restarts", "1")

    def route():
        (process,) = [p for p in psutil.Process(served.process.pid).children() if p.name() != "tritonserver"]
        return process

    assert route_health(served) == 200
    route().kill()
    # Sent while the route is down: the launcher holds the listening socket, so the call waits in the
    # accept queue and the restarted route answers it.
    assert len(route_embeddings(served, TEXTS, timeout=30)["data"]) == 3
    output = served.read_until("the OpenAI route is serving again", timeout=60)
    assert "the OpenAI route exited with code -9; starting it again in 0.5 s (restart 1 of at most 1" in output
    assert route_health(served) == 200
    server = served.tritonserver()
    processes = [server, *served.model_processes()]
    route().kill()
    served.read_until("restarts in a row are used up", timeout=60)
    assert served.process.wait(30) == 1
    wait_until(lambda: all(ended(p) for p in processes), timeout=5)


def test_route_callers_get_503_with_retry_after_while_a_replica_drains(launch_serve, tiny_fp32):
    """During a drain the route answers, with 200 or a retryable 503, until its last moment: only as the
    route stops does its port refuse, and a call that connected just then is reset, unanswered."""
    import http.client

    served = launch_serve("--artifact", str(tiny_fp32.path), "--variant", "fp32")
    seen: list[tuple[str, float]] = []
    stop = threading.Event()

    def call() -> None:
        while not stop.is_set():
            connection = http.client.HTTPConnection("127.0.0.1", served.openai_port, timeout=10)
            try:
                connection.request("POST", "/v1/embeddings", body=b'{"input": ["a short text"]}',
                                   headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                retry_after = response.getheader("Retry-After")
                kind = ("ok" if response.status == 200 else
                        "503 retry" if response.status == 503 and retry_after else f"status {response.status}")
            except ConnectionRefusedError:
                kind = "refused"
            except (OSError, http.client.HTTPException) as exc:
                kind = f"cut ({type(exc).__name__})"
            finally:
                connection.close()
            seen.append((kind, time.monotonic()))
            if kind == "refused":
                return
            if kind == "503 retry":
                time.sleep(0.05)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_until(lambda: sum(kind == "ok" for kind, _ in seen) >= 20, timeout=30)
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(60) == 0
    exited = time.monotonic()
    stop.set()
    for thread in threads:
        thread.join(15)
    kinds = Counter(kind for kind, _ in seen)
    print(f"route outcomes around a drain: {dict(kinds)}")
    assert kinds["503 retry"] >= 1, "no request arrived during the drain"
    assert {kind for kind in kinds if not kind.startswith("cut")} <= {"ok", "503 retry", "refused"}, kinds
    first_unanswered = min((at for kind, at in seen if kind == "refused" or kind.startswith("cut")), default=exited)
    assert exited - first_unanswered < 1.0, "the port refused or reset callers while the launcher was still draining"
