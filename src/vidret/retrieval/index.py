"""Video indexes: stored video embeddings, the exact and FAISS search backends, and the on-disk format.

An index folder holds::

    index.json           format version, kind, backend, settings, model identity, collection root, checksums
    videos-<h>.jsonl     one line per row: video_id, path, real_path, duration, file identity, captions
                         (``videos.jsonl`` in indexes written before it was content-named; still read)
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

An index folder may come from a stranger, and its checksums live in the ``index.json`` they protect, so
loading treats every file as untrusted data: ``index.json`` is schema-checked, the ``.npy`` headers are
checked (dtype, shape against ``count``/``dim``) before the data is read, vectors must be finite, a FAISS
file must agree with the index (size, dimension, ids in range), and every record with a file must lie
inside the collection ``root`` recorded at build time and carry the file identity media routes check.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vidret.atomic import remove_unreferenced, replace_json, sha256_file, sweep_temporaries, write_content_named
from vidret.errors import VidretError
from vidret.heads import VideoFeatures, masked_mean

logger = logging.getLogger(__name__)

INDEX_FORMAT_VERSION = 1
INDEX_FILE = "index.json"
LEGACY_VIDEOS_FILE = "videos.jsonl"  # the videos file of indexes written before it was content-named
DATA_STEMS = ("features", "masks", "faiss", "videos")  # roles of the content-named data files
_IDENTITY_RE = re.compile(r"[0-9]+:[0-9]+:[0-9a-f]{40}\Z")  # vidret.data.cache.file_identity: size:mtime_ns:sha1
_SHA256_RE = re.compile(r"[0-9a-f]{64}\Z")

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
    def from_obj(cls, d: Any) -> VideoRecord:
        """A record from its parsed JSON line, every field's type checked.

        Raises:
            ValueError: a field is missing or of the wrong type (the caller names the file and the row).
        """
        # `type(v) in` rather than isinstance: JSON gives exact types, and bool must not pass for a number.
        if type(d) is not dict:
            raise ValueError(f"a row must be a JSON object, got {type(d).__name__}")
        g = d.get
        vid, path, real_path, identity = g("video_id"), g("path", ""), g("real_path", ""), g("identity", "")
        if type(vid) is not str or not vid:
            raise ValueError(f"video_id must be a non-empty string, got {vid!r}")
        if not (type(path) is str and type(real_path) is str and type(identity) is str):
            raise ValueError(f"video {vid!r}: path, real_path and identity must be strings")
        duration, start, end, captions = g("duration"), g("start"), g("end"), g("captions", [])
        for v in (duration, start, end):
            if v is not None and (type(v) not in (float, int) or not math.isfinite(v)):
                raise ValueError(f"video {vid!r}: duration, start and end must be finite numbers or null, got {v!r}")
        if type(captions) is not list or not all(type(c) is str for c in captions):
            raise ValueError(f"video {vid!r}: captions must be a list of strings")
        return cls(
            vid,
            path,
            real_path,
            None if duration is None else float(duration),
            identity,
            None if start is None else float(start),
            None if end is None else float(end),
            tuple(captions),
        )


def check_records(records: Iterable[VideoRecord], root: str, where: str = "the index") -> None:
    """Refuse records a media route must never serve: files outside ``root``, files without an identity.

    Every record that names a file needs both ``path`` and ``real_path`` (absolute, inside ``root`` unless
    ``root`` is "" for an index written before roots were recorded) and the file identity media routes
    compare before serving. Video ids must be unique.
    """
    prefix = root if root.endswith(os.sep) else root + os.sep
    escape = f"{os.sep}..{os.sep}"
    seen: set[str] = set()
    for r in records:
        if r.video_id in seen:
            raise VidretError(f"{where}: video id {r.video_id!r} appears twice; rebuild the index")
        seen.add(r.video_id)
        if not r.path and not r.real_path:
            continue  # a synthetic row: nothing to serve
        if not r.path or not r.real_path:
            raise VidretError(
                f"{where}: video {r.video_id!r} has path {r.path!r} but real_path {r.real_path!r} (both or neither); "
                "rebuild the index"
            )
        for p in (r.path, r.real_path):
            # Lexically inside the root: starts with "<root>/" and has no ".." component after it (the same as
            # os.path.commonpath on normalised paths, without normalising a million paths on load).
            inside = p.startswith(prefix) and escape not in p[len(prefix) - 1 :] + os.sep if root else os.path.isabs(p)
            if not inside:
                what = f"outside the collection root {root}" if root else "not an absolute path"
                raise VidretError(
                    f"{where}: video {r.video_id!r} points to {p}, {what}; refusing the index (crafted or "
                    "hand-edited?); rebuild it with `vidret index` from the videos folder"
                )
        if not _IDENTITY_RE.match(r.identity):
            raise VidretError(
                f"{where}: video {r.video_id!r} names the file {r.real_path} without a valid file identity "
                f"({r.identity!r}), so its media could not be checked against the file that was indexed; "
                "rebuild the index with `vidret index`"
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

    def write_to(self, f: IO[bytes]) -> None:
        """Serialise into an open binary file (streamed: no second in-memory copy of the index)."""
        faiss = _faiss()
        if hasattr(faiss, "PyCallbackIOWriter"):
            writer = faiss.PyCallbackIOWriter(f.write)
            faiss.write_index(self._index, writer)
            del writer  # released before the caller closes the file
        else:
            f.write(faiss.serialize_index(self._index).tobytes())

    @classmethod
    def load(cls, path: str | os.PathLike[str], nprobe: int = 16) -> FaissIndex:
        """Read a FAISS file; an unreadable or damaged one raises VidretError (never a FAISS traceback)."""
        faiss = _faiss()
        try:
            index = faiss.read_index(os.fspath(path))
        except (RuntimeError, MemoryError, OSError) as e:
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise VidretError(f"{path} is not a readable FAISS index ({reason[:300]}); rebuild the index") from e
        if not isinstance(index, faiss.IndexIVFFlat):
            raise VidretError(f"{path} holds a FAISS {type(index).__name__}, not the IVF-Flat index vidret writes")
        return cls.from_faiss(index, nprobe)

    def check(self, count: int, dim: int, where: str) -> None:
        """Refuse a FAISS index that does not belong to an index of ``count`` vectors of size ``dim``.

        A damaged or crafted file can read fine and still return row ids far outside the index (ids up to
        3.6e18 were seen), so besides sizes every stored id is checked: each row in [0, count) exactly once.
        """
        faiss = _faiss()
        ix = self._index

        def fail(problem: str) -> VidretError:
            return VidretError(f"{where}: the FAISS index {problem}; rebuild the index (or use --backend exact)")

        if int(ix.d) != dim or int(ix.ntotal) != count:
            raise fail(f"holds {ix.ntotal} vectors of size {ix.d}, but the index has {count} of size {dim}")
        if int(ix.metric_type) != int(faiss.METRIC_INNER_PRODUCT) or not ix.is_trained:
            raise fail("is not a trained inner-product index")
        nlist = int(ix.nlist)
        quantizer = ix.quantizer
        if nlist < 1 or int(quantizer.ntotal) != nlist or int(quantizer.d) != dim:
            raise fail(f"has {nlist} lists but a quantizer of {quantizer.ntotal} centroids of size {quantizer.d}")
        direct_map = getattr(ix, "direct_map", None)
        if direct_map is not None and int(direct_map.type) != 0:  # vidret never writes a direct map
            raise fail("carries a direct map, which vidret never writes")
        invlists = ix.invlists
        if int(invlists.nlist) != nlist or int(invlists.code_size) != 4 * dim:
            raise fail("has inverted lists of the wrong size")
        seen = np.zeros(count, dtype=bool)
        total = 0
        for i in range(nlist):
            n = int(invlists.list_size(i))
            if n == 0:
                continue
            ptr = invlists.get_ids(i)
            try:
                ids = faiss.rev_swig_ptr(ptr, n).copy()
            finally:
                invlists.release_ids(i, ptr)
            if int(ids.min()) < 0 or int(ids.max()) >= count:
                raise fail(f"stores row ids in [{int(ids.min())}, {int(ids.max())}] (list {i}), outside [0, {count})")
            seen[ids] = True
            total += n
        if total != count or not bool(seen.all()):
            raise fail(f"does not store each of the {count} row ids exactly once")


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


def _save_npy(f: IO[bytes], arr: np.ndarray) -> None:
    np.save(f, arr, allow_pickle=False)


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


def _is_bare_name(v: Any) -> bool:
    return isinstance(v, str) and v not in ("", ".", "..") and not any(c in v for c in ("/", "\\", "\0", os.sep))


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


@dataclass(frozen=True)
class IndexMeta:
    """A schema-checked ``index.json``."""

    kind: IndexKind
    count: int  # rows (records = feature rows)
    dim: int  # E, the vector size
    backend: Backend  # the stored default backend
    settings: IndexSettings
    identity: ModelIdentity
    files: dict[str, dict[str, str]]  # role -> {"file": bare name, "sha256": hex[, "nlist": str]}
    root: str  # the collection root ("" = written before roots were recorded)


_MODEL_REQUIRED = ("backbone_name", "backbone_fingerprint", "adapter_method", "adapter_fingerprint")
_MODEL_OPTIONAL = ("backbone_spec", "adapter_path")


def parse_index_meta(meta: Any, where: str | os.PathLike[str]) -> IndexMeta:
    """Schema-check a parsed ``index.json``: one VidretError naming the first problem, never a KeyError.

    Every field's type is checked; ``count``/``dim`` are ints >= 0; data file names are bare names inside the
    index folder; ``root`` is "" or an absolute normalised path.
    """

    def fail(problem: str) -> VidretError:
        return VidretError(f"{where} is not a valid vidret index: {problem}; rebuild the index with `vidret index`")

    if not isinstance(meta, dict):
        raise fail(f"it holds a JSON {type(meta).__name__}, not an object")
    version = meta.get("format_version")
    if isinstance(version, bool) or version != INDEX_FORMAT_VERSION:
        raise VidretError(
            f"{where}: index format version {version!r}, this vidret reads {INDEX_FORMAT_VERSION}; rebuild the "
            "index with this version"
        )
    kind, backend = meta.get("kind"), meta.get("backend", "exact")
    if not isinstance(kind, str) or kind not in ("pooled", "frames"):
        raise fail(f"kind must be 'pooled' or 'frames', got {kind!r}")
    if not isinstance(backend, str) or backend not in ("exact", "faiss"):
        raise fail(f"backend must be 'exact' or 'faiss', got {backend!r}")
    for key in ("count", "dim"):
        if not _is_count(meta.get(key)):
            raise fail(f"{key} must be an int >= 0, got {meta.get(key)!r}")
    root = meta.get("root", "")
    if not isinstance(root, str) or (root and (not os.path.isabs(root) or os.path.normpath(root) != root)):
        raise fail(f"root must be an absolute, normalised folder path, got {root!r}")

    model = meta.get("model")
    if not isinstance(model, dict):
        raise fail(f"model must be an object, got {type(model).__name__}")
    unknown = sorted(set(model) - set(_MODEL_REQUIRED) - set(_MODEL_OPTIONAL))
    missing = [k for k in _MODEL_REQUIRED if k not in model]
    if unknown or missing:
        raise fail(f"model has unknown fields {unknown} or lacks {missing}")
    wrong = [k for k, v in model.items() if not isinstance(v, str)]
    if wrong:
        raise fail(f"model fields {wrong} must be strings")

    settings = meta.get("settings")
    if not isinstance(settings, dict):
        raise fail(f"settings must be an object, got {type(settings).__name__}")
    try:
        parsed_settings = IndexSettings.from_dict(settings)
    except VidretError as e:
        raise fail(str(e)) from e

    files = meta.get("files")
    if not isinstance(files, dict):
        raise fail(f"files must be an object, got {type(files).__name__}")
    need = {"features", "videos"} | ({"masks"} if kind == "frames" else set())
    allowed = need | ({"faiss"} if kind == "pooled" else set())
    if not need <= set(files) <= allowed:
        raise fail(f"a {kind} index names the data files {sorted(need)} (and optionally faiss), got {sorted(files)}")
    for role, entry in files.items():
        if not isinstance(entry, dict) or not set(entry) <= {"file", "sha256", "nlist"}:
            raise fail(f"files.{role} must be an object with file and sha256, got {entry!r}")
        if not _is_bare_name(entry.get("file")):
            raise fail(f"files.{role}.file must be a bare file name inside the index folder, got {entry.get('file')!r}")
        if not isinstance(entry.get("sha256"), str) or not _SHA256_RE.match(entry["sha256"]):
            raise fail(f"files.{role}.sha256 must be 64 hex digits, got {entry.get('sha256')!r}")
        if "nlist" in entry and not (isinstance(entry["nlist"], str) and entry["nlist"].isdigit()):
            raise fail(f"files.{role}.nlist must be a string of digits, got {entry['nlist']!r}")
    return IndexMeta(
        kind=kind,  # type: ignore[arg-type]
        count=meta["count"],
        dim=meta["dim"],
        backend=backend,  # type: ignore[arg-type]
        settings=parsed_settings,
        identity=ModelIdentity(**model),
        files=files,
        root=root,
    )


def _read_npy(
    path: Path, role: str, dtypes: tuple[str, ...], shape_ok: Callable[[tuple[int, ...]], bool], want: str
) -> np.ndarray:
    """A ``.npy`` data file, its header (dtype, shape) checked before the data is read; never a pickle."""

    def fail(problem: str) -> VidretError:
        return VidretError(f"index file {path} ({role}) {problem}; rebuild the index")

    fmt = np.lib.format
    try:
        with path.open("rb") as f:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = fmt.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = fmt.read_array_header_2_0(f)
            else:
                raise fail(f"has .npy format version {version}, not 1.0 or 2.0")
            if dtype.hasobject or dtype not in [np.dtype(d) for d in dtypes]:
                raise fail(f"holds {dtype.str} values, expected {' or '.join(dtypes)}")
            if not shape_ok(tuple(shape)):
                raise fail(f"has shape {tuple(shape)}, expected {want}")
            f.seek(0)
            arr = np.load(f, allow_pickle=False)
    except VidretError:
        raise
    except (ValueError, OSError, EOFError) as e:
        raise fail(f"is not a readable .npy file ({e})") from e
    return arr


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
            name, digest = write_content_named(out, role, ".npy", functools.partial(_save_npy, arr=arr))
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
        m = parse_index_meta(_read_json(root), meta_path)
        where = f"index {root}"

        def path_of(role: str) -> Path:
            p = root / m.files[role]["file"]  # a bare name (checked): always inside the index folder
            if not p.is_file():
                raise VidretError(f"index file {p} is missing; rebuild the index")
            if verify and sha256_file(p) != m.files[role]["sha256"]:
                raise VidretError(f"index file {p} does not match its checksum (damaged?); rebuild the index")
            return p

        records = _read_records(path_of("videos"))
        if len(records) != m.count:
            raise VidretError(f"{where} holds {len(records)} videos but index.json says {m.count}; rebuild the index")
        check_records(records, m.root, where)
        n, e = m.count, m.dim
        feature_path = path_of("features")
        pooled = m.kind == "pooled"

        def shape_ok(s: tuple[int, ...]) -> bool:  # pooled [N, E]; frames [N, T, E]
            return s == (n, e) if pooled else (len(s) == 3 and s[0] == n and s[2] == e)

        want = f"({n}, {e})" if pooled else f"({n}, T, {e})"
        feats = torch.from_numpy(_read_npy(feature_path, "features", ("float16", "float32"), shape_ok, want)).float()
        if not _all_finite(feats):
            rows = _non_finite_rows(feats)
            raise VidretError(
                f"index file {feature_path} holds NaN/Inf vectors (rows {rows}, videos "
                f"{[records[r].video_id for r in rows]}); rebuild the index with an adapter whose weights are finite"
            )
        chosen: Backend = backend or m.backend
        if m.kind == "pooled":
            idx = cls(records, m.identity, m.settings, vectors=feats, backend_name="exact", root=m.root)
        else:
            t = feats.shape[1]
            masks = _read_npy(path_of("masks"), "masks", ("bool",), lambda s: s == (n, t), f"({n}, {t})")
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
                fi = FaissIndex.load(path_of("faiss"), nprobe or m.settings.nprobe)
                fi.check(n, e, where)
                idx.backend_name = "faiss"
                idx._backend = fi
            else:
                idx.use_backend("faiss", nprobe)  # builds it (or says how to install FAISS)
        elif nprobe is not None:
            idx.use_backend("exact", nprobe)
        return idx


def _read_json(folder: Path) -> Any:
    p = folder / INDEX_FILE
    if not p.is_file():
        raise VidretError(f"{folder} is not a vidret index (no {INDEX_FILE}); build one with `vidret index`")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise VidretError(f"{p} is not valid JSON ({e}); rebuild the index") from e


def _read_records(path: Path) -> list[VideoRecord]:
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError as e:
        raise VidretError(f"{path} is not UTF-8 text ({e}); rebuild the index") from e
    try:
        objs = json.loads("[" + ",".join(lines) + "]")  # one parse: ~3x faster than a loads per line
    except (json.JSONDecodeError, RecursionError) as e:
        raise VidretError(f"{path} is damaged ({e}); rebuild the index") from e
    records = []
    for i, o in enumerate(objs):
        try:
            records.append(VideoRecord.from_obj(o))
        except ValueError as e:
            raise VidretError(f"{path}, row {i + 1}: {e}; rebuild the index") from e
    return records


def read_index_meta(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The schema-checked ``index.json`` of an index folder, as a dict (no data files read)."""
    meta = _read_json(Path(folder))
    parse_index_meta(meta, Path(folder) / INDEX_FILE)
    return dict(meta)


__all__ = [
    "INDEX_FORMAT_VERSION",
    "ExactIndex",
    "FaissIndex",
    "FramesSearch",
    "IndexMeta",
    "IndexSettings",
    "ModelIdentity",
    "SearchBackend",
    "VideoIndex",
    "VideoRecord",
    "adapter_fingerprint",
    "check_identity",
    "check_records",
    "default_nlist",
    "faiss_available",
    "mean_pool",
    "model_identity",
    "parse_index_meta",
    "read_index_meta",
]
