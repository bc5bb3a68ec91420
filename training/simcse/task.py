"""What an objective brings to the training loop: its examples, each step's batch and loss, and its dev metric.

The loop (trainer.py: `Run`, `train`) is one for every objective: the batch order, GradCache, checkpoints,
resume, stop signals, best-step selection (the starting model included) and the artifact. A `Task` is what
differs, behind one seam:

  * `SentenceTask` (trainer.py): the sentence objectives (unsup, sup, triplet, contrastive, cosine, supcon) on
    `--train_file`, the best step by STS Spearman on `--dev_file`;
  * `RetrievalTask` (retrieval.py): (query, relevant passage) pairs with mined hard negatives, the best step
    by nDCG@10 on the dev queries.

A task's state that is not weights (e.g. mined negatives) travels in the checkpoint (`state_dict`), so a
resumed run goes on exactly as an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from tokenizers import Tokenizer

from embedline.encoder import SentenceEncoder
from embedline.training.data import Batch
from embedline.training.simcse.losses import ObjectiveLoss


class Task(Protocol):
    """label: the progress bar's; selection: the dev metric whose highest value picks the artifact's step;
    views: encodings of each text per step (2 for unsupervised SimCSE); source, dev_source: the training and
    dev files messages and metrics name."""

    label: str
    selection: str
    views: int
    source: str
    dev_source: str

    def __len__(self) -> int: ...  # training examples: an epoch is len // batch_size steps
    @property
    def has_dev(self) -> bool: ...
    def before_step(self, encoder: SentenceEncoder, tokenizer: Tokenizer, step: int) -> None: ...
    def batch(self, step: int, indices: list[int], rows: slice) -> tuple[Batch, ObjectiveLoss]: ...
    def evaluate(self, encoder: SentenceEncoder, tokenizer: Tokenizer) -> dict[str, float]: ...
    def describe(self, result: dict[str, float]) -> str: ...
    def log_record(self) -> dict[str, Any]: ...  # extra fields of a metrics line (since the last one)
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def artifact_metrics(self) -> dict[str, Any]: ...
    def finish_artifact(self, output: Path) -> None: ...
