"""Derive the fused, fp16 and int8 ONNX graphs from the fp32 graph with ONNX Runtime's own tools.

    model.onnx --optimize_model(bert)--> model_fused.onnx --float16--> model_fp16.onnx   (GPU)
                                                          --dynamic int8--> model_int8.onnx (CPU)

Every graph keeps the fp32 graph's interface: input_ids, attention_mask (int64, [batch, sequence]) ->
sentence_embedding (float32, [batch, dim]).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx

from embedline.export.errors import ExportError

log = logging.getLogger(__name__)

# Operators ORT's transformer optimizer fuses into (LayerNormalization is a plain ONNX op since opset 17;
# it is counted because unfused leftovers show up as LayerNormalization).
FUSED_OPERATORS = (
    "EmbedLayerNormalization",
    "Attention",
    "MultiHeadAttention",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "BiasGelu",
    "FastGelu",
    "Gelu",
    "GemmFastGelu",
)
# The last of these in a BERT graph produces the token embeddings that pooling reads.
_LAYER_NORM_OPS = {
    "EmbedLayerNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "LayerNormalization",
    "SimplifiedLayerNormalization",
}
# Kept in fp32 wherever they occur: reductions and powers overflow or lose precision in fp16
# (they appear in unfused LayerNorm, mean pooling and L2 normalization; fused ops accumulate in fp32).
_FP16_UNSAFE_OPS = ("ReduceMean", "ReduceSum", "ReduceL2", "Pow", "Sqrt")


def attention_shape(config_json: Path) -> tuple[int, int]:
    """(num_heads, hidden_size) of a HF transformer config (BERT/MPNet names, DistilBERT's as fallback)."""
    try:
        config = json.loads(config_json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{config_json}: cannot read the transformer config ({exc})") from exc
    num_heads = config.get("num_attention_heads", config.get("n_heads"))
    hidden_size = config.get("hidden_size", config.get("dim"))
    if not num_heads or not hidden_size:
        raise ExportError(f"{config_json}: no num_attention_heads/hidden_size; is this a BERT-like encoder?")
    return int(num_heads), int(hidden_size)


def fused_operator_counts(model: onnx.ModelProto) -> dict[str, int]:
    """How many of each fused operator the graph holds (operators that do not occur are left out)."""
    counts = Counter(node.op_type for node in model.graph.node if node.op_type in FUSED_OPERATORS)
    return {op: counts[op] for op in FUSED_OPERATORS if counts[op]}


def fuse(fp32_path: Path, dest: Path, num_heads: int, hidden_size: int) -> dict[str, int]:
    """Write the operator-fused graph to `dest`; return its fused operator counts."""
    from onnxruntime.transformers.optimizer import optimize_model

    # Python fusions only (no ORT graph optimizations baked in), so the file runs on CPU and CUDA alike.
    optimized = optimize_model(str(fp32_path), model_type="bert", num_heads=num_heads, hidden_size=hidden_size)
    optimized.save_model_to_file(str(dest))
    counts = fused_operator_counts(optimized.model)
    log.info("fused graph %s: %s", dest.name, ", ".join(f"{op} {n}" for op, n in counts.items()) or "no fusions")
    if not counts.get("Attention") and not counts.get("MultiHeadAttention"):
        log.warning("no attention was fused in %s: the graph pattern is not one ORT's optimizer recognizes", dest)
    return counts


def _name_unnamed_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique name: the fp16 block list addresses nodes by name (fusion leaves some blank)."""
    taken = {node.name for node in model.graph.node}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_unnamed_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def _nodes_after_token_embeddings(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes the transformer does not need: pooling, L2 normalization and their mask arithmetic.

    The transformer is everything upstream of the last layer norm (its output is the token embeddings,
    [batch, sequence, hidden]); whatever is not upstream of it belongs to the pooling head.
    """
    nodes = list(model.graph.node)
    last_norm = next((n for n in reversed(nodes) if n.op_type in _LAYER_NORM_OPS), None)
    if last_norm is None:
        raise ExportError("cannot find the transformer's last layer norm in the fused graph; fp16 needs it")
    producer = {output: node for node in nodes for output in node.output}
    needed: set[str] = set()
    stack = [last_norm]
    while stack:
        node = stack.pop()
        if node.name in needed:
            continue
        needed.add(node.name)
        stack.extend(producer[name] for name in node.input if name in producer)
    return [node.name for node in nodes if node.name not in needed]


def _drop_duplicate_nodes(model: onnx.ModelProto) -> int:
    """Remove exact duplicates (same name, op, inputs and outputs); return how many were removed.

    ORT 1.31's float16 converter names the Cast it puts before a blocked node after the input tensor, so a
    float32 tensor read by two blocked nodes (here the attention mask, read by both mean-pooling sums) gets
    two identical Casts: an invalid graph ("two nodes with same node name"). Dropping the copy is exact.
    """
    seen: set[tuple] = set()
    kept = []
    for node in model.graph.node:
        key = (node.name, node.op_type, tuple(node.input), tuple(node.output))
        if key not in seen:
            seen.add(key)
            kept.append(node)
    removed = len(model.graph.node) - len(kept)
    if removed:
        del model.graph.node[:]
        model.graph.node.extend(kept)
    return removed


def to_fp16(fused_path: Path, dest: Path) -> Path:
    """Write the fp16 graph for GPUs: transformer in fp16; inputs/outputs, pooling and L2 normalize in fp32."""
    from onnxruntime.transformers import float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(fused_path))
    _name_unnamed_nodes(model)
    pooling_nodes = _nodes_after_token_embeddings(model)
    wrapped = OnnxModel(model)
    wrapped.convert_float_to_float16(
        keep_io_types=True,
        op_block_list=[*float16.DEFAULT_OP_BLOCK_LIST, *_FP16_UNSAFE_OPS],
        node_block_list=pooling_nodes,
    )
    removed = _drop_duplicate_nodes(wrapped.model)
    if removed:
        log.debug("dropped %d duplicate Cast nodes left by the float16 converter", removed)
    wrapped.topological_sort()  # the converter appends its Casts at the end of the node list
    try:
        onnx.checker.check_model(wrapped.model)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the fp16 graph is invalid ({str(exc).splitlines()[0]})") from exc
    wrapped.save_model_to_file(str(dest))
    log.info("fp16 graph %s (%d pooling/normalize nodes kept in fp32)", dest.name, len(pooling_nodes))
    return dest


@contextmanager
def _without_preprocess_hint() -> Iterator[None]:
    """Silence quantize_dynamic's root-logger hint to run quant pre-processing.

    Pre-processing re-optimizes the graph; the fused graph is quantized on purpose (docs/architecture.md,
    "Measured decisions", int8 by default on CPU).
    """
    root = logging.getLogger()

    def keep(record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()

    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def quantize_int8(fused_path: Path, dest: Path) -> Path:
    """Write the int8 graph for CPUs: dynamic quantization, int8 weights per output channel.

    Per-tensor weights cost ~0.03 cosine on all-MiniLM-L6-v2 (docs/architecture.md, "Measured decisions",
    int8 by default on CPU). DefaultTensorType tells the quantizer the type of tensors it cannot infer
    through the fused com.microsoft ops.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _without_preprocess_hint():
        quantize_dynamic(
            str(fused_path),
            str(dest),
            per_channel=True,
            weight_type=QuantType.QInt8,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    log.info("int8 graph %s", dest.name)
    return dest
