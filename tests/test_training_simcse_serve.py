"""Train -> export -> serve with no conversion step: a tiny training run's artifact answers `embed` on the
real Triton server, and the served embeddings equal the trained torch encoder's."""

import random

import numpy as np
import pytest

from embedline.training.simcse.config import TrainConfig
from embedline.training.simcse.trainer import train

from tiny_model import WORDS


@pytest.mark.slow
def test_trained_artifact_exports_and_serves(tiny_model_dir, tmp_path, start_server):
    export_pipeline = pytest.importorskip("embedline.export.pipeline")
    from embedline.client import EmbeddingClient
    from embedline.tokenization import load_tokenizer
    from embedline.training.evaluate import embed_texts, load_any_encoder

    rng = random.Random(1)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(40)]
    (tmp_path / "train.txt").write_text("\n".join(sentences) + "\n")
    # cls pooling: the training-only MLP must be gone from what is exported and served.
    result = train(TrainConfig(model=str(tiny_model_dir), train_file=str(tmp_path / "train.txt"),
                               output=str(tmp_path / "artifact"), pooling="cls", batch_size=8, max_steps=3,
                               lr=1e-3, device="cpu"))
    artifact = export_pipeline.export_artifact(result.artifact, variants=("fp32",), show_progress=False,
                                               speed_seconds=0)
    served = start_server(artifact, variant="fp32")

    texts = ["a man plays the guitar", "the cat sleeps on the bed", "a dog runs in the park"]
    with EmbeddingClient(served.grpc_url) as client:
        embeddings = client.embed(texts)
    assert embeddings.shape == (3, artifact.dim)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    encoder, tokenizer_json, max_len = load_any_encoder(artifact.path)
    expected = embed_texts(encoder, load_tokenizer(tokenizer_json, max_len), texts).numpy()
    cosine = (embeddings * expected).sum(axis=1)
    assert cosine.min() > 0.9999
