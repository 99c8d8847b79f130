"""Fixtures of the retrieval tests: a collection of tiny coloured clips, saved adapters, built indexes."""

from __future__ import annotations

from pathlib import Path

import pytest

import vidret
from tests.retrieval.helpers import BACKBONE, make_collection, save_adapter_for, testdata_dir
from vidret.retrieval.build import build_index, load_backbone_spec


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "browser: drives a real headless Chromium (skipped when it is missing)")


@pytest.fixture(scope="session")
def collection_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("collection") / "videos"
    make_collection(root)
    return root


@pytest.fixture(scope="session")
def lora_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_adapter_for(tmp_path_factory.mktemp("adapters") / "lora1", "lora", seed=1)


@pytest.fixture(scope="session")
def other_lora_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_adapter_for(tmp_path_factory.mktemp("adapters") / "lora2", "lora", seed=2)


@pytest.fixture(scope="session")
def frozen_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_adapter_for(tmp_path_factory.mktemp("adapters") / "frozen", "frozen")


@pytest.fixture(scope="session")
def lora_model(lora_adapter: Path):
    return vidret.load_adapter(load_backbone_spec(BACKBONE), lora_adapter).eval()


@pytest.fixture(scope="session")
def built_index(tmp_path_factory: pytest.TempPathFactory, collection_dir: Path, lora_adapter: Path, lora_model) -> Path:
    """The coloured collection indexed with the lora adapter (exact backend)."""
    out = tmp_path_factory.mktemp("indexes") / "colours"
    build_index(lora_model, collection_dir, out, backbone_spec=BACKBONE, adapter_path=str(lora_adapter))
    return out


@pytest.fixture(scope="session")
def msrvtt_dir() -> Path:
    d = testdata_dir() / "msrvtt-samples"
    if not d.is_dir() or not any(d.rglob("*.mp4")):
        pytest.skip(f"MSR-VTT sample clips not found in {d}")
    return d


@pytest.fixture(scope="session")
def msrvtt_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One frame cache for every MSR-VTT index of the session: the real clips are decoded once."""
    return tmp_path_factory.mktemp("msrvtt-cache")


@pytest.fixture(scope="session")
def msrvtt_index(
    tmp_path_factory: pytest.TempPathFactory, msrvtt_dir: Path, frozen_adapter: Path, msrvtt_cache: Path
) -> Path:
    """The MSR-VTT sample clips indexed with the frozen adapter over the same tiny backbone."""
    model = vidret.load_adapter(load_backbone_spec(BACKBONE), frozen_adapter).eval()
    out = tmp_path_factory.mktemp("indexes") / "msrvtt"
    build_index(
        model, msrvtt_dir, out, backbone_spec=BACKBONE, adapter_path=str(frozen_adapter), cache_dir=msrvtt_cache
    )
    return out
