"""embedline: contrastive sentence embeddings from training to Triton serving in one straight line.

Subpackages (each a top-level folder of the repository):
    embedline.training   SimCSE and classifier-head trainers        (extra: train)
    embedline.export     ONNX export, fusion, fp16/int8, parity, model repository   (extra: export)
    embedline.client     gRPC client SDK (numpy + tritonclient only; the bare install)
Core modules here: artifact (the artifact contract), encoder (torch encoder + pooling),
tokenization, server (Triton launcher), cli.

Importing `embedline` itself is cheap: no torch, transformers or onnx.
"""

__version__ = "0.1.0"
