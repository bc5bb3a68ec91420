"""The export stage: ONNX variants, fusion counts, parity with torch / sentence-transformers, variant choice.

Each export runs once per module (fixtures below); threads are pinned to 2 (shared cores:
docs/architecture.md, "Measured decisions", thread pinning).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from embedline import artifact as art
from embedline.export import parity
from embedline.export.errors import ExportError
from embedline.export.pipeline import export_artifact
from embedline.variants import choose_variant, choose_variant_from_parity
from embedline.export.ensure import ensure_exported

THREADS = 2
MINILM_FUSED = {"EmbedLayerNormalization": 1, "Attention": 6, "SkipLayerNormalization": 12, "BiasGelu": 6}


def copy_artifact(artifact: art.Artifact, dest) -> art.Artifact:
    """Export writes into the artifact, so tests export a copy of the shared session fixture."""
    shutil.copytree(artifact.path, dest)
    return art.load_artifact(dest)


def onnx_embeddings(path, texts, tokenizer, provider: str = "CPUExecutionProvider") -> np.ndarray:
    session = parity.ort_session(path, THREADS, provider)
    batches = parity.make_batches(tokenizer, texts, parity.PARITY_BATCH_SIZE)
    return np.concatenate([session.run(["sentence_embedding"], b)[0] for b in batches])


@pytest.fixture(scope="module")
def tiny_exported(tiny_artifact, tmp_path_factory) -> art.Artifact:
    artifact = copy_artifact(tiny_artifact, tmp_path_factory.mktemp("export-tiny") / "a")
    return export_artifact(artifact, show_progress=False, threads=THREADS, speed_seconds=0.2)


@pytest.fixture(scope="module")
def minilm_exported(minilm_artifact) -> art.Artifact:
    """The suite's one MiniLM export (tests/conftest.py): every ONNX variant, exported once per session."""
    return minilm_artifact


# ---- tiny model: every variant, the records, the choice ----------------------------------------------


def test_tiny_exports_every_variant(tiny_exported):
    assert tiny_exported.exported_variants() == list(art.VARIANTS)
    record = tiny_exported.parity()
    assert set(record["variants"]) == set(art.VARIANTS)
    assert record["texts"] == len(parity.PARITY_TEXTS) >= 40
    for variant, entry in record["variants"].items():
        assert entry["measured"], variant
        assert entry["within_tolerance"], (variant, entry)
        assert 0.98 <= entry["mean_cosine"] <= 1.0 + 1e-6
        assert entry["sentences_per_second"] > 0
    assert record["variants"]["fp32"]["min_cosine"] >= 0.9999
    assert record["variants"]["fused"]["min_cosine"] >= 0.9999


def test_tiny_fused_operator_counts(tiny_exported):
    # 2 layers: one attention and two skip layer norms per layer, one embedding layer norm.
    expected = {"EmbedLayerNormalization": 1, "Attention": 2, "SkipLayerNormalization": 4, "BiasGelu": 2}
    assert tiny_exported.parity()["fused_operators"] == expected
    assert tiny_exported.metadata["export"]["fused_operators"] == expected


def test_tiny_metadata_summary(tiny_exported):
    summary = tiny_exported.metadata["export"]
    assert summary["variants"] == list(art.VARIANTS)
    assert set(summary["parity"]) == set(art.VARIANTS)
    assert summary["default_gpu_variant"] == "fp16"
    assert summary["default_cpu_variant"] in ("fp32", "fused", "int8")
    assert summary["onnxruntime"] and summary["date"] and summary["torch_sentences_per_second"] > 0


def test_fp16_graph_keeps_io_and_normalization_in_fp32(tiny_exported, tiny_artifact):
    import onnx

    from embedline.tokenization import load_tokenizer

    model = onnx.load(str(tiny_exported.onnx_path("fp16")))
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [onnx.TensorProto.INT64] * 2
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    # An fp16 L2 normalization would leave norms ~1e-3 off; the fp32 one leaves them ~1e-7 off.
    tokenizer = load_tokenizer(tiny_exported.tokenizer_path, tiny_exported.max_seq_length)
    embeddings = onnx_embeddings(tiny_exported.onnx_path("fp16"), parity.PARITY_TEXTS, tokenizer)
    assert embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


