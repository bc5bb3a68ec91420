"""Contrastive losses over sentence embeddings: InfoNCE (SimCSE), InfoNCE with a false-negative guard
(retrieval), supervised contrastive, triplet, pairwise contrastive and cosine-similarity regression (SetFit's).

Each loss is a plain function of embedding tensors (and labels), so any loop can use it: the SimCSE
trainer here, or a few-shot classifier trainer that feeds SetFit-style labelled pairs. `make_loss`
binds an objective's hyperparameters into an `ObjectiveLoss`: (embedding columns, labels) -> scalar,
where the columns are the per-column embeddings of a `data.Batch`. `matryoshka_loss` wraps any
`ObjectiveLoss` so that the first k dimensions of each embedding are trained to work on their own too;
since it acts on the embedding columns, the plain and the cached (GradCache) step share it unchanged.

All similarities are cosine; embeddings need not be normalized beforehand.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

# (embedding columns, each (batch, dim); labels (batch,) or None) -> scalar loss
ObjectiveLoss = Callable[[Sequence[torch.Tensor], torch.Tensor | None], torch.Tensor]
# Gathers a (local_batch, dim) tensor from every process -> (world * local_batch, dim), plus the offset of
# this process's rows in the result. Identity (offset 0) in a single process.
Gather = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


def _no_gather(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    return tensor, 0


def cosine_similarity_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, dim), (m, dim) -> (n, m) cosine similarities."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def info_nce_loss(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    temperature: float = 0.05,
    positive_offset: int = 0,
) -> torch.Tensor:
    """InfoNCE / NT-Xent over cosine similarities (SimCSE, Gao, Yao & Chen, EMNLP 2021, eq. 1 and 5).

    anchors (n, dim); candidates (m, dim) with m >= n, where `candidates[positive_offset + i]` is anchor
    i's positive and every other candidate is a negative. The loss is the mean over anchors of

        -log( exp(cos(h_i, h_i+) * scale) / sum_j exp(cos(h_i, h_j) * scale) ),   scale = 1 / temperature

    (scale = 20 for the paper's temperature 0.05, as sentence-transformers' MultipleNegativesRankingLoss).
    """
    scores = cosine_similarity_matrix(anchors, candidates) / temperature  # (n, m)
    targets = torch.arange(anchors.shape[0], device=anchors.device) + positive_offset
    return F.cross_entropy(scores, targets)


def simcse_loss(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    hard_negatives: torch.Tensor | None = None,
    temperature: float = 0.05,
    gather: Gather = _no_gather,
) -> torch.Tensor:
    """SimCSE's loss (Gao, Yao & Chen, EMNLP 2021), scale = 1 / temperature.

    Unsupervised: anchors and positives are two encodings of the same sentences under independent
    dropout masks. Supervised: (premise, entailment) pairs, and each premise's contradiction hypothesis
    as a hard negative; the candidates are all positives followed by all hard negatives (eq. 5).
    With several processes, `gather` collects the candidates of every process so the negatives include
    the whole global batch; this process's anchors' positives then start at its offset.
    """
    candidates, offset = gather(positives)  # (global_batch, dim)
    if hard_negatives is not None:
        gathered_negatives, _ = gather(hard_negatives)
        candidates = torch.cat([candidates, gathered_negatives])  # (2 * global_batch, dim)
    return info_nce_loss(anchors, candidates, temperature, positive_offset=offset)


def guarded_info_nce_loss(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    temperature: float,
    positive_offset: int,
    excluded: torch.Tensor,
    guarded: torch.Tensor | None = None,
    margin: float | None = None,
) -> tuple[torch.Tensor, int]:
    """InfoNCE (as `info_nce_loss`) with a false-negative guard; -> (loss, negatives the margin dropped).

    The retrieval objective's loss (DPR: in-batch negatives plus mined hard negatives). anchors (n, dim) are
    queries, candidates (m, dim) the passages (every positive of the batch, then every mined negative), and
    `candidates[positive_offset + i]` is anchor i's positive. Two kinds of candidate are not negatives:

      * `excluded` (n, m) bool: a passage labelled relevant to the anchor (another query's positive, a
        mined negative of another query, the same passage twice) is taken out of the softmax;
      * `guarded` (n, m) bool marks each anchor's own mined negatives: with `margin`, one whose cosine to the
        anchor is above the positive's minus `margin` is taken out too (an unlabelled relevant passage looks
        exactly like that; NV-Retriever's "positive-aware" mining, Moreira et al. 2024, applied per step).

    The decision uses the detached cosines; anchor i's positive is never taken out.
    """
    cosines = cosine_similarity_matrix(anchors, candidates)  # (n, m)
    rows = torch.arange(anchors.shape[0], device=anchors.device)
    targets = rows + positive_offset
    masked = excluded.clone()
    dropped = 0
    if guarded is not None and margin is not None:
        with torch.no_grad():
            positive = cosines[rows, targets].detach()
            too_close = guarded & (cosines.detach() > positive[:, None] - margin)
        dropped = int(too_close.sum())
        masked |= too_close
    masked[rows, targets] = False
    scores = (cosines / temperature).masked_fill(masked, float("-inf"))
    return F.cross_entropy(scores, targets), dropped


def triplet_loss(
    anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, margin: float = 0.5
) -> torch.Tensor:
    """Triplet margin loss (Schroff et al., FaceNet, CVPR 2015; Reimers & Gurevych 2019 for sentences)
    with cosine distance d = 1 - cos:  mean( max(0, d(a, p) - d(a, n) + margin) ). No temperature."""
    d_pos = 1.0 - F.cosine_similarity(anchors, positives, dim=-1)
    d_neg = 1.0 - F.cosine_similarity(anchors, negatives, dim=-1)
    return F.relu(d_pos - d_neg + margin).mean()


def contrastive_loss(
    embeddings_a: torch.Tensor, embeddings_b: torch.Tensor, labels: torch.Tensor, margin: float = 0.5
) -> torch.Tensor:
    """Pairwise contrastive loss (Hadsell, Chopra & LeCun, CVPR 2006) with cosine distance d = 1 - cos:

        mean( 0.5 * [ y * d^2 + (1 - y) * max(0, margin - d)^2 ] ),   y = 1 similar, 0 dissimilar

    (the form of sentence-transformers' ContrastiveLoss). Labels may be soft, in [0, 1].
    """
    distances = 1.0 - F.cosine_similarity(embeddings_a, embeddings_b, dim=-1)
    labels = labels.to(distances.dtype)
    losses = labels * distances.pow(2) + (1.0 - labels) * F.relu(margin - distances).pow(2)
    return 0.5 * losses.mean()


def cosine_similarity_loss(
    embeddings_a: torch.Tensor, embeddings_b: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """mean( (cos(a, b) - y)^2 ): sentence-transformers' CosineSimilarityLoss, the pair loss of SetFit
    (Tunstall et al. 2022) with y = 1 for a same-class pair and 0 for a different-class one. Unlike the
    contrastive loss with margin 1, a negative pair below cos 0 is pulled back up to 0."""
    cosines = F.cosine_similarity(embeddings_a, embeddings_b, dim=-1)
    return (cosines - labels.to(cosines.dtype)).pow(2).mean()


def supervised_contrastive_loss(
    embeddings: torch.Tensor, classes: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., NeurIPS 2020, eq. 2, "L_out"): every other text of the
    same class in the batch is a positive, every text of another class a negative.

    embeddings (n, dim), classes (n,) integer class ids. For each text i that has at least one positive,

        -1/|P(i)| * sum_{p in P(i)} log( exp(cos(h_i, h_p) / t) / sum_{a != i} exp(cos(h_i, h_a) / t) )

    averaged over those texts. Unlike InfoNCE over (anchor, positive) pairs, a same-class text elsewhere
    in the batch is never pushed away as a negative: with few classes most of a batch shares a class.
    """
    scores = cosine_similarity_matrix(embeddings, embeddings) / temperature  # (n, n)
    self_mask = torch.eye(len(embeddings), dtype=torch.bool, device=embeddings.device)
    scores = scores.masked_fill(self_mask, float("-inf"))  # a text is neither its own positive nor negative
    log_prob = scores - torch.logsumexp(scores, dim=1, keepdim=True)
    positives = (classes[:, None] == classes[None, :]) & ~self_mask
    counts = positives.sum(dim=1)
    has_positive = counts > 0
    if not bool(has_positive.any()):
        raise ValueError("supervised contrastive loss: no two texts of the batch share a class")
    positive_log_prob = log_prob.masked_fill(~positives, 0.0).sum(dim=1)
    return -(positive_log_prob[has_positive] / counts[has_positive]).mean()


def matryoshka_loss(
    loss_fn: ObjectiveLoss, dims: Sequence[int], weights: Sequence[float] | None = None
) -> ObjectiveLoss:
    """Matryoshka Representation Learning (Kusupati et al., NeurIPS 2022, "Matryoshka Representation
    Learning"): the same loss on nested prefixes of the embedding, so a served vector can be cut to its
    first k dimensions (and re-normalized) and still work.

    For each k in `dims`, `loss_fn` runs on the first k dimensions of every embedding column; its cosine
    similarities re-normalize the truncated vectors (for SimCSE still scale = 1 / temperature). The result
    is the weighted mean over the dims, equal weights by default:

        L = sum_k w_k * loss(columns[:, :k]) / sum_k w_k

    sentence-transformers' MatryoshkaLoss does the same with a weighted *sum*; the mean keeps the loss on
    the plain loss's scale (so `dims == (full,)` is exactly the plain loss, and logged losses, the
    learning rate and gradient clipping keep their meaning). The encoder runs once; only the loss, which
    is cheap next to it, runs once per dim. `loss_fn` can be any `ObjectiveLoss` (unsup/sup SimCSE with
    hard negatives, triplet, contrastive), and with several processes each dim gathers its own slice.
    """
    dims = tuple(int(k) for k in dims)
    if not dims:
        raise ValueError("matryoshka_loss needs at least one dimension")
    if any(k < 1 for k in dims) or len(set(dims)) != len(dims):
        raise ValueError(f"Matryoshka dims must be distinct and >= 1, got {dims}")
    weights = tuple(float(w) for w in weights) if weights is not None else (1.0,) * len(dims)
    if len(weights) != len(dims) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"need one non-negative weight per dim (not all 0), got {weights} for {dims}")
    total_weight = sum(weights)

    def loss(columns: Sequence[torch.Tensor], labels: torch.Tensor | None) -> torch.Tensor:
        dim = columns[0].shape[-1]
        if max(dims) > dim:
            raise ValueError(f"Matryoshka dim {max(dims)} is larger than the embeddings' {dim}")
        per_dim = [loss_fn([column[..., :k] for column in columns], labels) for k in dims]
        return sum(w * value for w, value in zip(weights, per_dim)) / total_weight

    return loss


