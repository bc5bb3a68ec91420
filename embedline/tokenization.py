"""Fast tokenization with dynamic padding, shared by export, parity checks, training and benchmarks.

The packaged tokenizer.json of all-MiniLM-L6-v2 pads every input to 128 tokens; here padding is reset so
each batch is padded only to its own longest sequence, and truncation is set to max_seq_length.
`embed_by_length` is the embedding loop that makes the most of it: texts of similar length share a batch.
(The Triton model.py carries its own copy of these few lines: a model directory reads nothing outside it.)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import numpy as np
from tokenizers import Tokenizer

Batch = dict[str, np.ndarray]  # {"input_ids", "attention_mask"}: int64 (batch, sequence)


def load_tokenizer(tokenizer_json: str | os.PathLike, max_seq_length: int) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_seq_length)
    pad_id = tokenizer.token_to_id("[PAD]")
    tokenizer.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
    return tokenizer


def encode(tokenizer: Tokenizer, texts: list[str]) -> Batch:
    """texts -> {"input_ids", "attention_mask"}: int64 arrays (batch, longest sequence in the batch)."""
    encodings = tokenizer.encode_batch(texts)
    return {
        "input_ids": np.asarray([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.asarray([e.attention_mask for e in encodings], dtype=np.int64),
    }


def embed_by_length(run: Callable[[Batch], np.ndarray], tokenizer: Tokenizer, texts: list[str], batch_size: int,
                    dim: int, progress: Callable[[Iterable[int]], Iterable[int]] = iter) -> np.ndarray:
    """(n, dim) float32 embeddings of `texts` in input order, `run` called on batches of similar length.

    Texts are sorted by length so each batch pads little; `progress` may wrap the batch starts (a tqdm).
    """
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.empty((len(texts), dim), dtype=np.float32)
    for start in progress(range(0, len(texts), batch_size)):
        index = order[start:start + batch_size]
        out[index] = run(encode(tokenizer, [texts[i] for i in index]))
    return out
