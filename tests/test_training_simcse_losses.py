"""The contrastive losses against values computed by hand (and against sentence-transformers' MNRL)."""

import math

import pytest
import torch

from embedline.training.simcse.losses import (
    contrastive_loss, cosine_similarity_loss, info_nce_loss, make_loss, simcse_loss, supervised_contrastive_loss,
    triplet_loss,
)

E1, E2 = [1.0, 0.0], [0.0, 1.0]
P68, P86 = [0.6, 0.8], [0.8, 0.6]  # unit vectors: cos(E1, P68) = 0.6, cos(E1, P86) = 0.8


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_info_nce_two_orthogonal_pairs():
    # scores = cos / temperature = [[2, 0], [0, 2]] at temperature 0.5; each row: -log(e^2 / (e^2 + e^0)).
    loss = info_nce_loss(t(E1, E2), t(E1, E2), temperature=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-12)


def test_scale_is_inverse_temperature_and_cosine_ignores_norms():
    a, c = t(E1, E2), t(P68, P86)
    expected = info_nce_loss(a, c, temperature=0.05)
    # Scaling the vectors changes nothing (cosine); temperature 0.05 means logits = 20 * cos.
    assert info_nce_loss(3 * a, 0.1 * c, temperature=0.05).item() == pytest.approx(expected.item(), abs=1e-12)
    by_hand = -(20 * 0.6) + math.log(math.exp(20 * 0.6) + math.exp(20 * 0.8))
    assert expected.item() == pytest.approx(by_hand, abs=1e-9)


def test_supervised_simcse_with_hard_negatives():
    # Anchors E1, E2; positives P68, P86; hard negatives E2, E1; temperature 1 -> logits = cosines.
    # Row 1 candidates [P68, P86, E2, E1] -> cos [0.6, 0.8, 0, 1], target 0.
    # Row 2 candidates -> cos [0.8, 0.6, 1, 0], target 1. Both rows: -0.6 + log(e^.6 + e^.8 + e^0 + e^1).
    loss = simcse_loss(t(E1, E2), t(P68, P86), t(E2, E1), temperature=1.0)
    by_hand = -0.6 + math.log(math.exp(0.6) + math.exp(0.8) + math.exp(0.0) + math.exp(1.0))
    assert loss.item() == pytest.approx(by_hand, abs=1e-12)
    without = simcse_loss(t(E1, E2), t(P68, P86), temperature=1.0)
    assert without.item() == pytest.approx(-0.6 + math.log(math.exp(0.6) + math.exp(0.8)), abs=1e-12)


def test_triplet_loss_by_hand():
    # d = 1 - cos. Triplet 1: d(a,p) = 0.4, d(a,n) = 0.2 -> 0.4 - 0.2 + 0.5 = 0.7. Triplet 2: 0 - 1 + 0.5 < 0 -> 0.
    loss = triplet_loss(t(E1, E1), t(P68, E1), t(P86, E2), margin=0.5)
    assert loss.item() == pytest.approx((0.7 + 0.0) / 2, abs=1e-12)


def test_contrastive_loss_by_hand():
    # Similar pair, d = 0.4: 0.5 * 0.4^2 = 0.08. Dissimilar, d = 0.2: 0.5 * (0.5 - 0.2)^2 = 0.045.
    # Dissimilar, d = 1 >= margin: 0.
    loss = contrastive_loss(t(E1, E1, E1), t(P68, P86, E2), torch.tensor([1.0, 0.0, 0.0]), margin=0.5)
    assert loss.item() == pytest.approx((0.08 + 0.045 + 0.0) / 3, abs=1e-12)


def test_cosine_similarity_loss_by_hand():
    # Same class, cos 0.6: (0.6 - 1)^2 = 0.16. Different, cos 0.8: 0.64. Different, cos -0.6: 0.36 (a negative
    # pair below 0 is pulled back to 0, unlike the contrastive loss with margin 1).
    loss = cosine_similarity_loss(t(E1, E1, E1), t(P68, P86, [-0.6, 0.8]), torch.tensor([1.0, 0.0, 0.0]))
    assert loss.item() == pytest.approx((0.16 + 0.64 + 0.36) / 3, abs=1e-12)
    labels = torch.tensor([1.0, 0.0, 0.0])
    assert make_loss("cosine")([t(E1, E1, E1), t(P68, P86, E2)], labels).item() == pytest.approx((0.16 + 0.64) / 3)
    with pytest.raises(ValueError, match="needs labels"):
        make_loss("cosine")([t(E1), t(E2)], None)


