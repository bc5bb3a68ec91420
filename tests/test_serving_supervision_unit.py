"""The supervisor's bookkeeping and the process-lifetime helpers, without a server.

- `Restarts`: backoff doubling to its cap, the bound on restarts in a row, the reset after a long run;
- `RouteKeeper`: a dead route is started again after the backoff, never while the wait runs, and the
  launcher gives up after the bound (a fake route and clock as the seams);
- `check_ports_free`: waits for a port an exiting process still holds, and names a port that stays taken;
- `parent_watch.exit_with_parent`: a real process is killed once its parent exits, even while that parent
  is an unreaped zombie (where the python-backend stub's own check keeps succeeding) and its main thread
  holds the GIL (where a stub with a request in flight deadlocks), and the watch ends with it;
- the chaos benchmark's fault plan covers every kind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from embedline.serving.launcher import (
    MAX_RESTART_BACKOFF_S,
    RESTART_BACKOFF_S,
    RESTART_RESET_S,
    Restarts,
    RouteKeeper,
)
from embedline.serving.triton import ServingError, check_ports_free

MODEL_REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_restarts_back_off_doubling_and_give_up_after_the_bound():
    clock = Clock()
    restarts = Restarts(limit=5, clock=clock)
    delays = [restarts.next_delay() for _ in range(6)]
    assert delays == [RESTART_BACKOFF_S * 2 ** k for k in range(5)] + [None]
    assert restarts.in_a_row == 5


def test_restart_backoff_is_capped():
    restarts = Restarts(limit=20, clock=Clock())
    delays = [restarts.next_delay() for _ in range(20)]
    assert max(delays) == MAX_RESTART_BACKOFF_S
    assert delays[-1] == MAX_RESTART_BACKOFF_S


def test_a_long_run_makes_the_next_crash_the_first_again():
    clock = Clock()
    restarts = Restarts(limit=2, clock=clock)
    assert restarts.next_delay() == RESTART_BACKOFF_S
    restarts.started()
    clock.now += RESTART_RESET_S - 1  # not long enough: the count goes on
    assert restarts.next_delay() == RESTART_BACKOFF_S * 2
    restarts.started()
    clock.now += RESTART_RESET_S
    assert restarts.next_delay() == RESTART_BACKOFF_S
    assert restarts.in_a_row == 1


def test_no_restart_at_all_with_a_bound_of_zero():
    assert Restarts(limit=0, clock=Clock()).next_delay() is None


class FakeProcess:
    def __init__(self, pid):
        self.pid = pid
        self.returncode = None


class FakeRoute:
    """RouteProcess's surface as RouteKeeper uses it: spawn, died, listening."""

    url = "http://127.0.0.1:1"

    def __init__(self):
        self.process = FakeProcess(100)
        self.spawned = 0
        self.up = True

    def spawn(self):
        self.spawned += 1
        self.process = FakeProcess(100 + self.spawned)

    def died(self):
        return self.process.returncode is not None

    def listening(self):
        return self.process.returncode is None and self.up

    def kill(self):
        self.process.returncode = -9


def test_a_dead_route_is_started_again_after_the_backoff(caplog):
    clock = Clock()
    route = FakeRoute()
    keeper = RouteKeeper(route, max_restarts=3, clock=clock)
    keeper.poll()
    assert route.spawned == 0  # alive: nothing to do
    route.kill()
    with caplog.at_level("INFO", logger="embedline.serving.launcher"):
        keeper.poll()
        clock.now += RESTART_BACKOFF_S - 0.01
        keeper.poll()
        assert route.spawned == 0  # still backing off
        clock.now += 0.01
        keeper.poll()
        assert route.spawned == 1
        keeper.poll()
    messages = [record.getMessage() for record in caplog.records]
    assert any("exited with code -9; starting it again in 0.5 s (restart 1 of at most 3" in m for m in messages)
    assert any("serving again" in m for m in messages), messages


def _crash_and_restart(route, keeper, clock, backoff_s: float) -> None:
    """Kill the route, let the keeper schedule its restart, wait out the backoff, let it spawn the route."""
    route.kill()
    keeper.poll()
    clock.now += backoff_s
    keeper.poll()


def test_a_route_that_keeps_dying_ends_the_launcher_after_its_restarts():
    clock = Clock()
    route = FakeRoute()
    keeper = RouteKeeper(route, max_restarts=2, clock=clock)
    for _ in range(2):
        _crash_and_restart(route, keeper, clock, MAX_RESTART_BACKOFF_S)
    assert route.spawned == 2
    route.kill()
    with pytest.raises(ServingError, match="OpenAI route exited with code -9 and 2 restarts in a row are used up"):
        keeper.poll()


