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
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from string import Template

from embedline import artifact as art

log = logging.getLogger(__name__)

LAYOUTS = ("python", "onnxruntime")


@dataclass(frozen=True)
class RepositorySettings:
    """How the server runs the models (dynamic batching, instances, threads)."""

    variant: str = "fp32"
    layout: str = "python"
    device: str = "cpu"  # cpu | gpu: where model instances run
    max_batch_size: int = 64  # most texts in one request, and in one dynamic batch
    queue_delay_us: int = 1000  # how long the dynamic batcher waits to fill a batch
    instances: int = 1
    intra_op_threads: int = 0  # ONNX Runtime threads per instance; 0 = one per core
    length_group_size: int = 32  # texts per padded group inside a dynamic batch


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


def _render(template: Path, dest: Path, values: dict[str, object]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(Template(template.read_text()).substitute({k: str(v) for k, v in values.items()}))


def build_repository(artifact: art.Artifact, dest: str | os.PathLike, settings: RepositorySettings) -> Path:
    """Write the model repository for `artifact` into `dest` (replaced if it exists) and return its path."""
    if settings.layout not in LAYOUTS:
        raise art.ArtifactError(f"unknown layout {settings.layout!r}; expected one of {LAYOUTS}")
    onnx_file = artifact.onnx_path(settings.variant)
    if not onnx_file.is_file():
        exported = ", ".join(artifact.exported_variants()) or "none"
        raise art.ArtifactError(
            f"{artifact.path}: variant {settings.variant!r} is not exported ({onnx_file} missing; exported: "
            f"{exported}); run `embedline export --model {artifact.path}`"
        )
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
    }
    values = {
        "max_batch_size": settings.max_batch_size,
        "dim": artifact.dim,
        "queue_delay_us": settings.queue_delay_us,
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
        shutil.copy2(layout / "embed" / "1" / "model.py", version / "model.py")
        shutil.copy2(text_batch, version / "text_batch.py")
        shutil.copy2(artifact.tokenizer_path, version / "tokenizer.json")
        _place(onnx_file, version / "model.onnx")
    else:
        for model in ("tokenize", "encoder", "embed"):
            _render(layout / model / "config.pbtxt", dest / model / "config.pbtxt", values)
            (dest / model / "1").mkdir(parents=True, exist_ok=True)
        shutil.copy2(layout / "tokenize" / "1" / "model.py", dest / "tokenize" / "1" / "model.py")
        shutil.copy2(text_batch, dest / "tokenize" / "1" / "text_batch.py")
        shutil.copy2(artifact.tokenizer_path, dest / "tokenize" / "1" / "tokenizer.json")
        _place(onnx_file, dest / "encoder" / "1" / "model.onnx")
    log.info("built %s model repository in %s (%s)", settings.layout, dest, asdict(settings))
    return dest


# ---- `embedline build-repo` -------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--artifact", required=True, help="artifact directory (exported with `embedline export`)")
    parser.add_argument("--output", required=True, help="where to write the model repository")
    parser.add_argument("--layout", choices=LAYOUTS, default="python",
                        help="python: embedded tritonserver (default); onnxruntime: stock Triton container")
    parser.add_argument("--variant", choices=art.VARIANTS, default=None,
                        help="ONNX variant (default: fp16 for --device gpu, else the artifact's best CPU variant)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--max-batch-size", type=int, default=RepositorySettings.max_batch_size)
    parser.add_argument("--queue-delay-us", type=int, default=RepositorySettings.queue_delay_us)
    parser.add_argument("--instances", type=int, default=RepositorySettings.instances)
    parser.add_argument("--threads", type=int, default=RepositorySettings.intra_op_threads,
                        help="ONNX Runtime intra-op threads per instance (0: one per core)")


def settings_from_args(args: argparse.Namespace, artifact: art.Artifact, device: str) -> RepositorySettings:
    """RepositorySettings from the shared CLI options of build-repo and serve."""
    from embedline.export.variants import choose_variant

    return RepositorySettings(
        variant=args.variant or choose_variant(artifact, device),
        layout=getattr(args, "layout", "python"),
        device=device,
        max_batch_size=args.max_batch_size,
        queue_delay_us=args.queue_delay_us,
        instances=args.instances,
        intra_op_threads=args.threads,
    )


def run(args: argparse.Namespace) -> int:
    artifact = art.load_artifact(args.artifact)
    settings = settings_from_args(args, artifact, args.device)
    path = build_repository(artifact, args.output, settings)
    print(f"model repository ({settings.layout} layout, variant {settings.variant}): {path}")
    return 0
