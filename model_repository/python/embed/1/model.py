"""Triton python-backend model `embed`: UTF-8 texts -> tokens -> ONNX Runtime -> sentence embeddings.

Runs on the embedded tritonserver (PyPI nvidia-pytriton). The ONNX graph contains pooling and L2
normalization, so its output is the final `sentence_embedding`. Every request of a dynamic batch is
tokenized together, the texts are grouped by length, and each group is padded only to its own longest.
"""

import os
import sys

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(__file__))
from text_batch import TextTokenizer, decode_requests, length_groups, model_parameters, version_dir  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        directory = version_dir(args)
        self.dim = int(params["dim"])
        self.group_size = int(params.get("length_group_size", "32"))
        self.tokenizer = TextTokenizer(os.path.join(directory, "tokenizer.json"), int(params["max_seq_length"]))

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "0"))
        options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers = [("CUDAExecutionProvider", {"device_id": int(args["model_instance_device_id"])})] + providers
        self.session = ort.InferenceSession(os.path.join(directory, "model.onnx"), options, providers=providers)

    def embed(self, texts):
        """texts -> (embeddings float32 (n, dim), truncated bool (n,))."""
        ids, truncated = self.tokenizer.tokenize(texts)
        embeddings = np.empty((len(texts), self.dim), dtype=np.float32)
        for group in length_groups(ids, self.group_size):
            input_ids, attention_mask = self.tokenizer.pad([ids[i] for i in group])
            (embeddings[group],) = self.session.run(
                ["sentence_embedding"], {"input_ids": input_ids, "attention_mask": attention_mask}
            )
        return embeddings, truncated

    def execute(self, requests):
        texts, spans, errors = decode_requests(requests, pb_utils)
        responses = [None] * len(requests)
        for index, error in errors.items():
            responses[index] = pb_utils.InferenceResponse(error=error)
        if texts:
            try:
                embeddings, truncated = self.embed(texts)
            except Exception as exc:  # an engine failure fails this batch's requests, not the server
                error = pb_utils.TritonError(f"inference failed: {exc}", pb_utils.TritonError.INTERNAL)
                for index, _, _ in spans:
                    responses[index] = pb_utils.InferenceResponse(error=error)
                return responses
            for index, start, end in spans:
                responses[index] = pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("sentence_embedding", embeddings[start:end]),
                    pb_utils.Tensor("truncated", truncated[start:end].reshape(-1, 1)),
                ])
        return responses
