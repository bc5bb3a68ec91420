"""The speed-work side of export: STS Spearman per variant, the quality gate in choose_variant, the
OpenVINO variant in the variant lists and the model repository. Small, fast, no speed assertions."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest

from embedline import artifact as art
from embedline.export.errors import ExportError
from embedline.export.sts import read_sts_file, spearman, sts_spearman
from embedline.variants import (
    OPENVINO_VARIANT,
    SERVABLE_VARIANTS,
    choose_variant_from_parity,
    servable_variants,
    variant_files,
)


def test_spearman_matches_scipy_with_ties():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a = rng.integers(0, 6, 200).astype(float)  # many ties, like gold STS scores
    b = a + rng.normal(0, 2, 200)
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)


def write_sts(path, rows, columns=("sentence1", "sentence2", "score")):
    header = "\t".join(["genre", *columns])
    lines = [header] + ["\t".join(["news", a, b, str(s)]) for a, b, s in rows]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def test_read_sts_file_and_score(tmp_path):
    rows = [(f"a dog runs {i}", f"a dog runs {i}" if i % 2 else f"stock prices {i}", 5.0 if i % 2 else 0.5)
            for i in range(20)]
    pairs = read_sts_file(write_sts(tmp_path / "sts.tsv.gz", rows))
    assert len(pairs.scores) == 20 and pairs.sentences1[0] == "a dog runs 0"

    def embed(texts):  # identical texts -> identical vectors; different topics -> orthogonal-ish
        return np.array([[1.0, 0.0] if "dog" in t else [0.0, 1.0] for t in texts]) + 1e-3 * np.arange(len(texts))[:, None]

    assert sts_spearman(embed, pairs) > 80
    sick = read_sts_file(write_sts(tmp_path / "sick.tsv.gz", rows, ("sentence_A", "sentence_B", "relatedness_score")))
    assert len(sick.scores) == 20
    with pytest.raises(ExportError, match="columns"):
        read_sts_file(write_sts(tmp_path / "bad.tsv.gz", rows, ("x", "y", "z")))


def _entry(speed, spearman_value=None, mean_cos=0.995):
    entry = {"measured": True, "min_cosine": 0.95, "mean_cosine": mean_cos, "sentences_per_second": speed}
    if spearman_value is not None:
        entry["sts_spearman"] = spearman_value
    return entry


def test_choose_variant_prefers_fast_variants_only_within_half_a_spearman_point():
    exported = [*art.VARIANTS, OPENVINO_VARIANT]
    record = {"variants": {"fp32": {**_entry(100, 86.72), "min_cosine": 1.0, "mean_cosine": 1.0},
                           "fused": {**_entry(95, 86.72), "min_cosine": 1.0, "mean_cosine": 1.0},
                           "int8": _entry(200, 86.45), "openvino": _entry(260, 86.76)}}
    assert choose_variant_from_parity(record, exported, "cpu") == "openvino"
    record["variants"]["openvino"]["sts_spearman"] = 86.0  # loses 0.72: out
    assert choose_variant_from_parity(record, exported, "cpu") == "int8"
    record["variants"]["int8"]["sts_spearman"] = 86.2  # loses 0.52: out too
    assert choose_variant_from_parity(record, exported, "cpu") == "fp32"
    # No Spearman measured: the speed rule alone (the existing behaviour).
    for entry in record["variants"].values():
        entry.pop("sts_spearman")
    assert choose_variant_from_parity(record, exported, "cpu") == "openvino"
    # openvino is never a GPU choice.
    assert choose_variant_from_parity(record, exported, "gpu") == "fp16"
    assert choose_variant_from_parity(record, ["fp32", OPENVINO_VARIANT], "gpu") == "fp32"


def test_openvino_variant_files_and_repository(tiny_artifact, tmp_path):
    from embedline.export.onnx_export import export_fp32
    from embedline.serving.repository import RepositorySettings, build_repository

    dest = tmp_path / "a"
    shutil.copytree(tiny_artifact.path, dest)
    artifact = art.load_artifact(dest)
    export_fp32(artifact)
    assert OPENVINO_VARIANT in SERVABLE_VARIANTS
    assert servable_variants(artifact) == ["fp32"]
    with pytest.raises(art.ArtifactError, match="--openvino"):
        variant_files(artifact, OPENVINO_VARIANT)
    # Stand-in IR files: the repository builder only places them (the server test runs a real one).
    xml, bin_ = artifact.openvino_files()
    xml.parent.mkdir(parents=True)
    xml.write_text("<net/>")
    bin_.write_bytes(b"\0")
    assert servable_variants(artifact) == ["fp32", OPENVINO_VARIANT]
    repo = build_repository(artifact, tmp_path / "models", RepositorySettings(variant=OPENVINO_VARIANT, streams=2))
    version = repo / "embed" / "1"
    assert {"model.xml", "model.bin", "model.py", "engines.py", "text_batch.py"} <= {p.name for p in version.iterdir()}
    config = (repo / "embed" / "config.pbtxt").read_text()
    assert '{ key: "engine", value: { string_value: "openvino" } }' in config
    with pytest.raises(art.ArtifactError, match="python layout"):
        build_repository(artifact, tmp_path / "m2", RepositorySettings(variant=OPENVINO_VARIANT, layout="onnxruntime"))


def test_export_records_sts_spearman(tiny_artifact, tmp_path, monkeypatch):
    from embedline.export.pipeline import export_artifact

    dest = tmp_path / "a"
    shutil.copytree(tiny_artifact.path, dest)
    rows = [(f"the dog runs in the park {i}", f"the cat sleeps {i}", float(i % 5)) for i in range(24)]
    monkeypatch.setenv("EMBEDLINE_STS_FILE", str(write_sts(tmp_path / "sts.tsv.gz", rows)))
    artifact = export_artifact(dest, variants=("fp32", "int8"), show_progress=False, speed_seconds=0.1)
    variants = artifact.parity()["variants"]
    assert all(isinstance(variants[v]["sts_spearman"], float) for v in ("fp32", "fused", "int8"))
    assert artifact.parity()["sts"]["pairs"] == 24
    assert artifact.metadata["export"]["parity"]["int8"]["sts_spearman"] == variants["int8"]["sts_spearman"]
