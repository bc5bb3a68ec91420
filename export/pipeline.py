"""Export an artifact: write its ONNX variants into <artifact>/onnx/, check them against torch, record it all.

    model.onnx (fp32) -> model_fused.onnx -> model_fp16.onnx (GPU) / model_int8.onnx (CPU)
    model.onnx (fp32) -> openvino/model.xml + .bin (CPU, NNCF int8; only with openvino=True)
    onnx/parity.json      per variant: min/mean cosine to torch, CPU sentences/s, tolerance verdict,
                          STS Spearman when an STS file is given (export/sts.py)
    embedline.json        "export": variants, fused operator counts, cosines, speeds, Spearman, defaults

A variant that misses its tolerance (export/parity.py) is an ExportError; parity.json is still written so
the numbers can be inspected, but embedline.json gets no export record (ensure_exported retries).
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
from embedline.export.variants import OPENVINO_DIR, OPENVINO_VARIANT, choose_variant_from_parity, openvino_files

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


def _check_tolerances(record: dict[str, Any], parity_path: os.PathLike) -> None:
    failures = []
    for variant, entry in record["variants"].items():
        if entry.get("measured") and not entry["within_tolerance"]:
            tol = entry["tolerance"]
            failures.append(
                f"{variant} cosine to torch min {entry['min_cosine']:.5f} / mean {entry['mean_cosine']:.5f} "
                f"(needs >= {tol['min_cosine']} / {tol['mean_cosine']}; worst on {entry['worst_text']!r})"
            )
    if failures:
        raise ExportError(f"parity check failed: {'; '.join(failures)}. Details: {parity_path}")


def _summary(record: dict[str, Any], fused_operators: dict[str, int], seconds: float) -> dict[str, Any]:
    """The embedline.json "export" entry: what was exported and how well it agrees, in brief."""
    import onnx

    variants = list(record["variants"])
    return {
        "variants": variants,
        "fused_operators": fused_operators,
        "parity": {
            v: {k: e.get(k) for k in ("measured", "min_cosine", "mean_cosine", "sentences_per_second", "provider",
                                      "sts_spearman") if k in e}
            for v, e in record["variants"].items()
        },
        "sts": record.get("sts"),
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


def _calibration_texts(calibration_file: str | os.PathLike | None, sts_pairs: Any) -> list[str]:
    """Texts to calibrate int8 activation ranges on (see export_artifact's calibration_file)."""
    import gzip
    from pathlib import Path

    from embedline.export.openvino_int8 import CALIBRATION_SIZE

    if calibration_file:
        path = Path(calibration_file)
        opener = gzip.open if path.suffix == ".gz" else open
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                texts = [line.strip() for _, line in zip(range(CALIBRATION_SIZE * 2), f) if line.strip()]
        except OSError as exc:
            raise ExportError(f"{path}: cannot read the calibration file ({exc})") from exc
        return texts[:CALIBRATION_SIZE]
    if sts_pairs is not None:
        # Calibration only sets activation ranges, it does not fit to the gold scores.
        return sts_pairs.unique_sentences()[:CALIBRATION_SIZE]
    return list(parity.PARITY_TEXTS)


def _calibration_batches(artifact: art.Artifact, texts: list[str]) -> list[dict]:
    """One single-text batch per calibration sample (no padding in the statistics)."""
    from embedline.tokenization import load_tokenizer

    tokenizer = load_tokenizer(artifact.tokenizer_path, artifact.max_seq_length)
    return parity.make_batches(tokenizer, texts, 1)


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
    calibration_file: texts for its int8 calibration (one per line, .txt or .txt.gz; the first 300);
    default: the STS file's sentences when given, else the built-in parity texts.
    """
    from tqdm.auto import tqdm

    from embedline.export.sts import read_sts_file, resolve_sts_file

    artifact = artifact if isinstance(artifact, art.Artifact) else art.load_artifact(artifact)
    to_export = resolve_variants(variants)
    sts_path = resolve_sts_file(sts_file)
    sts_pairs = read_sts_file(sts_path) if sts_path else None
    if openvino:
        from embedline.export.openvino_int8 import require_openvino

        require_openvino()  # fail before any work, naming the extra
    onnx_dir = artifact.onnx_dir
    onnx_dir.mkdir(parents=True, exist_ok=True)
    # What a previous export left would describe other files: drop its variants, parity and record first,
    # so an export that fails half-way never looks complete to ensure_exported.
    for variant in art.VARIANTS:
        if variant not in to_export:
            artifact.onnx_path(variant).unlink(missing_ok=True)
    shutil.rmtree(onnx_dir / OPENVINO_DIR, ignore_errors=True)
    (onnx_dir / art.PARITY_FILE).unlink(missing_ok=True)
    artifact = art.update_metadata(artifact.path, {"export": None})

    started = time.perf_counter()
    fused_operators: dict[str, int] = {}
    steps = [*to_export, *([OPENVINO_VARIANT] if openvino else [])]
    with tqdm(total=len(steps) + 1, desc=f"export {artifact.name}", unit="step",
              disable=not show_progress) as bar:
        for variant in steps:
            bar.set_postfix_str(variant)
            step_started = time.perf_counter()
            if variant == "fp32":
                export_fp32(artifact)
            elif variant == "fused":
                num_heads, hidden_size = graphs.attention_shape(artifact.path / "config.json")
                fused_operators = graphs.fuse(artifact.onnx_path("fp32"), artifact.onnx_path("fused"),
                                              num_heads, hidden_size)
            elif variant == "fp16":
                graphs.to_fp16(artifact.onnx_path("fused"), artifact.onnx_path("fp16"))
            elif variant == OPENVINO_VARIANT:
                from embedline.export import openvino_int8

                texts = _calibration_texts(calibration_file, sts_pairs)
                openvino_int8.quantize(artifact.onnx_path("fp32"), openvino_files(artifact)[0],
                                       _calibration_batches(artifact, texts))
            else:
                graphs.quantize_int8(artifact.onnx_path("fused"), artifact.onnx_path("int8"))
            log.info("export step %s: %.1f s", variant, time.perf_counter() - step_started)
            bar.update(1)

        bar.set_postfix_str("parity + speed")
        step_started = time.perf_counter()
        record = parity.measure(artifact, steps, threads=threads, speed_seconds=speed_seconds,
                                sts_pairs=sts_pairs)
        log.info("export step parity + speed: %.1f s", time.perf_counter() - step_started)
        bar.update(1)

    record["fused_operators"] = fused_operators
    parity_path = onnx_dir / art.PARITY_FILE
    art.write_json(parity_path, record)
    _check_tolerances(record, parity_path)
    seconds = time.perf_counter() - started
    exported = art.update_metadata(artifact.path, {"export": _summary(record, fused_operators, seconds)})
    log.info("exported %s (%s) in %.0f s", artifact.path, ", ".join(to_export), seconds)
    return exported
