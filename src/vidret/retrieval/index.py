"""Video indexes: stored video embeddings, the exact and FAISS search backends, and the on-disk format.

An index folder holds::

    index.json           format version, kind, backend, settings, model identity, file checksums
    videos.jsonl         one line per row: video_id, path, real_path, duration, file identity, captions
    features-<h>.npy     pooled:  [N, E] L2-normalised video vectors (float16 or float32)
                         frames:  [N, T, E] per-frame embeddings (text-conditioned heads)
    masks-<h>.npy        frames kind only: [N, T] bool, True = real frame
    faiss-<h>.index      FAISS IVF-Flat index over the pooled vectors (backend "faiss")
    cache/               the frame cache used to build it (default location)

Two kinds: ``pooled`` when the model's head is text-independent (meanP, seqTransf: one vector per video,
searched by inner product) and ``frames`` when it is text-conditioned (Cross-Modal Adapter: the video vector
depends on the query, so exact search runs ``model.similarity`` over video chunks). Data files carry a
content hash in their name and ``index.json`` is replaced last, so an interrupted write leaves the previous
index intact. Loading verifies SHA-256 checksums and refuses a model other than the one that built it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vidret.errors import VidretError
from vidret.heads import VideoFeatures, masked_mean

logger = logging.getLogger(__name__)

INDEX_FORMAT_VERSION = 1
INDEX_FILE = "index.json"
VIDEOS_FILE = "videos.jsonl"

IndexKind = Literal["pooled", "frames"]
Backend = Literal["exact", "faiss"]
StorageDtype = Literal["float16", "float32"]


# ------------------------------------------------------------------------------------------ metadata


class VideoRecord(NamedTuple):
    """One indexed video: what the media routes may serve and what ``--update`` compares.

    A NamedTuple rather than a frozen dataclass: a million of them are built when a large index loads.
    """

    video_id: str  # unique in the index
    path: str = ""  # absolute path of the video file as indexed ("" for synthetic rows)
    real_path: str = ""  # os.path.realpath at indexing time; media routes refuse a file that now resolves elsewhere
    duration: float | None = None  # seconds, from the container headers
    identity: str = ""  # vidret.data.cache.file_identity at indexing time ("" = unknown)
    start: float | None = None  # segment start (manifest entries), None = from the start
    end: float | None = None  # segment end, None = to the end
    captions: tuple[str, ...] = ()  # manifest captions, shown by the web page

    def to_json(self) -> str:
        # Built by hand: dataclasses.asdict deep-copies and dominated writing million-row indexes.
        d = {
            "video_id": self.video_id,
            "path": self.path,
            "real_path": self.real_path,
            "duration": self.duration,
            "identity": self.identity,
            "start": self.start,
            "end": self.end,
            "captions": list(self.captions),
        }
        return json.dumps(d, ensure_ascii=False)

    @classmethod
    def from_obj(cls, d: dict[str, Any]) -> VideoRecord:
        duration, start, end = d.get("duration"), d.get("start"), d.get("end")
        return cls(
            str(d["video_id"]),
            str(d.get("path", "")),
            str(d.get("real_path", "")),
            None if duration is None else float(duration),
            str(d.get("identity", "")),
            None if start is None else float(start),
            None if end is None else float(end),
            tuple(str(c) for c in d.get("captions", ())),
        )


@dataclass(frozen=True)
class ModelIdentity:
    """Which backbone + adapter produced an index's vectors (and can therefore query it)."""

    backbone_name: str  # architecture name, e.g. "ViT-B-32"
    backbone_fingerprint: str  # vidret.backbone.clip.fingerprint of the backbone weights
    adapter_method: str  # registered method name
    adapter_fingerprint: str  # see adapter_fingerprint(): method + config + trained state
    backbone_spec: str = ""  # how to load the backbone again: a name, a path, or "random:<config>"
    adapter_path: str = ""  # the adapter folder the index was built with ("" = built from memory)

    def describe_backbone(self) -> str:
        return f"{self.backbone_name!r} (fingerprint {self.backbone_fingerprint})"

    def describe_adapter(self) -> str:
        where = f" from {self.adapter_path}" if self.adapter_path else ""
        return f"{self.adapter_method!r}{where} (fingerprint {self.adapter_fingerprint})"


