"""The variant policy: which variants exist, what each must reach, and which one serves on which device.

Export records with it (tolerances, the exporting host) and serving chooses with it; it sits below both.

GPU: fp16 (fused kernels in half precision). CPU: the fastest variant, by the CPU speed measured at export,
among those whose measured cosine to torch is within tolerance and, when export measured STS-B Spearman
(`embedline export --sts-file`), whose Spearman is within SPEARMAN_MAX_LOSS of fp32's; fp16 never (CPU
has no fp16 kernels for most of it). Besides the ONNX variants there is "openvino" (an NNCF int8
OpenVINO IR, `embedline export --openvino`), served only where the openvino runtime is installed.
A variant that export rejected (parity outside tolerance: status "rejected" in parity.json) is never chosen.
`host_mismatch` warns when the serving CPU's int8 instructions differ from the exporting host's, whose
speed check made the CPU choice. Imports no torch and no ONNX tooling: the server launcher stays small.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedline import artifact as art

log = logging.getLogger(__name__)

DEVICES = ("cpu", "gpu")
# GPU order of preference; int8 (MatMulInteger, dynamic quantization) is a CPU graph.
_GPU_PREFERENCE = ("fp16", "fused", "fp32")
# The OpenVINO int8 IR (CPU only): its files are `Artifact.openvino_files()`.
OPENVINO_VARIANT = "openvino"
# Every variant a server can be built with.
SERVABLE_VARIANTS = (*art.VARIANTS, OPENVINO_VARIANT)
# A faster variant is served on CPU only if it loses at most this much STS-B dev Spearman (x100) to fp32.
SPEARMAN_MAX_LOSS = 0.5
# The CPU instructions int8 speed depends on (flags of /proc/cpuinfo): VNNI does int8 dot products in one
# instruction (avx512_vnni, avx_vnni), AMX in tiles (amx_int8); AVX2 alone needs several and saturates.
INT8_INSTRUCTIONS = ("avx2", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16")
# A variant whose measured parity missed its tolerance: recorded, never served (its files are removed).
REJECTED = "rejected"


@dataclass(frozen=True)
class Tolerance:
    """The least cosine to torch a variant must reach, for its worst sentence and on average."""

    min_cosine: float
    mean_cosine: float

    def accepts(self, min_cosine: float, mean_cosine: float) -> bool:
        return min_cosine >= self.min_cosine and mean_cosine >= self.mean_cosine


# fp32/fused are the same arithmetic reordered. int8 is judged on the mean: on 1-3 word inputs ("OK",
# "Wow.") dynamic int8 reaches only ~0.96 on all-MiniLM-L6-v2 (few tokens, nothing averages the
# activation-quantization noise out), so its min is a floor that catches a broken graph, not noise.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(min_cosine=0.9999, mean_cosine=0.9999),
    "fused": Tolerance(min_cosine=0.9999, mean_cosine=0.9999),
    "fp16": Tolerance(min_cosine=0.999, mean_cosine=0.9995),
    "int8": Tolerance(min_cosine=0.90, mean_cosine=0.98),
    # NNCF static int8 fixes activation ranges at calibration, so an input outside them can fail badly
    # (0.745 on "Wow." when calibrated on sentences only): held to a higher bar than dynamic int8, which
    # the length-spread calibration clears (0.98-0.99 min, 0.997 mean; export/openvino_int8.py). Its STS-B
    # loss is gated separately (SPEARMAN_MAX_LOSS).
    "openvino": Tolerance(min_cosine=0.95, mean_cosine=0.99),
}


def within_tolerance(variant: str, entry: dict[str, Any]) -> bool:
    """True when a parity.json variant entry was measured and meets the variant's tolerance."""
    if not entry.get("measured") or variant not in TOLERANCES:
        return False
    return TOLERANCES[variant].accepts(float(entry["min_cosine"]), float(entry["mean_cosine"]))


def openvino_runtime_available() -> bool:
    """True when the openvino package (the `openvino` extra) is importable here."""
    return importlib.util.find_spec("openvino") is not None


def openvino_export_available() -> bool:
    """True when the OpenVINO variant can be exported here: openvino and nncf both importable."""
    return openvino_runtime_available() and importlib.util.find_spec("nncf") is not None


