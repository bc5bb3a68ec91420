"""embedline's client SDK: embed and classify texts through a Triton Inference Server over gRPC.

Needs only numpy and tritonclient[grpc] (the bare `pip install embedline`): no torch, transformers,
onnx, tokenizers or onnxruntime; the server tokenizes.

    from embedline.client import EmbeddingClient

    with EmbeddingClient("127.0.0.1:8001") as client:
        if client.health():
            embeddings = client.embed(["A man is eating food.", "A man is riding a horse."])
            # (2, 384) float32, L2-normalized, in input order
            result = client.embed_with_details(["a very long text ..."])
            # result.embeddings (n, dim), result.truncated (n,) bool: cut to max_seq_length tokens
            print(client.info())   # ModelInfo(model_name=..., dim=384, max_seq_length=256, ...)

Several replicas of one server, an API key (else read from $EMBEDLINE_API_KEY) and TLS:

    client = EmbeddingClient(["host1:8001", "host2:8001"], api_key="...", ssl=True, root_certificates="ca.pem")

Requests take turns over the replicas; an unavailable or overloaded replica's request is retried on
another at once, then with jittered backoff, all within the call's timeout.

`AsyncEmbeddingClient` has the same methods as coroutines (`async with`, `await client.embed(...)`).
One return type per function: `embed` -> ndarray, `embed_with_details` -> EmbedResult,
`classify` -> list[Prediction], `info` -> ModelInfo, `health` -> bool.
Errors are `EmbeddingClientError` subclasses (see `embedline.client.errors`): ServerUnavailableError
(and its ServerOverloadedError), AuthenticationError, InvalidInputError, ModelNotFoundError,
DeadlineExceededError, ServerError.
"""

from embedline.client.aio import AsyncEmbeddingClient
from embedline.client.errors import (
    AuthenticationError,
    CollectionNotFoundError,
    DeadlineExceededError,
    EmbeddingClientError,
    InvalidInputError,
    ModelNotFoundError,
    ServerError,
    ServerOverloadedError,
    ServerUnavailableError,
)
from embedline.client.results import EmbedResult, Hit, ModelInfo, Prediction
from embedline.client.retry import RetryPolicy
from embedline.client.sync import EmbeddingClient

__all__ = [
    "AsyncEmbeddingClient",
    "AuthenticationError",
    "CollectionNotFoundError",
    "DeadlineExceededError",
    "EmbedResult",
    "EmbeddingClient",
    "EmbeddingClientError",
    "Hit",
    "InvalidInputError",
    "ModelInfo",
    "ModelNotFoundError",
    "Prediction",
    "RetryPolicy",
    "ServerError",
    "ServerOverloadedError",
    "ServerUnavailableError",
]
