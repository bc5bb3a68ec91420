"""GPU paths of the speed work (CUDA execution provider with IO binding in the server's engine, the fp16
server): run only where onnxruntime has CUDA (tests/conftest.py skips `gpu` tests elsewhere)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from embedline import artifact as art

pytestmark = pytest.mark.gpu


def _engines_module():
    path = Path(__file__).parents[1] / "model_repository" / "python" / "embed" / "1" / "engines.py"
    spec = importlib.util.spec_from_file_location("engines_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def exported_tiny(tiny_artifact, tmp_path_factory) -> art.Artifact:
    from embedline.export.pipeline import export_artifact

    dest = tmp_path_factory.mktemp("gpu-artifact") / "a"
    shutil.copytree(tiny_artifact.path, dest)
    return export_artifact(dest, variants=("fp32", "fp16"), show_progress=False, speed_seconds=0)


def test_io_binding_engine_matches_cpu(exported_tiny):
    from embedline.tokenization import encode, load_tokenizer

    engines = _engines_module()
    tokenizer = load_tokenizer(exported_tiny.tokenizer_path, exported_tiny.max_seq_length)
    batch = encode(tokenizer, ["a man plays the guitar", "hi", "the dog runs in the park " * 5])
    gpu = engines.OrtEngine(str(exported_tiny.onnx_path("fp16")), 1, gpu_device_id=0)
    assert gpu.on_gpu
    cpu = engines.OrtEngine(str(exported_tiny.onnx_path("fp32")), 1)
    on_gpu = gpu.run(batch["input_ids"], batch["attention_mask"])
    on_cpu = cpu.run(batch["input_ids"], batch["attention_mask"])
    assert on_gpu.dtype == np.float32 and on_gpu.shape == on_cpu.shape
    assert ((on_gpu * on_cpu).sum(axis=1) > 0.999).all()


def test_fp16_server_on_gpu_agrees_with_cpu(start_server, exported_tiny):
    from embedline.client import EmbeddingClient

    texts = ["a man plays the guitar", "hi", "", "the dog runs in the park " * 5] * 4
    gpu = start_server(exported_tiny, variant="fp16", device="gpu", group_overhead_tokens=2048)
    cpu = start_server(exported_tiny, variant="fp32")
    with EmbeddingClient(gpu.grpc_url) as a, EmbeddingClient(cpu.grpc_url) as b:
        cosines = (a.embed(texts) * b.embed(texts)).sum(axis=1)
    assert (cosines > 0.999).all(), cosines
