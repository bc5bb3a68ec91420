"""The model being trained: the shared `SentenceEncoder` plus, for `cls` pooling, SimCSE's training-only MLP.

Pooling runs through `embedline.encoder.pool`, the same function export traces into ONNX, so the
trained embedding is the served embedding. For `cls` pooling SimCSE puts an MLP (dense + tanh) over
[CLS] during training and drops it at inference (the paper's unsupervised setting); `cls_no_mlp` is
plain [CLS] throughout. Both are saved with pooling "cls" and without the MLP.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from embedline import artifact as art
from embedline.encoder import SentenceEncoder, load_transformer, pool
from embedline.training.simcse.config import ConfigError, TrainConfig

log = logging.getLogger(__name__)


class ContrastiveModel(nn.Module):
    """input_ids, attention_mask (rows, seq) -> embeddings (rows, dim), unnormalized (losses use cosine)."""

    def __init__(self, encoder: SentenceEncoder, mlp: bool):
        super().__init__()
        self.encoder = encoder
        dim = encoder.dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.Tanh()) if mlp else None
        if self.mlp is not None:
            # BERT's initialization for a new dense layer.
            nn.init.normal_(self.mlp[0].weight, std=0.02)
            nn.init.zeros_(self.mlp[0].bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        token_embeddings = self.encoder.token_embeddings(input_ids, attention_mask)  # (rows, seq, dim)
        embeddings = pool(token_embeddings, attention_mask, self.encoder.pooling)  # (rows, dim)
        return self.mlp(embeddings) if self.mlp is not None else embeddings


@dataclass(frozen=True)
class BaseModel:
    """What the trainer needs to know about the starting model."""

    path: Path
    tokenizer_json: Path
    inference_max_seq_length: int  # the base model's, kept by the artifact (training truncates shorter)


def describe_base(config: TrainConfig) -> BaseModel:
    path = Path(config.model)
    max_len = int(art.describe_source(path)["max_seq_length"])
    return BaseModel(path, path / "tokenizer.json", max_len)


def _random_layers(pretrained: nn.Module, config: TrainConfig) -> nn.Module:
    """A freshly initialized transformer of the given config that keeps `pretrained`'s word embeddings."""
    from transformers import AutoConfig, AutoModel

    source = Path(config.layers_config or config.model)
    try:
        model_config = AutoConfig.from_pretrained(str(source), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--layers_config {source}: cannot read a transformers config ({exc})") from exc
    if config.num_layers:
        model_config.num_hidden_layers = config.num_layers
    words = pretrained.get_input_embeddings().weight  # (vocab, dim)
    if (model_config.vocab_size, model_config.hidden_size) != tuple(words.shape):
        raise ConfigError(
            f"--layers_config {source}: vocab_size x hidden_size {model_config.vocab_size} x "
            f"{model_config.hidden_size} does not match the pretrained word embeddings {tuple(words.shape)}"
        )
    model = AutoModel.from_config(model_config)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(words)
    log.info("random %d-layer transformer with pretrained word embeddings from %s",
             model_config.num_hidden_layers, config.model)
    return model


def build_model(config: TrainConfig) -> ContrastiveModel:
    """The resolved config's starting model (seed the RNG first: random layers and the MLP draw from it)."""
    transformer = load_transformer(config.model)
    if config.random_layers:
        transformer = _random_layers(transformer, config)
    if config.dropout is not None:
        # Attention reads its dropout's p at every forward, so setting the modules is enough.
        for module in transformer.modules():
            if isinstance(module, nn.Dropout):
                module.p = config.dropout
    # BERT's pooler (dense + tanh over [CLS]) is not part of the sentence embedding: frozen, so neither
    # the optimizer nor DDP waits for gradients it never gets; it is saved unchanged.
    pooler = getattr(transformer, "pooler", None)
    if pooler is not None:
        pooler.requires_grad_(False)
    if config.freeze_word_embeddings:
        # With random layers the word embeddings hold all the pretrained knowledge; Adam moves every
        # coordinate by ~lr per update however small its gradient, which scrambles rarely seen words.
        transformer.get_input_embeddings().requires_grad_(False)
    pooling = "cls" if config.pooling in ("cls", "cls_no_mlp") else config.pooling
    encoder = SentenceEncoder(transformer, pooling, normalize=True)
    return ContrastiveModel(encoder, mlp=config.pooling == "cls")
