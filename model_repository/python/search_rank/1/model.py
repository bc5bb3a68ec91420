"""Triton python-backend model `search_rank`: query vectors and texts -> per query a JSON list of the k best documents.

The second step of the `search` ensemble (the first is `embed`). The ranking itself is embedline.search.service
(the server's environment has embedline installed: this model is only ever built by `serve --index` /
`build-repo --index`). This file is the Triton seam: it reads the served model's record from the embed
model's config (re-read when `publish` rewrites it, so a new model never searches vectors of the old one),
ranks each request of a dynamic batch with its own options (Triton's request parameters, forwarded by the
ensemble), and turns errors into statuses: a bad request is INVALID_ARG, an unknown collection NOT_FOUND, a
store that cannot be reached UNAVAILABLE. One request's error is that request's alone.
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(__file__))
from parent_watch import exit_with_parent  # noqa: E402  (copied next to this file by the repository builder)

from embedline.search.service import (  # noqa: E402
    CollectionNotFoundError, SearchRequest, SearchRequestError, SearchService,
)
from embedline.search.store import ModelMismatchError, ModelRecord, StoreError  # noqa: E402


def _parameters(config):
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


class ServedModel:
    """The embed model's record, from its config.pbtxt, re-read whenever the file changes."""

    def __init__(self, config_path):
        self.path, self.mtime, self.record, self.default_prompt = config_path, None, None, ""

    def current(self):
        mtime = os.stat(self.path).st_mtime_ns
        if mtime != self.mtime:
            from google.protobuf import text_format
            from tritonclient.grpc import model_config_pb2

            with open(self.path, encoding="utf-8") as f:
                config = text_format.Parse(f.read(), model_config_pb2.ModelConfig())
            params = {key: value.string_value for key, value in config.parameters.items()}
            prompts = json.loads(params["prompts"])
            self.record = ModelRecord.for_model(params["model_name"], int(params["dim"]), params["fingerprint"], prompts)
            self.default_prompt = prompts.get(params["default_prompt_name"], "")
            self.mtime = mtime
        return self.record, self.default_prompt


class TritonPythonModel:
    def initialize(self, args):
        exit_with_parent()  # no model process outlives its tritonserver (parent_watch.py)
        try:  # one query at a time: OpenMP's thread team costs more than it saves, beside the embed instances
            import faiss

            faiss.omp_set_num_threads(1)
        except ImportError:  # a store without faiss (Milvus)
            pass
        params = _parameters(json.loads(args["model_config"]))
        repository = os.path.dirname(args["model_repository"])
        self.served = ServedModel(os.path.join(repository, params["embed_model"], "config.pbtxt"))
        self.service = SearchService(params["store_uri"])

    @staticmethod
    def request_of(request):
        """A Triton request -> SearchRequest (its queries and vectors, its options from the request parameters)."""
        queries = [q.decode("utf-8", errors="replace")
                   for q in pb_utils.get_input_tensor_by_name(request, "text").as_numpy().reshape(-1)]
        vectors = pb_utils.get_input_tensor_by_name(request, "sentence_embedding").as_numpy()
        options = json.loads(request.parameters() or "{}")
        k = options.get("k", 10)
        if isinstance(k, str):  # HTTP clients may send every parameter as a string
            k = int(k) if k.strip().lstrip("-").isdigit() else k
        hybrid = options.get("hybrid", False) in (True, "true", "True", "1")
        return SearchRequest(queries, vectors, k, options.get("filter") or None, options.get("collection") or None,
                             hybrid)

    def execute(self, requests):
        try:
            record, default_prompt = self.served.current()
            results = self.service.search_many([self.request_of(r) for r in requests], record, default_prompt)
        except Exception as exc:  # the batch could not start: every request fails, the server goes on
            results = [exc] * len(requests)
        return [self._response(result) for result in results]

    def _response(self, result):
        if isinstance(result, CollectionNotFoundError):
            return self._error(str(result), pb_utils.TritonError.NOT_FOUND)
        if isinstance(result, (SearchRequestError, ModelMismatchError, ValueError)):
            return self._error(str(result), pb_utils.TritonError.INVALID_ARG)
        if isinstance(result, StoreError):
            return self._error(f"the store failed: {result}", pb_utils.TritonError.UNAVAILABLE)
        if isinstance(result, Exception):
            return self._error(f"search failed: {result}", pb_utils.TritonError.INTERNAL)
        body = [json.dumps([{"id": h.id, "score": h.score, "text": h.text, "metadata": h.metadata} for h in row],
                           ensure_ascii=False).encode("utf-8") for row in result]
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("hits", np.array(body, dtype=np.object_).reshape(-1, 1))])

    @staticmethod
    def _error(message, code):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