@dataclass(frozen=True)
class IndexSettings:
    """How videos became vectors, and how the vectors are stored and searched."""

    num_frames: int = 12  # T frames per video
    fps: float = 1.0  # candidate frame rate before uniform subsampling to T
    max_candidates: int = 64  # cap on candidates per video (the frame cache's cap)
    image_size: int = 224  # must equal the backbone's input size
    max_words: int = 32  # query length in tokens
    dtype: StorageDtype = "float16"  # storage dtype of the feature file (search always runs in float32)
    backend: Backend = "exact"  # default search backend when the index is loaded
    nlist: int = 0  # FAISS IVF lists; 0 = chosen from the collection size (~sqrt(N))
    nprobe: int = 16  # FAISS lists visited per query: the recall-vs-speed knob

    def __post_init__(self) -> None:
        for name in ("num_frames", "max_candidates", "image_size", "max_words", "nprobe"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise VidretError(f"index setting {name} must be an int >= 1, got {v!r}")
        if not (isinstance(self.fps, (int, float)) and math.isfinite(self.fps) and self.fps > 0):
            raise VidretError(f"index setting fps must be a positive number, got {self.fps!r}")
        if self.max_candidates < self.num_frames:
            raise VidretError(f"max_candidates ({self.max_candidates}) must be >= num_frames ({self.num_frames})")
        if self.dtype not in ("float16", "float32"):
            raise VidretError(f"index dtype must be 'float16' or 'float32', got {self.dtype!r}")
        if self.backend not in ("exact", "faiss"):
            raise VidretError(f"index backend must be 'exact' or 'faiss', got {self.backend!r}")
        if isinstance(self.nlist, bool) or not isinstance(self.nlist, int) or self.nlist < 0:
            raise VidretError(f"nlist must be an int >= 0 (0 = automatic), got {self.nlist!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IndexSettings:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


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


# ------------------------------------------------------------------------------------------ backends


class SearchBackend(Protocol):
    """What every backend offers: top-k inner-product search over L2-normalised vectors."""

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """[Q, E] queries -> (scores float [Q, k'], rows long [Q, k']), k' = min(k, N); rows -1 = no result."""
        ...

    def __len__(self) -> int: ...


def _check_queries(queries: Tensor, dim: int) -> Tensor:
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise VidretError(f"query vectors must be [Q, {dim}], got {tuple(queries.shape)}")
    return queries.detach().float().cpu()


class ExactIndex:
    """Brute-force inner product in torch: a matmul per row chunk, then a top-k merge.

    The vectors are held transposed, [E, N] contiguous: for a handful of queries the CPU GEMM
    ``[Q, E] @ [E, N]`` ran ~1.7x faster than ``[Q, E] @ [N, E]^T`` at N = 1M here (8 queries: 0.72 s vs
    1.2-1.3 s on 2 cores). ``vectors`` is a [N, E] view of that storage, so nothing is held twice.

    Args:
        vectors: [N, E] L2-normalised video vectors (held as float32).
        chunk_rows: rows scored per matmul; bounds the [Q, chunk] score buffer.
    """

    kind = "exact"

    def __init__(self, vectors: Tensor, chunk_rows: int = 262_144) -> None:
        if vectors.ndim != 2:
            raise ValueError(f"vectors must be [N, E], got {tuple(vectors.shape)}")
        self._t = vectors.detach().float().T.contiguous()  # [N, E] -> [E, N]
        self.chunk_rows = chunk_rows

    @property
    def vectors(self) -> Tensor:
        """[N, E] (a transposed view of the [E, N] storage)."""
        return self._t.T

    def __len__(self) -> int:
        return self._t.shape[1]

    @property
    def dim(self) -> int:
        return self._t.shape[0]

    @torch.no_grad()
    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        q = _check_queries(queries, self.dim)
        n = len(self)
        k = max(0, min(k, n))
        if k == 0 or q.shape[0] == 0:
            return torch.zeros(q.shape[0], k), torch.zeros(q.shape[0], k, dtype=torch.long)
        best_s, best_i = [], []
        for s in range(0, n, self.chunk_rows):
            scores = q @ self._t[:, s : s + self.chunk_rows]  # [Q, E] @ [E, chunk] -> [Q, chunk]
            v, i = scores.topk(min(k, scores.shape[1]), dim=1)
            best_s.append(v)
            best_i.append(i + s)
        if len(best_s) == 1:
            return best_s[0], best_i[0]
        all_s, all_i = torch.cat(best_s, 1), torch.cat(best_i, 1)  # [Q, chunks*k]
        v, j = all_s.topk(k, dim=1)
        return v, all_i.gather(1, j)


def faiss_available() -> bool:
    """Whether the optional ``faiss`` package (the ``[ann]`` extra) can be imported."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as e:
        raise VidretError(
            "the FAISS backend needs the [ann] extra: `pip install faiss-cpu` (or use the exact backend)"
        ) from e
    return faiss


def default_nlist(n: int) -> int:
    """IVF list count for n vectors: ~sqrt(n), with at least 39 training points per list (FAISS's floor)."""
    return max(1, min(int(math.sqrt(n)), n // 39))


class FaissIndex:
    """FAISS IVF-Flat over inner product: approximate search whose recall/speed knob is ``nprobe``.

    Args:
        vectors: [N, E] L2-normalised float vectors to train the coarse quantizer on and add.
        nlist: number of inverted lists (0 = ``default_nlist(N)``).
        nprobe: lists visited per query (more = higher recall, slower); clipped to nlist.
        seed: k-means seed, so a rebuild gives the same lists.
        train_per_list: k-means training points per list (FAISS suggests 30 to 256); a sample of the vectors.
    """

    kind = "faiss"

    def __init__(
        self, vectors: Tensor, nlist: int = 0, nprobe: int = 16, seed: int = 0, train_per_list: int = 64
    ) -> None:
        faiss = _faiss()
        x = np.ascontiguousarray(vectors.detach().float().cpu().numpy())
        n, d = x.shape
        if n == 0:
            raise VidretError("cannot build a FAISS index over an empty collection")
        nlist = nlist or default_nlist(n)
        nlist = min(nlist, n)
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        rng = np.random.default_rng(seed)
        max_train = max(train_per_list * nlist, 39 * nlist)
        train = x if n <= max_train else x[np.sort(rng.choice(n, max_train, replace=False))]
        index.train(train)
        index.add(x)
        self._index = index
        self._quantizer = quantizer  # keep the quantizer alive as long as the IVF index refers to it
        self.nprobe = nprobe

    @classmethod
    def from_faiss(cls, index: Any, nprobe: int = 16) -> FaissIndex:
        """Wrap an existing ``faiss.IndexIVF`` (e.g. read from disk)."""
        self = cls.__new__(cls)
        self._index = index
        self._quantizer = None
        self.nprobe = nprobe
        return self

    @property
    def nlist(self) -> int:
        return int(self._index.nlist)

    @property
    def nprobe(self) -> int:
        return int(self._index.nprobe)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise VidretError(f"nprobe must be an int >= 1, got {value!r}")
        self._index.nprobe = min(value, int(self._index.nlist))

    @property
    def dim(self) -> int:
        return int(self._index.d)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        q = np.ascontiguousarray(_check_queries(queries, self.dim).numpy())
        k = max(0, min(k, len(self)))
        if k == 0 or q.shape[0] == 0:
            return torch.zeros(q.shape[0], k), torch.zeros(q.shape[0], k, dtype=torch.long)
        scores, rows = self._index.search(q, k)
        return torch.from_numpy(scores), torch.from_numpy(rows.astype(np.int64))

    def save(self, path: str | os.PathLike[str]) -> None:
        _faiss().write_index(self._index, os.fspath(path))

    @classmethod
    def load(cls, path: str | os.PathLike[str], nprobe: int = 16) -> FaissIndex:
        return cls.from_faiss(_faiss().read_index(os.fspath(path)), nprobe)


class FramesSearch:
    """Exact search for text-conditioned heads: ``model.similarity`` over chunks of per-frame features."""

    def __init__(self, frames: Tensor, masks: Tensor, chunk_videos: int = 4096) -> None:
        self.frames = frames.detach().float().contiguous()  # [N, T, E]
        self.masks = masks.detach().bool().contiguous()  # [N, T]
        self.chunk_videos = chunk_videos

    def __len__(self) -> int:
        return self.frames.shape[0]

    @torch.no_grad()
    def search_text(self, model: Any, text: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """[Q, E] raw text embeddings -> (scores [Q, k'] as logits / logit scale, rows [Q, k'])."""
        n = len(self)
        k = max(0, min(k, n))
        q = text.shape[0]
        if k == 0 or q == 0:
            return torch.zeros(q, k), torch.zeros(q, k, dtype=torch.long)
        device = text.device
        scale = model.logit_scale().float()
        best_s, best_i = [], []
        for s in range(0, n, self.chunk_videos):
            part = VideoFeatures(
                self.frames[s : s + self.chunk_videos].to(device), self.masks[s : s + self.chunk_videos].to(device)
            )
            scores = (model.similarity(text, part).float() / scale).cpu()  # [Q, chunk], cosine-like
            v, i = scores.topk(min(k, scores.shape[1]), dim=1)
            best_s.append(v)
            best_i.append(i + s)
        all_s, all_i = torch.cat(best_s, 1), torch.cat(best_i, 1)
        v, j = all_s.topk(k, dim=1)
        return v, all_i.gather(1, j)


def mean_pool(frames: Tensor, masks: Tensor) -> Tensor:
    """meanP pooling (normalise frames, masked mean, normalise): [N, T, E] -> [N, E].

    Used for video-to-video queries on a ``frames`` index, whose head has no text-independent pooling.
    """
    return F.normalize(masked_mean(F.normalize(frames.float(), dim=-1), masks), dim=-1)


# ------------------------------------------------------------------------------------------ the index


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


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
    _backend: SearchBackend | None = field(default=None, repr=False)
    _pooled_for_video: ExactIndex | None = field(default=None, repr=False)
    _rows: dict[str, int] | None = field(default=None, repr=False)

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
        """Write the index into ``folder`` (created); ``index.json`` goes last so readers never see half a write.

        Args:
            folder: the index folder.
            write_faiss: also write the FAISS index (default: when the backend is "faiss").
        """
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        dtype = torch.float16 if self.settings.dtype == "float16" else torch.float32
        arrays: dict[str, np.ndarray] = {}
        feats = self.vectors if self.kind == "pooled" else self.frames
        assert feats is not None
        arrays["features"] = feats.to(dtype).contiguous().numpy()  # torch casts in parallel; numpy does not
        if self.kind == "frames":
            assert self.masks is not None
            arrays["masks"] = self.masks.contiguous().numpy().astype(bool)
        files: dict[str, dict[str, str]] = {}
        written: list[Path] = []
        for name, arr in arrays.items():
            tmp = out / f".{name}.{os.getpid()}.tmp"
            with tmp.open("wb") as f:
                np.save(f, arr, allow_pickle=False)
            digest = _sha256(tmp)
            final = out / f"{name}-{digest[:12]}.npy"
            os.replace(tmp, final)
            files[name] = {"file": final.name, "sha256": digest}
            written.append(final)
        if write_faiss if write_faiss is not None else self.backend_name == "faiss":
            if self.kind != "pooled":
                raise VidretError("only pooled indexes can have a FAISS index")
            if isinstance(self._backend, FaissIndex):
                backend = self._backend
            else:
                assert self.vectors is not None
                backend = FaissIndex(self.vectors, self.settings.nlist, self.settings.nprobe)
            tmp = out / f".faiss.{os.getpid()}.tmp"
            backend.save(tmp)
            digest = _sha256(tmp)
            final = out / f"faiss-{digest[:12]}.index"
            os.replace(tmp, final)
            files["faiss"] = {"file": final.name, "sha256": digest, "nlist": str(backend.nlist)}
            written.append(final)
        tmp_v = out / f".{VIDEOS_FILE}.{os.getpid()}.tmp"
        with tmp_v.open("w", encoding="utf-8") as f:
            for r in self.records:
                f.write(r.to_json() + "\n")
        digest = _sha256(tmp_v)
        os.replace(tmp_v, out / VIDEOS_FILE)
        files["videos"] = {"file": VIDEOS_FILE, "sha256": digest}
        meta = {
            "format_version": INDEX_FORMAT_VERSION,
            "kind": self.kind,
            "count": len(self),
            "dim": self.dim,
            "backend": self.backend_name,
            "settings": asdict(self.settings),
            "model": asdict(self.identity),
            "files": files,
        }
        tmp_m = out / f".{INDEX_FILE}.{os.getpid()}.tmp"
        tmp_m.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp_m, out / INDEX_FILE)
        # Older generations of the data files are no longer referenced by index.json.
        keep = {p.name for p in written} | {VIDEOS_FILE, INDEX_FILE}
        for p in out.iterdir():
            if p.is_file() and p.name not in keep and p.name.split("-")[0] in ("features", "masks", "faiss"):
                p.unlink()
        return out

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike[str],
        backend: Backend | None = None,
        nprobe: int | None = None,
        verify: bool = True,
    ) -> VideoIndex:
        """Open an index folder.

        Args:
            folder: the folder ``save`` wrote.
            backend: override the stored backend ("exact" works for every index; "faiss" needs [ann]).
            nprobe: override the FAISS nprobe.
            verify: check the SHA-256 of every data file (catches damaged or hand-edited files).
        """
        root = Path(folder)
        meta_path = root / INDEX_FILE
        if not meta_path.is_file():
            raise VidretError(f"{root} is not a vidret index (no {INDEX_FILE}); build one with `vidret index`")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise VidretError(f"{meta_path} is not valid JSON ({e}); rebuild the index") from e
        if meta.get("format_version") != INDEX_FORMAT_VERSION:
            raise VidretError(
                f"{meta_path}: index format version {meta.get('format_version')!r}, this vidret reads "
                f"{INDEX_FORMAT_VERSION}; rebuild the index with this version"
            )
        try:
            files = meta["files"]
            identity = ModelIdentity(**meta["model"])
            settings = IndexSettings.from_dict(meta["settings"])
            kind = meta["kind"]
        except (KeyError, TypeError) as e:
            raise VidretError(f"{meta_path} lacks field {e}; rebuild the index") from e

        def path_of(name: str) -> Path:
            p = root / Path(files[name]["file"]).name  # a bare file name inside the index folder, never a path
            if not p.is_file():
                raise VidretError(f"index file {p} is missing; rebuild the index")
            if verify and _sha256(p) != files[name]["sha256"]:
                raise VidretError(f"index file {p} does not match its checksum (damaged?); rebuild the index")
            return p

        lines = [ln for ln in path_of("videos").read_text(encoding="utf-8").splitlines() if ln.strip()]
        try:
            objs = json.loads("[" + ",".join(lines) + "]")  # one parse: ~3x faster than a loads per line
            records = [VideoRecord.from_obj(o) for o in objs]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise VidretError(f"{root / VIDEOS_FILE} is damaged ({e}); rebuild the index") from e
        feats = torch.from_numpy(np.load(path_of("features"), allow_pickle=False)).float()
        chosen: Backend = backend or meta.get("backend", "exact")
        if kind == "pooled":
            idx = cls(records, identity, settings, vectors=feats, backend_name="exact")
        elif kind == "frames":
            masks = torch.from_numpy(np.load(path_of("masks"), allow_pickle=False).astype(bool))
            idx = cls(records, identity, settings, frames=feats, masks=masks, backend_name="exact")
        else:
            raise VidretError(f"{meta_path}: unknown index kind {kind!r}")
        if chosen == "faiss":
            if "faiss" in files and faiss_available():
                fi = FaissIndex.load(path_of("faiss"), nprobe or settings.nprobe)
                if len(fi) != len(idx):
                    raise VidretError(f"{root}: FAISS index holds {len(fi)} vectors, expected {len(idx)}; rebuild")
                idx.backend_name = "faiss"
                idx._backend = fi
            else:
                idx.use_backend("faiss", nprobe)  # builds it (or says how to install FAISS)
        elif nprobe is not None:
            idx.use_backend("exact", nprobe)
        return idx


def read_index_meta(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``index.json`` of an index folder (no data files read)."""
    p = Path(folder) / INDEX_FILE
    if not p.is_file():
        raise VidretError(f"{folder} is not a vidret index (no {INDEX_FILE}); build one with `vidret index`")
    try:
        meta: dict[str, Any] = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VidretError(f"{p} is not valid JSON ({e}); rebuild the index") from e
    return meta


__all__ = [
    "INDEX_FORMAT_VERSION",
    "ExactIndex",
    "FaissIndex",
    "FramesSearch",
    "IndexSettings",
    "ModelIdentity",
    "SearchBackend",
    "VideoIndex",
    "VideoRecord",
    "adapter_fingerprint",
    "check_identity",
    "default_nlist",
    "faiss_available",
    "mean_pool",
    "model_identity",
    "read_index_meta",
]
