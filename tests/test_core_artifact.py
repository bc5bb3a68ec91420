"""The artifact contract: import, validation errors, sentence-transformers compatibility."""

import json

import pytest

from embedline import artifact as art


def test_import_writes_metadata(tiny_artifact):
    meta = tiny_artifact.metadata
    assert meta["format"] == art.FORMAT_NAME and meta["format_version"] == art.FORMAT_VERSION
    assert (tiny_artifact.dim, tiny_artifact.pooling, tiny_artifact.normalize) == (32, "mean", True)
    assert tiny_artifact.max_seq_length == 64
    assert not tiny_artifact.has_onnx() and not tiny_artifact.has_head()


def test_bundled_model_is_described():
    info = art.describe_model_dir(art.bundled_model_dir())
    assert info == {"pooling": "mean", "normalize": True, "max_seq_length": 256, "dim": 384}


def test_artifact_or_model_directory_is_answered_once(tiny_artifact, tiny_model_dir):
    assert art.is_artifact(tiny_artifact.path) and not art.is_artifact(tiny_model_dir)
    assert art.resolve_model_source(tiny_artifact.path) == (tiny_artifact.path, True)
    # Either kind describes itself the same way: the artifact from embedline.json, the model from its files.
    described = art.describe_source(tiny_artifact.path)
    assert described == {"pooling": "mean", "normalize": True, "max_seq_length": 64, "dim": 32}
    assert art.describe_source(tiny_model_dir)["dim"] == 32


def test_missing_directory_is_clear_error(tmp_path):
    with pytest.raises(art.ArtifactError, match="does not exist"):
        art.load_artifact(tmp_path / "nope")


def test_not_an_artifact_names_the_file(tmp_path):
    with pytest.raises(art.ArtifactError, match="embedline.json"):
        art.load_artifact(tmp_path)


def test_incompatible_version(tiny_artifact, tmp_path):
    meta = dict(tiny_artifact.metadata, format_version=99)
    (tmp_path / "embedline.json").write_text(json.dumps(meta))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(art.ArtifactError, match="format_version 99"):
        art.load_artifact(tmp_path)


def test_model_dir_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(art.ArtifactError, match="model.safetensors"):
        art.describe_model_dir(tmp_path)


def test_sentence_transformers_loads_artifact(tiny_artifact):
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from embedline.encoder import load_encoder
    from embedline.tokenization import encode, load_tokenizer

    st = SentenceTransformer(str(tiny_artifact.path), device="cpu")
    texts = ["a man plays the guitar", "the cat sleeps"]
    expected = st.encode(texts, convert_to_numpy=True)
    tokens = encode(load_tokenizer(tiny_artifact.tokenizer_path, tiny_artifact.max_seq_length), texts)
    with torch.no_grad():
        ours = load_encoder(tiny_artifact)(**{k: torch.from_numpy(v) for k, v in tokens.items()}).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_import_keeps_the_models_prompts(tiny_model_dir, tmp_path):
    import json
    import shutil

    from embedline import artifact as art

    source = tmp_path / "model"
    shutil.copytree(tiny_model_dir, source)
    (source / art.PROMPTS_FILE).write_text(json.dumps({"prompts": {"query": "query: ", "passage": "passage: "},
                                                       "default_prompt_name": "query"}))
    imported = art.import_model_dir(source, tmp_path / "artifact")
    assert imported.prompts == {"query": "query: ", "passage": "passage: "}
    assert imported.default_prompt_name == "query"
    assert art.import_model_dir(tiny_model_dir, tmp_path / "plain").prompts == {}
    (tmp_path / "artifact" / art.PROMPTS_FILE).write_text(json.dumps({"prompts": {"q": 1}}))
    with pytest.raises(art.ArtifactError, match="must map names to strings"):
        art.load_artifact(tmp_path / "artifact").prompts