def test_choose_variant_on_tiny(tiny_exported):
    record = tiny_exported.parity()["variants"]
    fastest = max(("fp32", "fused", "int8"), key=lambda v: record[v]["sentences_per_second"])
    assert choose_variant(tiny_exported, "cpu") == fastest
    assert choose_variant(tiny_exported, "gpu") == "fp16"


def _entry(min_cos: float, mean_cos: float, speed: float | None, measured: bool = True) -> dict:
    return {"measured": measured, "min_cosine": min_cos, "mean_cosine": mean_cos, "sentences_per_second": speed}


def test_choose_variant_rules_on_a_hand_written_record():
    record = {"variants": {
        "fp32": _entry(1.0, 1.0, 100.0),
        "fused": _entry(1.0, 1.0, 120.0),
        "fp16": _entry(1.0, 1.0, 900.0),    # fastest, but a GPU graph: never chosen on CPU
        "int8": _entry(0.97, 0.995, 200.0),
    }}
    all_variants = list(art.VARIANTS)
    assert choose_variant_from_parity(record, all_variants, "cpu") == "int8"
    assert choose_variant_from_parity(record, all_variants, "gpu") == "fp16"
    # int8 out of tolerance (mean below 0.98): the next fastest within tolerance.
    record["variants"]["int8"] = _entry(0.95, 0.97, 200.0)
    assert choose_variant_from_parity(record, all_variants, "cpu") == "fused"
    # Only exported files count.
    assert choose_variant_from_parity(record, ["fp32", "int8"], "cpu") == "fp32"
    assert choose_variant_from_parity(record, ["fp32", "fused"], "gpu") == "fused"
    # fp16 not measured (no CUDA at export time) is still the GPU choice.
    record["variants"]["fp16"] = {"measured": False, "reason": "needs CUDA"}
    assert choose_variant_from_parity(record, all_variants, "gpu") == "fp16"
    # fp16 measured and out of tolerance: the next GPU choice.
    record["variants"]["fp16"] = _entry(0.9, 0.95, None)
    assert choose_variant_from_parity(record, all_variants, "gpu") == "fused"
    # No record at all: fp16 on GPU (nothing speaks against it), fp32 on CPU (no speed to go by).
    assert choose_variant_from_parity({}, all_variants, "gpu") == "fp16"
    assert choose_variant_from_parity({"variants": {}}, all_variants, "cpu") == "fp32"
    with pytest.raises(ValueError, match="device"):
        choose_variant_from_parity(record, all_variants, "tpu")
    with pytest.raises(art.ArtifactError, match="no exported"):
        choose_variant_from_parity(record, [], "cpu")


# ---- errors and ensure_exported --------------------------------------------------------------------


def test_parity_below_threshold_is_a_clear_error(tiny_artifact, tmp_path, monkeypatch):
    artifact = copy_artifact(tiny_artifact, tmp_path / "a")
    real_measure = parity.measure

    def degraded(*args, **kwargs):
        record = real_measure(*args, **kwargs)
        record["variants"]["fp32"].update(min_cosine=0.9, within_tolerance=False)
        return record

    monkeypatch.setattr(parity, "measure", degraded)
    with pytest.raises(ExportError) as error:
        export_artifact(artifact, variants=("fp32",), show_progress=False, speed_seconds=0)
    message = str(error.value)
    assert "fp32 cosine to torch min 0.90000" in message and "needs >= 0.9999" in message
    assert "parity.json" in message and "\n" not in message
    # The numbers stay for inspection; the artifact gets no export record, so ensure_exported retries.
    assert (artifact.onnx_dir / art.PARITY_FILE).is_file()
    assert art.load_artifact(artifact.path).metadata["export"] is None


def test_unknown_variant_is_an_error(tiny_artifact):
    with pytest.raises(ExportError, match="unknown variant"):
        export_artifact(tiny_artifact, variants=("fp8",), show_progress=False)


