"""Sharded index building under ``torchrun``: each rank encodes a share of the videos into a shard file.

``torchrun --nproc_per_node N -m vidret index ...`` runs N copies of the same build. Every rank plans the same
rows (same source, same settings), takes its share (:func:`split_rows`: whole videos, balanced by row count, so
the windows of one video are decoded by one rank), encodes it and writes ``<out>/shards/shard-<r>of<N>.json``
naming its ``.npy`` data by content hash (the :mod:`vidret.atomic` rule: data first, the JSON last, one
rename). After a barrier, rank 0 reads every shard, assembles and saves the index (atomically, as always) and
removes the shards folder.

A shard records a key: a hash of the model identity, the encoding settings and the rows it holds (ids, file
identities, time spans). A rerun after an interruption reuses each shard whose key still matches (its rank's
work is skipped) and re-encodes the rest. Shard files live in the index folder, which may be shared, so they are
read like the index (schema, checksum, ``.npy`` header, finite values) before any of it is used.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vidret.atomic import replace_json, sha256_file, write_content_named
from vidret.data.manifest import ManifestEntry
from vidret.errors import VidretError
from vidret.retrieval.index_files import IndexSettings, ModelIdentity, VideoRecord, read_npy, write_npy

logger = logging.getLogger(__name__)

SHARDS_DIR = "shards"
SHARD_FORMAT = 1

Features = dict[str, tuple[Tensor, Tensor | None]]  # row id -> (pooled [E], None) or (frames [T, E], mask [T])


@dataclass(frozen=True)
class Sharding:
    """This process's place in a sharded build."""

    rank: int  # 0 assembles the index
    world_size: int  # processes sharing the work
    barrier: Callable[[], None] = lambda: None  # waits for every rank (torch.distributed.barrier under torchrun)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise VidretError(f"rank {self.rank} is not in [0, {self.world_size})")


def split_rows(todo: Sequence[ManifestEntry], group_of: Callable[[str], str], world_size: int) -> list[list[int]]:
    """Positions in ``todo`` per rank: whole videos, each to the rank with the fewest rows so far (ties: lowest).

    Deterministic in the order of ``todo``, so every rank computes the same split.
    """
    videos: dict[str, list[int]] = {}
    for i, e in enumerate(todo):
        videos.setdefault(group_of(e.video_id), []).append(i)
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for rows in videos.values():
        r = min(range(world_size), key=lambda j: (len(shares[j]), j))
        shares[r].extend(rows)
    return [sorted(s) for s in shares]


def shard_key(identity: ModelIdentity, settings: IndexSettings, rows: Sequence[VideoRecord], world_size: int) -> str:
    """What a shard's vectors depend on: the model, how frames are sampled, and exactly which rows it holds."""
    enc = {k: v for k, v in asdict(settings).items() if k not in ("dtype", "backend", "nlist", "nprobe")}
    spec = {
        "format": SHARD_FORMAT,
        "model": [identity.backbone_fingerprint, identity.adapter_fingerprint, identity.adapter_method],
        "settings": enc,
        "world_size": world_size,
        "rows": [[r.video_id, r.real_path, r.identity, r.start, r.end] for r in rows],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode("utf-8")).hexdigest()


def _rows_ok(shape: tuple[int, ...], n: int, dims: tuple[int, ...]) -> bool:
    return len(shape) in dims and shape[0] == n


