"""embedline: contrastive sentence embeddings from training to Triton serving in one straight line.

Subpackages (each a top-level folder of the repository):
    embedline.training   SimCSE and classifier-head trainers        (extra: train)
    embedline.export     ONNX export, fusion, fp16/int8, parity, variant choice     (extra: export)
    embedline.serving    Triton model repository, tritonserver process, `serve`    (extra: serve)
    embedline.client     gRPC client SDK (numpy + tritonclient only; the bare install)
Core modules here: artifact (the artifact contract), encoder (torch encoder + pooling),
tokenization (+ the length-sorted embed loop), sts (STS reader and Spearman), errors, cli. The core imports none of the subpackages (docs/architecture.md).

Importing `embedline` itself is cheap: no torch, transformers or onnx.
"""

__version__ = "0.1.0"
