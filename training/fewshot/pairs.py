"""Contrastive examples from class labels (SetFit, Tunstall et al. 2022), with hard negatives.

From a handful of labelled texts, stage 1 of the few-shot classifier builds:
  * pairs (a, b, y): y = 1 for two texts of the same label, y = 0 for different labels, as many
    positives as negatives (SetFit's balanced sampling), for the pairwise contrastive loss; or
  * triples (anchor, positive, negative) for the triplet and InfoNCE losses; or
  * same-class pairs (anchor, positive) with the class id, for the supervised contrastive loss, where
    the batch's other-class texts are the negatives.
Each round visits every example once as an anchor (in a fresh random order) and draws one positive and
one negative for it; `iterations` rounds are SetFit's R. A `hard_fraction` of the negatives are hard:
drawn among the `hard_pool` different-label examples that the current encoder places closest to the
anchor (cosine on `embeddings`); the rest are uniform over the other labels, which keeps the easy,
clearly-separable structure in the loss too. `max_pairs` caps the total for many-class sets (banking77
has 77 x 8 anchors).

`hard_schedule` is the curriculum: `constant` uses `hard_fraction` for every negative; `linear` ramps the
share from 0 at the first anchor drawn to `hard_fraction` at the last (`hard_share`), so the examples come
out easy first, hard last, in the order they are returned (the classifier lays them out so the trainer
visits them in that order). `add_user_pairs` mixes user-written contrast rows into the result.

The result is a `training.data.TrainingData`, the shape the SimCSE trainer's loop consumes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedline.training.data import DataError, TrainingData

log = logging.getLogger(__name__)

PAIR_COLUMNS = ("sent0", "sent1")
TRIPLE_COLUMNS = ("sent0", "sent1", "hard_neg")
HARD_SCHEDULES = ("constant", "linear")


def hard_share(schedule: str, fraction: float, progress: float) -> float:
    """The share of hard negatives at `progress` (0 = first anchor drawn, 1 = last): `fraction` throughout
    (constant), or rising linearly from 0 to `fraction` (linear)."""
    if schedule == "constant":
        return fraction
    if schedule == "linear":
        return fraction * min(1.0, max(0.0, progress))
    raise DataError(f"hard_schedule must be one of {', '.join(HARD_SCHEDULES)}, got {schedule!r}")


@dataclass(frozen=True)
class PairSettings:
    """How many examples to draw and how hard the negatives are."""

    # Rounds over the anchors (SetFit's R; SetFit uses 20). 10 at train-classifier's lr 5e-5: on the
    # validation splits (8 shots, 3 seeds) 20 rounds lost 2.1 on emotion and gained 0.6 on SST-5, and the
    # test splits agreed (benchmarks/README.md, few-shot section); it also halves stage 1.
    iterations: int = 10
    max_pairs: int = 0  # cap on pairs (or triples) in all; 0 = no cap
    hard_fraction: float = 0.5  # share of negatives drawn among the closest different-label examples
    hard_pool: int = 3  # how many closest different-label examples a hard negative is drawn from
    hard_schedule: str = "constant"  # constant | linear (0 -> hard_fraction over the examples, in order)

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise DataError(f"iterations must be >= 1, got {self.iterations}")
        if self.max_pairs < 0:
            raise DataError(f"max_pairs must be >= 0, got {self.max_pairs}")
        if not 0.0 <= self.hard_fraction <= 1.0:
            raise DataError(f"hard_fraction must be in [0, 1], got {self.hard_fraction}")
        if self.hard_pool < 1:
            raise DataError(f"hard_pool must be >= 1, got {self.hard_pool}")
        hard_share(self.hard_schedule, self.hard_fraction, 0.0)  # checks the schedule's name


class _Sampler:
    """Draws positives and (hard or uniform) negatives for anchors, from labels and embeddings.

    Memory stays O(n * hard_pool) (no n x n matrices kept), so a full training file works as well as a
    few-shot sample.
    """

    def __init__(self, labels: list[str], embeddings: np.ndarray | None, settings: PairSettings, seed: int):
        classes, self.codes = np.unique(np.asarray(labels), return_inverse=True)
        self.members = [np.flatnonzero(self.codes == c) for c in range(len(classes))]
        self.settings = settings
        self.rng = np.random.default_rng(seed)
        self.hard: np.ndarray | None = None  # (n, pool) closest other-label examples, nearest first
        self.hard_drawn = 0  # negatives drawn among the closest (for the log and the tests)
        self.negatives_drawn = 0
        has_positive = sum(len(m) for m in self.members if len(m) >= 2)
        self.expected_anchors = settings.iterations * has_positive  # before any max_pairs cap
        if embeddings is not None and settings.hard_fraction > 0:
            if embeddings.shape[0] != len(labels):
                raise DataError(f"{embeddings.shape[0]} embeddings for {len(labels)} examples")
            self.hard = self._closest_other_label(embeddings, settings.hard_pool)

    def _closest_other_label(self, embeddings: np.ndarray, pool: int, block: int = 1024) -> np.ndarray:
        unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
        n = len(unit)
        pool = min(pool, n - max(len(m) for m in self.members))  # every anchor has that many negatives
        out = np.empty((n, pool), dtype=np.int64)
        for start in range(0, n, block):
            rows = slice(start, min(start + block, n))
            similarity = unit[rows] @ unit.T  # (block, n)
            similarity[self.codes[rows, None] == self.codes[None, :]] = -np.inf  # never a same-label negative
            top = np.argpartition(-similarity, pool - 1, axis=1)[:, :pool]
            order = np.argsort(-np.take_along_axis(similarity, top, axis=1), axis=1, kind="stable")
            out[rows] = np.take_along_axis(top, order, axis=1)
        return out

    def positive(self, anchor: int) -> int | None:
        members = self.members[self.codes[anchor]]
        if len(members) < 2:
            return None
        while True:
            candidate = int(self.rng.choice(members))
            if candidate != anchor:
                return candidate

    def negative(self, anchor: int, progress: float = 0.0) -> int:
        """A negative for `anchor`; `progress` (0..1, the anchor's place among all drawn) sets the hard share."""
        self.negatives_drawn += 1
        share = hard_share(self.settings.hard_schedule, self.settings.hard_fraction, progress)
        if self.hard is not None and self.rng.random() < share:
            self.hard_drawn += 1
            return int(self.rng.choice(self.hard[anchor]))
        while True:  # uniform over the other labels' examples (rejection: at least 2 classes exist)
            candidate = int(self.rng.integers(len(self.codes)))
            if self.codes[candidate] != self.codes[anchor]:
                return candidate

    def rounds(self):
        """Anchor orders, one shuffled permutation per round."""
        for _ in range(self.settings.iterations):
            yield self.rng.permutation(len(self.codes))


def _progress(done: int, total: int) -> float:
    """The place of the `done`-th anchor (0-based) among `total`: 0 for the first, 1 for the last."""
    return done / (total - 1) if total > 1 else 1.0


def _check(texts: list[str], labels: list[str]) -> None:
    if len(texts) != len(labels):
        raise DataError(f"{len(texts)} texts but {len(labels)} labels")
    if len(set(labels)) < 2:
        raise DataError("contrastive pairs need at least 2 classes")
    if all(count < 2 for count in np.unique(labels, return_counts=True)[1]):
        raise DataError("contrastive pairs need a class with at least 2 examples (a positive pair)")


def make_pairs(texts: list[str], labels: list[str], embeddings: np.ndarray | None = None,
               settings: PairSettings = PairSettings(), seed: int = 0,
               source: Path = Path("<labelled texts>")) -> TrainingData:
    """Balanced labelled pairs: columns (sent0, sent1), labels 1.0 (same class) / 0.0 (different).

    Anchors of a single-example class have no positive; they are skipped, so the balance holds.
    """
    _check(texts, labels)
    sampler = _Sampler(labels, embeddings, settings, seed)
    first: list[str] = []
    second: list[str] = []
    targets: list[float] = []
    cap = settings.max_pairs or None
    total = min(sampler.expected_anchors, cap // 2) if cap is not None else sampler.expected_anchors
    for order in sampler.rounds():
        for anchor in order:
            if cap is not None and len(targets) + 2 > cap:
                break
            positive = sampler.positive(anchor)
            if positive is None:
                continue
            negative = sampler.negative(anchor, _progress(len(targets) // 2, total))
            first += [texts[anchor], texts[anchor]]
            second += [texts[positive], texts[negative]]
            targets += [1.0, 0.0]
    log.info("%d pairs (%d positive, %d negative, %d of them hard, %s schedule) from %d examples", len(targets),
             len(targets) // 2, len(targets) // 2, sampler.hard_drawn, settings.hard_schedule, len(texts))
    return TrainingData(source, PAIR_COLUMNS, (tuple(first), tuple(second)), tuple(targets), 0)


def make_triples(texts: list[str], labels: list[str], embeddings: np.ndarray | None = None,
                 settings: PairSettings = PairSettings(), seed: int = 0,
                 source: Path = Path("<labelled texts>")) -> TrainingData:
    """(anchor, positive, negative) triples: columns (sent0, sent1, hard_neg), no labels."""
    _check(texts, labels)
    sampler = _Sampler(labels, embeddings, settings, seed)
    columns: tuple[list[str], list[str], list[str]] = ([], [], [])
    cap = settings.max_pairs or None
    total = min(sampler.expected_anchors, cap) if cap is not None else sampler.expected_anchors
    for order in sampler.rounds():
        for anchor in order:
            if cap is not None and len(columns[0]) >= cap:
                break
            positive = sampler.positive(anchor)
            if positive is None:
                continue
            negative = sampler.negative(anchor, _progress(len(columns[0]), total))
            for column, index in zip(columns, (anchor, positive, negative)):
                column.append(texts[index])
    log.info("%d triples (%d hard negatives, %s schedule) from %d examples", len(columns[0]), sampler.hard_drawn,
             settings.hard_schedule, len(texts))
    return TrainingData(source, TRIPLE_COLUMNS, tuple(tuple(c) for c in columns), None, 0)


def make_class_pairs(texts: list[str], labels: list[str], settings: PairSettings = PairSettings(), seed: int = 0,
                     source: Path = Path("<labelled texts>")) -> TrainingData:
    """(anchor, positive) pairs of one class each: columns (sent0, sent1), labels the class ids (0.0, 1.0, ...
    in sorted label order), for the supervised contrastive loss. No negatives are drawn: every text of
    another class in the batch is one (so the hard-negative settings have no effect)."""
    _check(texts, labels)
    sampler = _Sampler(labels, None, settings, seed)
    columns: tuple[list[str], list[str]] = ([], [])
    classes: list[float] = []
    cap = settings.max_pairs or None
    for order in sampler.rounds():
        for anchor in order:
            if cap is not None and len(classes) >= cap:
                break
            positive = sampler.positive(anchor)
            if positive is None:
                continue
            columns[0].append(texts[anchor])
            columns[1].append(texts[positive])
            classes.append(float(sampler.codes[anchor]))
    log.info("%d same-class pairs of %d classes from %d examples", len(classes), len(set(classes)), len(texts))
    return TrainingData(source, PAIR_COLUMNS, tuple(tuple(c) for c in columns), tuple(classes), 0)


def add_user_pairs(examples: TrainingData, columns: tuple[tuple[str, ...], ...], same: tuple[float, ...] | None,
                   repeats: int, seed: int) -> TrainingData:
    """`examples` with user-written rows mixed in, each `repeats` times, at seeded random places (so a
    curriculum's easy-to-hard order keeps its shape around them).

    `columns` are (anchor, positive, negative) when `same` is None, else (text_a, text_b) with `same` 1.0 / 0.0.
    Pairs (examples with labels): a triple becomes (anchor, positive, 1) and (anchor, negative, 0), kept
    adjacent. Triples (no labels): only (anchor, positive, negative) rows fit.
    """
    if repeats < 1:
        raise DataError(f"repeats must be >= 1, got {repeats}")
    pairs_mode = examples.labels is not None
    units: list[list[tuple[tuple[str, ...], float | None]]] = []  # one unit = rows kept adjacent
    for i in range(len(columns[0])):
        if same is None:
            anchor, positive, negative = columns[0][i], columns[1][i], columns[2][i]
            unit = ([((anchor, positive), 1.0), ((anchor, negative), 0.0)] if pairs_mode
                    else [((anchor, positive, negative), None)])
        elif pairs_mode:
            unit = [((columns[0][i], columns[1][i]), same[i])]
        else:
            raise DataError("text_a, text_b, same rows need a pair loss (--loss contrastive or cosine); "
                            "triplet and sup take anchor, positive, negative rows")
        units += [unit] * repeats
    rng = np.random.default_rng(seed)
    base = [[(tuple(column[j] for column in examples.columns), examples.labels[j] if pairs_mode else None)]
            for j in range(len(examples))]
    # Insert each user unit at a uniform random gap between the drawn examples (order within each kept).
    gaps = np.sort(rng.integers(0, len(base) + 1, size=len(units)))
    order = rng.permutation(len(units))
    merged: list[list[tuple[tuple[str, ...], float | None]]] = []
    k = 0
    for gap in range(len(base) + 1):
        while k < len(units) and gaps[k] == gap:
            merged.append(units[order[k]])
            k += 1
        if gap < len(base):
            merged.append(base[gap])
    rows = [row for unit in merged for row in unit]
    new_columns = tuple(tuple(texts[c] for texts, _ in rows) for c in range(len(examples.column_names)))
    labels = tuple(float(y) for _, y in rows) if pairs_mode else None
    return TrainingData(examples.path, examples.column_names, new_columns, labels, examples.skipped_empty)
