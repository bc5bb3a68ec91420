"""Triton python-backend model `classifier_head`: sentence embeddings -> label, probabilities, neighbours.

Second step of the `classify` ensemble (the first is `embed`). Runs the artifact's head.onnx (multinomial
logistic regression: L2 normalize -> MatMul + Add -> Softmax) with ONNX Runtime on the whole dynamic
batch at once. When the artifact keeps its training embeddings (train_embeddings.npy, train_labels.json)
it also returns, per text, the labels of the k most cosine-similar training examples, nearest first:
mixed neighbours flag a doubtful prediction. Reads only files inside its own model directory.
"""

import json
import os
import sys

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(__file__))
from ort_options import session_options  # noqa: E402  (copied next to this file by the repository builder)
from parent_watch import exit_with_parent  # noqa: E402  (likewise)


def _parameters(args):
    config = json.loads(args["model_config"])
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


class TritonPythonModel:
    def initialize(self, args):
        exit_with_parent()  # no model process outlives its tritonserver (parent_watch.py)
        params = _parameters(args)
        directory = os.path.join(args["model_repository"], args["model_version"])
        self.labels = np.array([label.encode("utf-8") for label in json.loads(params["labels"])], dtype=np.object_)
        # The head is a (batch, dim) x (dim, labels) product: one thread, no pool to wake up.
        options = session_options(ort, 1)
        self.session = ort.InferenceSession(os.path.join(directory, "head.onnx"), options,
                                            providers=["CPUExecutionProvider"])
        self.k = int(params["neighbours"])
        if self.k:
            train = np.load(os.path.join(directory, "train_embeddings.npy"), allow_pickle=False)
            norms = np.maximum(np.linalg.norm(train, axis=1, keepdims=True), 1e-12)
            self.train_embeddings = (train / norms).astype(np.float32)  # (n_train, dim)
            with open(os.path.join(directory, "train_labels.json"), encoding="utf-8") as f:
                self.train_labels = np.array([label.encode("utf-8") for label in json.load(f)], dtype=np.object_)

    def neighbours(self, embeddings):
        """(n, dim) -> (n, k) bytes: labels of the k nearest training examples, nearest first."""
        unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
        similarity = unit @ self.train_embeddings.T  # (n, n_train)
        top = np.argpartition(-similarity, self.k - 1, axis=1)[:, : self.k]
        order = np.argsort(-np.take_along_axis(similarity, top, axis=1), axis=1, kind="stable")
        return self.train_labels[np.take_along_axis(top, order, axis=1)]

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, "sentence_embedding").as_numpy() for r in requests]
        sizes = [len(a) for a in arrays]
        embeddings = np.concatenate(arrays).astype(np.float32, copy=False)  # (texts in the batch, dim)
        try:
            (probabilities,) = self.session.run(["probabilities"], {"sentence_embedding": embeddings})
            labels = self.labels[probabilities.argmax(axis=1)].reshape(-1, 1)
            neighbours = self.neighbours(embeddings) if self.k else None
        except Exception as exc:  # an engine failure fails this batch's requests, not the server
            error = pb_utils.TritonError(f"classifier head failed: {exc}", pb_utils.TritonError.INTERNAL)
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        responses, start = [], 0
        for size in sizes:
            end = start + size
            outputs = [pb_utils.Tensor("label", labels[start:end]),
                       pb_utils.Tensor("probabilities", probabilities[start:end])]
            if neighbours is not None:
                outputs.append(pb_utils.Tensor("neighbour_labels", neighbours[start:end]))
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
            start = end
        return responses
