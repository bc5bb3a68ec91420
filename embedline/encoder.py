"""The PyTorch sentence encoder: a HF transformer + pooling + optional L2 normalization.

One implementation used by training (the model being trained), export (the graph traced to ONNX,
so pooling and normalization live inside the ONNX graph) and parity checks (the reference).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from embedline import artifact as art


def pool(token_embeddings: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool token embeddings (batch, seq, dim) into sentence embeddings (batch, dim).

    mean: average over real tokens (padding masked out), as sentence-transformers does.
    cls:  the first token's hidden state (SimCSE; its training-only MLP lives in the trainer).
    """
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)  # (batch, seq, 1)
        summed = (token_embeddings * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1e-9)
        return summed / counts
    if pooling == "cls":
        return token_embeddings[:, 0]
    raise ValueError(f"unknown pooling {pooling!r}; expected one of {art.POOLING_MODES}")


class SentenceEncoder(nn.Module):
    """input_ids, attention_mask (batch, seq) -> sentence_embedding (batch, dim)."""

    def __init__(self, transformer: nn.Module, pooling: str, normalize: bool = True):
        super().__init__()
        if pooling not in art.POOLING_MODES:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {art.POOLING_MODES}")
        self.transformer = transformer
        self.pooling = pooling
        self.normalize = normalize

    @property
    def dim(self) -> int:
        return int(self.transformer.config.hidden_size)

    def token_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        embeddings = pool(self.token_embeddings(input_ids, attention_mask), attention_mask, self.pooling)
        if self.normalize:
            embeddings = F.normalize(embeddings, p=2, dim=-1)
        return embeddings


def load_transformer(model_dir: str | os.PathLike) -> nn.Module:
    """The HF AutoModel from a local directory (never a hub download)."""
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise art.ArtifactError(f"{model_dir}: cannot load the transformer weights ({exc})") from exc


def load_encoder(artifact: art.Artifact, normalize: bool | None = None) -> SentenceEncoder:
    """The torch encoder of an artifact, in eval mode."""
    transformer = load_transformer(artifact.path)
    encoder = SentenceEncoder(
        transformer, artifact.pooling, artifact.normalize if normalize is None else normalize
    )
    return encoder.eval()


def save_artifact(
    encoder: SentenceEncoder,
    dest: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike,
    name: str,
    base_model: str,
    max_seq_length: int,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    matryoshka_dims: Sequence[int] = (),
) -> art.Artifact:
    """Write `encoder` as an artifact directory (weights, tokenizer, sentence-transformers files, metadata).

    `matryoshka_dims`: the embedding sizes the model was trained to be truncated to (Matryoshka loss),
    recorded as embedline.json's `matryoshka_dims`; empty: not trained for truncation (key left out).
    Any previous onnx/ export in `dest` is removed: it would describe other weights.
    """
    dest = Path(dest).expanduser().resolve()
    dest.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dest / art.ONNX_DIR, ignore_errors=True)
    encoder.transformer.save_pretrained(str(dest), safe_serialization=True)
    tokenizer_dir = Path(tokenizer_dir)
    for fname in (*art.TOKENIZER_FILES, art.PROMPTS_FILE):  # a fine-tune keeps its base model's prompts
        if (tokenizer_dir / fname).is_file() and tokenizer_dir.resolve() != dest:
            shutil.copy2(tokenizer_dir / fname, dest / fname)
    art.write_sentence_transformers_files(dest, encoder.pooling, max_seq_length, encoder.dim)
    meta = art.new_metadata(
        name=name,
        base_model=base_model,
        pooling=encoder.pooling,
        normalize=encoder.normalize,
        max_seq_length=max_seq_length,
        dim=encoder.dim,
        training=training,
        metrics=metrics,
        matryoshka_dims=matryoshka_dims,
    )
    art.write_json(dest / art.METADATA_FILE, meta)
    return art.load_artifact(dest)
