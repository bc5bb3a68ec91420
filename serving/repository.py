"""Build a Triton model repository from an artifact and the templates in `model_repository/`.

Two layouts, same public models (`embed`, and `classify` when the artifact has a head):

    python       one python-backend model per public model, tokenizer + ONNX Runtime inside: runs on the
                 embedded tritonserver from PyPI (CPU, or GPU with onnxruntime-gpu).
    onnxruntime  `embed` = ensemble(tokenize [python] -> encoder [native onnxruntime backend]): for the
                 stock Triton container on GPU (CUDA execution provider, fp16 graph).

Every model directory is self-contained: config.pbtxt, model.py and the files it loads are copied in.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path
from string import Template

from embedline import artifact as art
from embedline import wire
from embedline.variants import OPENVINO_VARIANT, host_mismatch, variant_files
from embedline.serving.settings import RepositorySettings, add_server_options, artifact_variants, settings_from_args

log = logging.getLogger(__name__)

LAYOUTS = ("python", "onnxruntime")
# A served model's name is a directory name in the repository and a path segment in Triton's HTTP API.
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# The default artifact's model names: no other artifact may take them.
RESERVED_NAMES = ("embed", "classify", "classifier_head", "tokenize", "encoder", wire.SEARCH_MODEL)
# The parameters of the classify ensemble and of its classifier_head step (embedline/wire.py).
CLASSIFY_CONTRACT = {**wire.EMBED_PARAMETERS, **wire.HEAD_PARAMETERS}
HEAD_CONTRACT = {"dim": wire.EMBED_PARAMETERS["dim"], **wire.HEAD_PARAMETERS}
# Every python model starts its watch on tritonserver from this file (model_repository/common/).
PARENT_WATCH = "parent_watch.py"


def _templates() -> Path:
    return Path(str(resources.files("embedline.model_repository")))


def _place(source: Path, dest: Path) -> None:
    """Hard-link large files (ONNX graphs) when possible, copy otherwise."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        dest.unlink()
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


def _parameters_block(contract: dict[str, wire.Parameter], params: dict[str, object]) -> str:
    entries = ",\n".join(
        f'  {{ key: "{key}", value: {{ string_value: {json.dumps(value)} }} }}'
        for key, value in wire.encode(contract, params).items()
    )
    return f"parameters [\n{entries}\n]"


def _dynamic_batching_block(settings: RepositorySettings) -> str:
    if not settings.dynamic_batching:
        return "# dynamic batching off: every request is executed on its own"
    # REJECT + allow_timeout_override: a request that carries its caller's deadline as Triton's per-request
    # timeout is dropped from the queue once the caller has given up, instead of running for nobody.
    # max_queue_size 0 leaves the policy out: Triton's unbounded queue (perf_analyzer records no request
    # from a model with a queue policy, measured with the perf_analyzer this project runs).
    queue_policy = (f"\n  default_queue_policy {{ max_queue_size: {settings.max_queue_size}, "
                    "timeout_action: REJECT, allow_timeout_override: true, "
                    f"default_timeout_microseconds: {int(settings.max_queue_wait_s * 1e6)} }}"
                    if settings.max_queue_size else "")
    return f"dynamic_batching {{\n  max_queue_delay_microseconds: {settings.queue_delay_us}{queue_policy}\n}}"


