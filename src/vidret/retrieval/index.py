"""Video indexes: stored video embeddings, their search and the on-disk format (:class:`VideoIndex`).

An index folder holds::

    index.json           format version, kind, backend, settings, model identity, collection root, checksums
    videos-<h>.jsonl     one line per row: video_id, path, real_path, duration, file identity, start, end,
                         captions, and ``parent`` for the windows of ``index --segment`` (id "<parent>#<start>-<end>")
                         (``videos.jsonl`` in indexes written before it was content-named; still read)
    features-<h>.npy     pooled:  [N, E] L2-normalised video vectors (float16 or float32)
                         frames:  [N, T, E] per-frame embeddings (text-conditioned heads)
    masks-<h>.npy        frames kind only: [N, T] bool, True = real frame
    faiss-<h>.index      FAISS IVF-Flat index over the pooled vectors (backend "faiss")
    cache/               the frame cache used to build it (default location)
    shards/              only while a ``torchrun`` build runs (:mod:`vidret.retrieval.shards`)

Two kinds: ``pooled`` when the model's head is text-independent (meanP, seqTransf: one vector per video,
searched by inner product) and ``frames`` when it is text-conditioned (Cross-Modal Adapter: the video vector
depends on the query, so exact search runs ``model.similarity`` over video chunks). Data files carry a
content hash in their name and ``index.json`` is replaced last, so an interrupted write leaves the previous
index intact. Loading verifies SHA-256 checksums and refuses a model other than the one that built it.
The search backends (exact torch, FAISS, frames through the head) live in :mod:`vidret.retrieval.backends`.

An index folder may come from a stranger, and its checksums live in the ``index.json`` they protect, so
loading treats every file as untrusted data: ``index.json`` is schema-checked, the ``.npy`` headers are
checked (dtype, shape against ``count``/``dim``) before the data is read, and every record with a file must
lie inside the collection ``root`` recorded at build time and carry the file identity media routes check
(these checks, and the types of what the files hold, are in :mod:`vidret.retrieval.index_files`); vectors
must be finite (:meth:`VideoIndex.load`), and a FAISS file must agree with the index (size, dimension, ids
in range: :meth:`vidret.retrieval.backends.FaissIndex.check`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vidret.atomic import remove_unreferenced, replace_json, sha256_file, sweep_temporaries, write_content_named
from vidret.errors import VidretError
from vidret.retrieval.backends import ExactIndex, FaissIndex, FramesSearch, SearchBackend, faiss_available, mean_pool
from vidret.retrieval.index_files import (
    DATA_STEMS,
    INDEX_FILE,
    INDEX_FORMAT_VERSION,
    LEGACY_VIDEOS_FILE,
    Backend,
    IndexKind,
    IndexSettings,
    ModelIdentity,
    VideoRecord,
    check_records,
    parse_index_meta,
    read_index_json,
    read_npy,
    read_records,
    write_npy,
)
from vidret.retrieval.moments import grouped_topk

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ model identity


def adapter_fingerprint(model: Any) -> str:
    """A short hash of what makes a model's embeddings: method, config and trained state (adapter + head)."""
    from vidret.eval.evaluate import adapter_fingerprint as state_fingerprint

    h = hashlib.sha256()
    h.update(model.method.encode())
    h.update(model.config.to_json().encode())
    h.update(state_fingerprint(model).encode())
    return h.hexdigest()[:16]


def model_identity(model: Any, backbone_spec: str = "", adapter_path: str = "") -> ModelIdentity:
    """The identity an index records for ``model`` (a VideoTextModel)."""
    return ModelIdentity(
        backbone_name=model.clip.name,
        backbone_fingerprint=model.backbone_fingerprint,
        adapter_method=model.method,
        adapter_fingerprint=adapter_fingerprint(model),
        backbone_spec=backbone_spec,
        adapter_path=adapter_path,
    )


