"""What the clients return (ModelInfo, EmbedResult, Prediction) and what they know of a served model (_ModelSpec)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ModelInfo:
    """What the server says about the model it serves (read once from the model configs, then cached).

    `labels` is the `classify` model's label order, empty when the server has no `classify` model.
    """

    model_name: str
    dim: int
    max_seq_length: int
    variant: str
    pooling: str
    max_batch_size: int
    labels: tuple[str, ...] = ()
    # Every model the server serves, by name (the first is the default); `model=` takes one of these.
    served_models: tuple[str, ...] = ()
    # The dims a Matryoshka loss trained the model for (`embed(..., dimensions=k)` keeps quality at
    # these); empty when it was not trained for truncation, which then still works but loses more.
    matryoshka_dims: tuple[int, ...] = ()
    # Non-empty when the server's CPU has other int8 instructions than the one that exported the model
    # and chose its variant by speed: the variant may not be the fastest there.
    host_warning: str = ""
    # Named prompts (name -> the text prepended to each input), for `embed(..., prompt_name=...)`, and the
    # one a call that names none gets ("" for none). Empty for a model without prompts.
    prompts: dict[str, str] = field(default_factory=dict, hash=False, compare=True)
    default_prompt_name: str = ""
    # A hash of the model's weights ("sha256:..."): the identity of its vector space, which a search
    # collection records. "" from a server built before it existed.
    fingerprint: str = ""


@dataclass(frozen=True, eq=False)
class EmbedResult:
    """Embeddings plus, per text, whether the server cut it to max_seq_length tokens.

    embeddings: (n, dim) float32, L2-normalized, in input order
    truncated:  (n,) bool
    """

    embeddings: np.ndarray
    truncated: np.ndarray

    def __len__(self) -> int:
        return len(self.embeddings)


@dataclass(frozen=True)
class Prediction:
    """One text's classification: the top label, its probability, all probabilities by label."""

    label: str
    score: float
    probabilities: dict[str, float] = field(hash=False)
    truncated: bool = False
    # Labels of the k training examples nearest to the text, nearest first, when the server keeps them
    # (an artifact trained with `--neighbours K`); mixed labels flag a doubtful prediction. Else ().
    neighbour_labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class Hit:
    """One document a search ranked: its id, score (cosine similarity; with hybrid, the fused rank score),
    text and metadata."""

    id: str
    score: float
    text: str
    metadata: dict = field(hash=False)


@dataclass(frozen=True)
class _ModelSpec:
    """The parts of one model's config the client uses."""

    name: str
    max_batch_size: int
    parameters: dict[str, str] = field(hash=False)
    url: str = ""  # the replica it was read from, named by errors about the config
    instances: int = 1       # model instances (instance_group counts summed): batches run side by side
    max_queue_size: int = 0  # the dynamic batcher's queue bound; 0: unbounded (or not said)
