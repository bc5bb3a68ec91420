"""Export an artifact: write its ONNX variants into <artifact>/onnx/, check them against torch, record it all.

    model.onnx (fp32) -> model_fused.onnx -> model_fp16.onnx (GPU) / model_int8.onnx (CPU)
    model.onnx (fp32) -> openvino/model.xml + .bin (CPU, NNCF int8; only with openvino=True)
    onnx/parity.json      per variant: min/mean cosine to torch, CPU sentences/s, tolerance verdict,
                          STS Spearman when an STS file is given (export/sts.py)
    embedline.json        "export": variants, fused operator counts, cosines, speeds, Spearman, defaults

Only fp32 missing its tolerance (export/parity.py) is an ExportError: parity.json is still written so the
numbers can be inspected, but embedline.json gets no export record (ensure_exported retries). Any other
variant that misses its tolerance is *rejected*: its parity.json entry gets status "rejected" and a reason
beside its numbers, embedline.json lists it under "rejected", its files are removed (so nothing can serve
it), and the export goes on. The export record also names the exporting host's CPU and its int8
instructions (embedline.variants.host_record), because the CPU default is chosen by speed measured there.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

from embedline import artifact as art
from embedline.export import graphs, parity
from embedline.export.errors import ExportError
from embedline.export.onnx_export import OPSET, export_fp32
from embedline.export.sts import read_sts_file, resolve_sts_file
from embedline.tokenization import load_tokenizer
from embedline.variants import OPENVINO_VARIANT, REJECTED, choose_variant_from_parity, host_record

log = logging.getLogger(__name__)

# The fused graph is the parent of fp16 and int8; fp32 is the contract every artifact export has.
_DERIVED_FROM_FUSED = ("fp16", "int8")


def resolve_variants(variants: Iterable[str]) -> list[str]:
    """Requested variants plus what they are derived from, in VARIANTS order; unknown names are an error."""
    requested = set(variants)
    unknown = sorted(requested - set(art.VARIANTS))
    if unknown:
        raise ExportError(f"unknown variant(s) {', '.join(unknown)}; expected some of {', '.join(art.VARIANTS)}")
    needed = requested | {"fp32"}
    if needed & set(_DERIVED_FROM_FUSED):
        needed.add("fused")
    added = sorted(needed - requested)
    if added:
        log.info("also exporting %s (the other variants are derived from it)", " and ".join(added))
    return [v for v in art.VARIANTS if v in needed]


def _rejection_reason(entry: dict[str, Any]) -> str:
    tol = entry["tolerance"]
    return (f"cosine to torch min {entry['min_cosine']:.5f} / mean {entry['mean_cosine']:.5f} "
            f"(needs >= {tol['min_cosine']} / {tol['mean_cosine']}; worst on {entry['worst_text']!r})")


def _apply_gates(record: dict[str, Any], artifact: art.Artifact) -> list[str]:
    """Mark each measured variant accepted or rejected in `record`; remove a rejected variant's files.

    fp32 is never rejected here (it failing fails the export: _check_fp32). Returns the rejected variants.
    """
    rejected = []
    for variant, entry in record["variants"].items():
        if not entry.get("measured"):
            entry["status"] = "not measured"
        elif entry["within_tolerance"] or variant == "fp32":
            entry["status"] = "accepted" if entry["within_tolerance"] else "failed"
        else:
            entry["status"] = REJECTED
            entry["reason"] = _rejection_reason(entry)
            if variant == OPENVINO_VARIANT:
                shutil.rmtree(artifact.openvino_dir, ignore_errors=True)
            else:
                artifact.onnx_path(variant).unlink(missing_ok=True)
            log.warning("variant %s rejected, not served, files removed: %s", variant, entry["reason"])
            rejected.append(variant)
    return rejected


def _check_fp32(record: dict[str, Any], parity_path: os.PathLike) -> None:
    """fp32 is the contract every export has: it missing its tolerance fails the whole export."""
    entry = record["variants"].get("fp32")
    if entry and entry.get("measured") and not entry["within_tolerance"]:
        raise ExportError(f"parity check failed: fp32 {_rejection_reason(entry)}. Details: {parity_path}")


def _summary(record: dict[str, Any], fused_operators: dict[str, int], seconds: float) -> dict[str, Any]:
    """The embedline.json "export" entry: what was exported and how well it agrees, in brief."""
    import onnx

    variants = [v for v, e in record["variants"].items() if e.get("status") != REJECTED]
    return {
        "variants": variants,
        "rejected": {
            v: {k: e.get(k) for k in ("reason", "min_cosine", "mean_cosine", "worst_text", "tolerance",
                                      "sentences_per_second", "sts_spearman") if k in e}
            for v, e in record["variants"].items() if e.get("status") == REJECTED
        },
        "fused_operators": fused_operators,
        "parity": {
            v: {k: e.get(k) for k in ("status", "measured", "min_cosine", "mean_cosine", "sentences_per_second",
                                      "provider", "sts_spearman", "reason") if k in e}
            for v, e in record["variants"].items()
        },
        "sts": record.get("sts"),
        "host": record["speed"].get("host") or host_record(),
        "torch_sentences_per_second": record["speed"]["torch_sentences_per_second"],
        "default_cpu_variant": choose_variant_from_parity(record, variants, "cpu"),
        "default_gpu_variant": choose_variant_from_parity(record, variants, "gpu"),
        "opset": OPSET,
        "onnxruntime": record["onnxruntime"],
        "onnx": onnx.__version__,
        "threads": record["speed"]["threads"],
        "seconds": round(seconds, 1),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# How many of the user's texts the calibration set is sampled from (a file's first lines are often one genre).
_CALIBRATION_POOL = 10_000


def _user_calibration_texts(calibration_file: str | os.PathLike | None, sts_pairs: Any) -> tuple[list[str], str]:
    """(texts, source) the user gave for calibration: the calibration file, else the STS file's sentences."""
    import gzip
    from pathlib import Path

    if calibration_file:
        path = Path(calibration_file)
        opener = gzip.open if path.suffix == ".gz" else open
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                texts = [line.strip() for _, line in zip(range(_CALIBRATION_POOL), f) if line.strip()]
        except OSError as exc:
            raise ExportError(f"{path}: cannot read the calibration file ({exc})") from exc
        return texts, str(path)
    if sts_pairs is not None:
        # Calibration only sets activation ranges, it does not fit to the gold scores.
        return sts_pairs.unique_sentences()[:_CALIBRATION_POOL], sts_pairs.source
    return [], "built-in"


