"""The wire contract (embedline/wire.py) holds everywhere it is spoken: the model templates (which cannot import
it: model directories stay self-contained), model_repository/README.md, the repositories `build-repo` writes
and the SDK's reading of them."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from embedline import wire
from embedline.serving.repository import RepositorySettings, build_repository

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "model_repository"
CONTRACT = {**wire.EMBED_PARAMETERS, **wire.HEAD_PARAMETERS}
TENSORS = (wire.TEXT_INPUT, wire.EMBEDDING_OUTPUT, wire.TRUNCATED_OUTPUT, wire.LABEL_OUTPUT,
           wire.PROBABILITIES_OUTPUT, wire.NEIGHBOURS_OUTPUT, wire.HITS_OUTPUT)


def template_sources() -> list[Path]:
    return sorted(TEMPLATES.rglob("*.py"))


def parameter_reads(path: Path) -> tuple[set[str], list[str]]:
    """(keys read as params["key"], the calls that read with a fallback: params.get(...))."""
    keys, fallbacks = set(), []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "params"
                and isinstance(node.slice, ast.Constant)):
            keys.add(node.slice.value)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "params"):
            fallbacks.append(f"{path.name}:{node.lineno}")
    return keys, fallbacks


def test_the_templates_read_only_contract_parameters_and_never_with_a_fallback():
    read = set()
    for path in template_sources():
        keys, fallbacks = parameter_reads(path)
        assert not fallbacks, f"a missing parameter must fail loudly, not fall back: {fallbacks}"
        assert keys <= set(CONTRACT), f"{path.relative_to(REPO)} reads {sorted(keys - set(CONTRACT))}"
        read |= keys
    # What the engine and the batching need is all read from the config, nothing assumed.
    assert {"dim", "max_seq_length", "length_group_size", "engine", "max_group_tokens", "labels"} <= read


def test_the_templates_name_the_contract_tensors():
    sources = "\n".join(p.read_text(encoding="utf-8") for p in template_sources())
    configs = "\n".join(p.read_text(encoding="utf-8") for p in TEMPLATES.rglob("config.pbtxt"))
    for name in TENSORS:
        assert f'"{name}"' in sources, f"no model.py speaks {name!r}"
        # neighbour_labels is declared by the builder, only for a head that keeps its training embeddings
        assert name == wire.NEIGHBOURS_OUTPUT or f'name: "{name}"' in configs, f"no config.pbtxt declares {name!r}"
    assert '"text"' in (TEMPLATES / "common" / "text_batch.py").read_text() and wire.TEXT_INPUT == "text"


def test_the_model_repository_readme_documents_every_parameter_and_tensor():
    readme = (TEMPLATES / "README.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"`([a-z_]+)`", readme))
    assert set(CONTRACT) <= documented, sorted(set(CONTRACT) - documented)
    assert set(TENSORS) <= documented, sorted(set(TENSORS) - documented)
    assert {wire.EMBED_MODEL, wire.CLASSIFY_MODEL, wire.SEARCH_MODEL,
            *wire.SEARCH_REQUEST_PARAMETERS} <= documented


def config_parameters(path: Path) -> dict[str, str]:
    config = text_format.Parse(path.read_text(), mc.ModelConfig())
    return {key: value.string_value for key, value in config.parameters.items()}


def test_build_repo_writes_exactly_the_contract_and_the_sdk_reads_it_back(tiny_classifier, tmp_path):
    from embedline.client import model_config, planning, results

    repo = build_repository(tiny_classifier, tmp_path / "models", RepositorySettings(variant="fp32"))
    embed = config_parameters(repo / "embed" / "config.pbtxt")
    assert set(embed) == set(wire.EMBED_PARAMETERS)
    assert set(config_parameters(repo / "classify" / "config.pbtxt")) == {*wire.EMBED_PARAMETERS, *wire.HEAD_PARAMETERS}
    assert set(config_parameters(repo / "classifier_head" / "config.pbtxt")) == {"dim", *wire.HEAD_PARAMETERS}
    for key, parameter in wire.EMBED_PARAMETERS.items():
        wire.decode(parameter, embed[key])  # every value parses as its declared kind
    spec = results._ModelSpec(name="embed", max_batch_size=64, parameters=embed, url="h:1")
    classify = results._ModelSpec(name="classify", max_batch_size=64,
                                  parameters=config_parameters(repo / "classify" / "config.pbtxt"), url="h:1")
    info = model_config.build_info(spec, classify, "h:1")
    assert (info.dim, info.max_seq_length, info.variant) == (tiny_classifier.dim, tiny_classifier.max_seq_length, "fp32")
    assert planning.spec_group_size(spec) == 32 and info.labels


def test_build_repo_with_an_index_writes_the_search_contract(tiny_fp32, tmp_path):
    repo = build_repository(tiny_fp32, tmp_path / "models", RepositorySettings(variant="fp32"),
                            index=str(tmp_path / "store"))
    search = text_format.Parse((repo / wire.SEARCH_MODEL / "config.pbtxt").read_text(), mc.ModelConfig())
    assert search.platform == "ensemble" and [o.name for o in search.output] == [wire.HITS_OUTPUT]
    assert search.input[0].name == wire.TEXT_INPUT
    [step] = search.ensemble_scheduling.step
    assert step.model_name == wire.EMBED_MODEL and dict(step.output_map) == {wire.HITS_OUTPUT: wire.HITS_OUTPUT}
    # the embed model ranks: it names the store and declares `hits` (its record is its own parameters)
    embed = text_format.Parse((repo / "embed" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert wire.HITS_OUTPUT in [o.name for o in embed.output]
    assert config_parameters(repo / "embed" / "config.pbtxt")["store_uri"] == str(tmp_path / "store")
    assert (repo / "embed" / "1" / "search_step.py").is_file()
    # without an index: no `hits`, no store
    plain = build_repository(tiny_fp32, tmp_path / "plain", RepositorySettings(variant="fp32"))
    assert config_parameters(plain / "embed" / "config.pbtxt")["store_uri"] == ""
    plain_embed = text_format.Parse((plain / "embed" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert wire.HITS_OUTPUT not in [o.name for o in plain_embed.output]
    assert not (plain / wire.SEARCH_MODEL).exists()


def test_encode_refuses_parameters_outside_the_contract():
    values = {key: 1 for key in wire.EMBED_PARAMETERS}
    with pytest.raises(ValueError, match="unknown \\['extra'\\]"):
        wire.encode(wire.EMBED_PARAMETERS, {**values, "extra": 1})
    with pytest.raises(ValueError, match="missing \\['dim'\\]"):
        wire.encode(wire.EMBED_PARAMETERS, {k: v for k, v in values.items() if k != "dim"})
    with pytest.raises(ValueError, match="'spin_wait'"):
        wire.decode(wire.EMBED_PARAMETERS["spin_wait"], "yes")
