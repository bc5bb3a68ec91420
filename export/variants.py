"""Which exported variant to serve, on which device, and making sure an artifact has been exported.

GPU: fp16 (fused kernels in half precision). CPU: the fastest variant, by the CPU speed measured at export,
among those whose measured cosine to torch is within tolerance and, when export measured STS-B Spearman
(`embedline export --sts-file`), whose Spearman is within SPEARMAN_MAX_LOSS of fp32's; fp16 never (CPU
has no fp16 kernels for most of it). Besides the ONNX variants there is "openvino" (an NNCF int8
OpenVINO IR, `embedline export --openvino`), served only where the openvino runtime is installed.
Used by the server launcher and `embedline build-repo`; imports no torch.
"""

from __future__ import annotations

import importlib.util
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
# The OpenVINO int8 IR (CPU only): <artifact>/onnx/openvino/model.xml + model.bin.
OPENVINO_VARIANT = "openvino"
OPENVINO_DIR = "openvino"
# Every variant a server can be built with.
SERVABLE_VARIANTS = (*art.VARIANTS, OPENVINO_VARIANT)
# A faster variant is served on CPU only if it loses at most this much STS-B dev Spearman (x100) to fp32.
SPEARMAN_MAX_LOSS = 0.5


def openvino_files(artifact: art.Artifact) -> tuple[Path, Path]:
    """(model.xml, model.bin) of the artifact's OpenVINO variant (they may not exist)."""
    directory = artifact.onnx_dir / OPENVINO_DIR
    return directory / "model.xml", directory / "model.bin"


def openvino_runtime_available() -> bool:
    """True when the openvino package (the `openvino` extra) is importable here."""
    return importlib.util.find_spec("openvino") is not None


def variant_files(artifact: art.Artifact, variant: str) -> list[Path]:
    """The model files a server needs for `variant` (an ArtifactError when it is not exported)."""
    if variant == OPENVINO_VARIANT:
        files = list(openvino_files(artifact))
        how = f"run `embedline export --model {artifact.path} --openvino` (needs pip install 'embedline[openvino]')"
    else:
        files = [artifact.onnx_path(variant)]
        how = f"run `embedline export --model {artifact.path}`"
    missing = [f for f in files if not f.is_file()]
    if missing:
        exported = ", ".join(servable_variants(artifact)) or "none"
        raise art.ArtifactError(
            f"{artifact.path}: variant {variant!r} is not exported ({missing[0]} missing; exported: "
            f"{exported}); {how}"
        )
    return files


def servable_variants(artifact: art.Artifact) -> list[str]:
    """Exported variants in SERVABLE_VARIANTS order; openvino when its IR files exist."""
    variants = artifact.exported_variants()
    if all(f.is_file() for f in openvino_files(artifact)):
        variants.append(OPENVINO_VARIANT)
    return variants


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
    exported = [v for v in SERVABLE_VARIANTS if v in set(exported)]
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

    # Quality gate from STS-B (when export measured it): a variant may not lose more than
    # SPEARMAN_MAX_LOSS Spearman points to fp32, whatever its cosine to torch.
    fp32_spearman = entries.get("fp32", {}).get("sts_spearman")

    def keeps_quality(variant: str) -> bool:
        spearman = entries[variant].get("sts_spearman")
        if fp32_spearman is None or spearman is None:
            return True
        return float(spearman) >= float(fp32_spearman) - SPEARMAN_MAX_LOSS

    speeds = {
        v: float(entries[v]["sentences_per_second"])
        for v in exported
        if v != "fp16" and v in entries and within_tolerance(v, entries[v]) and entries[v].get("sentences_per_second")
        and keeps_quality(v)
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
    exported = servable_variants(artifact)
    if OPENVINO_VARIANT in exported and not openvino_runtime_available():
        log.info("%s has an OpenVINO variant but openvino is not installed here; not considering it",
                 artifact.name)
        exported.remove(OPENVINO_VARIANT)
    variant = choose_variant_from_parity(artifact.parity(), exported, device)
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
