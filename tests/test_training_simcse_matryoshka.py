"""The Matryoshka loss (Kusupati et al. 2022): the plain loss at the full dim, the mean of independently
computed per-prefix losses otherwise, gradients, the cached (GradCache) path, the --matryoshka_dims option
and the `matryoshka_dims` the trained artifact records."""

import json
import random
import shutil

import pytest
import torch
import torch.nn.functional as F

from embedline import artifact as art
from embedline.cli import main
from embedline.training.simcse.config import (
    ConfigError, TrainConfig, apply_overrides, from_dict, parse_overrides, resolve_config, to_dict,
)
from embedline.training.simcse.losses import make_loss, matryoshka_loss
from embedline.training.simcse.trainer import train

from tiny_model import WORDS

OBJECTIVES = ["unsup", "sup", "triplet", "contrastive"]


def _columns(objective, rows=6, dim=16, seed=0):
    """Random (unnormalized) embedding columns and labels for an objective, float64."""
    generator = torch.Generator().manual_seed(seed)
    count = {"unsup": 2, "sup": 3, "triplet": 3, "contrastive": 2}[objective]
    columns = [torch.randn(rows, dim, generator=generator, dtype=torch.float64) for _ in range(count)]
    labels = torch.tensor([1.0, 0.0] * (rows // 2), dtype=torch.float64) if objective == "contrastive" else None
    return columns, labels


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_full_dim_only_is_the_plain_loss(objective):
    columns, labels = _columns(objective)
    plain = make_loss(objective, temperature=0.05)(columns, labels)
    wrapped = make_loss(objective, temperature=0.05, matryoshka_dims=(16,))(columns, labels)
    assert wrapped.item() == plain.item()


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_mean_of_independent_per_dim_losses(objective):
    columns, labels = _columns(objective)
    dims = (16, 8, 4, 2)
    ours = make_loss(objective, temperature=0.05, matryoshka_dims=dims)(columns, labels)
    # Independently: cut each embedding to k dims and re-normalize it, then the plain loss on those vectors.
    plain = make_loss(objective, temperature=0.05)
    per_dim = [plain([F.normalize(c[:, :k].clone(), dim=-1) for c in columns], labels).item() for k in dims]
    assert ours.item() == pytest.approx(sum(per_dim) / len(per_dim), rel=1e-12)
    assert len({round(v, 6) for v in per_dim}) == len(dims)  # the dims really give different losses
    # Weights: a weighted mean (weight 0 drops a dim).
    weighted = matryoshka_loss(plain, dims, weights=[1, 0, 0, 3])(columns, labels)
    assert weighted.item() == pytest.approx((per_dim[0] + 3 * per_dim[3]) / 4, rel=1e-12)


def test_gradients_flow_to_every_prefix():
    columns, _ = _columns("sup")
    columns = [c.requires_grad_() for c in columns]
    make_loss("sup", matryoshka_dims=(16, 4))(columns, None).backward()
    grads = [c.grad.clone() for c in columns]
    assert all(torch.isfinite(g).all() and g[:, :4].abs().sum() > 0 and g[:, 4:].abs().sum() > 0 for g in grads)
    # Dims 4..15 are seen only by the full-dim term: their gradient is half the plain loss's (mean of 2 terms).
    for c in columns:
        c.grad = None
    make_loss("sup")(columns, None).backward()
    for ours, c in zip(grads, columns):
        torch.testing.assert_close(ours[:, 4:], 0.5 * c.grad[:, 4:], rtol=1e-12, atol=1e-12)
        assert (ours[:, :4] - 0.5 * c.grad[:, :4]).abs().max() > 1e-6  # the 4-d term adds to the prefix


def test_bad_dims_in_the_loss():
    plain = make_loss("sup")
    for dims in ((), (8, 8), (0, 4)):
        with pytest.raises(ValueError):
            matryoshka_loss(plain, dims)
    with pytest.raises(ValueError, match="larger than the embeddings' 16"):
        matryoshka_loss(plain, (32, 16))(_columns("sup")[0], None)


def test_option_parsing_and_validation(tiny_model_dir, tmp_path):
    parsed = apply_overrides(TrainConfig(), parse_overrides(["--matryoshka-dims", "64, 256,128"]))
    assert parsed.matryoshka_dims == (64, 256, 128)
    assert apply_overrides(TrainConfig(), {"matryoshka_dims": ""}).matryoshka_dims == ()
    assert apply_overrides(TrainConfig(), {"matryoshka_dims": [8, 4]}).matryoshka_dims == (8, 4)  # JSON lists
    for raw, message in (("0,8", r"0 not in 1\.\.the model's dimension"), ("8,4,8", "8 given more than once"),
                         ("8,x", r"'x' is not one"), ("8.5", "expected a comma-separated list of integers")):
        with pytest.raises(ConfigError, match=message):
            apply_overrides(TrainConfig(), {"matryoshka_dims": raw})
    base = dict(model=str(tiny_model_dir), train_file="x", output=str(tmp_path / "o"))
    with pytest.raises(ConfigError, match=r"--matryoshka_dims: 64 not in 1\.\.the model's dimension 32"):
        resolve_config(TrainConfig(**base, matryoshka_dims=(64, 16)))
    resolved = resolve_config(TrainConfig(**base, matryoshka_dims=(4, 32, 16)))
    assert resolved.matryoshka_dims == (32, 16, 4)
    assert resolve_config(TrainConfig(**base)).matryoshka_dims == ()
    # A checkpoint's config (JSON) reads back to the same resolved config.
    assert resolve_config(from_dict(json.loads(json.dumps(to_dict(resolved))))) == resolved


@pytest.fixture(scope="module")
def triples(tmp_path_factory):
    rng = random.Random(0)

    def sentence():
        return " ".join(rng.choice(WORDS) for _ in range(6))

    path = tmp_path_factory.mktemp("data") / "triples.csv"
    path.write_text("\n".join(["sent0,sent1,hard_neg"] + [f"{sentence()},{sentence()},{sentence()}"
                                                         for _ in range(40)]) + "\n")
    return path


def test_training_records_matryoshka_dims(tiny_model_dir, triples, tmp_path, capsys):
    """`embedline train --matryoshka_dims=16,8,4` (cached loss): embedline.json records [32, 16, 8, 4]."""
    out = tmp_path / "out"
    code = main(["train", "--objective=sup", f"--model={tiny_model_dir}", f"--train_file={triples}",
                 f"--output={out}", "--matryoshka_dims=16,8,4", "--batch_size=8", "--mini_batch_size=5",
                 "--max_steps=2", "--lr=1e-3", "--device=cpu", "--checkpoint_steps=0"])
    assert code == 0, capsys.readouterr().err
    meta = json.loads((out / art.METADATA_FILE).read_text())
    assert meta["matryoshka_dims"] == [32, 16, 8, 4] and meta["training"]["matryoshka_dims"] == [32, 16, 8, 4]
    assert art.load_artifact(out).matryoshka_dims == (32, 16, 8, 4)
    plain = train(TrainConfig(objective="sup", model=str(tiny_model_dir), train_file=str(triples),
                              output=str(tmp_path / "plain"), batch_size=8, max_steps=1, device="cpu"))
    assert "matryoshka_dims" not in plain.artifact.metadata and plain.artifact.matryoshka_dims == ()
    # A bad value is one clear line from the verb, before any training.
    assert main(["train", f"--train_file={triples}", f"--output={tmp_path / 'bad'}", "--matryoshka_dims=8,8"]) == 1
    assert "--matryoshka_dims: 8 given more than once" in capsys.readouterr().err


def test_artifact_property_and_malformed_value(tiny_artifact, tmp_path):
    assert tiny_artifact.matryoshka_dims == ()  # imported, not trained for truncation
    copy = tmp_path / "a"
    shutil.copytree(tiny_artifact.path, copy)
    assert art.update_metadata(copy, {"matryoshka_dims": [32, 8]}).matryoshka_dims == (32, 8)
    meta = json.loads((copy / art.METADATA_FILE).read_text())
    for bad in ([64], ["8"], 8):
        art.write_json(copy / art.METADATA_FILE, {**meta, "matryoshka_dims": bad})
        with pytest.raises(art.ArtifactError, match="matryoshka_dims"):
            art.load_artifact(copy)
