"""Server-side text handling shared by the python-backend models (copied into each model directory).

Decodes the UTF-8 `text` tensors of a dynamic batch, tokenizes them with the model's own tokenizer.json,
and plans how to pad them: length-aware (sorted by length and cut where padding would cost more than an
extra engine run, each group padded only to its own longest) or, when length grouping is off, the whole
batch in arrival order padded to its longest (the baseline the benchmark compares against).
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
        lengths = np.fromiter((len(row) for row in ids), dtype=np.int64, count=len(ids))
        longest = int(lengths.max())
        filled = np.arange(longest) < lengths[:, None]  # (n, longest): True on real tokens
        input_ids = np.full((len(ids), longest), self.pad_id, dtype=np.int64)
        # Boolean assignment fills row by row, the order the concatenated ids come in.
        input_ids[filled] = np.fromiter((t for row in ids for t in row), dtype=np.int64, count=int(lengths.sum()))
        return input_ids, filled.astype(np.int64)


def length_groups(ids, group_size):
    """Indices of the texts, sorted by token count and cut into groups of at most group_size.

    Running each group separately means a short text never pays for a long one's padding.
    """
    order = np.argsort([len(row) for row in ids], kind="stable")
    return [order[start : start + group_size] for start in range(0, len(order), group_size)]


def plan_groups(lengths, max_group, overhead_tokens, max_tokens=None):
    """Cut the texts into engine runs that waste the least work: a list of index arrays.

    The texts are sorted by length and split into contiguous groups of at most `max_group` texts and at
    most `max_tokens` padded tokens (a lone text may exceed it), choosing the
    cut points that minimise sum(group size * group's longest) + overhead_tokens per group, i.e. padded
    tokens computed plus a fixed cost per engine run expressed in tokens (dynamic programming, O(n *
    max_group); n is at most a dynamic batch). A batch of similar lengths stays one run; a few long
    texts among many short ones get a run of their own instead of padding everyone to their length.
    The token cap bounds one run's activations (attention is texts x heads x longest^2), and with them the
    memory an engine keeps for its largest run (docs/architecture.md, "Memory").
    """
    n = len(lengths)
    if n == 0:
        return []
    order = np.argsort(np.asarray(lengths), kind="stable")
    sorted_lengths = [int(lengths[i]) for i in order]
    # best[j]: least cost of the first j sorted texts; cut[j]: where the last group of that plan starts.
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        longest = sorted_lengths[end - 1]  # sorted: the group's last text is its longest
        size_cap = max_group if not max_tokens else max(1, min(max_group, max_tokens // max(1, longest)))
        for start in range(max(0, end - size_cap), end):
            cost = best[start] + (end - start) * longest + overhead_tokens
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], n
    while end > 0:
        groups.append(order[cut[end] : end])
        end = cut[end]
    return groups[::-1]


def arrival_groups(n, max_group):
    """Length grouping off: texts in arrival order, cut only to respect max_group (pad-to-longest)."""
    order = np.arange(n)
    return [order[start : start + max_group] for start in range(0, n, max_group)]


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


def respond(requests, pb_utils, compute):
    """One response per request of a dynamic batch that carries texts.

    `compute(texts) -> {output name: array with one row per text}` runs once over the valid texts of every
    request; each output is sliced back to its request. A request whose text is not valid UTF-8 fails on
    its own; a failure inside `compute` fails this batch's requests with INTERNAL, not the server.
    """
    texts, spans, errors = decode_requests(requests, pb_utils)
    responses = [None] * len(requests)
    for index, error in errors.items():
        responses[index] = pb_utils.InferenceResponse(error=error)
    if not texts:
        return responses
    try:
        outputs = compute(texts)
    except Exception as exc:  # noqa: BLE001 - reported to the batch's callers
        error = pb_utils.TritonError(f"inference failed: {exc}", pb_utils.TritonError.INTERNAL)
        for index, _, _ in spans:
            responses[index] = pb_utils.InferenceResponse(error=error)
        return responses
    for index, start, end in spans:
        responses[index] = pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(name, values[start:end]) for name, values in outputs.items()])
    return responses

