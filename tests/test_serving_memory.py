"""Server memory: bounded under mixed request shapes, read from the cgroup, checked before `serve` starts."""

from __future__ import annotations

import importlib.util
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import pytest

from embedline.serving.memory import (
    MODEL_PROCESS_MIB,
    SERVER_BASE_MIB,
    fit_to_memory,
    memory_limit_mib,
    memory_plan,
    tree_pss_mib,
)
from embedline.serving.settings import RepositorySettings, served_settings
from embedline.serving.triton import ServingError

WORDS = ("the quick brown fox jumps over a lazy dog while seven old wizards quietly brew strange potions "
         "under moonlight near rivers and mountains").split()


def test_memory_limit_is_read_from_cgroup_v2_and_v1(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("max\n")
    assert memory_limit_mib(str(v2)) is None
    (v2 / "memory.max").write_text(f"{3 * 2**30}\n")
    assert memory_limit_mib(str(v2)) == 3072
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert memory_limit_mib(str(v1)) is None
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{2 * 2**30}\n")
    assert memory_limit_mib(str(v1)) == 2048
    assert memory_limit_mib(str(tmp_path / "none")) is None


def test_memory_plan_counts_every_model_process():
    plan = memory_plan(["openvino", "int8"], instances=2, heads=1)
    assert plan.need_mib == SERVER_BASE_MIB + 2 * MODEL_PROCESS_MIB["openvino"] + 3 * MODEL_PROCESS_MIB["onnxruntime"]
    assert "2 openvino processes" in plan.describe() and "3 onnxruntime processes" in plan.describe()


def test_fit_to_memory_keeps_drops_to_one_instance_or_refuses():
    two = RepositorySettings(variant="openvino", instances=2, intra_op_threads=1)
    need_two = memory_plan(["openvino"], 2).need_mib
    need_one = memory_plan(["openvino"], 1).need_mib
    assert fit_to_memory(two, ["openvino"], 0, None, True)[0] == two
    assert fit_to_memory(two, ["openvino"], 0, need_two, True)[0] == two
    # serve chose two instances itself: one instance on both threads fits instead
    single, plan = fit_to_memory(two, ["openvino"], 0, need_two - 1, True)
    assert (single.instances, single.intra_op_threads, plan.need_mib) == (1, 2, need_one)
    # the operator asked for two: kept, so refused, in one line naming what it needs
    with pytest.raises(ServingError, match=f"needs up to {need_two} MiB") as raised:
        fit_to_memory(two, ["openvino"], 0, need_two - 1, False)
    assert "\n" not in str(raised.value)
    with pytest.raises(ServingError, match=f"at least {need_one} MiB"):
        fit_to_memory(two, ["openvino"], 0, need_one - 1, True)


def test_a_served_index_is_counted_in_the_plan():
    two = RepositorySettings(variant="openvino", instances=2, intra_op_threads=1)
    without = memory_plan(["openvino"], 2).need_mib
    settings, plan = fit_to_memory(two, ["openvino"], 0, None, True, search_mib=300)
    # each embed instance holds the index it ranks with
    assert plan.need_mib == without + 600 and "search 600 MiB" in plan.describe()
    # the index's memory can push the plan to one instance, as the model processes can
    single, plan = fit_to_memory(two, ["openvino"], 0, without + 599, True, search_mib=300)
    assert single.instances == 1 and plan.search_mib == 300


@pytest.mark.slow
def test_serve_refuses_a_memory_limit_it_cannot_fit(launch_serve, tiny_fp32, tmp_path):
    (tmp_path / "memory.max").write_text(f"{512 * 2**20}\n")
    served = launch_serve("--artifact", str(tiny_fp32.path), env={"EMBEDLINE_CGROUP": str(tmp_path)}, wait=False)
    output, _ = served.process.communicate(timeout=120)
    assert served.process.returncode != 0
    error = [line for line in output.splitlines() if "memory limit is 512 MiB" in line]
    assert error and "raise the limit" in error[0], output


def _distinct_shape_requests(count: int, seed: int = 0) -> list[list[str]]:
    """`count` requests, each a (texts, longest) shape not used before; one in ten has a text past 256 tokens."""
    rng = random.Random(seed)
    shapes = [(n, w) for n in range(1, 33) for w in range(3, 80)]
    rng.shuffle(shapes)
    requests = []
    for index, (count_texts, longest) in enumerate(shapes[:count]):
        if index % 10 == 0:
            longest = rng.randint(150, 300)
        texts = [" ".join(rng.choices(WORDS, k=longest))]
        texts += [" ".join(rng.choices(WORDS, k=rng.randint(1, longest))) for _ in range(count_texts - 1)]
        requests.append(texts)
    return requests


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("openvino") is None or importlib.util.find_spec("nncf") is None,
                    reason="needs the openvino extra (pip install 'embedline[openvino]'), which CI installs")
def test_default_variant_memory_stays_bounded_under_distinct_shapes(start_server, minilm_artifact, tmp_path_factory):
    """A few hundred request shapes never seen before through the default CPU variant as `serve` lays it out:
    the server's PSS stays under the plan `serve` prints (unbounded kernel caches took 2 GB per process)."""
    from embedline.client import EmbeddingClient
    from embedline.export.pipeline import export_artifact

    dest = tmp_path_factory.mktemp("minilm-openvino") / "a"
    shutil.copytree(minilm_artifact.path, dest)
    artifact = export_artifact(dest, variants=("fp32",), show_progress=False, speed_seconds=0.1, openvino=True)
    settings = served_settings("openvino", cores=2)
    served = start_server(artifact, **asdict(settings))
    bound = memory_plan(["openvino"], settings.instances).need_mib
    requests = _distinct_shape_requests(300)
    with EmbeddingClient(served.grpc_url, timeout=120) as client, ThreadPoolExecutor(4) as pool:
        results = list(pool.map(client.embed, requests))
    assert [len(r) for r in results] == [len(r) for r in requests]
    pss = tree_pss_mib(served.server.process.pid)
    print(f"server PSS after {len(requests)} distinct shapes: {pss} MiB (bound {bound} MiB)")
    assert pss < bound
