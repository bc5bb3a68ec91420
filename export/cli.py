"""`embedline export`: import a model into an artifact (or take an artifact) and export its ONNX variants."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from embedline import artifact as art
from embedline.export.errors import ExportError

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="sentence-transformers/HF model directory, or an artifact to export in place "
                             "(default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--output", default=None,
                        help="artifact directory to create (required unless --model is an artifact)")
    parser.add_argument("--variants", default=",".join(art.VARIANTS),
                        help=f"comma-separated subset of {','.join(art.VARIANTS)} (default: all)")
    parser.add_argument("--name", default=None, help="artifact name (default: the model directory's name)")
    parser.add_argument("--threads", type=int, default=2, help="threads for the parity and speed measurement")
    parser.add_argument("--speed-seconds", type=float, default=1.0,
                        help="seconds of CPU speed measurement per variant (0: none)")
    parser.add_argument("--sts-file", default=None,
                        help="STS TSV (STS-B or SICK columns, .gz ok) to record each variant's Spearman; a CPU "
                             "variant losing more than 0.5 to fp32 is never the default (default: "
                             "$EMBEDLINE_STS_FILE, else none)")
    parser.add_argument("--openvino", action="store_true",
                        help="also export the OpenVINO NNCF int8 variant (needs pip install 'embedline[openvino]')")
    parser.add_argument("--calibration-file", default=None,
                        help="texts (one per line, .txt[.gz]) to calibrate the OpenVINO int8 variant on "
                             "(default: the STS file's sentences, else built-in texts; either way mixed with "
                             "built-in 1-3 word texts and long prefixes up to max_seq_length)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_variants(text: str) -> list[str]:
    variants = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in variants if v not in art.VARIANTS]
    if not variants or unknown:
        raise ExportError(f"--variants {text!r}: expected a comma-separated subset of {','.join(art.VARIANTS)}")
    return variants


def format_table(export: dict[str, Any]) -> str:
    """The parity/speed table printed after an export."""
    torch_speed = export.get("torch_sentences_per_second")
    sts = export.get("sts") or {}
    lines = [f"{'variant':<8} {'min cos':>9} {'mean cos':>9} {'sent/s':>8} {'x torch':>8} {'STS':>6}  provider"]
    for variant, entry in export["parity"].items():
        if not entry.get("measured"):
            lines.append(f"{variant:<8} {'not measured':>19}")
            continue
        speed = entry.get("sentences_per_second")
        ratio = f"{speed / torch_speed:.2f}" if speed and torch_speed else "-"
        spearman = entry.get("sts_spearman")
        verdict = "  REJECTED (not served)" if entry.get("status") == "rejected" else ""
        lines.append(f"{variant:<8} {entry['min_cosine']:>9.5f} {entry['mean_cosine']:>9.5f} "
                     f"{speed or '-':>8} {ratio:>8} {spearman if spearman is not None else '-':>6}  "
                     f"{entry.get('provider', '')}{verdict}")
    if torch_speed:
        lines.append(f"{'torch':<8} {'':>9} {'':>9} {torch_speed:>8} {'1.00':>8} "
                     f"{sts.get('torch_spearman') if sts else '-':>6}  (reference)")
    if sts:
        lines.append(f"STS: {sts['metric']} on {sts['pairs']} pairs of {sts['file']}")
    ops = ", ".join(f"{op} {n}" for op, n in export["fused_operators"].items()) or "none"
    lines.append(f"fused operators: {ops}")
    for variant, rejected in (export.get("rejected") or {}).items():
        lines.append(f"rejected: {variant}: {rejected['reason']}; its files were removed")
    host = export.get("host") or {}
    if host.get("int8_instructions") is not None:
        lines.append(f"measured on: {host.get('cpu') or 'unknown CPU'}, {host.get('cpus')} CPUs, int8 instructions: "
                     f"{' '.join(host['int8_instructions']) or 'none'}")
    lines.append(f"default variant: cpu {export['default_cpu_variant']}, gpu {export['default_gpu_variant']}"
                 f"  ({export['threads']} threads, {export['seconds']} s)")
    return "\n".join(lines)


def _quiet_library_logs() -> None:
    """Keep embedline's INFO lines; of other libraries (ORT's optimizer logs every fusion) only warnings."""

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.startswith("embedline")

    for handler in logging.getLogger().handlers:
        handler.addFilter(keep)


def run(args: argparse.Namespace) -> int:
    from embedline.export.pipeline import export_artifact  # torch: not for `embedline export --help`

    _quiet_library_logs()
    variants = parse_variants(args.variants)
    source, is_artifact = art.resolve_model_source(args.model)
    if is_artifact:
        if args.output is not None and Path(args.output).expanduser().resolve() != source:
            raise ExportError(f"{source}: is already an artifact and is exported in place; drop --output")
        artifact = art.load_artifact(source)
    else:
        if args.output is None:
            raise ExportError(f"{source}: is a model directory; give --output DIR for the artifact to create")
        artifact = art.import_model_dir(source, args.output, name=args.name)
        log.info("imported %s into %s", source, artifact.path)
    artifact = export_artifact(artifact, variants, show_progress=not args.no_progress,
                               threads=args.threads, speed_seconds=args.speed_seconds, sts_file=args.sts_file,
                               openvino=args.openvino, calibration_file=args.calibration_file)
    print(f"exported {artifact.path}")
    print(format_table(artifact.metadata["export"]))
    return 0