def check_identity(index_id: ModelIdentity, model_id: ModelIdentity, where: str = "index") -> None:
    """Refuse a model whose backbone or adapter differs from the one that built the index, naming both."""
    if index_id.backbone_fingerprint != model_id.backbone_fingerprint:
        raise VidretError(
            f"{where} was built with backbone {index_id.describe_backbone()}, but the serving backbone is "
            f"{model_id.describe_backbone()}; load the backbone it was built with (`--backbone "
            f"{index_id.backbone_spec or 'NAME|PATH'}`) or rebuild the index"
        )
    if index_id.adapter_fingerprint != model_id.adapter_fingerprint:
        raise VidretError(
            f"{where} was built with adapter {index_id.describe_adapter()}, but the serving adapter is "
            f"{model_id.describe_adapter()}; use the adapter it was built with or rebuild the index "
            "(`vidret index --adapter DIR ...`)"
        )


# ------------------------------------------------------------------------------------------ the index


def _all_finite(t: Tensor) -> bool:
    """No NaN/Inf in ``t``, without an [N, ...] mask (512 MB for 1M x 512 vectors) and ~20x faster than one.

    NaN and Inf survive a sum, so a finite sum settles it; a non-finite one (or a float32 overflow) is settled
    by the extremes, which NaN also propagates to.
    """
    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t.amax())) and bool(torch.isfinite(t.amin()))


def _non_finite_rows(t: Tensor, limit: int = 5) -> list[int]:
    bad = (~torch.isfinite(t.reshape(t.shape[0], -1))).any(dim=1)
    return bad.nonzero().flatten()[:limit].tolist()


