"""Triton python-backend model `tokenize` (stock-container layout): UTF-8 texts -> input_ids, attention_mask.

First step of the `embed` ensemble whose second step is the native onnxruntime backend (`encoder`).
All requests of one dynamic batch are padded to the batch's longest sequence, so they reach the encoder
with the same shape and its dynamic batcher can run them together.
"""

import os
import sys

import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(__file__))
from parent_watch import exit_with_parent  # noqa: E402
from text_batch import TextTokenizer, model_parameters, respond, version_dir  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        exit_with_parent()  # no model process outlives its tritonserver (parent_watch.py)
        params = model_parameters(args)
        self.tokenizer = TextTokenizer(
            os.path.join(version_dir(args), "tokenizer.json"), int(params["max_seq_length"])
        )

    def execute(self, requests):
        def compute(texts):
            ids, truncated = self.tokenizer.tokenize(texts)
            input_ids, attention_mask = self.tokenizer.pad(ids)
            return {"input_ids": input_ids, "attention_mask": attention_mask, "truncated": truncated.reshape(-1, 1)}

        return respond(requests, pb_utils, compute)