def calibration_batches(artifact: art.Artifact, calibration_file: str | os.PathLike | None = None,
                        sts_pairs: Any = None) -> tuple[list[dict], dict[str, Any]]:
    """(batches, description) for the OpenVINO int8 calibration: the user's texts mixed with short and
    long ones (openvino_int8.calibration_texts), one single-text batch each (no padding in the statistics)."""
    from embedline.export.openvino_int8 import calibration_texts  # openvino + nncf: an optional extra

    tokenizer = load_tokenizer(artifact.tokenizer_path, artifact.max_seq_length)
    user_texts, source = _user_calibration_texts(calibration_file, sts_pairs)
    texts, description = calibration_texts(user_texts, tokenizer, artifact.max_seq_length)
    if description["source"] == "given":
        description["source"] = source
    return parity.make_batches(tokenizer, texts, 1), description


def _clear_previous_export(artifact: art.Artifact, to_export: list[str]) -> art.Artifact:
    """What a previous export left would describe other files: drop its variants, parity and record first,
    so an export that fails half-way never looks complete to ensure_exported."""
    artifact.onnx_dir.mkdir(parents=True, exist_ok=True)
    for variant in art.VARIANTS:
        if variant not in to_export:
            artifact.onnx_path(variant).unlink(missing_ok=True)
    shutil.rmtree(artifact.openvino_dir, ignore_errors=True)
    (artifact.onnx_dir / art.PARITY_FILE).unlink(missing_ok=True)
    return art.update_metadata(artifact.path, {"export": None})


