"""Trace an artifact's torch encoder to ONNX, with pooling and L2 normalization inside the graph.

Graph: input_ids, attention_mask (int64, [batch, sequence]) -> sentence_embedding (float32, [batch, dim]).
The TorchScript exporter (dynamo=False) is used on purpose: ONNX Runtime's transformer optimizer fuses
its BERT graph fully (EmbedLayerNorm, Attention, SkipLayerNorm, BiasGelu); the dynamo graph only gets
BiasGelu fused (measured; docs/architecture.md, "Measured decisions", the TorchScript exporter).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from embedline import artifact as art
from embedline.encoder import load_encoder

log = logging.getLogger(__name__)

INPUT_NAMES = ["input_ids", "attention_mask"]
OUTPUT_NAME = "sentence_embedding"
OPSET = 17


def export_fp32(artifact: art.Artifact, dest: Path | None = None) -> Path:
    """Write the fp32 ONNX graph (default: <artifact>/onnx/model.onnx) and return its path."""
    dest = dest or artifact.onnx_path("fp32")
    dest.parent.mkdir(parents=True, exist_ok=True)
    encoder = load_encoder(artifact)
    # Eager attention traces to plain MatMul/Softmax ops, the pattern ORT's fusion recognizes.
    if hasattr(encoder.transformer, "set_attn_implementation"):
        encoder.transformer.set_attn_implementation("eager")
    else:
        encoder.transformer.config._attn_implementation = "eager"
    example = {
        "input_ids": torch.ones((2, 8), dtype=torch.int64),
        "attention_mask": torch.ones((2, 8), dtype=torch.int64),
    }
    with torch.no_grad(), warnings.catch_warnings():
        # Two known-harmless warnings from tracing transformers' mask code: the traced `padding_length > 0`
        # branch is constant for an encoder (mask length == key length), and the advanced indexing it
        # uses never sees negative indices. Parity checks on padded batches verify the graph.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        # The TorchScript exporter is chosen on purpose (module docstring); its deprecation notices are known.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            encoder,
            (example["input_ids"], example["attention_mask"]),
            str(dest),
            input_names=INPUT_NAMES,
            output_names=[OUTPUT_NAME],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                OUTPUT_NAME: {0: "batch"},
            },
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    log.info("exported fp32 ONNX to %s", dest)
    return dest
