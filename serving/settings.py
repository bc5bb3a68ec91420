"""How the server runs the models: `RepositorySettings`, and the one option list that sets them.

`embedline serve` and `embedline build-repo` both call `add_server_options(parser)` and turn the parsed
arguments into settings with `settings_from_args`, so the two verbs cannot drift apart.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from embedline import artifact as art
from embedline.variants import SERVABLE_VARIANTS, choose_variant


@dataclass(frozen=True)
class RepositorySettings:
    """How the server runs the models (dynamic batching, queue, instances, threads, length grouping).

    The defaults were chosen from measurements on a 2-core CPU (benchmarks/README.md, "Server tuning",
    and docs/architecture.md): no queue delay; ONNX Runtime workers that spin-wait; length groups of at
    most 32 texts with a per-run cost of 64 padded tokens; a queue bounded at 32 requests per model
    (benchmarks/overload.py). `instances` and `intra_op_threads` here are the plain dataclass defaults;
    what `serve` runs comes from `engine_layout` (two instances on a CPU, when neither is given). The length
    group size follows the variant (`group_size`), so one settings object serves artifacts of different
    variants side by side, each with its own.
    """

    variant: str = "fp32"  # an ONNX variant (fp32, fused, fp16, int8) or "openvino" (CPU, NNCF int8 IR)
    layout: str = "python"
    device: str = "cpu"  # cpu | gpu: where model instances run
    max_batch_size: int = 64  # most texts in one request, and in one dynamic batch
    # How long the dynamic batcher waits to fill a batch. 0 measured best on CPU: with one busy instance,
    # requests that arrive during a run queue up and form the next batch anyway, and a lone request no
    # longer waits for company.
    queue_delay_us: int = 0
    # Most requests waiting in one model's queue; more are refused at once with UNAVAILABLE ("Exceeds
    # maximum queue size"), which the SDK retries with backoff. 0 = no queue policy: unbounded, and no
    # request timeouts. Under overload a bounded queue refuses the excess at once instead of letting every
    # request time out; 32 keeps accepted work inside a 2 s deadline and leaves the batcher room. Any queue
    # policy also turns off Triton's payload prefetching; 0 trades the bound for it (docs/architecture.md,
    # "Server"; benchmarks/README.md, "Overload").
    max_queue_size: int = 32
    # Longest a request may wait in the queue before it is rejected. Triton lets a request's own timeout
    # (the SDK sends its remaining deadline) override this only when it is shorter than a nonzero default,
    # so the default is a generous ceiling rather than "no limit".
    max_queue_wait_s: float = 60.0
    instances: int = 1
    intra_op_threads: int = 0  # engine threads per instance; 0 = one per core
    # Most texts in one engine run inside a dynamic batch; None: the variant's own (`group_size_for`).
    length_group_size: int | None = None
    # Length-aware batching: sort a dynamic batch by length and cut it into the engine runs that waste the
    # least padding. False pads the whole batch to its longest in arrival order (the benchmark's baseline).
    length_grouping: bool = True
    group_overhead_tokens: int = 64  # the cost of one more engine run, in padded tokens (plan_groups)
    # Most padded tokens in one engine run (a lone text may exceed it): bounds the activations an engine
    # allocates, and keeps, for its largest run (serving/memory.py).
    max_group_tokens: int = 8192
    # Input shapes whose compiled kernels OpenVINO's CPU plugin keeps (CPU_RUNTIME_CACHE_CAPACITY; its own
    # default of 5,000 grows a process by a few MB per new shape without bound; serving/memory.py).
    engine_cache_shapes: int = 100
    dynamic_batching: bool = True  # False: every request runs alone (Triton's default scheduler)
    streams: int = 1  # OpenVINO CPU streams per instance (parallel infer requests over the length groups)
    gpu_provider: str = "cuda"  # cuda | tensorrt (python layout on GPU; tensorrt falls back to cuda)
    # ONNX Runtime's workers spin-wait for the next parallel section instead of sleeping on a futex between
    # them (ORT's own default): faster single requests and a server as fast or faster at every load point
    # (benchmarks/README.md, "Server tuning"). Off leaves the cores alone between runs: for a machine shared
    # with busier processes (`--no-spin-wait`).
    spin_wait: bool = True
    # Texts whose embeddings each python-layout embed instance keeps (the most recently used; about 2 KB
    # each at 384 dims): a repeated query skips the engine (benchmarks/README.md, "Response cache"). 0: none.
    embedding_cache_entries: int = 4096

    @property
    def group_size(self) -> int:
        """The length group size this variant is served with."""
        return self.length_group_size or group_size_for(self.variant)


def engine_layout(device: str, cores: int) -> tuple[int, int]:
    """(model instances, engine threads per instance) when neither --instances nor --threads is given.

    On a CPU with 2 or more cores: two instances, each with half the cores. Between two executions of one
    instance the engine sits idle for up to ~15 ms while Triton hands the python model its next batch, even
    with requests queued, and one instance's parallel engine threads contend with Triton's own; a second
    instance runs in that gap. Throughput wins over the few ms a lone query pays (benchmarks/README.md,
    "Engine layout"); `--instances 1 --threads 0` keeps the latency-first layout.
    On a GPU: one instance.
    """
    if device == "cpu" and cores >= 2:
        return 2, cores // 2
    return 1, 0


def group_size_for(variant: str) -> int:
    """The largest length group `serve` gives `variant`: 64 texts for OpenVINO, 32 for ONNX Runtime.

    The SDK cuts a long list into requests of one group each (client/planning.py: plan_requests), so this
    also sets a corpus call's requests. 64 made OpenVINO's corpus calls faster and gained ONNX Runtime
    nothing (benchmarks/README.md, "Length groups").
    """
    return 64 if variant == "openvino" else 32


def served_settings(variant: str, cores: int | None = None, device: str = "cpu", *, layout: str = "python",
                    instances: int | None = None, threads: int | None = None, **overrides) -> RepositorySettings:
    """The settings `embedline serve` runs `variant` with: the one constructor, used per artifact by the CLI
    (`settings_from_args`), the benchmarks and the tests, so that what they measure is what users run.

    instances / threads: as given; both None: `engine_layout` for `cores` (default: `usable_cores()`), the
    threads spelled out. The length group size follows the variant (`RepositorySettings.group_size`), the
    cost of one more engine run the device. `overrides`: any other RepositorySettings field.
    """
    if instances is None and threads is None:
        cores = usable_cores() if cores is None else cores
        instances, threads = engine_layout(device, cores)
        threads = threads or cores
    else:
        instances = RepositorySettings.instances if instances is None else instances
        threads = RepositorySettings.intra_op_threads if threads is None else threads
    # One more run on a GPU costs a kernel-launch round trip, far more than a few padded tokens.
    overrides.setdefault("group_overhead_tokens",
                         2048 if device == "gpu" else RepositorySettings.group_overhead_tokens)
    return RepositorySettings(variant=variant, layout=layout, device=device, instances=instances,
                              intra_op_threads=threads, **overrides)


def usable_cores(cgroup: str = "/sys/fs/cgroup") -> int:
    """The cores this process may use: its CPU affinity (a container's cpuset), capped by a cgroup CPU quota
    rounded up (`docker run --cpus 2`, a Kubernetes CPU limit), which affinity does not show."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for quota_file, period_file in (("cpu.max", None), ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):
        try:  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"; v1: two files, quota -1 when unlimited
            fields = open(os.path.join(cgroup, quota_file), encoding="ascii").read().split()
            if period_file:
                fields.append(open(os.path.join(cgroup, period_file), encoding="ascii").read().strip())
            quota, period = fields[0], fields[1]
        except (OSError, IndexError):
            continue
        if quota not in ("max", "-1"):
            cores = min(cores, max(1, -(-int(quota) // int(period))))
        break
    return cores


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """The model-serving options `serve` and `build-repo` share (variant, batching, queue, threads)."""
    defaults = RepositorySettings
    parser.add_argument("--variant", choices=SERVABLE_VARIANTS, default=None,
                        help="ONNX variant, or openvino (default: fp16 on GPU; on CPU the fastest within "
                             "tolerance, measured at export)")
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size,
                        help="most texts in one request and in one dynamic batch")
    parser.add_argument("--queue-delay-us", type=int, default=defaults.queue_delay_us,
                        help="how long the dynamic batcher waits to fill a batch")
    parser.add_argument("--max-queue-size", type=_non_negative_int, default=defaults.max_queue_size,
                        help="most requests waiting per model; more get a fast UNAVAILABLE (0: unbounded)")
    # Both default to None: unset, `engine_layout` chooses them for the machine.
    parser.add_argument("--instances", type=int, default=None,
                        help="model instances (default: 2 on a CPU with 2+ cores, else 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="engine threads per instance (0: one per core; default: half the usable cores "
                             "each for the two CPU instances, the CPU quota counted)")
    parser.add_argument("--streams", type=int, default=defaults.streams,
                        help="OpenVINO CPU streams per instance (openvino variant)")
    parser.add_argument("--embedding-cache", type=_non_negative_int, default=defaults.embedding_cache_entries,
                        help="texts whose embeddings each model instance keeps, so a repeated query skips "
                             "the engine (0: none)")
    parser.add_argument("--no-length-grouping", action="store_true",
                        help="pad each dynamic batch to its longest text in arrival order (benchmark baseline)")
    parser.add_argument("--no-dynamic-batching", action="store_true", help="run every request on its own")
    parser.add_argument("--no-spin-wait", action="store_true",
                        help="ONNX Runtime threads sleep between parallel sections instead of spinning "
                             "(slower, but leaves the cores to other processes)")


def settings_from_args(args: argparse.Namespace, artifact: art.Artifact, device: str,
                       layout: str = "python", variant: str | None = None) -> RepositorySettings:
    """`served_settings` from the options of `add_server_options` (`variant`: one already chosen)."""
    return served_settings(
        variant or args.variant or choose_variant(artifact, device), device=device, layout=layout,
        instances=args.instances, threads=args.threads,
        max_batch_size=args.max_batch_size,
        queue_delay_us=args.queue_delay_us,
        max_queue_size=args.max_queue_size,
        streams=args.streams,
        length_grouping=not args.no_length_grouping,
        dynamic_batching=not args.no_dynamic_batching,
        spin_wait=not args.no_spin_wait,
        embedding_cache_entries=args.embedding_cache,
    )


def artifact_variants(args: argparse.Namespace, artifacts: list[art.Artifact], device: str) -> list[str]:
    """The variant each artifact is served with: --variant for all, else each artifact's own best."""
    return [args.variant or choose_variant(artifact, device) for artifact in artifacts]

