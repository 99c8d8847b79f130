"""evaluate.py helpers that need no model: the QB-Norm querybank."""

from __future__ import annotations

from pathlib import Path

import pytest

from vidret.data.manifest import ManifestEntry, write_manifest
from vidret.errors import VidretError
from vidret.eval.evaluate import query_bank_captions


def _manifest(tmp_path: Path, captions: list[list[str]]) -> Path:
    path = tmp_path / "train.jsonl"
    write_manifest(
        path, [ManifestEntry(video_id=f"v{i}", path=f"v{i}.mp4", captions=tuple(c)) for i, c in enumerate(captions)]
    )
    return path


def test_query_bank_is_every_caption_or_a_seeded_sample(tmp_path: Path) -> None:
    caps = [[f"c{i}a", f"c{i}b"] for i in range(30)]
    path = _manifest(tmp_path, caps)
    every = query_bank_captions(path)
    assert every == [c for pair in caps for c in pair]
    sample = query_bank_captions(path, size=17)
    assert len(sample) == 17 == len(set(sample)) and set(sample) <= set(every)
    assert sample == query_bank_captions(path, size=17)  # seeded
    assert sample != query_bank_captions(path, size=17, seed=1)
    assert query_bank_captions(path, size=1000) == every


def test_query_bank_refuses_nonsense(tmp_path: Path) -> None:
    with pytest.raises(VidretError, match="positive"):
        query_bank_captions(_manifest(tmp_path, [["a"]]), size=0)
    with pytest.raises(VidretError, match="no captions"):
        query_bank_captions(_manifest(tmp_path, [[]]))