@dataclass
class VideoIndex:
    """A searchable collection: records (ids, files), embeddings, model identity and settings.

    Build one with :func:`vidret.retrieval.build.build_index`, or :meth:`from_vectors` for synthetic data;
    persist with :meth:`save`, reopen with :meth:`load`.
    """

    records: list[VideoRecord]
    identity: ModelIdentity
    settings: IndexSettings = field(default_factory=IndexSettings)
    vectors: Tensor | None = None  # pooled kind: [N, E] float32, L2-normalised
    frames: Tensor | None = None  # frames kind: [N, T, E] float32
    masks: Tensor | None = None  # frames kind: [N, T] bool
    backend_name: Backend = "exact"
    # realpath of the videos folder (or the common parent of a manifest's files): every record's file lies in
    # it; "" for synthetic indexes and those written before roots were recorded (media then needs a root given)
    root: str = ""
    folder: str = field(default="", compare=False)  # where load() read it from ("" = built in memory)
    _backend: SearchBackend | None = field(default=None, repr=False)
    _pooled_for_video: ExactIndex | None = field(default=None, repr=False)
    _rows: dict[str, int] | None = field(default=None, repr=False)
    _groups: list[str] | None = field(default=None, repr=False)
    _group_rows: dict[str, list[int]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        n = len(self.records)
        if (self.vectors is None) == (self.frames is None):
            raise ValueError("give exactly one of vectors (pooled kind) or frames + masks (frames kind)")
        if self.vectors is not None and self.vectors.shape[0] != n:
            raise ValueError(f"{n} records but {self.vectors.shape[0]} vectors")
        if self.frames is not None and (
            self.masks is None or self.frames.shape[0] != n or self.masks.shape != self.frames.shape[:2]
        ):
            raise ValueError("frames [N, T, E] need masks [N, T] and one row per record")
        if self.backend_name == "faiss" and self.kind == "frames":
            raise VidretError(
                "the FAISS backend needs one vector per video; this index's head is text-conditioned "
                "(per-frame features), so it supports exact search only (drop --backend faiss)"
            )

    # ------------------------------------------------------------------------------------ properties

    @property
    def kind(self) -> IndexKind:
        return "pooled" if self.vectors is not None else "frames"

    @property
    def dim(self) -> int:
        t = self.vectors if self.vectors is not None else self.frames
        assert t is not None
        return int(t.shape[-1])

    def __len__(self) -> int:
        return len(self.records)

    @property
    def ids(self) -> list[str]:
        return [r.video_id for r in self.records]

    def row_of(self, video_id: str) -> int | None:
        """The row of ``video_id``, or None when it is not in the index (exact string match only)."""
        if self._rows is None:
            self._rows = {r.video_id: i for i, r in enumerate(self.records)}
        return self._rows.get(video_id)

    @property
    def segmented(self) -> bool:
        """Whether rows are windows of videos (``vidret index --segment``), grouped per video in results."""
        return self.settings.segment > 0

    def group_keys(self) -> list[str]:
        """Row -> the video it belongs to (a window's parent; a whole video's own id)."""
        if self._groups is None:
            self._groups = [r.group for r in self.records]
        return self._groups

    def top_hits(
        self, search: Callable[[int], tuple[Tensor, Tensor]], ks: Sequence[int], groups: Sequence[str]
    ) -> list[list[tuple[int, float]]]:
        """Hits per query, [(row, score), ...] best first, from ``search(n)`` (scores, rows [Q, n']).

        ``groups[q] == "video"`` keeps the best window of each video (windowed indexes; whole-video rows are
        their own group), ``"segment"`` every window.
        """
        per_video = [self.segmented and g == "video" for g in groups]
        return grouped_topk(search, self.group_keys(), ks, per_video)

    def rows_of_video(self, video_id: str) -> list[int]:
        """The rows ``video_id`` stands for: its own row, else every window of that video; [] when unknown."""
        row = self.row_of(video_id)
        if row is not None:
            return [row]
        if not self.segmented:
            return []
        if self._group_rows is None:
            groups: dict[str, list[int]] = {}
            for i, g in enumerate(self.group_keys()):
                groups.setdefault(g, []).append(i)
            self._group_rows = groups
        return list(self._group_rows.get(video_id, ()))

    def record(self, video_id: str) -> VideoRecord | None:
        row = self.row_of(video_id)
        return None if row is None else self.records[row]

    # ------------------------------------------------------------------------------------ backends

    @property
    def backend(self) -> SearchBackend:
        """The vector search backend (pooled kind), built on first use."""
        if self.kind != "pooled":
            raise VidretError("this index holds per-frame features; search it with search_text(model, ...)")
        if self._backend is None:
            assert self.vectors is not None
            if self.backend_name == "faiss":
                self._backend = FaissIndex(self.vectors, self.settings.nlist, self.settings.nprobe)
            else:
                exact = ExactIndex(self.vectors)
                self.vectors = exact.vectors  # share the backend's storage instead of holding a second copy
                self._backend = exact
        return self._backend

    def use_backend(self, name: Backend, nprobe: int | None = None) -> VideoIndex:
        """Switch the search backend in place ("exact" or "faiss"); returns self."""
        if name not in ("exact", "faiss"):
            raise VidretError(f"unknown backend {name!r}; use 'exact' or 'faiss'")
        if name != self.backend_name:
            if name == "faiss" and self.kind == "frames":
                raise VidretError("the FAISS backend needs one vector per video; this index is exact-only")
            self.backend_name = name
            self._backend = None
        if nprobe is not None:
            self.settings = IndexSettings.from_dict({**asdict(self.settings), "nprobe": nprobe})
            if isinstance(self._backend, FaissIndex):
                self._backend.nprobe = nprobe
        return self

    # ------------------------------------------------------------------------------------ search

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """[Q, E] L2-normalised query vectors -> (scores [Q, k'], rows [Q, k']) over pooled vectors.

        On a ``frames`` index this compares against meanP-pooled frames (video-to-video queries).
        """
        if self.kind == "pooled":
            return self.backend.search(F.normalize(queries.float(), dim=-1), k)
        if self._pooled_for_video is None:
            assert self.frames is not None and self.masks is not None
            self._pooled_for_video = ExactIndex(mean_pool(self.frames, self.masks))
        return self._pooled_for_video.search(F.normalize(queries.float(), dim=-1), k)

    @torch.no_grad()
    def search_text(self, model: Any, text_feats: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Raw text embeddings [Q, E] from ``model.encode_text`` -> (scores [Q, k'], rows [Q, k']).

        Scores are cosine similarities (pooled) or the head's logits divided by its scale (frames).
        """
        if self.kind == "pooled":
            return self.backend.search(F.normalize(text_feats.float(), dim=-1), k)
        assert self.frames is not None and self.masks is not None
        return FramesSearch(self.frames, self.masks).search_text(model, text_feats, k)

    def check_model(self, model: Any, where: str | None = None, adapter_path: str = "") -> None:
        """Refuse ``model`` unless it has the backbone and adapter this index was built with.

        ``adapter_path`` (the folder ``model`` was loaded from) only makes the error message clearer.
        """
        check_identity(self.identity, model_identity(model, adapter_path=adapter_path), where or "this index")
        want = self.settings.image_size
        have = model.clip.config.vision.image_size
        if want != have:
            raise VidretError(f"index frames are {want} px but the backbone takes {have} px; rebuild the index")

    # ------------------------------------------------------------------------------------ build helpers

    @classmethod
    def from_vectors(
        cls,
        vectors: Tensor,
        ids: Sequence[str] | None = None,
        identity: ModelIdentity | None = None,
        settings: IndexSettings | None = None,
        backend: Backend = "exact",
    ) -> VideoIndex:
        """A pooled index over given vectors (normalised here): synthetic benchmarks, tests, imports."""
        n = vectors.shape[0]
        ids = list(ids) if ids is not None else [f"v{i:07d}" for i in range(n)]
        if len(ids) != n or len(set(ids)) != n:
            raise VidretError("ids must be unique, one per vector")
        identity = identity or ModelIdentity("synthetic", "-", "none", "-")
        return cls(
            records=[VideoRecord(i) for i in ids],
            identity=identity,
            settings=settings or IndexSettings(backend=backend),
            vectors=F.normalize(vectors.float(), dim=-1),
            backend_name=backend,
        )

    # ------------------------------------------------------------------------------------ persistence

    def save(self, folder: str | os.PathLike[str], write_faiss: bool | None = None) -> Path:
        """Write the index into ``folder`` (created), crash-safe (see :mod:`vidret.atomic`).

        Data files are content-named and ``index.json`` is replaced last, so a kill at any point leaves the
        previous index or the new one, both loadable; older generations and temporaries of an interrupted
        earlier write are removed.

        Args:
            folder: the index folder.
            write_faiss: also write the FAISS index (default: when the backend is "faiss").
        """
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        feats = self.vectors if self.kind == "pooled" else self.frames
        assert feats is not None
        if not _all_finite(feats):
            rows = _non_finite_rows(feats)
            ids = ", ".join(repr(self.records[r].video_id) for r in rows)
            raise VidretError(
                f"refusing to write an index with NaN/Inf vectors (videos {ids}); the model that encoded them has "
                "NaN/Inf weights: use another adapter or backbone"
            )
        check_records(self.records, self.root, f"the index for {out}")
        sweep_temporaries(out)
        dtype = torch.float16 if self.settings.dtype == "float16" else torch.float32
        arrays: dict[str, np.ndarray] = {"features": feats.to(dtype).contiguous().numpy()}  # torch casts in parallel
        if self.kind == "frames":
            assert self.masks is not None
            arrays["masks"] = self.masks.contiguous().numpy().astype(bool)
        files: dict[str, dict[str, str]] = {}
        for role, arr in arrays.items():
            name, digest = write_content_named(out, role, ".npy", functools.partial(write_npy, arr=arr))
            files[role] = {"file": name, "sha256": digest}
        if write_faiss if write_faiss is not None else self.backend_name == "faiss":
            if self.kind != "pooled":
                raise VidretError("only pooled indexes can have a FAISS index")
            if isinstance(self._backend, FaissIndex):
                backend = self._backend
            else:
                assert self.vectors is not None
                backend = FaissIndex(self.vectors, self.settings.nlist, self.settings.nprobe)
            name, digest = write_content_named(out, "faiss", ".index", backend.write_to)
            files["faiss"] = {"file": name, "sha256": digest, "nlist": str(backend.nlist)}
        name, digest = write_content_named(out, "videos", ".jsonl", self._write_records)
        files["videos"] = {"file": name, "sha256": digest}
        meta = {
            "format_version": INDEX_FORMAT_VERSION,
            "kind": self.kind,
            "count": len(self),
            "dim": self.dim,
            "backend": self.backend_name,
            "settings": asdict(self.settings),
            "model": asdict(self.identity),
            "files": files,
            "root": self.root,
        }
        replace_json(out / INDEX_FILE, meta)  # the commit point
        remove_unreferenced(out, DATA_STEMS, [f["file"] for f in files.values()])
        legacy = out / LEGACY_VIDEOS_FILE
        if legacy.is_file() and not legacy.is_symlink():
            legacy.unlink()
        return out

    def _write_records(self, f: IO[bytes], rows: int = 16_384) -> None:
        for s in range(0, len(self.records), rows):
            f.write("".join(r.to_json() + "\n" for r in self.records[s : s + rows]).encode("utf-8"))

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike[str],
        backend: Backend | None = None,
        nprobe: int | None = None,
        verify: bool = True,
    ) -> VideoIndex:
        """Open an index folder, treating every file in it as untrusted (see the module docstring).

        Args:
            folder: the folder ``save`` wrote.
            backend: override the stored backend ("exact" works for every index; "faiss" needs [ann]).
            nprobe: override the FAISS nprobe.
            verify: check the SHA-256 of every data file (catches damaged or hand-edited files).

        Raises:
            VidretError: the folder is not a readable, well-formed index (the message names the file and field).
        """
        root = Path(folder)
        meta_path = root / INDEX_FILE
        m = parse_index_meta(read_index_json(root), meta_path)
        where = f"index {root}"

        def path_of(role: str) -> Path:
            p = root / m.files[role]["file"]  # a bare name (checked): always inside the index folder
            if not p.is_file():
                raise VidretError(f"index file {p} is missing; rebuild the index")
            if verify and sha256_file(p) != m.files[role]["sha256"]:
                raise VidretError(f"index file {p} does not match its checksum (damaged?); rebuild the index")
            return p

        records = read_records(path_of("videos"))
        if len(records) != m.count:
            raise VidretError(f"{where} holds {len(records)} videos but index.json says {m.count}; rebuild the index")
        check_records(records, m.root, where)
        n, e = m.count, m.dim
        feature_path = path_of("features")
        pooled = m.kind == "pooled"

        def shape_ok(s: tuple[int, ...]) -> bool:  # pooled [N, E]; frames [N, T, E]
            return s == (n, e) if pooled else (len(s) == 3 and s[0] == n and s[2] == e)

        want = f"({n}, {e})" if pooled else f"({n}, T, {e})"
        stored = read_npy(feature_path, "features", ("float16", "float32"), shape_ok, want)
        feats = torch.from_numpy(stored).float()
        if not _all_finite(feats):
            rows = _non_finite_rows(feats)
            raise VidretError(
                f"index file {feature_path} holds NaN/Inf vectors (rows {rows}, videos "
                f"{[records[r].video_id for r in rows]}); rebuild the index with an adapter whose weights are finite"
            )
        if pooled and stored.dtype == np.float16:  # renormalised after the cast: cosine scores stay <= 1
            feats = F.normalize(feats, dim=-1)
        chosen: Backend = backend or m.backend
        if m.kind == "pooled":
            idx = cls(records, m.identity, m.settings, vectors=feats, backend_name="exact", root=m.root)
        else:
            t = feats.shape[1]
            masks = read_npy(path_of("masks"), "masks", ("bool",), lambda s: s == (n, t), f"({n}, {t})")
            idx = cls(
                records,
                m.identity,
                m.settings,
                frames=feats,
                masks=torch.from_numpy(masks),
                backend_name="exact",
                root=m.root,
            )
        idx.folder = str(root)
        if chosen == "faiss":
            if "faiss" in m.files and faiss_available():
                fi = FaissIndex.load(path_of("faiss"), m.settings.nprobe if nprobe is None else nprobe)
                fi.check(n, e, where)
                idx.backend_name = "faiss"
                idx._backend = fi
                if nprobe is not None:  # 0: the size rule, also for indexes that recorded a value
                    idx.settings = IndexSettings.from_dict({**asdict(idx.settings), "nprobe": nprobe})
            else:
                idx.use_backend("faiss", nprobe)  # builds it (or says how to install FAISS)
        elif nprobe is not None:
            idx.use_backend("exact", nprobe)
        return idx


# The index's public face: the types a user of VideoIndex meets are re-exported from their new homes.
__all__ = [
    "ExactIndex",
    "FaissIndex",
    "IndexSettings",
    "ModelIdentity",
    "VideoIndex",
    "VideoRecord",
    "adapter_fingerprint",
    "check_identity",
    "faiss_available",
    "model_identity",
]