def cpu_int8_instructions(cpuinfo: str | None = None) -> list[str] | None:
    """The INT8_INSTRUCTIONS this CPU has, in that order; None where /proc/cpuinfo cannot be read.

    cpuinfo: the text of /proc/cpuinfo (default: read it).
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return [f for f in INT8_INSTRUCTIONS if f in flags]


def host_record() -> dict[str, Any]:
    """The exporting host, for the export record: CPU model, logical CPUs, int8 instructions."""
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cpus": os.cpu_count(), "int8_instructions": cpu_int8_instructions()}


def host_mismatch(artifact: art.Artifact, current: list[str] | None = None) -> str | None:
    """A one-line warning when this CPU's int8 instructions differ from those of the host that exported
    `artifact` (whose speed check chose the CPU variant), else None (also None when either is unknown).

    current: this CPU's instructions (default: cpu_int8_instructions()).
    """
    export = artifact.metadata.get("export") or {}
    exported_on = (export.get("host") or {}).get("int8_instructions")
    here = cpu_int8_instructions() if current is None else current
    if exported_on is None or here is None or set(exported_on) == set(here):
        return None

    def named(flags: list[str]) -> str:
        return " ".join(flags) or "none of " + "/".join(INT8_INSTRUCTIONS)

    return (f"{artifact.name} was exported on a CPU with {named(exported_on)}; this CPU has {named(here)}: "
            f"the CPU variant ({export.get('default_cpu_variant')}) was chosen by speed there and may not be the "
            f"fastest here; re-export on this host to re-measure (embedline export --model {artifact.path}"
            f"{' --openvino' if OPENVINO_VARIANT in export.get('variants', []) else ''}) or choose with --variant")


def is_rejected(entry: dict[str, Any] | None) -> bool:
    """True for a parity.json entry that export rejected (status "rejected": measured outside its tolerance)."""
    return bool(entry) and entry.get("status") == REJECTED


def variant_files(artifact: art.Artifact, variant: str) -> list[Path]:
    """The model files a server needs for `variant` (an ArtifactError when it is not exported)."""
    if variant == OPENVINO_VARIANT:
        files = list(artifact.openvino_files())
        how = f"run `embedline export --model {artifact.path} --openvino` (needs pip install 'embedline[openvino]')"
    else:
        files = [artifact.onnx_path(variant)]
        how = f"run `embedline export --model {artifact.path}`"
    missing = [f for f in files if not f.is_file()]
    if missing:
        exported = ", ".join(servable_variants(artifact)) or "none"
        entry = (artifact.parity().get("variants") or {}).get(variant)
        if is_rejected(entry):
            raise art.ArtifactError(f"{artifact.path}: variant {variant!r} was rejected at export "
                                    f"({entry.get('reason')}); exported: {exported}")
        raise art.ArtifactError(
            f"{artifact.path}: variant {variant!r} is not exported ({missing[0]} missing; exported: "
            f"{exported}); {how}"
        )
    return files


def servable_variants(artifact: art.Artifact) -> list[str]:
    """Exported variants in SERVABLE_VARIANTS order; openvino when its IR files exist."""
    variants = artifact.exported_variants()
    if all(f.is_file() for f in artifact.openvino_files()):
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
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    exported = [v for v in SERVABLE_VARIANTS if v in set(exported)]
    if not exported:
        raise art.ArtifactError("the artifact has no exported ONNX variant; run `embedline export --model DIR` first")
    entries = record.get("variants", {})

    def rejected(variant: str) -> bool:
        # Rejected at export, or a measured miss: fp16's parity may need a GPU to be measured at all.
        entry = entries.get(variant)
        return is_rejected(entry) or (bool(entry and entry.get("measured")) and not within_tolerance(variant, entry))

    exported = [v for v in exported if not rejected(v)]
    if not exported:
        raise art.ArtifactError("every exported variant was rejected by its parity check; re-export the artifact")
    if device == "gpu":
        for variant in _GPU_PREFERENCE:
            if variant in exported:
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
        raise art.ArtifactError("only the fp16 variant is exported, and it is a GPU graph; export fp32 or int8 for CPU")
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