def _write_variant(artifact: art.Artifact, variant: str, calibration_file: str | os.PathLike | None,
                   sts_pairs) -> dict[str, Any]:
    """Write one variant's files (each derived from fp32 or fused, written before it); -> what the record
    keeps of the step: the fused operator counts, or the OpenVINO calibration set."""
    if variant == "fp32":
        export_fp32(artifact)
    elif variant == "fused":
        num_heads, hidden_size = graphs.attention_shape(artifact.path / "config.json")
        return {"fused_operators": graphs.fuse(artifact.onnx_path("fp32"), artifact.onnx_path("fused"),
                                               num_heads, hidden_size)}
    elif variant == "fp16":
        graphs.to_fp16(artifact.onnx_path("fused"), artifact.onnx_path("fp16"))
    elif variant == OPENVINO_VARIANT:
        from embedline.export import openvino_int8  # openvino + nncf: an optional extra

        batches, calibration = calibration_batches(artifact, calibration_file, sts_pairs)
        openvino_int8.quantize(artifact.onnx_path("fp32"), artifact.openvino_files()[0], batches)
        return {"calibration": calibration}
    else:
        graphs.quantize_int8(artifact.onnx_path("fused"), artifact.onnx_path("int8"))
    return {}


def export_artifact(
    artifact: art.Artifact | str | os.PathLike,
    variants: Iterable[str] = art.VARIANTS,
    show_progress: bool = True,
    *,
    threads: int = 2,
    speed_seconds: float = 1.0,
    sts_file: str | os.PathLike | None = None,
    openvino: bool = False,
    calibration_file: str | os.PathLike | None = None,
) -> art.Artifact:
    """Export `variants` of an artifact into its onnx/ directory and return the reloaded artifact.

    threads: ORT intra-op and torch threads for the parity and speed measurement.
    speed_seconds: time spent measuring each variant's CPU speed (0 skips it; choose_variant then
    falls back to fp32 on CPU).
    sts_file: an STS TSV (export/sts.py; default $EMBEDLINE_STS_FILE, else none): each variant's
    Spearman is recorded, and a CPU variant losing more than 0.5 to fp32 is never the default.
    openvino: also write the OpenVINO NNCF int8 variant (needs the `openvino` extra).
    calibration_file: texts for its int8 calibration (one per line, .txt or .txt.gz); default: the STS
    file's sentences when given, else built-in texts. Either way they are mixed with 1-3 word texts and
    long prefixes up to max_seq_length (openvino_int8.calibration_texts), so short inputs keep their parity.
    A variant other than fp32 that misses its parity tolerance is rejected (recorded, files removed), not
    an error.
    """
    from tqdm.auto import tqdm

    artifact = artifact if isinstance(artifact, art.Artifact) else art.load_artifact(artifact)
    to_export = resolve_variants(variants)
    sts_path = resolve_sts_file(sts_file)
    sts_pairs = read_sts_file(sts_path) if sts_path else None
    if openvino:
        from embedline.export.openvino_int8 import require_openvino  # an optional extra

        require_openvino()  # fail before any work, naming the extra
    artifact = _clear_previous_export(artifact, to_export)
    started = time.perf_counter()
    notes: dict[str, Any] = {"fused_operators": {}}
    steps = [*to_export, *([OPENVINO_VARIANT] if openvino else [])]
    with tqdm(total=len(steps) + 1, desc=f"export {artifact.name}", unit="step",
              disable=not show_progress) as bar:
        for variant in steps:
            bar.set_postfix_str(variant)
            step_started = time.perf_counter()
            notes.update(_write_variant(artifact, variant, calibration_file, sts_pairs))
            log.info("export step %s: %.1f s", variant, time.perf_counter() - step_started)
            bar.update(1)

        bar.set_postfix_str("parity + speed")
        step_started = time.perf_counter()
        record = parity.measure(artifact, steps, threads=threads, speed_seconds=speed_seconds,
                                sts_pairs=sts_pairs)
        log.info("export step parity + speed: %.1f s", time.perf_counter() - step_started)
        bar.update(1)

    fused_operators = record["fused_operators"] = notes["fused_operators"]
    if openvino:
        record["variants"][OPENVINO_VARIANT]["calibration"] = notes["calibration"]
    record["speed"]["host"] = host_record()
    parity_path = artifact.onnx_dir / art.PARITY_FILE
    rejected = _apply_gates(record, artifact)
    art.write_json(parity_path, record)
    _check_fp32(record, parity_path)
    seconds = time.perf_counter() - started
    exported = art.update_metadata(artifact.path, {"export": _summary(record, fused_operators, seconds)})
    log.info("exported %s (%s%s) in %.0f s", artifact.path, ", ".join(exported.metadata["export"]["variants"]),
             f"; rejected {', '.join(rejected)}" if rejected else "", seconds)
    return exported
