"""Shared fixtures: a tiny model built in-process and its imported artifact."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# Two shared cores: unpinned thread pools oversubscribe and collapse (see DESIGN.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialized 2-layer, 32-d BERT in sentence-transformers layout (mean pooling)."""
    from tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model")


@pytest.fixture(scope="session")
def tiny_artifact(tiny_model_dir, tmp_path_factory):
    """The tiny model imported as an artifact (no ONNX export yet)."""
    from embedline import artifact as art

    return art.import_model_dir(tiny_model_dir, tmp_path_factory.mktemp("tiny-artifact") / "a", name="tiny")
