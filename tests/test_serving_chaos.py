"""Chaos, two minutes of it: two real `embedline serve` replicas under SDK and OpenAI-route load while a
fault hits one of them every 20 s (benchmarks/chaos.py: a stub, tritonserver or the route SIGKILLed, the
whole `serve` SIGKILLed and started again at once, a SIGTERM deploy). Every fault kind occurs once (seeded
plan); the tiny model keeps restarts quick on a busy 2-core host.

Required: no failed or wrong SDK call, route callers see nothing but answers and retryable refusals, every
replica serves again after each fault, no start of `serve` fails, and nothing of a killed server outlives it
by more than a few seconds.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.processes]

LINGER_LIMIT_S = 5.0


def test_two_replicas_ride_out_two_minutes_of_faults(tiny_fp32, tmp_path):
    from benchmarks.chaos import FAULTS, ROUTE_ENDING_FAULTS, ChaosConfig, run_chaos

    results = run_chaos(ChaosConfig(
        minutes=2, fault_every=20, seed=0, sdk_threads=8, route_threads=2, log_dir=tmp_path,
        serve_args=["--artifact", str(tiny_fp32.path), "--variant", "fp32", "--instances", "2", "--threads", "1"]))
    faults = results["faults"]
    print({key: results[key] for key in ("sdk", "route", "failed_serve_starts", "left_behind")})
    for fault in faults:
        print(fault)

    assert {fault["kind"] for fault in faults} == set(FAULTS)
    sdk, route = results["sdk"], results["route"]
    assert sdk["ok"] > 100 and sdk["failed"] == 0 and sdk["wrong"] == 0, sdk
    assert route["ok"] > 10 and route["failed"] == 0 and route["wrong"] == 0, route
    assert all(cut["after"] in ROUTE_ENDING_FAULTS for cut in route["cuts"]), route
    # A serving replica's route port never refuses: the launcher holds its socket across route restarts.
    assert route["retried"].get("connection refused (serve running)", 0) == 0, route
    assert all(fault["serving_again_s"] is not None for fault in faults), faults
    assert results["failed_serve_starts"] == [], results["failed_serve_starts"]
    assert all(fault["still_running"] == [] and fault["lingered_s"] <= LINGER_LIMIT_S for fault in faults), faults
    assert results["left_behind"] == []
    deploys = [codes for exits in results["serve_exits"] for codes in exits["exit_codes"]]
    assert sorted(deploys) == sorted([0] * sum(f["kind"] == "deploy" for f in faults)
                                     + [-9] * sum(f["kind"] == "pod" for f in faults)), results["serve_exits"]
