"""Model repositories built from an artifact: valid Triton configs for both layouts, self-contained dirs.

The onnxruntime layout targets the stock Triton container on GPU, which cannot run here, so its configs
are validated structurally: parsed with Triton's own ModelConfig protobuf, ensemble wiring checked
tensor by tensor, and the encoder's declared inputs/outputs checked against the ONNX graph.
"""

from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from embedline.serving.repository import RepositorySettings, build_repository


def read_config(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def tensors(entries):
    return {entry.name: entry for entry in entries}


def assert_self_contained(repository: Path) -> None:
    for path in repository.rglob("*"):
        assert not path.is_symlink(), f"{path} links outside its model directory"
    for model_py in repository.rglob("model.py"):
        source = model_py.read_text()
        assert ".." not in source.replace("...", ""), f"{model_py} refers to a parent directory"


def test_python_layout_matches_wire_contract(tiny_fp32, tmp_path):
    repo = build_repository(tiny_fp32, tmp_path / "models", RepositorySettings(max_batch_size=16))
    assert sorted(p.name for p in repo.iterdir()) == ["embed"]
    config = read_config(repo / "embed" / "config.pbtxt")
    assert config.backend == "python" and config.max_batch_size == 16
    assert config.HasField("dynamic_batching")
    inputs, outputs = tensors(config.input), tensors(config.output)
    assert list(inputs) == ["text"] and inputs["text"].data_type == mc.TYPE_STRING
    assert list(inputs["text"].dims) == [1]
    assert outputs["sentence_embedding"].data_type == mc.TYPE_FP32
    assert list(outputs["sentence_embedding"].dims) == [tiny_fp32.dim]
    assert outputs["truncated"].data_type == mc.TYPE_BOOL
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["dim"] == str(tiny_fp32.dim) and params["variant"] == "fp32"
    assert params["max_seq_length"] == str(tiny_fp32.max_seq_length)
    version = repo / "embed" / "1"
    assert {p.name for p in version.iterdir()} >= {"model.py", "text_batch.py", "tokenizer.json", "model.onnx"}
    assert_self_contained(repo)


def test_onnxruntime_layout_for_stock_gpu_container(tiny_fp32, tmp_path):
    settings = RepositorySettings(layout="onnxruntime", device="gpu", max_batch_size=32)
    repo = build_repository(tiny_fp32, tmp_path / "models", settings)
    configs = {p.name: read_config(p / "config.pbtxt") for p in repo.iterdir()}
    assert set(configs) == {"embed", "tokenize", "encoder"}
    assert all(c.name == name for name, c in configs.items())
    assert all(c.max_batch_size == 32 for c in configs.values())

    encoder = configs["encoder"]
    assert encoder.platform == "onnxruntime_onnx"
    assert encoder.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    graph = onnx.load(str(repo / "encoder" / "1" / encoder.default_model_filename)).graph
    onnx_types = {onnx.TensorProto.INT64: mc.TYPE_INT64, onnx.TensorProto.FLOAT: mc.TYPE_FP32}
    assert {i.name: onnx_types[i.type.tensor_type.elem_type] for i in graph.input} == {
        t.name: t.data_type for t in encoder.input
    }
    assert {o.name: onnx_types[o.type.tensor_type.elem_type] for o in graph.output} == {
        t.name: t.data_type for t in encoder.output
    }

    # Ensemble wiring: every step input comes from the ensemble input or an earlier step, with the
    # same data type; every ensemble output is produced by a step.
    ensemble = configs["embed"]
    assert ensemble.platform == "ensemble"
    available = {t.name: t.data_type for t in ensemble.input}
    for step in ensemble.ensemble_scheduling.step:
        model = configs[step.model_name]
        model_inputs, model_outputs = tensors(model.input), tensors(model.output)
        for model_tensor, ensemble_tensor in step.input_map.items():
            assert ensemble_tensor in available, f"{step.model_name} reads {ensemble_tensor} before it exists"
            assert model_inputs[model_tensor].data_type == available[ensemble_tensor]
        assert set(step.input_map) == set(model_inputs)
        for model_tensor, ensemble_tensor in step.output_map.items():
            available[ensemble_tensor] = model_outputs[model_tensor].data_type
    for output in ensemble.output:
        assert available.get(output.name) == output.data_type
    assert {p.name for p in (repo / "tokenize" / "1").iterdir()} >= {"model.py", "text_batch.py", "tokenizer.json"}
    assert_self_contained(repo)


def test_onnxruntime_layout_follows_batching_settings(tiny_fp32, tmp_path):
    settings = RepositorySettings(layout="onnxruntime", queue_delay_us=250)
    repo = build_repository(tiny_fp32, tmp_path / "on", settings)
    for name in ("tokenize", "encoder"):
        config = read_config(repo / name / "config.pbtxt")
        assert config.dynamic_batching.max_queue_delay_microseconds == 250
    off = build_repository(tiny_fp32, tmp_path / "off", RepositorySettings(layout="onnxruntime", dynamic_batching=False))
    assert not any(read_config(off / name / "config.pbtxt").HasField("dynamic_batching") for name in ("tokenize", "encoder"))


def test_spin_wait_is_on_by_default_and_off_with_the_cli_flag(tiny_fp32, tmp_path):
    import argparse

    from embedline.serving.repository import configure, settings_from_args

    def spin_param(argv, dest):
        parser = argparse.ArgumentParser()
        configure(parser)
        args = parser.parse_args(["--artifact", str(tiny_fp32.path), "--output", str(dest), "--variant", "fp32", *argv])
        repo = build_repository(tiny_fp32, dest, settings_from_args(args, tiny_fp32, "cpu"))
        return read_config(repo / "embed" / "config.pbtxt").parameters["spin_wait"].string_value

    assert spin_param([], tmp_path / "default") == "true"
    assert spin_param(["--no-spin-wait"], tmp_path / "off") == "false"


def test_engine_layout_gives_a_cpu_two_instances_with_half_the_cores_each():
    from embedline.serving.settings import engine_layout, served_settings

    assert engine_layout("cpu", 2) == (2, 1)
    assert engine_layout("cpu", 16) == (2, 8)
    assert engine_layout("cpu", 1) == (1, 0)  # one core: nothing to run beside the engine
    assert engine_layout("gpu", 16) == (1, 0)
    # What the benchmarks serve: the same layouts, the threads spelled out.
    assert (served_settings("openvino", 2).instances, served_settings("openvino", 2).intra_op_threads) == (2, 1)
    assert (served_settings("fp16", 4, "gpu").instances, served_settings("fp16", 4, "gpu").intra_op_threads) == (1, 4)
    assert served_settings("int8", 2, max_queue_size=0).max_queue_size == 0
    # ... and the group size `serve` gives the variant, unless overridden.
    assert served_settings("openvino", 2).group_size == 64
    assert served_settings("int8", 2).group_size == 32
    assert served_settings("openvino", 2, length_group_size=16).group_size == 16


def test_usable_cores_honours_a_cgroup_cpu_quota(tmp_path):
    import os

    from embedline.serving.settings import usable_cores

    affinity = len(os.sched_getaffinity(0))
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    v2.mkdir()
    (v2 / "cpu.max").write_text("max 100000\n")
    assert usable_cores(str(v2)) == affinity
    (v2 / "cpu.max").write_text("150000 100000\n")  # --cpus 1.5: rounded up
    assert usable_cores(str(v2)) == min(affinity, 2)
    (v2 / "cpu.max").write_text("50000 100000\n")
    assert usable_cores(str(v2)) == 1
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert usable_cores(str(v1)) == affinity
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    assert usable_cores(str(v1)) == 1
    assert usable_cores(str(tmp_path / "absent")) == affinity


def test_instances_and_threads_follow_the_variant_unless_given(tiny_fp32, tmp_path, monkeypatch):
    import argparse

    from embedline.serving import settings as server_settings
    from embedline.serving.repository import configure, settings_from_args

    monkeypatch.setattr(server_settings, "usable_cores", lambda: 4)

    def layout(variant, *argv):
        parser = argparse.ArgumentParser()
        configure(parser)
        args = parser.parse_args(["--artifact", str(tiny_fp32.path), "--output", str(tmp_path), *argv])
        settings = settings_from_args(args, tiny_fp32, "cpu", variant=variant)
        return settings.instances, settings.intra_op_threads

    assert layout("openvino") == (2, 2)
    assert layout("fp32") == (2, 2)
    assert layout("openvino", "--threads", "4") == (1, 4)  # either option given: the rest are plain defaults
    assert layout("openvino", "--instances", "3") == (3, 0)
    assert layout("fp32", "--instances", "2", "--threads", "1") == (2, 1)
    parser = argparse.ArgumentParser()
    configure(parser)
    args = parser.parse_args(["--artifact", str(tiny_fp32.path), "--output", str(tmp_path)])
    # OpenVINO runs groups of up to 64 texts, ONNX Runtime 32 (serving/settings.py: group_size_for).
    assert settings_from_args(args, tiny_fp32, "cpu", variant="openvino").group_size == 64
    assert settings_from_args(args, tiny_fp32, "cpu", variant="fp32").group_size == 32
    config = read_config(build_repository(tiny_fp32, tmp_path / "m", RepositorySettings(instances=2)) / "embed"
                         / "config.pbtxt")
    assert config.instance_group[0].count == 2


def test_missing_variant_is_clear_error(tiny_fp32, tmp_path):
    from embedline.artifact import ArtifactError

    with pytest.raises(ArtifactError, match="variant 'int8' is not exported"):
        build_repository(tiny_fp32, tmp_path / "m", RepositorySettings(variant="int8"))


def test_every_batched_model_has_a_bounded_queue_that_honours_request_timeouts(tiny_classifier, tmp_path):
    import argparse

    from embedline.serving.repository import configure, settings_from_args

    def policies(argv, dest, layout="python"):
        parser = argparse.ArgumentParser()
        configure(parser)
        args = parser.parse_args(["--artifact", str(tiny_classifier.path), "--output", str(dest),
                                  "--variant", "fp32", "--layout", layout, *argv])
        repo = build_repository(tiny_classifier, dest, settings_from_args(args, tiny_classifier, "cpu", layout))
        configs = [read_config(path) for path in sorted(repo.glob("*/config.pbtxt"))]
        return {c.name: c.dynamic_batching.default_queue_policy for c in configs if c.HasField("dynamic_batching")}

    default = policies([], tmp_path / "default")
    assert set(default) == {"embed", "classifier_head"}
    for policy in default.values():
        assert policy.max_queue_size == RepositorySettings.max_queue_size > 0
        assert policy.timeout_action == mc.ModelQueuePolicy.REJECT
        assert policy.allow_timeout_override  # a request's own shorter timeout wins...
        assert policy.default_timeout_microseconds == RepositorySettings.max_queue_wait_s * 1e6 > 0  # ...over this
    unbounded = policies(["--max-queue-size", "0"], tmp_path / "unbounded").values()
    assert {(p.max_queue_size, p.default_timeout_microseconds) for p in unbounded} == {(0, 0)}  # no policy
    assert "encoder" in policies(["--max-queue-size", "7"], tmp_path / "ort", layout="onnxruntime")
    with pytest.raises(SystemExit):
        policies(["--max-queue-size", "-1"], tmp_path / "bad")


def test_a_model_exported_on_another_cpu_carries_a_host_warning(tiny_fp32, tmp_path):
    import json
    import shutil

    from embedline import artifact as art

    copy = tmp_path / "artifact"
    shutil.copytree(tiny_fp32.path, copy)
    metadata = json.loads((copy / art.METADATA_FILE).read_text())
    metadata["export"] = {**(metadata.get("export") or {}), "host": {"int8_instructions": ["amx_int8", "avx512_vnni"]}}
    (copy / art.METADATA_FILE).write_text(json.dumps(metadata))
    moved = art.load_artifact(copy)
    repo = build_repository(moved, tmp_path / "moved", RepositorySettings(variant="fp32"))
    warning = read_config(repo / "embed" / "config.pbtxt").parameters["host_warning"].string_value
    # Only a CPU without avx2 could have exactly these two: every host this runs on differs.
    assert "was exported on a CPU with amx_int8 avx512_vnni" in warning
    same = build_repository(tiny_fp32, tmp_path / "same", RepositorySettings(variant="fp32"))
    assert read_config(same / "embed" / "config.pbtxt").parameters["host_warning"].string_value == ""


def test_every_onnx_runtime_model_carries_the_one_session_options_file(tiny_classifier, tmp_path):
    """model_repository/common/ort_options.py is the one definition: each python model gets a copy."""
    from importlib import resources

    template = (Path(str(resources.files("embedline.model_repository"))) / "common" / "ort_options.py").read_text()
    repo = build_repository(tiny_classifier, tmp_path / "models", RepositorySettings(variant="fp32"))
    for model in ("embed", "classifier_head"):
        assert (repo / model / "1" / "ort_options.py").read_text() == template


def test_each_artifact_s_classifier_head_is_its_own_classify_model(tiny_classifier, tmp_path):
    import json
    import shutil

    from embedline import artifact as art

    second = tmp_path / "second"
    shutil.copytree(tiny_classifier.path, second)
    metadata = json.loads((second / art.METADATA_FILE).read_text())
    (second / art.METADATA_FILE).write_text(json.dumps({**metadata, "name": "intent"}))
    repo = build_repository([tiny_classifier, art.load_artifact(second)], tmp_path / "models",
                            RepositorySettings(variant="fp32"))
    assert {p.name for p in repo.iterdir()} == {"embed", "classify", "classifier_head",
                                               "intent", "intent-classify", "intent-classifier-head"}
    ensemble = read_config(repo / "intent-classify" / "config.pbtxt")
    assert [step.model_name for step in ensemble.ensemble_scheduling.step] == ["intent", "intent-classifier-head"]
    catalog = json.loads(read_config(repo / "embed" / "config.pbtxt").parameters["served_models"].string_value)
    assert catalog == {tiny_classifier.name: {"embed": "embed", "classify": "classify"},
                       "intent": {"embed": "intent", "classify": "intent-classify"}}


def with_openvino_stand_in(artifact, dest: Path, name: str):
    """A copy of `artifact` named `name` with stand-in OpenVINO IR files: the builder only places them."""
    import json
    import shutil

    from embedline import artifact as art

    shutil.copytree(artifact.path, dest)
    metadata = json.loads((dest / art.METADATA_FILE).read_text())
    (dest / art.METADATA_FILE).write_text(json.dumps({**metadata, "name": name}))
    copy = art.load_artifact(dest)
    xml, bin_ = copy.openvino_files()
    xml.parent.mkdir(parents=True, exist_ok=True)
    xml.write_text("<net/>")
    bin_.write_bytes(b"\0")
    return copy


def parameters(config: mc.ModelConfig) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


def test_artifacts_of_different_variants_side_by_side_get_their_own_group_sizes(tiny_fp32, tmp_path):
    openvino = with_openvino_stand_in(tiny_fp32, tmp_path / "ov", "tiny-ov")
    for order in (["fp32", "openvino"], ["openvino", "fp32"]):
        artifacts = [tiny_fp32, openvino] if order[0] == "fp32" else [openvino, tiny_fp32]
        repo = build_repository(artifacts, tmp_path / "-".join(order), RepositorySettings(), order)
        embed_dirs = ["embed", artifacts[1].name]
        sizes = [parameters(read_config(repo / d / "config.pbtxt"))["length_group_size"] for d in embed_dirs]
        assert sizes == ["32" if variant == "fp32" else "64" for variant in order], (order, sizes)


def test_publish_of_an_openvino_version_over_onnxruntime_writes_what_build_repo_would(tiny_fp32, tmp_path):
    from embedline.serving import publish

    openvino = with_openvino_stand_in(tiny_fp32, tmp_path / "ov", tiny_fp32.name)
    settings = RepositorySettings(variant="fp32", instances=2, intra_op_threads=1)
    served = build_repository(tiny_fp32, tmp_path / "served", settings)
    assert parameters(read_config(served / "embed" / "config.pbtxt"))["length_group_size"] == "32"
    publish.publish(openvino, served, variant="openvino")
    expected = build_repository(openvino, tmp_path / "expected", RepositorySettings(
        variant="openvino", instances=2, intra_op_threads=1))
    published = read_config(served / "embed" / "config.pbtxt")
    assert parameters(published) == parameters(read_config(expected / "embed" / "config.pbtxt"))
    assert parameters(published)["length_group_size"] == "64"
    # The whole config, not only its parameters: batching, queue, instances, tensors.
    assert published == read_config(expected / "embed" / "config.pbtxt")
    assert (served / "embed" / "2" / "model.xml").is_file()
