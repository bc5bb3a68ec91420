"""Server-side text handling shared by the python-backend models (copied into each model directory).

Decodes the UTF-8 `text` tensors of a dynamic batch, tokenizes them with the model's own tokenizer.json,
and pads them in length-sorted groups so that each group is padded only to its own longest sequence.
A model directory reads nothing outside itself, so this file travels with model.py.
"""

import json
import os

import numpy as np
from tokenizers import Tokenizer


def model_parameters(args):
    """The string parameters of the model's config.pbtxt as a dict."""
    config = json.loads(args["model_config"])
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def version_dir(args):
    return os.path.join(args["model_repository"], args["model_version"])


class TextTokenizer:
    def __init__(self, tokenizer_json, max_seq_length):
        self.tokenizer = Tokenizer.from_file(tokenizer_json)
        # The packaged tokenizer.json may pad everything to 128 tokens: padding is done here, per group.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_seq_length)
        pad_id = self.tokenizer.token_to_id("[PAD]")
        self.pad_id = 0 if pad_id is None else pad_id

    def tokenize(self, texts):
        """texts -> (list of token id lists, truncated: bool array (n,))."""
        encodings = self.tokenizer.encode_batch(texts)
        ids = [encoding.ids for encoding in encodings]
        truncated = np.array([len(encoding.overflowing) > 0 for encoding in encodings], dtype=bool)
        return ids, truncated

    def pad(self, ids):
        """Pad a list of id lists to its longest: input_ids, attention_mask int64 (n, longest)."""
        longest = max(len(row) for row in ids)
        input_ids = np.full((len(ids), longest), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(ids), longest), dtype=np.int64)
        for row, tokens in enumerate(ids):
            input_ids[row, : len(tokens)] = tokens
            attention_mask[row, : len(tokens)] = 1
        return input_ids, attention_mask


def length_groups(ids, group_size):
    """Indices of the texts, sorted by token count and cut into groups of at most group_size.

    Running each group separately means a short text never pays for a long one's padding.
    """
    order = np.argsort([len(row) for row in ids], kind="stable")
    return [order[start : start + group_size] for start in range(0, len(order), group_size)]


def decode_requests(requests, pb_utils):
    """Decode each request's `text` tensor.

    Returns (texts, spans, errors): all valid texts in order, (request index, start, end) for each valid
    request, and {request index: TritonError} for requests that must fail on their own.
    """
    texts, spans, errors = [], [], {}
    for index, request in enumerate(requests):
        raw = pb_utils.get_input_tensor_by_name(request, "text").as_numpy().reshape(-1)
        decoded = []
        for position, item in enumerate(raw):
            try:
                decoded.append(item.decode("utf-8") if isinstance(item, bytes) else str(item))
            except UnicodeDecodeError as exc:
                errors[index] = pb_utils.TritonError(
                    f"text[{position}] is not valid UTF-8 ({exc.reason} at byte {exc.start})",
                    pb_utils.TritonError.INVALID_ARG,
                )
                break
        if index not in errors:
            spans.append((index, len(texts), len(texts) + len(decoded)))
            texts.extend(decoded)
    return texts, spans, errors
