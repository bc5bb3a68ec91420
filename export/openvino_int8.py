"""The OpenVINO variant: the fp32 ONNX graph read by OpenVINO and quantized to int8 with NNCF.

    model.onnx --openvino.read_model--> --nncf.quantize(TRANSFORMER preset)--> onnx/openvino/model.xml + .bin

Measured on this project's 2-core CPU (DESIGN.md), post-training int8 by NNCF was the fastest CPU route
(5.5-5.9x sentence-transformers) with no STS-B loss, ahead of ONNX Runtime's dynamic int8 (4.0x). NNCF is
needed only here, at export; the server needs only the `openvino` runtime. Both come with the optional
`openvino` extra (pip install 'embedline[openvino]'); nothing else in embedline imports them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from embedline.export.errors import ExportError

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]
# NNCF's guidance for transformers: a few hundred samples; more only slows the export.
CALIBRATION_SIZE = 300


def require_openvino() -> None:
    """An ExportError naming the extra when openvino or nncf is missing."""
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError as exc:
        raise ExportError(f"the OpenVINO variant needs openvino and nncf ({exc}); "
                          "pip install 'embedline[openvino]'") from exc


def quantize(fp32_onnx: Path, dest_xml: Path, calibration: list[Batch]) -> Path:
    """Write the NNCF int8 IR of the fp32 graph to dest_xml (+ .bin); calibration: one batch per sample."""
    require_openvino()
    import nncf
    import openvino as ov

    if not calibration:
        raise ExportError("the OpenVINO int8 quantization needs calibration texts")
    model = ov.Core().read_model(str(fp32_onnx))
    quantized = nncf.quantize(
        model,
        nncf.Dataset(calibration),
        model_type=nncf.ModelType.TRANSFORMER,  # keeps softmax / layer norm inputs in fp32
        subset_size=len(calibration),
    )
    dest_xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(dest_xml), compress_to_fp16=False)
    log.info("OpenVINO int8 IR %s (%d calibration samples)", dest_xml, len(calibration))
    return dest_xml


def runner(xml: Path, threads: int) -> Callable[[Batch], np.ndarray]:
    """A function batch -> embeddings (n, dim) on OpenVINO CPU with `threads` threads, one stream."""
    require_openvino()
    import openvino as ov

    compiled = ov.Core().compile_model(str(xml), "CPU", {
        "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "ENABLE_CPU_PINNING": False,
    })
    request = compiled.create_infer_request()

    def run(batch: Batch) -> np.ndarray:
        request.infer(batch)
        return request.get_tensor("sentence_embedding").data.copy()

    return run
