"""Export's optional variants: length-spread int8 calibration, rejected variants (recorded, removed, never
served, the export goes on; fp32 failing still fails), the exporting host's CPU record and host_mismatch.
Tiny model, small and fast; no speed assertions."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from embedline import artifact as art
from embedline.export import parity
from embedline.export.errors import ExportError
from embedline.export.openvino_int8 import CALIBRATION_SHORT_TEXTS, CALIBRATION_SIZE, calibration_texts
from embedline.tokenization import load_tokenizer
from embedline.variants import (
    INT8_INSTRUCTIONS,
    OPENVINO_VARIANT,
    TOLERANCES,
    Tolerance,
    choose_variant,
    choose_variant_from_parity,
    cpu_int8_instructions,
    host_mismatch,
    servable_variants,
    variant_files,
)

needs_openvino = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None or importlib.util.find_spec("nncf") is None,
    reason="needs the openvino extra (pip install 'embedline[openvino]')")


def token_lengths(tokenizer, texts):
    return [len(tokenizer.encode(t).ids) for t in texts]


# ---- calibration covers short and long lengths ------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return load_tokenizer(art.bundled_model_dir() / "tokenizer.json", 256)


def test_calibration_spreads_the_users_sentences_over_lengths(minilm_tokenizer):
    # Sentences only, all of middling length: what an STS file gives.
    user = [f"A man number {i} is playing a guitar on the street corner near the station." for i in range(500)]
    texts, description = calibration_texts(user, minilm_tokenizer, 256)
    assert len(texts) == CALIBRATION_SIZE and description["source"] == "given"
    lengths = token_lengths(minilm_tokenizer, texts)
    words = [len(t.split()) for t in texts]
    # one to three words ([CLS] + a few word pieces + [SEP]): a fifth, single words among them
    assert sum(w <= 3 for w in words) >= CALIBRATION_SIZE // 5
    assert sum(w == 1 for w in words) >= 10
    # long: from 64 tokens up to max_seq_length, spread (not all cut at the same length)
    long = [n for n in lengths if n >= 64]
    assert len(long) >= CALIBRATION_SIZE // 5 and max(long) == 256 and len(set(long)) >= 20
    assert any(100 <= n < 200 for n in long)
    # and the user's own sentences as they come
    assert sum(t in set(user) for t in texts) >= CALIBRATION_SIZE // 2
    assert sum(description["by_length"].values()) == len(texts)
    assert description["smooth_quant_alpha"] < 0.95  # below NNCF's transformer default (measured)
    # deterministic: the same texts give the same calibration set
    assert calibration_texts(user, minilm_tokenizer, 256)[0] == texts


def test_calibration_without_user_texts_and_with_few(minilm_tokenizer, tiny_artifact):
    texts, description = calibration_texts([], minilm_tokenizer, 256)
    assert description["source"] == "built-in"
    lengths = token_lengths(minilm_tokenizer, texts)
    assert min(lengths) <= 3 and max(lengths) == 256
    # Built-in texts stay out of the parity check's sample.
    assert not set(texts) & set(parity.PARITY_TEXTS) and not set(CALIBRATION_SHORT_TEXTS) & set(parity.PARITY_TEXTS)
    # Three short user texts still make long passages (cycled), and a short model's max length is honoured.
    tiny_tokenizer = load_tokenizer(tiny_artifact.tokenizer_path, tiny_artifact.max_seq_length)
    texts, _ = calibration_texts(["the dog runs", "a cat sleeps on the bed", "good"], tiny_tokenizer, 64, size=50)
    lengths = token_lengths(tiny_tokenizer, texts)
    assert min(lengths) <= 4 and max(lengths) == 64 and all(t for t in texts)


def test_parity_texts_include_one_word_and_over_long_texts(minilm_tokenizer):
    lengths = token_lengths(minilm_tokenizer, parity.PARITY_TEXTS)
    assert sum(len(t.split()) == 1 for t in parity.PARITY_TEXTS) >= 5
    assert max(lengths) == 256  # truncated: LONG_TEXT is longer than max_seq_length
    assert any(64 <= n < 256 for n in lengths)


# ---- rejected variants ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_rejected(tiny_model_dir, tmp_path_factory):
    """The CLI exporting fp32 + int8 of the tiny model with int8's tolerance out of reach."""
    from embedline.cli import main

    out = tmp_path_factory.mktemp("rejected") / "a"
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(TOLERANCES, "int8", Tolerance(min_cosine=2.0, mean_cosine=2.0))
        import io
        from contextlib import redirect_stdout

        printed = io.StringIO()
        with redirect_stdout(printed):
            code = main(["export", "--model", str(tiny_model_dir), "--output", str(out), "--variants", "fp32,int8",
                         "--speed-seconds", "0.1", "--no-progress"])
    return code, printed.getvalue(), art.load_artifact(out)


