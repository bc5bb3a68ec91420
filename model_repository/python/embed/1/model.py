"""Triton python-backend model `embed`: UTF-8 texts -> tokens -> encoder engine -> sentence embeddings.

Runs on the embedded tritonserver (PyPI nvidia-pytriton). The graph contains pooling and L2
normalization, so its output is the final `sentence_embedding`. Every request of a dynamic batch is
tokenized together; with length grouping on (the default) the texts are sorted by length and cut into
the engine runs that waste the least padding (text_batch.plan_groups), each padded to its own longest;
off, the whole batch is padded to its longest in arrival order. The engine (ONNX Runtime on CPU/CUDA, or
OpenVINO on CPU) is chosen by the config's `engine` parameter (engines.py). Texts seen lately are answered
from the instance's cache of their embeddings (embedding_cache.py). With an index served
(`store_uri` set), the requests that ask for `hits` are also ranked against the store (search_step.py).
"""

import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(__file__))
from embedding_cache import EmbeddingCache  # noqa: E402
from engines import load_engine  # noqa: E402
from parent_watch import exit_with_parent  # noqa: E402
from text_batch import (  # noqa: E402
    TextTokenizer, arrival_groups, model_parameters, plan_groups, respond, version_dir,
)


class TritonPythonModel:
    def initialize(self, args):
        exit_with_parent()  # no model process outlives its tritonserver (parent_watch.py)
        params = model_parameters(args)
        directory = version_dir(args)
        self.dim = int(params["dim"])
        self.group_size = int(params["length_group_size"])
        self.length_grouping = params["length_grouping"] == "true"
        self.overhead_tokens = int(params["group_overhead_tokens"])
        self.max_group_tokens = int(params["max_group_tokens"])
        self.tokenizer = TextTokenizer(os.path.join(directory, "tokenizer.json"), int(params["max_seq_length"]))
        gpu = args.get("model_instance_kind") == "GPU"
        self.engine = load_engine(directory, params, int(args["model_instance_device_id"]) if gpu else None)
        entries = int(params["embedding_cache_entries"])
        self.cache = EmbeddingCache(entries) if entries > 0 else None
        self.search = None
        if params["store_uri"]:
            from search_step import SearchStep  # imports embedline.search: only where an index is served

            self.search = SearchStep(params, pb_utils)

    def groups(self, ids):
        if self.length_grouping:
            return plan_groups([len(row) for row in ids], self.group_size, self.overhead_tokens,
                               self.max_group_tokens)
        return arrival_groups(len(ids), max(1, len(ids)))

    def embed(self, texts):
        """texts -> (embeddings float32 (n, dim), truncated bool (n,)); repeated texts from the cache."""
        if self.cache is None:
            return self.run_engine(texts)
        return self.cache.embed(texts, self.run_engine)

    def run_engine(self, texts):
        ids, truncated = self.tokenizer.tokenize(texts)
        groups = self.groups(ids)
        outputs = self.engine.run_many([self.tokenizer.pad([ids[i] for i in group]) for group in groups])
        embeddings = np.empty((len(texts), self.dim), dtype=np.float32)
        for group, output in zip(groups, outputs):
            embeddings[group] = output
        return embeddings, truncated

    def execute(self, requests):
        def compute(texts):
            embeddings, truncated = self.embed(texts)
            return {"sentence_embedding": embeddings, "truncated": truncated.reshape(-1, 1)}

        responses = respond(requests, pb_utils, compute)
        return responses if self.search is None else self.search.answer(requests, responses)