def _render(template: Path, dest: Path, values: dict[str, object]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(Template(template.read_text()).substitute({k: str(v) for k, v in values.items()}))


@dataclass(frozen=True)
class ModelNames:
    """The Triton model names of one served artifact.

    The first artifact of a server keeps the plain names (`embed`, `classify`): the default, and the wire
    contract of model_repository/README.md. Every further artifact is served under its own name.
    """

    name: str  # the artifact's public name (what `model=` and the OpenAI route's `model` take)
    embed: str
    classify: str
    head: str
    tokenize: str
    encoder: str

    @classmethod
    def for_artifact(cls, name: str, default: bool) -> "ModelNames":
        if default:
            return cls(name, "embed", "classify", "classifier_head", "tokenize", "encoder")
        return cls(name, name, f"{name}-classify", f"{name}-classifier-head", f"{name}-tokenize", f"{name}-encoder")

    def template_values(self) -> dict[str, str]:
        return {"embed_model": self.embed, "classify_model": self.classify, "head_model": self.head,
                "tokenize_model": self.tokenize, "encoder_model": self.encoder}


def served_names(artifacts: list[art.Artifact]) -> list[ModelNames]:
    """Model names for each artifact, in order (the first is the default); names must be unique."""
    names = []
    for index, artifact in enumerate(artifacts):
        name = artifact.name
        if index == 0:  # the default keeps the plain names, whatever the artifact is called
            names.append(ModelNames.for_artifact(name, default=True))
            continue
        if not _MODEL_NAME.fullmatch(name):
            raise art.ArtifactError(f"{artifact.path}: artifact name {name!r} cannot name a served model "
                                    "(letters, digits, '.', '_' and '-' only)")
        if any(name == other.name for other in names) or name in RESERVED_NAMES:
            raise art.ArtifactError(f"two served models would be named {name!r}: artifact names must be unique")
        names.append(ModelNames.for_artifact(name, default=False))
    return names


def build_repository(artifacts: art.Artifact | list[art.Artifact], dest: str | os.PathLike,
                     settings: RepositorySettings, variants: list[str] | None = None,
                     index: str | None = None) -> Path:
    """Write the model repository for `artifacts` into `dest` (replaced if it exists) and return its path.

    One artifact or several (one server, several models): the first is served as `embed` / `classify`,
    each further one under its own name (`ModelNames`). `variants` gives each artifact's variant
    (default: settings.variant for all). `index`: a store URI whose collections the `search` model serves,
    searched with the first artifact's model.
    """
    artifacts = [artifacts] if isinstance(artifacts, art.Artifact) else list(artifacts)
    if settings.layout not in LAYOUTS:
        raise art.ArtifactError(f"unknown layout {settings.layout!r}; expected one of {LAYOUTS}")
    variants = variants or [settings.variant] * len(artifacts)
    names = served_names(artifacts)
    dest = Path(dest).expanduser().resolve()
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    catalog = {n.name: {"embed": n.embed, "classify": n.classify if a.has_head() else ""}
               for n, a in zip(names, artifacts)}
    store_uri = search_store_uri(index, settings.layout) if index else ""
    for position, (artifact, model_names, variant) in enumerate(zip(artifacts, names, variants)):
        _add_artifact(artifact, model_names, replace(settings, variant=variant), dest, catalog,
                      store_uri if position == 0 else "")
    if store_uri:
        _add_search(names[0], dest, settings)
    log.info("built %s model repository in %s (%s)", settings.layout, dest, asdict(settings))
    return dest


def _add_artifact(artifact: art.Artifact, names: ModelNames, settings: RepositorySettings, dest: Path,
                  catalog: dict, store_uri: str = "") -> None:
    """The `embed` model (and `classify`, with a head) of one artifact, at version 1; with `store_uri`, its
    embed model also ranks against that store (the `hits` output)."""
    model_files = variant_files(artifact, settings.variant)
    if settings.variant == OPENVINO_VARIANT and settings.layout != "python":
        raise art.ArtifactError("the openvino variant runs in the python layout only (the embedded server)")
    templates = _templates()
    params = embed_parameters(artifact, settings, catalog, store_uri)
    values = _config_values(artifact, names.template_values(), settings, params)
    layout = templates / settings.layout
    text_batch = templates / "common" / "text_batch.py"

    if settings.layout == "python":
        (dest / names.embed).mkdir(parents=True)
        (dest / names.embed / "config.pbtxt").write_text(embed_config(artifact, names.embed, settings, params))
        write_embed_version(artifact, dest / names.embed / "1", model_files)
    else:
        for model, directory in (("tokenize", names.tokenize), ("encoder", names.encoder), ("embed", names.embed)):
            _render(layout / model / "config.pbtxt", dest / directory / "config.pbtxt", values)
            (dest / directory / "1").mkdir(parents=True, exist_ok=True)
        shutil.copy2(layout / "tokenize" / "1" / "model.py", dest / names.tokenize / "1" / "model.py")
        shutil.copy2(text_batch, dest / names.tokenize / "1" / "text_batch.py")
        shutil.copy2(templates / "common" / PARENT_WATCH, dest / names.tokenize / "1" / PARENT_WATCH)
        shutil.copy2(artifact.tokenizer_path, dest / names.tokenize / "1" / "tokenizer.json")
        _place(model_files[0], dest / names.encoder / "1" / "model.onnx")
    if artifact.has_head():
        _add_classify(artifact, names, dest, templates, settings.layout, params, values)


def _config_values(artifact: art.Artifact, model_names: dict[str, str], settings: RepositorySettings,
                   params: dict[str, object]) -> dict[str, object]:
    """What a model template's placeholders take."""
    return {
        **model_names,
        "max_batch_size": settings.max_batch_size,
        "dim": artifact.dim,
        "queue_delay_us": settings.queue_delay_us,
        "dynamic_batching": _dynamic_batching_block(settings),
        "instances": settings.instances,
        "instance_kind": "KIND_GPU" if settings.device == "gpu" else "KIND_CPU",
        "parameters": _parameters_block(wire.EMBED_PARAMETERS, params),
    }


def embed_config(artifact: art.Artifact, embed_model: str, settings: RepositorySettings,
                 params: dict[str, object]) -> str:
    """The python-layout `embed` model's config.pbtxt: what `build-repo` writes, and `publish` for a new version.
    `params`: `embed_parameters(artifact, settings, catalog)`."""
    values = _config_values(artifact, {"embed_model": embed_model}, settings, params)
    # Served with an index, the embed model also answers the `search` ensemble's `hits` (search_step.py).
    values["search_output"] = (f',\n  {{ name: "{wire.HITS_OUTPUT}", data_type: TYPE_STRING, dims: [ 1 ] }}'
                               if params.get("store_uri") else "")
    template = _templates() / "python" / "embed" / "config.pbtxt"
    return Template(template.read_text()).substitute({k: str(v) for k, v in values.items()})


def settings_from_config(config) -> RepositorySettings:
    """The settings a served embed model's config (a parsed ModelConfig) was written with: the inverse of
    `embed_config`, so that `publish` writes a new version's config the way `build-repo` did. The length
    group size is left to the variant."""
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    on_gpu = any(group.kind == group.KIND_GPU for group in config.instance_group)
    queue = dict(dynamic_batching=config.HasField("dynamic_batching"))
    if queue["dynamic_batching"]:
        batching = config.dynamic_batching
        policy = batching.default_queue_policy if batching.HasField("default_queue_policy") else None
        queue.update(queue_delay_us=batching.max_queue_delay_microseconds,
                     max_queue_size=policy.max_queue_size if policy else 0)
        if policy:
            queue["max_queue_wait_s"] = policy.default_timeout_microseconds / 1e6
    return replace(settings_from_parameters(parameters, "gpu" if on_gpu else "cpu"),
                   max_batch_size=config.max_batch_size, instances=sum(g.count for g in config.instance_group),
                   **queue)


def embed_parameters(artifact: art.Artifact, settings: RepositorySettings, catalog: dict,
                     store_uri: str = "") -> dict[str, object]:
    """The embed model's config parameters: the client contract (model_name, dim, ...) and the engine's.
    `build-repo` and `publish` both write these, so a published version is configured as a built one.
    `store_uri`: the store it ranks against (the default model of a server with an index)."""
    return {
        "model_name": artifact.name,
        "dim": artifact.dim,
        "max_seq_length": artifact.max_seq_length,
        "pooling": artifact.pooling,
        "variant": settings.variant,
        "intra_op_threads": settings.intra_op_threads,
        "length_group_size": settings.group_size,
        "length_grouping": settings.length_grouping,
        "group_overhead_tokens": settings.group_overhead_tokens,
        "max_group_tokens": settings.max_group_tokens,
        "engine_cache_shapes": settings.engine_cache_shapes,
        "engine": "openvino" if settings.variant == OPENVINO_VARIANT else "onnxruntime",
        "streams": settings.streams,
        "gpu_provider": settings.gpu_provider,
        "spin_wait": settings.spin_wait,
        "embedding_cache_entries": settings.embedding_cache_entries,
        # Every served artifact's name -> its Triton models, so a client can address one by name.
        "served_models": catalog,
        "matryoshka_dims": list(artifact.matryoshka_dims),
        "prompts": artifact.prompts,
        "default_prompt_name": artifact.default_prompt_name or "",
        "fingerprint": artifact.fingerprint,
        # Set when this CPU's int8 instructions differ from the exporting host's, whose speed check chose
        # the CPU variant: `info().host_warning` and the serve banner say so.
        "host_warning": (host_mismatch(artifact) or "") if settings.device == "cpu" else "",
        "store_uri": store_uri,
    }


def settings_from_parameters(parameters: dict[str, str], device: str) -> RepositorySettings:
    """The engine settings a served embed model's parameters were written with (embed_parameters), so that
    `publish` rewrites them for a new artifact. The length group size is left to the new variant."""
    def value(key: str):
        return wire.decode(wire.EMBED_PARAMETERS[key], parameters[key])

    engine_keys = ("intra_op_threads", "length_grouping", "group_overhead_tokens", "max_group_tokens",
                   "engine_cache_shapes", "streams", "gpu_provider", "spin_wait", "embedding_cache_entries")
    return RepositorySettings(variant=value("variant"), device=device, **{key: value(key) for key in engine_keys})


def write_embed_version(artifact: art.Artifact, version: Path, model_files: list[Path]) -> None:
    """One version directory of a python-layout `embed` model: code, tokenizer and the engine's files."""
    templates = _templates()
    version.mkdir(parents=True)
    for source in sorted((templates / "python" / "embed" / "1").glob("*.py")):  # model.py and engines.py
        shutil.copy2(source, version / source.name)
    for common in ("text_batch.py", "ort_options.py", PARENT_WATCH):
        shutil.copy2(templates / "common" / common, version / common)
    shutil.copy2(artifact.tokenizer_path, version / "tokenizer.json")
    for source in model_files:
        # model.onnx, or model.xml + model.bin (OpenVINO IR)
        _place(source, version / ("model" + "".join(source.suffixes[-1:])))


def _add_classify(artifact: art.Artifact, names: ModelNames, dest: Path, templates: Path, layout: str,
                  params: dict[str, object], values: dict[str, object]) -> None:
    """The public `classify` ensemble (embed's encoder -> classifier head) for an artifact with a head/."""
    head = artifact.head_dir
    labels = art.read_json(head / art.LABELS_FILE)
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
        raise art.ArtifactError(f"{head / art.LABELS_FILE}: expected a JSON list of at least 2 label strings")
    # Neighbours: the k nearest training examples' labels, when the head keeps its training embeddings.
    record = art.read_json(head / art.HEAD_RECORD_FILE) if (head / art.HEAD_RECORD_FILE).is_file() else {}
    neighbours = int(record.get("neighbours", 0) or 0)
    has_train = (head / art.TRAIN_EMBEDDINGS_FILE).is_file() and (head / art.TRAIN_LABELS_FILE).is_file()
    if neighbours and has_train:
        neighbours = min(neighbours, len(art.read_json(head / art.TRAIN_LABELS_FILE)))
    else:
        neighbours = 0
    head_params = {"labels": labels, "neighbours": neighbours}
    head_values = {
        **values,
        "num_labels": len(labels),
        "neighbour_output": (f',\n  {{ name: "{wire.NEIGHBOURS_OUTPUT}", data_type: TYPE_STRING, dims: [ {neighbours} ] }}'
                             if neighbours else ""),
        "neighbour_map": (f'\n      output_map {{ key: "{wire.NEIGHBOURS_OUTPUT}", value: "{wire.NEIGHBOURS_OUTPUT}" }}'
                          if neighbours else ""),
    }
    _render(templates / "python" / "classifier_head" / "config.pbtxt", dest / names.head / "config.pbtxt",
            {**head_values, "parameters": _parameters_block(HEAD_CONTRACT, {"dim": artifact.dim, **head_params})})
    version = dest / names.head / "1"
    version.mkdir(parents=True)
    shutil.copy2(templates / "python" / "classifier_head" / "1" / "model.py", version / "model.py")
    shutil.copy2(templates / "common" / "ort_options.py", version / "ort_options.py")
    shutil.copy2(templates / "common" / PARENT_WATCH, version / PARENT_WATCH)
    # The model directory keeps the head's file names: classifier_head/1/model.py opens them by these names.
    _place(head / art.HEAD_FILE, version / art.HEAD_FILE)
    if neighbours:
        _place(head / art.TRAIN_EMBEDDINGS_FILE, version / art.TRAIN_EMBEDDINGS_FILE)
        shutil.copy2(head / art.TRAIN_LABELS_FILE, version / art.TRAIN_LABELS_FILE)
    _render(templates / layout / "classify" / "config.pbtxt", dest / names.classify / "config.pbtxt",
            {**head_values, "parameters": _parameters_block(CLASSIFY_CONTRACT, {**params, **head_params})})
    (dest / names.classify / "1").mkdir(parents=True)  # an ensemble still needs its version directory


def search_store_uri(index: str, layout: str) -> str:
    """The store URI the embed model ranks against, checked before anything is written: the search extra
    present, the URI valid, a directory made absolute (the server runs from elsewhere)."""
    from embedline.search.store import open_store  # the search extra: only when an index is served

    if layout != "python":
        raise art.ArtifactError("search is served by the python layout (its embed model ranks against the "
                                "store); the onnxruntime layout has no index")
    try:
        import faiss  # noqa: F401  (the embedded store's ANN index, in the server's environment)
    except ImportError:
        raise art.ArtifactError("serving an index needs the search extra: pip install 'embedline[search]'") from None
    store = open_store(index)  # a bad URI fails here, before the server starts
    return str(Path(store.uri).resolve()) if "://" not in index else index


def _add_search(names: ModelNames, dest: Path, settings: RepositorySettings) -> None:
    """The public `search` ensemble: one step, the default artifact's embed model asked for its `hits`."""
    values = {"search_model": wire.SEARCH_MODEL, "embed_model": names.embed, "max_batch_size": settings.max_batch_size}
    _render(_templates() / "python" / "search" / "config.pbtxt", dest / wire.SEARCH_MODEL / "config.pbtxt", values)
    (dest / wire.SEARCH_MODEL / "1").mkdir(parents=True)  # an ensemble still needs its version directory


# ---- `embedline build-repo` -------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--artifact", required=True, action="append",
                        help="artifact directory (exported with `embedline export`); repeat to serve several, "
                             "the first as the default")
    parser.add_argument("--output", required=True, help="where to write the model repository")
    parser.add_argument("--layout", choices=LAYOUTS, default="python",
                        help="python: embedded tritonserver (default); onnxruntime: stock Triton container")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    add_server_options(parser)
    parser.add_argument("--index", default=None, metavar="URI",
                        help="also serve search over this store's collections (a directory or milvus://HOST:PORT)")


def run(args: argparse.Namespace) -> int:
    artifacts = [art.load_artifact(path) for path in args.artifact]
    variants = artifact_variants(args, artifacts, args.device)
    settings = settings_from_args(args, artifacts[0], args.device, args.layout, variants[0])
    path = build_repository(artifacts, args.output, settings, variants, index=args.index)
    print(f"model repository ({settings.layout} layout, variants {', '.join(variants)}): {path}")
    return 0