def test_a_rejected_variant_is_recorded_and_the_export_goes_on(int8_rejected):
    code, printed, artifact = int8_rejected
    assert code == 0
    entry = artifact.parity()["variants"]["int8"]
    assert entry["status"] == "rejected" and not entry["within_tolerance"]
    assert entry["reason"].startswith(f"cosine to torch min {entry['min_cosine']:.5f} / mean ")
    assert "needs >= 2.0 / 2.0" in entry["reason"] and entry["sentences_per_second"] > 0
    assert artifact.parity()["variants"]["fp32"]["status"] == "accepted"
    export = json.loads((artifact.path / art.METADATA_FILE).read_text())["export"]
    assert export["variants"] == ["fp32", "fused"]
    assert export["rejected"]["int8"]["reason"] == entry["reason"]
    assert export["rejected"]["int8"]["min_cosine"] == entry["min_cosine"]
    assert export["parity"]["int8"]["status"] == "rejected"
    # The printed table shows it, with the reason.
    assert "REJECTED (not served)" in [line for line in printed.splitlines() if line.startswith("int8")][0]
    assert f"rejected: int8: {entry['reason']}; its files were removed" in printed


def test_a_rejected_variant_is_never_served(int8_rejected):
    _, _, artifact = int8_rejected
    assert not artifact.onnx_path("int8").exists() and "int8" not in servable_variants(artifact)
    assert choose_variant(artifact, "cpu") in ("fp32", "fused")
    with pytest.raises(art.ArtifactError, match="'int8' was rejected at export \\(cosine to torch min"):
        variant_files(artifact, "int8")  # what `serve --variant int8` meets
    # Even with its file back and the best speed, the record's verdict keeps it out.
    record = artifact.parity()
    record["variants"]["int8"]["sentences_per_second"] = 1e9
    assert choose_variant_from_parity(record, ["fp32", "fused", "int8"], "cpu") != "int8"
    record["variants"]["fp16"] = {"measured": True, "min_cosine": 1.0, "mean_cosine": 1.0, "status": "rejected"}
    assert choose_variant_from_parity(record, ["fp32", "fused", "fp16"], "gpu") == "fused"
    with pytest.raises(art.ArtifactError, match="rejected"):
        choose_variant_from_parity(record, ["int8"], "cpu")


@needs_openvino
@pytest.mark.slow  # a real NNCF quantization
def test_a_rejected_openvino_variant_leaves_no_ir(tiny_artifact, tmp_path, monkeypatch):
    from embedline.export.pipeline import export_artifact

    shutil.copytree(tiny_artifact.path, tmp_path / "a")
    monkeypatch.setitem(TOLERANCES, OPENVINO_VARIANT, Tolerance(min_cosine=2.0, mean_cosine=2.0))
    artifact = export_artifact(tmp_path / "a", variants=("fp32",), show_progress=False, speed_seconds=0,
                               openvino=True)
    entry = artifact.parity()["variants"][OPENVINO_VARIANT]
    assert entry["status"] == "rejected" and entry["calibration"]["source"] == "built-in"
    assert not artifact.openvino_dir.exists() and servable_variants(artifact) == ["fp32"]
    assert artifact.metadata["export"]["default_cpu_variant"] == "fp32"
    assert OPENVINO_VARIANT in artifact.metadata["export"]["rejected"]


