"""vidret.atomic: only older generations of content-named files are removed, never a user's own files."""

from __future__ import annotations

from pathlib import Path

from vidret.atomic import remove_unreferenced, write_content_named


def test_remove_unreferenced_touches_only_content_named_generations(tmp_path: Path) -> None:
    old, _ = write_content_named(tmp_path, "checkpoint", ".safetensors", lambda f: f.write(b"old"))
    new, _ = write_content_named(tmp_path, "checkpoint", ".safetensors", lambda f: f.write(b"new"))
    users = ["checkpoint-notes.txt", "checkpoint-final.safetensors", "checkpoint-0123456789ab", "features-x.npy"]
    for name in users:
        (tmp_path / name).write_text("mine")
    remove_unreferenced(tmp_path, ["checkpoint", "features"], keep=[new])
    assert not (tmp_path / old).exists() and (tmp_path / new).read_bytes() == b"new"
    assert all((tmp_path / name).read_text() == "mine" for name in users)
