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
import shutil
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from string import Template

from embedline import artifact as art
from embedline.export.variants import OPENVINO_VARIANT, variant_files
from embedline.serving.settings import RepositorySettings, add_server_options, settings_from_args

log = logging.getLogger(__name__)

LAYOUTS = ("python", "onnxruntime")


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


def _parameters_block(params: dict[str, str]) -> str:
    entries = ",\n".join(
        f'  {{ key: "{key}", value: {{ string_value: {json.dumps(str(value))} }} }}' for key, value in params.items()
    )
    return f"parameters [\n{entries}\n]"


def _dynamic_batching_block(settings: RepositorySettings) -> str:
    if not settings.dynamic_batching:
        return "# dynamic batching off: every request is executed on its own"
    # REJECT + allow_timeout_override: a request that carries its caller's deadline as Triton's per-request
    # timeout is dropped from the queue once the caller has given up, instead of running for nobody.
    queue_policy = (f"\n  default_queue_policy {{ max_queue_size: {settings.max_queue_size}, "
                    "timeout_action: REJECT, allow_timeout_override: true, "
                    f"default_timeout_microseconds: {int(settings.max_queue_wait_s * 1e6)} }}")
    return f"dynamic_batching {{\n  max_queue_delay_microseconds: {settings.queue_delay_us}{queue_policy}\n}}"


def _render(template: Path, dest: Path, values: dict[str, object]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(Template(template.read_text()).substitute({k: str(v) for k, v in values.items()}))


def build_repository(artifact: art.Artifact, dest: str | os.PathLike, settings: RepositorySettings) -> Path:
    """Write the model repository for `artifact` into `dest` (replaced if it exists) and return its path."""
    if settings.layout not in LAYOUTS:
        raise art.ArtifactError(f"unknown layout {settings.layout!r}; expected one of {LAYOUTS}")
    model_files = variant_files(artifact, settings.variant)
    if settings.variant == OPENVINO_VARIANT and settings.layout != "python":
        raise art.ArtifactError("the openvino variant runs in the python layout only (the embedded server)")
    dest = Path(dest).expanduser().resolve()
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)

    templates = _templates()
    params = {
        "model_name": artifact.name,
        "dim": artifact.dim,
        "max_seq_length": artifact.max_seq_length,
        "pooling": artifact.pooling,
        "variant": settings.variant,
        "intra_op_threads": settings.intra_op_threads,
        "length_group_size": settings.length_group_size,
        "length_grouping": str(settings.length_grouping).lower(),
        "group_overhead_tokens": settings.group_overhead_tokens,
        "engine": "openvino" if settings.variant == OPENVINO_VARIANT else "onnxruntime",
        "streams": settings.streams,
        "gpu_provider": settings.gpu_provider,
        "spin_wait": str(settings.spin_wait).lower(),
    }
    values = {
        "max_batch_size": settings.max_batch_size,
        "dim": artifact.dim,
        "queue_delay_us": settings.queue_delay_us,
        "dynamic_batching": _dynamic_batching_block(settings),
        "instances": settings.instances,
        "instance_kind": "KIND_GPU" if settings.device == "gpu" else "KIND_CPU",
        "parameters": _parameters_block(params),
    }
    layout = templates / settings.layout
    text_batch = templates / "common" / "text_batch.py"

    if settings.layout == "python":
        _render(layout / "embed" / "config.pbtxt", dest / "embed" / "config.pbtxt", values)
        version = dest / "embed" / "1"
        version.mkdir(parents=True)
        for source in sorted((layout / "embed" / "1").glob("*.py")):  # model.py and engines.py
            shutil.copy2(source, version / source.name)
        shutil.copy2(text_batch, version / "text_batch.py")
        shutil.copy2(artifact.tokenizer_path, version / "tokenizer.json")
        for source in model_files:
            # model.onnx, or model.xml + model.bin (OpenVINO IR)
            _place(source, version / ("model" + "".join(source.suffixes[-1:])))
    else:
        for model in ("tokenize", "encoder", "embed"):
            _render(layout / model / "config.pbtxt", dest / model / "config.pbtxt", values)
            (dest / model / "1").mkdir(parents=True, exist_ok=True)
        shutil.copy2(layout / "tokenize" / "1" / "model.py", dest / "tokenize" / "1" / "model.py")
        shutil.copy2(text_batch, dest / "tokenize" / "1" / "text_batch.py")
        shutil.copy2(artifact.tokenizer_path, dest / "tokenize" / "1" / "tokenizer.json")
        _place(model_files[0], dest / "encoder" / "1" / "model.onnx")
    if artifact.has_head():
        _add_classify(artifact, dest, templates, settings.layout, params, values)
    log.info("built %s model repository in %s (%s)", settings.layout, dest, asdict(settings))
    return dest


