"""Triton python-backend model `search`: query texts -> per query a JSON list of the k best documents.

The search itself is embedline.search.service (the server's environment has embedline installed: this
model is only ever built by `serve --index` / `build-repo --index`). This file is the Triton seam: it
embeds queries by calling the `embed` model (BLS), reads the served model's record from the embed model's
config (re-read when `publish` rewrites it, so a new model never searches vectors of the old one), and
turns errors into statuses: a bad request is INVALID_ARG, an unknown collection NOT_FOUND.
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(__file__))
from parent_watch import exit_with_parent  # noqa: E402  (copied next to this file by the repository builder)

from embedline.search.service import CollectionNotFoundError, SearchRequestError, SearchService  # noqa: E402
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
            prompts = json.loads(params.get("prompts") or "{}")
            self.record = ModelRecord.for_model(params["model_name"], int(params["dim"]), params["fingerprint"], prompts)
            self.default_prompt = prompts.get(params.get("default_prompt_name") or "", "")
            self.mtime = mtime
        return self.record, self.default_prompt


class TritonPythonModel:
    def initialize(self, args):
        exit_with_parent()  # no model process outlives its tritonserver (parent_watch.py)
        params = _parameters(json.loads(args["model_config"]))
        self.embed_model = params["embed_model"]
        repository = os.path.dirname(args["model_repository"])
        self.served = ServedModel(os.path.join(repository, self.embed_model, "config.pbtxt"))
        self.service = SearchService(params["store_uri"], self.embed)

    def embed(self, texts):
        tensor = pb_utils.Tensor("text", np.array([t.encode("utf-8") for t in texts], dtype=np.object_).reshape(-1, 1))
        response = pb_utils.InferenceRequest(model_name=self.embed_model, inputs=[tensor],
                                             requested_output_names=["sentence_embedding"]).exec()
        if response.has_error():
            raise RuntimeError(f"embedding the queries failed: {response.error().message()}")
        return pb_utils.get_output_tensor_by_name(response, "sentence_embedding").as_numpy()

    def search(self, request):
        queries = [q.decode("utf-8", errors="replace")
                   for q in pb_utils.get_input_tensor_by_name(request, "text").as_numpy().reshape(-1)]
        options = json.loads(request.parameters() or "{}")
        k = options.get("k", 10)
        if isinstance(k, str):  # HTTP clients may send every parameter as a string
            k = int(k) if k.strip().lstrip("-").isdigit() else k
        hybrid = options.get("hybrid", False) in (True, "true", "True", "1")
        record, default_prompt = self.served.current()
        hits = self.service.search(queries, record, default_prompt, k=k, filter=options.get("filter") or None,
                                   collection=options.get("collection") or None, hybrid=hybrid)
        body = [json.dumps([{"id": h.id, "score": h.score, "text": h.text, "metadata": h.metadata} for h in row],
                           ensure_ascii=False).encode("utf-8") for row in hits]
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("hits", np.array(body, dtype=np.object_).reshape(-1, 1))])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self.search(request))
            except CollectionNotFoundError as exc:
                responses.append(self._error(str(exc), pb_utils.TritonError.NOT_FOUND))
            except (SearchRequestError, ModelMismatchError, ValueError) as exc:
                responses.append(self._error(str(exc), pb_utils.TritonError.INVALID_ARG))
            except StoreError as exc:
                responses.append(self._error(f"the store failed: {exc}", pb_utils.TritonError.UNAVAILABLE))
            except Exception as exc:  # one request's failure is not the server's
                responses.append(self._error(f"search failed: {exc}", pb_utils.TritonError.INTERNAL))
        return responses

    @staticmethod
    def _error(message, code):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