def make_loss(objective: str, temperature: float = 0.05, margin: float = 0.5,
              gather: Gather = _no_gather, matryoshka_dims: Sequence[int] = ()) -> ObjectiveLoss:
    """The loss of a training objective, taking a batch's embedding columns (and labels).

    unsup: columns (view1, view2) of the same sentences; sup: (anchor, positive[, hard_negative]);
    triplet: (anchor, positive, negative); contrastive, cosine: (a, b) with labels; supcon: (a, b) of the class
    `labels` (integer ids), every same-class text of the batch a positive.
    `matryoshka_dims` non-empty: that loss wrapped in `matryoshka_loss` with equal weights.
    """

    def unsup_or_sup(columns: Sequence[torch.Tensor], labels: torch.Tensor | None) -> torch.Tensor:
        hard_negatives = columns[2] if len(columns) > 2 else None
        return simcse_loss(columns[0], columns[1], hard_negatives, temperature, gather)

    def triplet(columns: Sequence[torch.Tensor], labels: torch.Tensor | None) -> torch.Tensor:
        return triplet_loss(columns[0], columns[1], columns[2], margin)

    def contrastive(columns: Sequence[torch.Tensor], labels: torch.Tensor | None) -> torch.Tensor:
        if labels is None:
            raise ValueError("the contrastive loss needs labels")
        return contrastive_loss(columns[0], columns[1], labels, margin)

    def cosine(columns: Sequence[torch.Tensor], labels: torch.Tensor | None) -> torch.Tensor:
        if labels is None:
            raise ValueError("the cosine similarity loss needs labels")
        return cosine_similarity_loss(columns[0], columns[1], labels)

    def supcon(columns: Sequence[torch.Tensor], labels: torch.Tensor | None) -> torch.Tensor:
        if labels is None:
            raise ValueError("the supervised contrastive loss needs class labels")
        classes = labels.long().repeat(len(columns))  # every column's row i has row i's class
        return supervised_contrastive_loss(torch.cat(list(columns)), classes, temperature)

    losses = {"unsup": unsup_or_sup, "sup": unsup_or_sup, "triplet": triplet, "contrastive": contrastive,
              "cosine": cosine, "supcon": supcon}
    if objective not in losses:
        raise ValueError(f"unknown objective {objective!r}; expected one of {', '.join(losses)}")
    if matryoshka_dims:
        return matryoshka_loss(losses[objective], matryoshka_dims)
    return losses[objective]
