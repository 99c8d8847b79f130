"""Crash-safe writes of multi-file artefacts (adapters, training checkpoints, indexes).

The rule everywhere: data files are written under a temporary name, fsynced, then renamed to a name that carries
their content hash; the one manifest (JSON) that names them is replaced last, with a single ``os.replace``. A
kill at any point therefore leaves either the old manifest (whose old data files are still there) or the new one
(whose new data files are already complete). Files no longer named by the manifest are removed afterwards, and
temporary files of an interrupted earlier write are swept by the next one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

TMP_SUFFIX = ".tmp"
HASH_CHARS = 12  # hex digits of the SHA-256 kept in a content-named file's name


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _tmp_path(folder: Path, stem: str) -> Path:
    # Starts with a dot and ends with TMP_SUFFIX so sweep_temporaries() recognises it after a crash.
    return folder / f".{stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_content_named(
    folder: str | os.PathLike[str], stem: str, suffix: str, write: Callable[[IO[bytes]], None]
) -> tuple[str, str]:
    """Write a data file as ``<stem>-<sha256[:12]><suffix>`` inside ``folder``.

    Args:
        folder: the artefact's folder (created).
        stem: the file's role, e.g. ``"features"``; must not contain a path separator.
        suffix: e.g. ``".npy"``.
        write: writes the bytes into the open binary file it is given.

    Returns:
        (file name, full hex SHA-256). An existing file of that name already holds these bytes.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(out, stem)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the rename must never expose a file whose data is not on disk
        digest = sha256_file(tmp)
        name = f"{stem}-{digest[:HASH_CHARS]}{suffix}"
        os.replace(tmp, out / name)
    finally:
        if tmp.exists():
            tmp.unlink()
    return name, digest


def replace_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Replace the JSON file ``path`` in one rename (the commit point of a multi-file write)."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(final.parent, final.name)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(final.parent)


def remove_unreferenced(folder: str | os.PathLike[str], stems: Iterable[str], keep: Iterable[str]) -> None:
    """Delete the older generations of content-named files in ``folder``: names ``<stem>-<12 hex><suffix>`` (as
    :func:`write_content_named` makes them) that the manifest no longer names. Any other file (a user's
    ``adapter-notes.txt``) is never touched."""
    keep_names = set(keep)
    generation = re.compile(rf"(?:{'|'.join(re.escape(s) for s in stems)})-[0-9a-f]{{{HASH_CHARS}}}(?:\.\w+)+")
    for p in Path(folder).iterdir():
        if generation.fullmatch(p.name) and p.name not in keep_names and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)


def sweep_temporaries(folder: str | os.PathLike[str]) -> None:
    """Delete temporary files left by an interrupted write (``.<name>.<pid>.<rand>.tmp``)."""
    root = Path(folder)
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX) and (p.is_file() or p.is_symlink()):
            p.unlink(missing_ok=True)


__all__ = ["remove_unreferenced", "replace_json", "sha256_file", "sweep_temporaries", "write_content_named"]
