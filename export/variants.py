"""Which exported variant to serve, on which device, and making sure an artifact has been exported.

GPU: fp16 (fused kernels in half precision). CPU: the fastest variant, by the CPU speed measured at export,
among those whose measured cosine to torch is within tolerance; fp16 never (CPU has no fp16 kernels
for most of it). Used by the server launcher and `embedline build-repo`; imports no torch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from embedline import artifact as art
from embedline.export.errors import ExportError
from embedline.export.parity import within_tolerance

log = logging.getLogger(__name__)

DEVICES = ("cpu", "gpu")
# GPU order of preference; int8 (MatMulInteger, dynamic quantization) is a CPU graph.
_GPU_PREFERENCE = ("fp16", "fused", "fp32")


def available_device() -> str:
    """"gpu" when onnxruntime has the CUDA execution provider, else "cpu".

    This reflects the installed onnxruntime build (onnxruntime-gpu lists CUDA even when no driver loads);
    it is the same check the model's session makes when it picks its providers.
    """
    import onnxruntime

    return "gpu" if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else "cpu"


def choose_variant_from_parity(record: dict[str, Any], exported: Iterable[str], device: str) -> str:
    """The variant to serve on `device`, given a parity.json record and the variants whose files exist."""
    if device not in DEVICES:
        raise ExportError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    exported = [v for v in art.VARIANTS if v in set(exported)]
    if not exported:
        raise ExportError("the artifact has no exported ONNX variant; run `embedline export --model DIR` first")
    entries = record.get("variants", {})

    def rejected(variant: str) -> bool:
        # Only a measured miss rules a variant out: fp16's parity may need a GPU to be measured at all.
        entry = entries.get(variant)
        return bool(entry and entry.get("measured")) and not within_tolerance(variant, entry)

    if device == "gpu":
        for variant in _GPU_PREFERENCE:
            if variant in exported and not rejected(variant):
                return variant
        return exported[0]

    speeds = {
        v: float(entries[v]["sentences_per_second"])
        for v in exported
        if v != "fp16" and v in entries and within_tolerance(v, entries[v]) and entries[v].get("sentences_per_second")
    }
    if speeds:
        return max(speeds, key=speeds.get)
    # No speed measured (or nothing within tolerance): the first CPU graph, fp32 when it exists.
    fallback = next((v for v in exported if v != "fp16"), None)
    if fallback is None:
        raise ExportError("only the fp16 variant is exported, and it is a GPU graph; export fp32 or int8 for CPU")
    return fallback


def choose_variant(artifact: art.Artifact, device: str) -> str:
    """The variant of `artifact` to serve on `device` ("gpu" or "cpu"), by its export's parity record."""
    variant = choose_variant_from_parity(artifact.parity(), artifact.exported_variants(), device)
    log.info("variant for %s on %s: %s", artifact.name, device, variant)
    return variant


def ensure_exported(
    model_or_artifact: str | os.PathLike | art.Artifact,
    output: str | os.PathLike | None = None,
    *,
    variants: Iterable[str] = art.VARIANTS,
    show_progress: bool = True,
) -> art.Artifact:
    """An exported artifact, exporting only when needed.

    An artifact with a completed export is returned as is; an artifact without one (fresh from training)
    is exported in place. A model directory (sentence-transformers / HF) is imported into `output` first;
    an `output` that already holds an exported artifact of that same model is reused.
    """
    from embedline.export.pipeline import export_artifact

    if isinstance(model_or_artifact, art.Artifact):
        model_or_artifact = model_or_artifact.path
    source, is_artifact = art.resolve_model_source(model_or_artifact)
    if is_artifact:
        artifact = art.load_artifact(source)
    else:
        if output is None:
            raise ExportError(f"{source}: is a model directory, not an artifact; give an output directory")
        output = Path(output).expanduser().resolve()
        if (output / art.METADATA_FILE).is_file():
            artifact = art.load_artifact(output)
            if artifact.metadata.get("base_model") != str(source):
                raise ExportError(f"{output}: already an artifact of {artifact.metadata.get('base_model')}, "
                                  f"not of {source}; choose another output directory")
        else:
            artifact = art.import_model_dir(source, output)
    if artifact.has_onnx() and artifact.metadata.get("export"):
        return artifact
    return export_artifact(artifact, variants, show_progress=show_progress)
