"""`dimensions=k` in embed / embed_with_details (sync and asyncio): Matryoshka truncation in the client.

The fake server behind the tritonclient seam is test_client_unit's (4-d vectors that identify their text).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from embedline.client import EmbedResult
from embedline.client import encoding
from test_client_unit import DIM, fake_embedding, make_async_client, make_client

TEXTS = ["first text", "a second, longer text", "3"]


def expected(texts: list[str], k: int) -> np.ndarray:
    head = np.stack([fake_embedding(t) for t in texts])[:, :k]
    return head / np.linalg.norm(head, axis=1, keepdims=True)


def test_truncate_keeps_the_first_k_components_renormalized():
    rows = np.array([[3.0, 4.0, 12.0, 0.0], [0.0, 0.0, 1.0, 0.0]], dtype=np.float32)
    result = encoding.truncate_dimensions(EmbedResult(rows, np.array([True, False])), 2, 4)
    assert result.embeddings.dtype == np.float32 and result.embeddings.shape == (2, 2)
    np.testing.assert_allclose(result.embeddings[0], [0.6, 0.8], rtol=1e-6)
    # A row whose first k components are all zero stays zero instead of becoming NaN.
    np.testing.assert_array_equal(result.embeddings[1], [0.0, 0.0])
    assert result.truncated.tolist() == [True, False]


def test_truncate_with_none_or_the_full_dim_changes_nothing():
    rows = np.eye(3, dtype=np.float32)
    result = EmbedResult(rows, np.zeros(3, dtype=bool))
    assert encoding.truncate_dimensions(result, None, 3) is result
    assert encoding.truncate_dimensions(result, 3, 3) is result
    assert encoding.truncate_dimensions(result, np.int64(1), 3).embeddings.shape == (3, 1)


@pytest.mark.parametrize("bad", [0, -1, DIM + 1, 2.0, "2", True, [2]])
def test_bad_dimensions_is_a_value_error_naming_the_dim(bad):
    with pytest.raises(ValueError, match=f"model's dim {DIM}"):
        encoding.check_dimensions(bad, DIM)


def test_sync_embed_with_dimensions():
    client, fake = make_client()
    vectors = client.embed(TEXTS, dimensions=2)
    assert vectors.shape == (3, 2) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, expected(TEXTS, 2), rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-6)
    result = client.embed_with_details(TEXTS, dimensions=3)
    assert result.embeddings.shape == (3, 3) and result.truncated.shape == (3,)
    assert client.embed(TEXTS, dimensions=DIM).shape == (3, DIM)
    assert client.embed([], dimensions=2).shape == (0, 2)


def test_sync_bad_dimensions_raise_before_any_inference():
    client, fake = make_client()
    for bad in (0, DIM + 1, 1.5):
        with pytest.raises(ValueError, match=f"model's dim {DIM}"):
            client.embed(TEXTS, dimensions=bad)
    assert fake.infer_calls == []


def test_async_embed_with_dimensions_and_bad_dimensions():
    client, fake = make_async_client()

    async def run():
        vectors = await client.embed(TEXTS, dimensions=2)
        result = await client.embed_with_details(TEXTS, dimensions=1)
        with pytest.raises(ValueError, match=f"model's dim {DIM}"):
            await client.embed(TEXTS, dimensions=DIM + 1)
        empty = await client.embed([], dimensions=3)
        await client.close()
        return vectors, result, empty

    vectors, result, empty = asyncio.run(run())
    np.testing.assert_allclose(vectors, expected(TEXTS, 2), rtol=1e-6)
    np.testing.assert_allclose(result.embeddings, np.sign(expected(TEXTS, 1)), rtol=1e-6)
    assert empty.shape == (0, 3)
    assert len(fake.infer_calls) == 2