def test_a_route_up_long_enough_gets_its_restarts_back():
    clock = Clock()
    route = FakeRoute()
    keeper = RouteKeeper(route, max_restarts=1, clock=clock)
    for _ in range(3):
        _crash_and_restart(route, keeper, clock, RESTART_BACKOFF_S)
        clock.now += RESTART_RESET_S  # up a long time before the next crash
    assert route.spawned == 3


def _listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_a_port_freed_within_the_wait_is_taken():
    sock = _listening_socket()
    port = sock.getsockname()[1]
    threading.Timer(0.5, sock.close).start()
    began = time.monotonic()
    check_ports_free("127.0.0.1", {"grpc": port}, wait_s=5)
    assert 0.4 < time.monotonic() - began < 3


def test_a_port_that_stays_taken_is_named_after_the_wait():
    with _listening_socket() as sock:
        port = sock.getsockname()[1]
        began = time.monotonic()
        with pytest.raises(ServingError, match=f"http port {port} on 127.0.0.1 is already in use; "
                                               "choose another with --http-port"):
            check_ports_free("127.0.0.1", {"grpc": 0, "http": port}, wait_s=0.3)
        assert time.monotonic() - began < 2



def test_free_port_never_hands_out_a_port_twice(monkeypatch):
    """The kernel may offer the same unbound port to two calls in a row: the second call asks again."""
    from embedline.serving import triton

    offered = iter([50001, 50001, 50002])

    class Socket:
        def __init__(self, *args):
            self.port = next(offered)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, address):
            pass

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(triton, "_handed_out_ports", set())
    monkeypatch.setattr(triton.socket, "socket", Socket)
    assert [triton.free_port(), triton.free_port()] == [50001, 50002]

# A model process as a stub is when tritonserver dies under it with a request in flight: its main thread
# holds the GIL in a blocking C call (PyDLL calls do not release it), so no Python thread of its own runs.
ORPHAN = """
import ctypes, sys
sys.path.insert(0, sys.argv[1])
from parent_watch import exit_with_parent
exit_with_parent(0.05)
print("watching", flush=True)
ctypes.PyDLL(None).sleep(60)
"""

PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE, text=True)
assert child.stdout.readline().strip() == "watching"
print(child.pid, flush=True)
time.sleep(60)
"""


def ended(process) -> bool:
    """Gone, or a zombie (dead; reaped whenever its new parent, init, gets to it)."""
    import psutil

    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_ended(processes, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not all(ended(p) for p in processes):
        time.sleep(0.05)


@pytest.mark.processes
def test_a_model_process_is_killed_when_its_parent_dies_even_unreaped_and_holding_the_gil():
    import psutil

    parent = subprocess.Popen([sys.executable, "-c", PARENT, ORPHAN, str(MODEL_REPOSITORY / "common")],
                              stdout=subprocess.PIPE, text=True)
    try:
        child = psutil.Process(int(parent.stdout.readline()))
        watch = child.children()
        assert [p.cmdline()[3] for p in watch] == ["embedline-parent-watch"]
        os.kill(parent.pid, signal.SIGKILL)
        # Not reaped on purpose: the parent stays a zombie, as tritonserver does under an init that does not
        # reap, and kill(parent, 0) still succeeds.
        time.sleep(0.2)
        assert psutil.Process(parent.pid).status() == psutil.STATUS_ZOMBIE
        wait_ended([child], 5)
        assert ended(child), "the orphan outlived its parent"
        wait_ended(watch, 5)
        assert all(ended(p) for p in watch), "the watch outlived the process it watched"
    finally:
        parent.kill()
        parent.wait()


def test_every_python_model_watches_its_parent():
    """Each python model's initialize() starts the watch, and the repository builder copies its file."""
    models = list((MODEL_REPOSITORY / "python").glob("*/1/model.py")) + \
        list((MODEL_REPOSITORY / "onnxruntime").glob("*/1/model.py"))
    assert len(models) == 3, models  # embed, classifier_head; tokenize
    for model in models:
        text = model.read_text()
        initialize = text.split("def initialize(self, args):", 1)[1]
        assert initialize.lstrip().startswith("exit_with_parent()"), model


def test_the_chaos_plan_covers_every_fault_and_both_replicas():
    from benchmarks.chaos import FAULTS, fault_plan, fault_times

    times = fault_times(minutes=2, fault_every=20)
    assert times == [20, 40, 60, 80, 100]
    for seed in range(20):
        plan = fault_plan(len(times), seed)
        assert {kind for kind, _ in plan} == set(FAULTS)
        assert {replica for _, replica in plan} == {0, 1}
        assert plan == fault_plan(len(times), seed)
