"""The cached (GradCache) loss gives the plain loss and gradients, dropout masks included (RNG replay)."""

import pytest
import torch

from embedline.tokenization import load_tokenizer
from embedline.training.simcse.cached_loss import cached_backward, plain_backward, split_features
from embedline.training.simcse.config import TrainConfig, resolve_config
from embedline.training.data import Batch
from embedline.training.simcse.losses import make_loss
from embedline.training.simcse.model import build_model
from embedline.training.simcse.trainer import batch_features

TEXTS = ["a man plays the guitar", "the cat sleeps on the bed", "a dog runs in the park", "she reads a book",
         "the children play with a ball", "a bird sings", "people walk in the city at night"]
NEGATIVES = ["a woman cooks", "the car is red", "the train is slow", "he eats bread", "it is cold today",
             "the fox jumps over the lazy dog", "they dance"]


def _setup(tiny_model_dir, tmp_path, objective="unsup", pooling="auto", dropout=None, matryoshka_dims=()):
    config = resolve_config(TrainConfig(objective=objective, model=str(tiny_model_dir), train_file="x",
                                        output=str(tmp_path / "o"), pooling=pooling, dropout=dropout,
                                        matryoshka_dims=matryoshka_dims))
    torch.manual_seed(0)
    model = build_model(config).double().train()
    tokenizer = load_tokenizer(tiny_model_dir / "tokenizer.json", 32)
    if objective == "unsup":
        batch, views = Batch([TEXTS]), 2
    elif objective == "contrastive":
        batch, views = Batch([TEXTS, NEGATIVES], torch.tensor([1.0, 0, 1, 0, 1, 0, 1])), 1
    else:
        batch, views = Batch([TEXTS, TEXTS[1:] + TEXTS[:1], NEGATIVES]), 1
    features, sizes, labels = batch_features(batch, tokenizer, views, torch.device("cpu"))
    loss_fn = make_loss(objective, temperature=0.05, matryoshka_dims=config.matryoshka_dims)
    return model, features, lambda embeddings: loss_fn(embeddings.split(sizes), labels)


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b, tol=1e-9):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("matryoshka_dims", [(), (16, 8)], ids=["plain-loss", "matryoshka"])
@pytest.mark.parametrize("objective,pooling", [("unsup", "cls"), ("sup", "mean"), ("contrastive", "mean")])
def test_cached_equals_plain_without_dropout(tiny_model_dir, tmp_path, objective, pooling, matryoshka_dims):
    model, features, loss_on = _setup(tiny_model_dir, tmp_path, objective, pooling, dropout=0.0,
                                      matryoshka_dims=matryoshka_dims)
    plain_loss = plain_backward(model, features, loss_on)
    plain = _grads(model)
    model.zero_grad()
    cached_loss = cached_backward(model, features, loss_on, mini_batch_size=3)  # 3 rows at a time: uneven chunks
    assert cached_loss.item() == pytest.approx(plain_loss.item(), abs=1e-12)
    _assert_same(_grads(model), plain)


def test_cached_replays_dropout_masks(tiny_model_dir, tmp_path):
    """With dropout on, the cached gradients equal a graph-keeping pass over the same chunks with the same
    masks; without replaying the RNG they do not (in unsup SimCSE the masks are the positive pairs)."""
    model, features, loss_on = _setup(tiny_model_dir, tmp_path, "unsup", dropout=0.1)

    torch.manual_seed(123)  # reference: chunks encoded with a graph, one after the other
    reference_loss = loss_on(torch.cat([model(**chunk) for chunk in split_features(features, 4)]))
    reference_loss.backward()
    reference = _grads(model)

    model.zero_grad()
    torch.manual_seed(123)
    cached_loss = cached_backward(model, features, loss_on, mini_batch_size=4)
    assert cached_loss.item() == pytest.approx(reference_loss.item(), abs=1e-12)
    _assert_same(_grads(model), reference)
    assert reference_loss.item() > 0.01  # the masks differ between views: the loss is not trivially 0

    model.zero_grad()
    torch.manual_seed(123)
    cached_backward(model, features, loss_on, mini_batch_size=4, replay_rng=False)
    worst = max((g - reference[n]).abs().max().item() for n, g in _grads(model).items())
    assert worst > 1e-4
