"""The wire contract of a served embedline model, in one place (standard library only).

What `build-repo` and `publish` write into a model's config.pbtxt, what the model templates read from it,
and what the SDK and the OpenAI route expect of the server: model and tensor names, the config parameters
with their types, the API-key variable and the default ports. model_repository/README.md documents it.

Model directories stay self-contained (Triton loads a model's code from its own directory), so the
templates under model_repository/ cannot import this module; tests/test_core_wire.py holds their code and
model_repository/README.md to it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# Public models (the first served artifact's names; every further artifact's models carry its name).
EMBED_MODEL = "embed"
CLASSIFY_MODEL = "classify"

TEXT_INPUT = "text"                      # [n, 1] BYTES, UTF-8
EMBEDDING_OUTPUT = "sentence_embedding"  # [n, dim] FP32, L2-normalized
TRUNCATED_OUTPUT = "truncated"           # [n, 1] BOOL: the text was cut to max_seq_length tokens
LABEL_OUTPUT = "label"                   # classify: [n, 1] BYTES
PROBABILITIES_OUTPUT = "probabilities"   # classify: [n, num_labels] FP32, in the order of `labels`
NEIGHBOURS_OUTPUT = "neighbour_labels"   # classify: [n, k] BYTES, only when `neighbours` k > 0

# `search` (served with `serve --index`): query texts -> per query a JSON list of hits. An ensemble of one
# step: the embed model, asked for its `hits` output (it embeds and ranks against the store in one process).
SEARCH_MODEL = "search"
HITS_OUTPUT = "hits"                     # [n, 1] BYTES: JSON [{"id", "score", "text", "metadata"}, ...]
# Its request parameters (Triton's per-request `parameters`): k (int), filter (str, "" for none),
# collection (str, "" for the default) and hybrid (bool).
SEARCH_REQUEST_PARAMETERS = ("k", "filter", "collection", "hybrid")
# The prompt queries get, when the model has one by this name (sentence-transformers' convention); else the
# model's default prompt. The caller prepends it (the SDK does), as for `embed(..., prompt_name=...)`.
QUERY_PROMPT = "query"

API_KEY_ENV = "EMBEDLINE_API_KEY"
DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002, "openai": 8080}


@dataclass(frozen=True)
class Parameter:
    """One config parameter: Triton carries every value as a string; `kind` says how to read it."""

    key: str
    kind: str  # "str", "int", "bool" ("true" / "false") or "json"
    meaning: str


def _parameters(*entries: tuple[str, str, str]) -> dict[str, Parameter]:
    return {key: Parameter(key, kind, meaning) for key, kind, meaning in entries}


# The `embed` model's parameters, every one written by `build-repo` and `publish`.
EMBED_PARAMETERS = _parameters(
    ("model_name", "str", "the artifact's name"),
    ("dim", "int", "embedding size"),
    ("max_seq_length", "int", "tokens a text is cut to"),
    ("pooling", "str", "mean | cls"),
    ("variant", "str", "fp32 | fused | fp16 | int8 | openvino"),
    ("engine", "str", "onnxruntime | openvino (model.xml + model.bin)"),
    ("intra_op_threads", "int", "engine threads per instance; 0: one per core"),
    ("length_grouping", "bool", "sort a dynamic batch by length and cut it into engine runs"),
    ("length_group_size", "int", "most texts in one engine run; the SDK's request size for long lists"),
    ("group_overhead_tokens", "int", "the cost of one more engine run, in padded tokens"),
    ("max_group_tokens", "int", "most padded tokens in one engine run (a lone longer text runs alone)"),
    ("engine_cache_shapes", "int", "input shapes whose kernels OpenVINO keeps"),
    ("streams", "int", "OpenVINO CPU streams per instance"),
    ("gpu_provider", "str", "cuda | tensorrt"),
    ("spin_wait", "bool", "ONNX Runtime threads spin between parallel sections"),
    ("embedding_cache_entries", "int", "texts whose embeddings each instance keeps; 0: none"),
    ("served_models", "json", "every served artifact's name -> {embed, classify} Triton model names"),
    ("matryoshka_dims", "json", "the dims a Matryoshka loss trained the model for"),
    ("host_warning", "str", "set when this CPU's int8 instructions differ from the exporting host's"),
    ("prompts", "json", "prompt name -> the text the SDK prepends to each input (sentence-transformers' prompts)"),
    ("default_prompt_name", "str", "the prompt a call that names none gets; empty: none"),
    ("fingerprint", "str", "a hash of the model's weights: a search collection records it, so vectors of two "
                           "models are never compared"),
    ("store_uri", "str", "the store whose collections the `hits` output ranks (serve --index); empty: none"),
)

# The `classify` ensemble carries the embed parameters plus these; `classifier_head` has dim and these.
HEAD_PARAMETERS = _parameters(
    ("labels", "json", "the label order of `probabilities`"),
    ("neighbours", "int", "k nearest training examples' labels returned; 0: none"),
)

def encode(parameters: dict[str, Parameter], values: dict[str, Any]) -> dict[str, str]:
    """Typed values -> the strings a config carries; every parameter of `parameters`, and only those."""
    if set(values) != set(parameters):
        missing, unknown = set(parameters) - set(values), set(values) - set(parameters)
        raise ValueError(f"config parameters do not match the wire contract: missing {sorted(missing)}, "
                         f"unknown {sorted(unknown)}")
    encoded = {}
    for key, value in values.items():
        kind = parameters[key].kind
        encoded[key] = (json.dumps(value) if kind == "json" and not isinstance(value, str)
                        else str(value).lower() if kind == "bool" else str(value))
    return encoded


def decode(parameter: Parameter, text: str) -> Any:
    """A config string -> its typed value; ValueError naming the parameter when it does not parse."""
    try:
        if parameter.kind == "int":
            return int(text)
        if parameter.kind == "bool":
            if text not in ("true", "false"):
                raise ValueError(f"expected true or false, got {text!r}")
            return text == "true"
        if parameter.kind == "json":
            return json.loads(text)
        return text
    except ValueError as exc:
        raise ValueError(f"config parameter {parameter.key!r}: {exc}") from None


def read(parameters: dict[str, str], key: str, default: Any = None) -> Any:
    """The typed value of `key` from a config's parameters; `default` when the config lacks it (a server
    built before the parameter existed). Unknown keys are a programming error (KeyError)."""
    parameter = EMBED_PARAMETERS.get(key) or HEAD_PARAMETERS[key]
    text = parameters.get(key)
    if text is None or text == "":
        return default
    return decode(parameter, text)
