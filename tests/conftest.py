"""Shared test set-up: tiny models run fastest on one thread (and the CI machine has two cores)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


def testdata_dir() -> Path:
    """../shared/testdata beside the repository (or $VIDRET_TESTDATA)."""
    return Path(os.environ.get("VIDRET_TESTDATA", REPO.parent / "shared" / "testdata"))


@pytest.fixture
def msrvtt_samples() -> Path:
    d = testdata_dir() / "msrvtt-samples"
    if not d.is_dir():
        pytest.skip("../shared/testdata/msrvtt-samples is not present")
    return d


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pocket world (real h264 files + manifests), generated once per test session."""
    from vidret.data.pocket import PocketConfig, generate_pocket_world

    out = tmp_path_factory.mktemp("pocket") / "world"
    generate_pocket_world(out, PocketConfig.from_size("tiny", seed=0), workers=1)
    return out
