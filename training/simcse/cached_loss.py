"""One training step's forward + backward, plain or cached (GradCache), for any embedding loss.

Plain: encode every text of the batch in one forward pass, compute the loss, backpropagate.

Cached (Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup", 2021):
  1. encode the batch in chunks of `mini_batch_size` texts without building a graph, recording the
     RNG state before each chunk;
  2. compute the loss on the detached embeddings and its gradient with respect to each embedding;
  3. encode each chunk again with a graph, *replaying its recorded RNG state* so dropout draws the same
     masks as in pass 1, and backpropagate the cached embedding gradients through it.
The parameter gradients equal the plain step's, while memory holds one chunk's activations. The RNG
replay is not an optimization: in unsupervised SimCSE the dropout noise *is* the positive pair, so a
second pass with fresh masks would backpropagate through different embeddings than the loss saw.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

Features = dict[str, torch.Tensor]  # input_ids, attention_mask: (rows, seq)
LossOnEmbeddings = Callable[[torch.Tensor], torch.Tensor]  # (rows, dim) -> scalar


class RandState:
    """The CPU and current-CUDA-device RNG states, to replay a forward pass's dropout masks."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block with the recorded RNG state; the global RNG is left as it was before."""
        devices = [self.device] if self.cuda_state is not None else []
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.set_rng_state(self.cpu_state)
            if self.cuda_state is not None:
                torch.cuda.set_rng_state(self.cuda_state, self.device)
            yield


def _full_precision(embeddings: torch.Tensor) -> torch.Tensor:
    """Losses run in float32 (or float64) even when the forward pass ran under fp16/bf16 autocast."""
    return embeddings.float() if embeddings.dtype in (torch.float16, torch.bfloat16) else embeddings


def split_features(features: Features, size: int) -> Iterator[Features]:
    """Chunks of `size` rows, each trimmed to its own longest sequence (right padding)."""
    rows = features["attention_mask"].shape[0]
    for start in range(0, rows, size):
        mask = features["attention_mask"][start : start + size]
        length = int(mask.sum(dim=1).max())
        yield {name: tensor[start : start + size, :length] for name, tensor in features.items()}


def plain_backward(
    model: nn.Module,
    features: Features,
    loss_fn: LossOnEmbeddings,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss,
) -> torch.Tensor:
    """Forward all rows at once, backward the loss. Returns the (unscaled, detached) loss."""
    with autocast():
        embeddings = model(**features)  # (rows, dim)
    loss = loss_fn(_full_precision(embeddings))
    scale(loss).backward()
    return loss.detach()


def cached_backward(
    model: nn.Module,
    features: Features,
    loss_fn: LossOnEmbeddings,
    mini_batch_size: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss,
    replay_rng: bool = True,
) -> torch.Tensor:
    """GradCache: the same parameter gradients as `plain_backward` in one chunk's memory.

    `replay_rng=False` exists only to show (in the tests) that the gradients are wrong without it.
    """
    device = features["input_ids"].device
    chunks = list(split_features(features, mini_batch_size))

    # Pass 1: embeddings without a graph, and the RNG state each chunk started from.
    states: list[RandState] = []
    pieces: list[torch.Tensor] = []
    with torch.no_grad():
        for chunk in chunks:
            states.append(RandState(device))
            with autocast():
                pieces.append(_full_precision(model(**chunk)))
    embeddings = torch.cat(pieces).requires_grad_()  # (rows, dim), a leaf
    loss = loss_fn(embeddings)
    scale(loss).backward()  # fills embeddings.grad only (and runs any cross-process gather's backward)
    embedding_grads = embeddings.grad.split([piece.shape[0] for piece in pieces])

    # Pass 2: re-encode each chunk with a graph, same dropout masks, and push the cached gradient in.
    for i, (chunk, state, grad) in enumerate(zip(chunks, states, embedding_grads)):
        last = i == len(chunks) - 1
        # DDP all-reduces parameter gradients once, after the last chunk's backward.
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        replay = state.replay() if replay_rng else contextlib.nullcontext()
        with sync:
            with replay, autocast():
                chunk_embeddings = model(**chunk)
            # d(surrogate)/d(chunk_embeddings) = grad, so the parameters get d(loss)/d(parameters).
            surrogate = torch.dot(_full_precision(chunk_embeddings).flatten(), grad.flatten())
            surrogate.backward()
    return loss.detach()