@pytest.mark.slow
def test_ensure_exported(tiny_model_dir, tmp_path, monkeypatch):
    from embedline.export import pipeline

    with pytest.raises(ExportError, match="output directory"):
        ensure_exported(tiny_model_dir)
    artifact = ensure_exported(tiny_model_dir, tmp_path / "a", variants=("fp32",), show_progress=False)
    assert artifact.exported_variants() == ["fp32"] and artifact.metadata["export"]

    def no_export(*args, **kwargs):
        raise AssertionError("an exported artifact must not be exported again")

    monkeypatch.setattr(pipeline, "export_artifact", no_export)
    assert ensure_exported(artifact.path).path == artifact.path
    assert ensure_exported(str(tiny_model_dir), tmp_path / "a").path == artifact.path


# ---- the CLI ---------------------------------------------------------------------------------------


def test_cli_exports_and_prints_the_table(tiny_model_dir, tmp_path, capsys):
    from embedline.cli import main

    out = tmp_path / "a"
    assert main(["export", "--model", str(tiny_model_dir), "--output", str(out), "--variants", "fp32",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "fp32       1.00000   1.00000" in printed and "default variant: cpu fp32, gpu fp32" in printed
    assert art.load_artifact(out).exported_variants() == ["fp32"]


@pytest.mark.parametrize("argv, message", [
    (["--model", "/nonexistent/model"], "does not exist"),
    (["--variants", "fp32,fp8", "--output", "x"], "--variants"),
    ([], "give --output"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    from embedline.cli import main

    assert main(["export", "--no-progress", *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("embedline export: error:")


# ---- the real all-MiniLM-L6-v2 ---------------------------------------------------------------------


def test_minilm_fp32_matches_sentence_transformers(minilm_exported):
    import torch
    from sentence_transformers import SentenceTransformer

    from embedline.tokenization import load_tokenizer

    texts = list(parity.PARITY_TEXTS)
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        model = SentenceTransformer(str(art.bundled_model_dir()), device="cpu")
        expected = model.encode(texts, batch_size=parity.PARITY_BATCH_SIZE, convert_to_numpy=True)
    finally:
        torch.set_num_threads(previous)
    tokenizer = load_tokenizer(minilm_exported.tokenizer_path, minilm_exported.max_seq_length)
    for variant, least in (("fp32", 0.9999), ("int8", 0.9)):
        cosines = parity.row_cosines(onnx_embeddings(minilm_exported.onnx_path(variant), texts, tokenizer), expected)
        assert cosines.min() >= least, (variant, cosines.min())
        if variant == "int8":
            assert cosines.mean() >= 0.98


def test_minilm_fused_operator_counts(minilm_exported):
    assert minilm_exported.metadata["export"]["fused_operators"] == MINILM_FUSED


def test_minilm_parity_record(minilm_exported):
    entries = minilm_exported.parity()["variants"]
    assert all(entry["within_tolerance"] for entry in entries.values()), entries
    assert entries["fp32"]["min_cosine"] >= 0.9999 and entries["fused"]["min_cosine"] >= 0.9999
    assert entries["int8"]["mean_cosine"] >= 0.98
    assert choose_variant(minilm_exported, "cpu") in ("fp32", "fused", "int8")
    assert json.loads((minilm_exported.path / art.METADATA_FILE).read_text())["export"]["variants"] == list(
        art.VARIANTS)


@pytest.mark.gpu
def test_minilm_fp16_on_cuda(minilm_exported):
    from embedline.tokenization import load_tokenizer

    entry = minilm_exported.parity()["variants"]["fp16"]
    assert entry["provider"] == "CUDAExecutionProvider" and entry["within_tolerance"], entry
    tokenizer = load_tokenizer(minilm_exported.tokenizer_path, minilm_exported.max_seq_length)
    texts = list(parity.PARITY_TEXTS)
    fp32 = onnx_embeddings(minilm_exported.onnx_path("fp32"), texts, tokenizer)
    fp16 = onnx_embeddings(minilm_exported.onnx_path("fp16"), texts, tokenizer, "CUDAExecutionProvider")
    assert fp16.dtype == np.float32
    assert parity.row_cosines(fp16, fp32).min() >= 0.999
