"""A served model's config -> what the clients need of it (_ModelSpec, ModelInfo, the served-model catalog)."""

from __future__ import annotations

from typing import Any

from embedline import wire
from embedline.client.errors import ModelNotFoundError, ServerError
from embedline.client.results import ModelInfo, _ModelSpec
from embedline.wire import CLASSIFY_MODEL


def parse_model_config(response: Any, url: str = "") -> _ModelSpec:
    """A tritonclient ModelConfigResponse (protobuf) from replica `url` -> the parts the client needs."""
    config = response.config
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    instances = sum(max(1, int(group.count)) for group in config.instance_group) or 1
    max_queue_size = 0
    if config.HasField("dynamic_batching"):
        max_queue_size = int(config.dynamic_batching.default_queue_policy.max_queue_size)
    return _ModelSpec(name=config.name, max_batch_size=int(config.max_batch_size), parameters=parameters, url=url,
                      instances=instances, max_queue_size=max_queue_size)


def _parameter(spec: _ModelSpec, key: str, url: str, default: Any = None) -> Any:
    """The typed value of a config parameter (embedline/wire.py); `default` where an older server lacks
    it, ServerError where a required one is missing or does not parse."""
    try:
        value = wire.read(spec.parameters, key, default)
    except ValueError as exc:
        raise ServerError(f"model '{spec.name}' at {url}: {exc}") from None
    if value is None:
        raise ServerError(f"model '{spec.name}' at {url} has no config parameter '{key}'; "
                          "was its repository built by `embedline build-repo`?")
    return value


def spec_dim(spec: _ModelSpec, url: str) -> int:
    return _parameter(spec, "dim", url)


def spec_labels(spec: _ModelSpec, url: str) -> tuple[str, ...]:
    labels = _parameter(spec, "labels", url)
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise ServerError(f"model '{spec.name}' at {url}: parameter 'labels' is not a JSON list of strings: "
                          f"{spec.parameters.get('labels')!r}")
    return tuple(labels)


def build_info(embed: _ModelSpec, classify: _ModelSpec | None, url: str) -> ModelInfo:
    return ModelInfo(
        model_name=_parameter(embed, "model_name", url),
        dim=spec_dim(embed, url),
        max_seq_length=_parameter(embed, "max_seq_length", url),
        variant=_parameter(embed, "variant", url),
        pooling=_parameter(embed, "pooling", url, default=""),
        max_batch_size=embed.max_batch_size,
        labels=spec_labels(classify, url) if classify is not None else (),
        served_models=tuple(served_catalog(embed)),
        matryoshka_dims=tuple(int(d) for d in _parameter(embed, "matryoshka_dims", url, default=[])),
        host_warning=_parameter(embed, "host_warning", url, default=""),
        prompts=dict(_parameter(embed, "prompts", url, default={})),
        default_prompt_name=_parameter(embed, "default_prompt_name", url, default=""),
        fingerprint=_parameter(embed, "fingerprint", url, default=""),
    )


def with_prompt(spec: _ModelSpec, texts: list[str], prompt_name: str | None) -> list[str]:
    """`texts` with the named prompt prepended, as sentence-transformers does (so a long text is cut at its
    end, never the prompt); no name: the model's default prompt, if it has one. ValueError naming the
    model's prompts for an unknown name."""
    prompts = wire.read(spec.parameters, "prompts", {})
    name = prompt_name if prompt_name is not None else (wire.read(spec.parameters, "default_prompt_name") or None)
    if name is None:
        return texts
    if name not in prompts:
        have = ", ".join(sorted(prompts)) or "none"
        raise ValueError(f"prompt_name {name!r} is not one of the model's prompts ({have})")
    return [prompts[name] + text for text in texts]


def with_query_prompt(spec: _ModelSpec, queries: list[str]) -> list[str]:
    """Search queries as the `search` model expects them: with the model's query prompt (wire.QUERY_PROMPT)
    when it has one, else its default prompt, as the collection's documents were paired with at indexing."""
    prompts = wire.read(spec.parameters, "prompts", {})
    return with_prompt(spec, queries, wire.QUERY_PROMPT if wire.QUERY_PROMPT in prompts else None)


def search_spec(spec: _ModelSpec, url: str) -> _ModelSpec:
    """`spec` (an embed model's) when that model ranks against a store (served with `--index`): searches go to
    it directly, asking for its `hits` output, which spares them the `search` ensemble's extra scheduling (the
    ensemble is for callers that address `search` by name). ModelNotFoundError, saying how, when it does not."""
    if not wire.read(spec.parameters, "store_uri"):
        raise ModelNotFoundError(f"server at {spec.url or url} serves no search index for model "
                                 f"'{wire.read(spec.parameters, 'model_name', spec.name)}': start it with "
                                 "`embedline serve --index STORE` (STORE filled by `embedline index`)", url=spec.url)
    return spec


def served_catalog(spec: _ModelSpec) -> dict[str, dict[str, str]]:
    """name -> {"embed": Triton model, "classify": Triton model or ""} of every artifact the server serves.

    Read from an embed model's `served_models` parameter; a server that predates it serves one artifact.
    """
    catalog = wire.read(spec.parameters, "served_models")
    if catalog:
        return catalog
    return {wire.read(spec.parameters, "model_name", spec.name): {"embed": spec.name, "classify": CLASSIFY_MODEL}}


def resolve_model(default_embed: _ModelSpec, name: str, url: str) -> tuple[str, str]:
    """The (embed, classify) Triton model names of the served model called `name`."""
    catalog = served_catalog(default_embed)
    if name not in catalog:
        raise ModelNotFoundError(f"server at {url} serves no model named {name!r}; it serves {', '.join(catalog)}",
                                 status=None, url=url)
    entry = catalog[name]
    # No classifier head: a name no model has, so classify() reports the missing model clearly.
    return entry["embed"], entry["classify"] or f"{entry['embed']}-classify"


def classify_missing_message(url: str, model: str = CLASSIFY_MODEL) -> str:
    return (f"server at {url} has no '{model}' model: it serves an artifact without a classifier head "
            "(train one with `embedline train-classifier`); embed still works")
