"""`ensure_exported`: an artifact with its variants exported, exporting only when needed.

The server launcher calls it on every start; an artifact already exported costs it no import of the export
pipeline (torch, ONNX tooling), which the launcher, resident all the while, then never loads.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from embedline import artifact as art
from embedline.export.errors import ExportError
from embedline.variants import openvino_export_available


def ensure_exported(
    model_or_artifact: str | os.PathLike | art.Artifact,
    output: str | os.PathLike | None = None,
    *,
    variants: Iterable[str] = art.VARIANTS,
    show_progress: bool = True,
    openvino: bool | None = None,
) -> art.Artifact:
    """An exported artifact, exporting only when needed.

    An artifact with a completed export is returned as is; an artifact without one (fresh from training)
    is exported in place. A model directory (sentence-transformers / HF) is imported into `output` first;
    an `output` that already holds an exported artifact of that same model is reused.
    openvino: also export the OpenVINO int8 variant; None (default): whenever openvino and nncf are
    importable (the export's speed check then decides whether it serves on CPU; a variant that misses its
    parity tolerance is rejected and the export goes on without it).
    """
    if isinstance(model_or_artifact, art.Artifact):
        model_or_artifact = model_or_artifact.path
    source, is_artifact = art.resolve_model_source(model_or_artifact)
    if is_artifact:
        artifact = art.load_artifact(source)
    else:
        if output is None:
            raise ExportError(f"{source}: is a model directory, not an artifact; give an output directory")
        output = Path(output).expanduser().resolve()
        if art.is_artifact(output):
            artifact = art.load_artifact(output)
            if artifact.metadata.get("base_model") != str(source):
                raise ExportError(f"{output}: already an artifact of {artifact.metadata.get('base_model')}, "
                                  f"not of {source}; choose another output directory")
        else:
            artifact = art.import_model_dir(source, output)
    if artifact.has_onnx() and artifact.metadata.get("export"):
        return artifact
    if openvino is None:
        openvino = openvino_export_available()
    # Imported only when an export is due: it brings torch, which `serve` of an exported artifact (the
    # supervisor process, resident all the while) then never loads (docs/architecture.md, "Memory").
    from embedline.export.pipeline import export_artifact

    return export_artifact(artifact, variants, show_progress=show_progress, openvino=openvino)