class ShardStore:
    """The shard files of one build, in ``<index>/shards``."""

    def __init__(self, index_folder: str | Path, world_size: int) -> None:
        self.folder = Path(index_folder) / SHARDS_DIR
        self.world_size = world_size

    def manifest(self, rank: int) -> Path:
        return self.folder / f"shard-{rank}of{self.world_size}.json"

    def write(self, rank: int, key: str, feats: Features, bad: Sequence[tuple[str, str, str]]) -> None:
        """Write rank ``rank``'s encoded rows (data files first, the JSON naming them last)."""
        ids = list(feats)
        files: dict[str, dict[str, str]] = {}
        if ids:
            arrays = {"features": torch.stack([feats[i][0] for i in ids]).float().numpy()}
            masks = [feats[i][1] for i in ids]
            if masks[0] is not None:
                arrays["masks"] = torch.stack([m for m in masks if m is not None]).bool().numpy()
            for role, arr in arrays.items():
                name, digest = write_content_named(
                    self.folder, f"r{rank}{role}", ".npy", functools.partial(write_npy, arr=arr)
                )
                files[role] = {"file": name, "sha256": digest}
        replace_json(
            self.manifest(rank),
            {"format": SHARD_FORMAT, "key": key, "ids": ids, "bad": [list(b) for b in bad], "files": files},
        )

    def read(self, rank: int, key: str, expected: Sequence[str]) -> tuple[Features, list[tuple[str, str, str]]] | None:
        """Rank ``rank``'s shard if it exists and was written for ``key``; None otherwise.

        Raises:
            VidretError: the shard names the right key but is damaged or malformed (one message naming the file).
        """
        path = self.manifest(rank)
        if not path.is_file():
            return None
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None  # half-written by something else: not ours to reuse
        if not isinstance(meta, dict) or meta.get("format") != SHARD_FORMAT or meta.get("key") != key:
            return None

        def fail(problem: str) -> VidretError:
            return VidretError(f"shard file {path} {problem}; delete {self.folder} and run `vidret index` again")

        ids, bad, files = meta.get("ids"), meta.get("bad"), meta.get("files")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids) or not set(ids) <= set(expected):
            raise fail("lists rows this build did not give it")
        if not isinstance(bad, list) or not all(
            isinstance(b, list) and len(b) == 3 and all(isinstance(x, str) for x in b) for b in bad
        ):
            raise fail("has a malformed bad-video list")
        want_roles = {"features"} if ids else set()
        if not isinstance(files, dict) or not want_roles <= set(files) <= {"features", "masks"}:
            raise fail("names unexpected data files")
        arrays: dict[str, np.ndarray] = {}
        for role, entry in files.items():
            name = entry.get("file") if isinstance(entry, dict) else None
            if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
                raise fail(f"names a {role} file outside its folder")
            p = self.folder / name
            if not p.is_file() or sha256_file(p) != entry.get("sha256"):
                raise fail(f"has a missing or damaged {role} file ({name})")
            dims = (2, 3) if role == "features" else (2,)
            dtype = "float32" if role == "features" else "bool"
            arrays[role] = read_npy(
                p, f"shard {role}", (dtype,), functools.partial(_rows_ok, n=len(ids), dims=dims), f"({len(ids)}, ...)"
            )
        out: Features = {}
        if ids:
            feats = torch.from_numpy(arrays["features"])
            if not bool(torch.isfinite(feats).all()):
                raise fail("holds NaN/Inf vectors")
            masks = torch.from_numpy(arrays["masks"]) if "masks" in arrays else None
            if (masks is None) != (feats.ndim == 2) or (masks is not None and masks.shape != feats.shape[:2]):
                raise fail("holds features and masks of mismatched shapes")
            for j, rid in enumerate(ids):
                out[rid] = (feats[j], None if masks is None else masks[j])
        return out, [(b[0], b[1], b[2]) for b in bad]

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def encode_sharded(
    encode: Callable[[list[ManifestEntry]], tuple[Features, list[tuple[str, str, str]]]],
    todo: list[ManifestEntry],
    records: dict[str, VideoRecord],
    identity: ModelIdentity,
    settings: IndexSettings,
    out: Path,
    sharding: Sharding,
) -> tuple[Features, list[tuple[str, str, str]]] | None:
    """Encode this rank's share of ``todo`` into its shard file (or reuse it); on rank 0, gather every shard.

    Args:
        encode: entries -> (features by row id, bad rows as (id, path, reason)).
        todo: the rows to encode, the same list on every rank.
        records: row id -> its record (for the shard keys).
        identity, settings: what the vectors depend on (part of the shard keys).
        out: the index folder.
        sharding: this rank and the barrier.

    Returns:
        On rank 0: (every rank's features, every bad row); None elsewhere.
    """
    w = sharding.world_size
    shares = split_rows(todo, lambda rid: records[rid].group, w)
    store = ShardStore(out, w)
    keys = [shard_key(identity, settings, [records[todo[i].video_id] for i in s], w) for s in shares]
    ids = [[todo[i].video_id for i in s] for s in shares]
    me = sharding.rank
    if store.read(me, keys[me], ids[me]) is None:
        feats, bad = encode([todo[i] for i in shares[me]])
        store.write(me, keys[me], feats, bad)
    else:
        logger.info("rank %d: reusing its completed shard (%d rows)", me, len(ids[me]))
    sharding.barrier()
    if me != 0:
        return None
    merged: Features = {}
    all_bad: list[tuple[str, str, str]] = []
    for r in range(w):
        got = store.read(r, keys[r], ids[r])
        if got is None:
            raise VidretError(
                f"rank {r} left no shard in {store.folder} for this build (it failed?); run the same command again: "
                "completed shards are reused"
            )
        merged.update(got[0])
        all_bad.extend(got[1])
    return merged, all_bad


__all__ = ["SHARDS_DIR", "ShardStore", "Sharding", "encode_sharded", "shard_key", "split_rows"]