def _add_classify(artifact: art.Artifact, dest: Path, templates: Path, layout: str,
                  params: dict[str, object], values: dict[str, object]) -> None:
    """The public `classify` ensemble (embed's encoder -> classifier_head) for an artifact with a head/."""
    head = artifact.head_dir
    labels = _read_head_json(head / "labels.json")
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
        raise art.ArtifactError(f"{head / 'labels.json'}: expected a JSON list of at least 2 label strings")
    # Neighbours: the k nearest training examples' labels, when the head keeps its training embeddings.
    record = _read_head_json(head / "head.json") if (head / "head.json").is_file() else {}
    neighbours = int(record.get("neighbours", 0) or 0)
    has_train = (head / "train_embeddings.npy").is_file() and (head / "train_labels.json").is_file()
    if neighbours and has_train:
        neighbours = min(neighbours, len(_read_head_json(head / "train_labels.json")))
    else:
        neighbours = 0
    head_params = {"labels": json.dumps(labels), "neighbours": neighbours}
    head_values = {
        **values,
        "num_labels": len(labels),
        "neighbour_output": (f',\n  {{ name: "neighbour_labels", data_type: TYPE_STRING, dims: [ {neighbours} ] }}'
                             if neighbours else ""),
        "neighbour_map": ('\n      output_map { key: "neighbour_labels", value: "neighbour_labels" }'
                          if neighbours else ""),
    }
    _render(templates / "python" / "classifier_head" / "config.pbtxt", dest / "classifier_head" / "config.pbtxt",
            {**head_values, "parameters": _parameters_block({"dim": artifact.dim, **head_params})})
    version = dest / "classifier_head" / "1"
    version.mkdir(parents=True)
    shutil.copy2(templates / "python" / "classifier_head" / "1" / "model.py", version / "model.py")
    _place(head / "head.onnx", version / "head.onnx")
    if neighbours:
        _place(head / "train_embeddings.npy", version / "train_embeddings.npy")
        shutil.copy2(head / "train_labels.json", version / "train_labels.json")
    _render(templates / layout / "classify" / "config.pbtxt", dest / "classify" / "config.pbtxt",
            {**head_values, "parameters": _parameters_block({**params, **head_params})})
    (dest / "classify" / "1").mkdir(parents=True)  # an ensemble still needs its version directory


def _read_head_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise art.ArtifactError(f"{path}: cannot read JSON ({exc})") from exc


# ---- `embedline build-repo` -------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--artifact", required=True, help="artifact directory (exported with `embedline export`)")
    parser.add_argument("--output", required=True, help="where to write the model repository")
    parser.add_argument("--layout", choices=LAYOUTS, default="python",
                        help="python: embedded tritonserver (default); onnxruntime: stock Triton container")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    add_server_options(parser)


def run(args: argparse.Namespace) -> int:
    artifact = art.load_artifact(args.artifact)
    settings = settings_from_args(args, artifact, args.device, args.layout)
    path = build_repository(artifact, args.output, settings)
    print(f"model repository ({settings.layout} layout, variant {settings.variant}): {path}")
    return 0