def test_supervised_contrastive_loss_by_hand():
    # Texts E1, P68 (class 0) and E2 (class 2), temperature 1 -> logits = cosines, self excluded.
    # E1: positive P68 (0.6) among {P68 0.6, E2 0};  P68: positive E1 (0.6) among {E1 0.6, E2 0.8};
    # E2 has no positive and is left out of the mean.
    loss = supervised_contrastive_loss(t(E1, P68, E2), torch.tensor([0, 0, 2]), temperature=1.0)
    e1 = -0.6 + math.log(math.exp(0.6) + math.exp(0.0))
    p68 = -0.6 + math.log(math.exp(0.6) + math.exp(0.8))
    assert loss.item() == pytest.approx((e1 + p68) / 2, abs=1e-12)
    # Two positives: the mean of their log-probabilities.
    loss = supervised_contrastive_loss(t(E1, P68, P86), torch.tensor([1, 1, 1]), temperature=1.0)
    e1 = -(0.6 + 0.8) / 2 + math.log(math.exp(0.6) + math.exp(0.8))
    p68 = -(0.6 + 0.96) / 2 + math.log(math.exp(0.6) + math.exp(0.96))
    p86 = -(0.8 + 0.96) / 2 + math.log(math.exp(0.8) + math.exp(0.96))
    assert loss.item() == pytest.approx((e1 + p68 + p86) / 3, abs=1e-12)
    with pytest.raises(ValueError, match="no two texts of the batch share a class"):
        supervised_contrastive_loss(t(E1, E2), torch.tensor([0, 1]))


def test_supcon_never_pushes_a_same_class_text_away():
    # InfoNCE over (anchor, positive) pairs treats the other pair's texts as negatives even when they share
    # the class; the supervised contrastive loss pulls them in. Its gradient moves E1 towards every text of
    # its class.
    anchors = t(E1, P68).requires_grad_()
    positives = t(P86, [0.0, 1.0])
    make_loss("supcon", temperature=0.1)([anchors, positives], torch.tensor([3.0, 3.0])).backward()
    # Descent direction -grad at E1 points towards the others (all class 3): cos with each one rises.
    step = -anchors.grad[0]
    for other in (P68, P86, [0.0, 1.0]):
        assert float(step @ torch.tensor(other, dtype=torch.float64)) > 0


def test_make_loss_dispatches_columns():
    columns = [t(E1, E2), t(P68, P86), t(E2, E1)]
    assert make_loss("sup", temperature=1.0)(columns, None).item() == pytest.approx(
        simcse_loss(*columns, temperature=1.0).item())
    assert make_loss("unsup", temperature=1.0)(columns[:2], None).item() == pytest.approx(
        info_nce_loss(columns[0], columns[1], temperature=1.0).item())
    assert make_loss("triplet", margin=0.5)(columns, None).item() == pytest.approx(
        triplet_loss(*columns, margin=0.5).item())
    labels = torch.tensor([1.0, 0.0])
    assert make_loss("contrastive", margin=0.5)(columns[:2], labels).item() == pytest.approx(
        contrastive_loss(columns[0], columns[1], labels, margin=0.5).item())
    with pytest.raises(ValueError, match="needs labels"):
        make_loss("contrastive")(columns[:2], None)
    classes = torch.tensor([0.0, 1.0])  # columns a, b: row i of each has class i
    assert make_loss("supcon", temperature=1.0)(columns[:2], classes).item() == pytest.approx(
        supervised_contrastive_loss(torch.cat(columns[:2]), torch.tensor([0, 1, 0, 1]), 1.0).item())
    with pytest.raises(ValueError, match="needs class labels"):
        make_loss("supcon")(columns[:2], None)
    with pytest.raises(ValueError, match="unknown objective"):
        make_loss("nope")


def test_matches_sentence_transformers_mnrl():
    """SimCSE with temperature 0.05 is MultipleNegativesRankingLoss with scale 20 (hard negatives included)."""
    st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
    torch.manual_seed(0)
    anchors, positives, negatives = (torch.randn(6, 8) for _ in range(3))
    mnrl = st_losses.MultipleNegativesRankingLoss(model=None, scale=20.0)
    for columns in ([anchors, positives], [anchors, positives, negatives]):
        expected = mnrl.compute_loss_from_embeddings(columns, labels=None)
        ours = make_loss("sup", temperature=0.05)(columns, None)
        assert ours.item() == pytest.approx(expected.item(), rel=1e-5)
