"""Vector search backends of an index: exact torch search (the default), FAISS IVF-Flat (the ``[ann]`` extra),
and exact search through a text-conditioned head over per-frame features.
"""

from __future__ import annotations

import math
import os
from typing import IO, Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vidret.errors import VidretError
from vidret.heads import VideoFeatures, masked_mean


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


# The automatic IVF settings (nlist = 0 / nprobe = 0), chosen for recall@10 >= 0.95 against exact search on
# clustered vectors (``vidret bench search --data clustered``; figures in benchmarks/search.md):
AUTO_NLIST_PER_SQRT = 4  # nlist = 4 sqrt(N): the low end of FAISS's advice (4 to 16 sqrt(N))
AUTO_NLIST_MAX = 1024  # ... at most: k-means and assignment cost grow with N * nlist (1M: ~200 s on 2 cores)
AUTO_NPROBE_SCAN = 5000  # nprobe visits at least this many vectors (small collections need a large share) ...
AUTO_NPROBE_SHARE = 16  # ... and at least 1/16 of the lists


def default_nlist(n: int) -> int:
    """IVF list count for n vectors: 4 sqrt(n), at most 1024, with >= 39 training points per list (FAISS's floor).

    More, smaller lists than the ~sqrt(n) used before: at 100k clustered vectors 1024 lists reach recall@10
    0.96 visiting 64 of them (1.2 ms per query), where 316 lists needed 128 for 0.97 (10 ms).
    """
    return max(1, min(int(AUTO_NLIST_PER_SQRT * math.sqrt(n)), AUTO_NLIST_MAX, n // 39))


def default_nprobe(n: int, nlist: int) -> int:
    """Lists visited per query for n vectors in ``nlist`` lists: enough to scan >= 5000 vectors and >= nlist / 16.

    Measured on clustered vectors, recall@10 vs exact: 10k (256 lists, nprobe 128) 0.96, 100k and 1M in
    benchmarks/search.md (>= 0.95). Never more than ``nlist`` (all lists: exact results).
    """
    if n <= 0 or nlist <= 0:
        return 1
    by_scan = math.ceil(nlist * AUTO_NPROBE_SCAN / n)
    by_share = math.ceil(nlist / AUTO_NPROBE_SHARE)
    return max(1, min(nlist, max(by_scan, by_share)))


class FaissIndex:
    """FAISS IVF-Flat over inner product: approximate search whose recall/speed knob is ``nprobe``.

    Args:
        vectors: [N, E] L2-normalised float vectors to train the coarse quantizer on and add.
        nlist: number of inverted lists (0 = ``default_nlist(N)``).
        nprobe: lists visited per query (more = higher recall, slower); clipped to nlist; 0 =
            ``default_nprobe(N, nlist)``.
        seed: k-means seed, so a rebuild gives the same lists.
        train_per_list: k-means training points per list (FAISS suggests 30 to 256); a sample of the vectors.
    """

    kind = "faiss"

    def __init__(
        self, vectors: Tensor, nlist: int = 0, nprobe: int = 0, seed: int = 0, train_per_list: int = 64
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
    def from_faiss(cls, index: Any, nprobe: int = 0) -> FaissIndex:
        """Wrap an existing ``faiss.IndexIVF`` (e.g. read from disk); nprobe 0 = chosen from its size."""
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
        """Set the lists visited per query; 0 = ``default_nprobe`` for this index's size and list count."""
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise VidretError(f"nprobe must be an int >= 1 (0 = chosen from the collection size), got {value!r}")
        nlist = int(self._index.nlist)
        self._index.nprobe = min(value or default_nprobe(int(self._index.ntotal), nlist), nlist)

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
    def load(cls, path: str | os.PathLike[str], nprobe: int = 0) -> FaissIndex:
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


__all__ = [
    "ExactIndex",
    "FaissIndex",
    "FramesSearch",
    "SearchBackend",
    "default_nlist",
    "default_nprobe",
    "faiss_available",
    "mean_pool",
]
