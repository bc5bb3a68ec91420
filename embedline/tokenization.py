"""Fast tokenization with dynamic padding, shared by export, parity checks, training and benchmarks.

The packaged tokenizer.json of all-MiniLM-L6-v2 pads every input to 128 tokens; here padding is reset so
each batch is padded only to its own longest sequence, and truncation is set to max_seq_length.
(The Triton model.py carries its own copy of these few lines: a model directory reads nothing outside it.)
"""

from __future__ import annotations

import os

import numpy as np
from tokenizers import Tokenizer


def load_tokenizer(tokenizer_json: str | os.PathLike, max_seq_length: int) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_seq_length)
    pad_id = tokenizer.token_to_id("[PAD]")
    tokenizer.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
    return tokenizer


def encode(tokenizer: Tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
    """texts -> {"input_ids", "attention_mask"}: int64 arrays (batch, longest sequence in the batch)."""
    encodings = tokenizer.encode_batch(texts)
    return {
        "input_ids": np.asarray([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.asarray([e.attention_mask for e in encodings], dtype=np.int64),
    }
