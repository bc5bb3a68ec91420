"""What the server's processes may take in memory, and whether that fits the box `serve` runs in.

A served model runs in python-backend processes, one per instance, each holding its engine. Their memory
is bounded by two settings (serving/settings.py): `max_group_tokens` caps one engine run's activations,
which an engine keeps for its largest run, and `engine_cache_shapes` caps the compiled kernels OpenVINO keeps
per input shape. `MODEL_PROCESS_MIB` is what one process reached under the shape soak
(`python -m benchmarks.soak`: every request a new shape, long texts included; benchmarks/README.md,
"Soak"), with headroom. `serve` prints it and checks the total against the memory limit an orchestrator
set (cgroup v2 `memory.max`, v1 `memory.limit_in_bytes`), read the way `usable_cores` reads the CPU quota.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from embedline.serving.settings import RepositorySettings
from embedline.serving.triton import ServingError, child_pids

# Peak PSS of tritonserver and its two model processes (serve's CPU layout) under the 10-minute shape soak,
# per engine (benchmarks/README.md, "Soak"; tritonserver itself took ~41 MiB of it).
# ONNX Runtime: the largest of its variants (int8 913, fp32 956, fused 1,070: its arena grew in steps).
SOAK_SERVER_PEAK_MIB = {"openvino": 1267, "onnxruntime": 1070}
# What one model process may take: its share of that peak with ~25% headroom.
MODEL_PROCESS_MIB = {"openvino": 770, "onnxruntime": 650}
# tritonserver, the launcher and the OpenAI route (PSS under load: ~41, ~51 and ~49 MiB), with headroom.
SERVER_BASE_MIB = 200
# A cgroup v1 limit this large means "no limit" (the kernel's page-rounded LONG_MAX).
_UNLIMITED = 1 << 60


def engine_of(variant: str) -> str:
    return "openvino" if variant == "openvino" else "onnxruntime"


@dataclass(frozen=True)
class MemoryPlan:
    """The memory one `serve` needs: its model processes (per engine) and the server around them."""

    processes: tuple[tuple[str, int], ...]  # (engine, number of processes)
    search_mib: int = 0  # what ranking adds to the embed processes, each holding the index (0: no index served)

    @property
    def need_mib(self) -> int:
        return (SERVER_BASE_MIB + self.search_mib
                + sum(MODEL_PROCESS_MIB[engine] * count for engine, count in self.processes))

    def describe(self) -> str:
        parts = [f"{count} {engine} process{'es' if count > 1 else ''} x {MODEL_PROCESS_MIB[engine]} MiB"
                 for engine, count in self.processes]
        if self.search_mib:
            parts.append(f"search {self.search_mib} MiB (the index in each embed process; grows with it)")
        return f"{' + '.join(parts)} + {SERVER_BASE_MIB} MiB for tritonserver and the route"


# What the rank step adds to an embed process besides its index: faiss, SQLite and embedline.search (a process
# holding only these measured 42 MiB PSS serving Cranfield's 1,398 documents), with headroom; the store says
# what its collections add (Store.resident_mib). Every embed instance of the default model holds its own copy.
SEARCH_STEP_MIB = 120


def memory_plan(variants: list[str], instances: int, heads: int = 0) -> MemoryPlan:
    """The plan for serving one embed model per variant with `instances` processes each, plus `heads`
    classifier-head processes (one per artifact with a head; counted as onnxruntime processes)."""
    counts: dict[str, int] = {}
    for variant in variants:
        counts[engine_of(variant)] = counts.get(engine_of(variant), 0) + instances
    if heads:
        counts["onnxruntime"] = counts.get("onnxruntime", 0) + heads
    return MemoryPlan(tuple(sorted(counts.items())))


def memory_limit_mib(cgroup: str = "/sys/fs/cgroup") -> int | None:
    """The memory limit of this process's cgroup in MiB (`docker run --memory`, a Kubernetes memory
    limit), or None when there is none."""
    for limit_file in ("memory.max", "memory/memory.limit_in_bytes"):  # cgroup v2, then v1
        try:
            value = Path(cgroup, limit_file).read_text(encoding="ascii").strip()
        except OSError:
            continue
        if value == "max" or not value.isdigit() or int(value) >= _UNLIMITED:
            return None
        return int(value) // 2**20
    return None


def process_pss_mib(pid: int) -> float:
    """Proportional set size of one process in MiB: shared pages (the python backend's shared memory, the
    libraries) counted once across the processes that map them, unlike RSS."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (tritonserver and its python-backend stubs)."""
    pids, frontier = [pid], [pid]
    while frontier:
        frontier = [child for parent in frontier for child in child_pids(parent)]
        pids += frontier
    return pids


def tree_pss_mib(pid: int) -> float:
    """PSS of `pid` and its descendants, summed (MiB)."""
    return round(sum(process_pss_mib(p) for p in process_tree(pid)), 1)


def check_fits(plan: MemoryPlan, limit_mib: int | None) -> str | None:
    """None when `plan` fits under `limit_mib` (or there is no limit), else the one-line reason."""
    if limit_mib is None or plan.need_mib <= limit_mib:
        return None
    return (f"the memory limit is {limit_mib} MiB but serving needs up to {plan.need_mib} MiB "
            f"({plan.describe()}); raise the limit to at least {plan.need_mib} MiB or serve fewer instances")


def cgroup_root() -> str:
    """Where the cgroup filesystem is mounted (EMBEDLINE_CGROUP overrides it, for tests)."""
    return os.environ.get("EMBEDLINE_CGROUP", "/sys/fs/cgroup")


def fit_to_memory(settings: RepositorySettings, variants: list[str], heads: int, limit_mib: int | None,
                  layout_chosen_by_serve: bool, search_mib: int = 0) -> tuple[RepositorySettings, MemoryPlan]:
    """`settings` with instance counts that fit under `limit_mib`, and their plan; ServingError when none do.

    When `serve` chose the layout itself (two instances on a CPU), one instance on all the threads is tried
    next: it serves fewer sentences/s but takes one engine's memory. An operator's own --instances is kept.
    `search_mib`: what one embed process adds to rank (SEARCH_STEP_MIB + the index), when an index is served;
    each instance holds it.
    """
    plan = replace(memory_plan(variants, settings.instances, heads), search_mib=search_mib * settings.instances)
    if check_fits(plan, limit_mib) is None:
        return settings, plan
    if layout_chosen_by_serve and settings.instances > 1:
        threads = settings.intra_op_threads * settings.instances if settings.intra_op_threads else 0
        single = replace(settings, instances=1, intra_op_threads=threads)
        single_plan = replace(memory_plan(variants, 1, heads), search_mib=search_mib)
        if check_fits(single_plan, limit_mib) is None:
            return single, single_plan
        plan = single_plan
    raise ServingError(check_fits(plan, limit_mib))
