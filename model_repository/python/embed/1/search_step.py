"""The `embed` model's rank step, present when the server serves an index (`serve --index`): the requests of a
dynamic batch that ask for `hits` (the `search` ensemble's) are ranked against the store with the vectors this
model just computed.

Ranking here, in the process that embeds, spares a search one more python-backend step (a trip through shared
memory and the stub) between the query's vector and its hits. The ranking itself is embedline.search.service
(the server's environment has embedline installed: only `serve --index` / `build-repo --index` set the store).
This file is the Triton seam: each request is ranked with its own options (Triton's request parameters,
forwarded by the ensemble), and errors become statuses: a bad request is INVALID_ARG, an unknown collection
NOT_FOUND, a store that cannot be reached UNAVAILABLE. One request's error is that request's alone.
"""

import json

import numpy as np

from embedline.search.service import CollectionNotFoundError, SearchRequest, SearchRequestError, SearchService
from embedline.search.store import ModelMismatchError, ModelRecord, StoreError

HITS = "hits"
EMBEDDING = "sentence_embedding"


class SearchStep:
    def __init__(self, params, pb_utils):
        """`params`: the embed model's config parameters (its store and the model's record)."""
        try:  # one query at a time: OpenMP's thread team costs more than it saves, beside the engine's threads
            import faiss

            faiss.omp_set_num_threads(1)
        except ImportError:  # a store without faiss (Milvus)
            pass
        self.pb_utils = pb_utils
        prompts = json.loads(params["prompts"])
        # This model's own record: a collection indexed with other weights is refused, also after `publish`
        # (each version ranks with its own).
        self.record = ModelRecord.for_model(params["model_name"], int(params["dim"]), params["fingerprint"], prompts)
        self.default_prompt = prompts.get(params["default_prompt_name"], "")
        self.store_uri, self._service = params["store_uri"], None

    def service(self):
        """Opened at the first search, so that a store down at start-up fails searches, never embedding."""
        if self._service is None:
            self._service = SearchService(self.store_uri)
        return self._service

    @staticmethod
    def wants_hits(request):
        """A search (the ensemble asks for `hits` alone); an embed call that names no outputs is not one."""
        names = request.requested_output_names()
        return HITS in names and EMBEDDING not in names

    def answer(self, requests, responses):
        """`responses` with each searching request's embedding response replaced by its hits (or its error)."""
        searching = [i for i, request in enumerate(requests)
                     if not responses[i].has_error() and self.wants_hits(request)]
        if not searching:
            return responses
        parsed = {}
        for i in searching:
            try:
                parsed[i] = self.request_of(requests[i], responses[i])
            except (ValueError, TypeError) as exc:  # options that do not parse
                parsed[i] = SearchRequestError(f"bad search parameters: {exc}")
        valid = [r for r in parsed.values() if isinstance(r, SearchRequest)]
        try:
            ranked = iter(self.service().search_many(valid, self.record, self.default_prompt) if valid else [])
        except Exception as exc:  # noqa: BLE001 (the store could not be opened: these searches fail, embedding goes on)
            ranked = iter([exc] * len(valid))
        for i, request in parsed.items():
            responses[i] = self._response(request if isinstance(request, Exception) else next(ranked))
        return responses

    def request_of(self, request, response):
        """A Triton request and its embedding response -> SearchRequest (its options from the request parameters)."""
        pb_utils = self.pb_utils
        queries = [q.decode("utf-8", errors="replace")
                   for q in pb_utils.get_input_tensor_by_name(request, "text").as_numpy().reshape(-1)]
        vectors = pb_utils.get_output_tensor_by_name(response, EMBEDDING).as_numpy()
        options = json.loads(request.parameters() or "{}")
        k = options.get("k", 10)
        if isinstance(k, str):  # HTTP clients may send every parameter as a string
            k = int(k) if k.strip().lstrip("-").isdigit() else k
        hybrid = options.get("hybrid", False) in (True, "true", "True", "1")
        return SearchRequest(queries, vectors, k, options.get("filter") or None, options.get("collection") or None,
                             hybrid)

    def _response(self, result):
        pb_utils = self.pb_utils
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
            pb_utils.Tensor(HITS, np.array(body, dtype=np.object_).reshape(-1, 1))])

    def _error(self, message, code):
        return self.pb_utils.InferenceResponse(error=self.pb_utils.TritonError(message, code))