def test_fp32_failing_still_fails_the_export(tiny_artifact, tmp_path, monkeypatch):
    from embedline.export.pipeline import export_artifact

    shutil.copytree(tiny_artifact.path, tmp_path / "a")
    monkeypatch.setitem(TOLERANCES, "fp32", Tolerance(min_cosine=2.0, mean_cosine=2.0))
    monkeypatch.setitem(TOLERANCES, "int8", Tolerance(min_cosine=2.0, mean_cosine=2.0))
    with pytest.raises(ExportError, match=r"^parity check failed: fp32 cosine to torch min"):
        export_artifact(tmp_path / "a", variants=("fp32", "int8"), show_progress=False, speed_seconds=0)
    artifact = art.load_artifact(tmp_path / "a")
    assert artifact.metadata["export"] is None  # ensure_exported retries
    entries = artifact.parity()["variants"]
    assert entries["fp32"]["status"] == "failed" and entries["int8"]["status"] == "rejected"


# ---- the exporting host ------------------------------------------------------------------------------

CPUINFO = """processor\t: 0
model name\t: Some CPU
flags\t\t: fpu sse2 avx avx2 avx512f avx512_vnni avx512_bf16 avx_vnni
processor\t: 1
flags\t\t: fpu sse2 avx avx2 avx512f avx512_vnni avx512_bf16 avx_vnni
"""


def test_cpu_int8_instructions_from_cpuinfo():
    assert cpu_int8_instructions(CPUINFO) == ["avx2", "avx512_vnni", "avx_vnni", "avx512_bf16"]
    assert cpu_int8_instructions("flags : fpu sse2 avx avx2\n") == ["avx2"]
    assert cpu_int8_instructions("") == []
    here = cpu_int8_instructions()
    assert here is None or set(here) <= set(INT8_INSTRUCTIONS)


def test_export_records_the_host(int8_rejected):
    _, printed, artifact = int8_rejected
    host = artifact.metadata["export"]["host"]
    assert host["int8_instructions"] == cpu_int8_instructions() and host["cpus"] >= 1
    assert artifact.parity()["speed"]["host"] == host
    if host["int8_instructions"] is not None:
        assert "int8 instructions: " in printed


def test_host_mismatch(int8_rejected, tmp_path):
    _, _, artifact = int8_rejected
    assert host_mismatch(artifact) is None  # exported here
    exported_on = artifact.metadata["export"]["host"]["int8_instructions"]
    if exported_on is None:
        pytest.skip("no /proc/cpuinfo here: the exporting host's instructions are unknown")
    assert host_mismatch(artifact, current=list(reversed(exported_on))) is None  # order does not matter
    other = ["avx2"] if exported_on != ["avx2"] else []
    warning = host_mismatch(artifact, current=other)
    assert warning and "\n" not in warning and artifact.name in warning and "re-export" in warning
    assert ("this CPU has " + (" ".join(other) or "none of")) in warning
    # An artifact exported before the host was recorded, or an unknown CPU: nothing to compare.
    old = art.Artifact(path=artifact.path, metadata={**artifact.metadata, "export": {"variants": ["fp32"]}})
    assert host_mismatch(old, current=["avx2"]) is None
    unexported = art.Artifact(path=artifact.path, metadata={**artifact.metadata, "export": None})
    assert host_mismatch(unexported, current=["avx2"]) is None


# ---- ensure_exported adds OpenVINO where it can ------------------------------------------------------


@pytest.mark.parametrize("available", [True, False])
def test_ensure_exported_adds_openvino_when_importable(tiny_artifact, tmp_path, monkeypatch, available):
    from embedline.export import ensure, pipeline

    shutil.copytree(tiny_artifact.path, tmp_path / "a")
    calls = []
    monkeypatch.setattr(ensure, "openvino_export_available", lambda: available)
    monkeypatch.setattr(pipeline, "export_artifact", lambda artifact, variants, **kw: calls.append(kw) or artifact)
    ensure.ensure_exported(tmp_path / "a", show_progress=False)
    assert calls[-1]["openvino"] is available
    ensure.ensure_exported(tmp_path / "a", show_progress=False, openvino=False)
    assert calls[-1]["openvino"] is False


def test_speed_check_warms_every_shape_up():
    import time

    calls = {"a": [], "b": []}

    def runner(name):
        def run(batch):
            calls[name].append(len(batch["input_ids"]))
            time.sleep(0.001)
        return run

    batches = [{"input_ids": [0] * n} for n in (1, 2, 3)]
    parity.measure_throughput({name: runner(name) for name in calls}, batches, 0.0)
    assert calls["a"][:3] == calls["b"][:3] == [1, 2, 3]  # warm-up: every batch once, each runner alike
