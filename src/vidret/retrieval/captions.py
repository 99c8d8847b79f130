"""Video -> text in the service: which captions of a bank best describe an indexed video (``serve --captions``).

The bank (a ``.txt`` or ``.jsonl`` file, read by :func:`vidret.retrieval.query.read_caption_bank`, the reader of
``vidret search --captions``) is encoded once per adapter when the service starts. A query then needs no
encoder at all: the video's stored vector (pooled indexes: cosine with every caption) or its stored per-frame
features (text-conditioned heads: the head's similarity divided by its logit scale, as
:func:`vidret.retrieval.query.rank_captions` scores a video file). For a windowed index
(``index --segment``) a video id names either one window or the whole video; for the whole video a caption's
score is its best window's, and the result says which window.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vidret.heads import VideoFeatures
from vidret.retrieval.http import ApiError


class CaptionBank:
    """Captions and their text embeddings, one [B, E] matrix per (adapter, max_words).

    Args:
        captions: the bank's captions (bank order is the ``caption_id`` order).
        source: where they came from (shown by ``/indexes``-like listings and errors).
        batch: captions encoded per forward pass.
    """

    def __init__(self, captions: Sequence[str], source: str = "", batch: int = 256) -> None:
        self.captions = list(captions)
        self.source = source
        self.batch = batch
        self._raw: dict[str, Tensor] = {}  # key -> [B, E] raw text embeddings (text-conditioned heads)
        self._unit: dict[str, Tensor] = {}  # key -> [B, E] L2-normalised (pooled indexes)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> CaptionBank:
        from vidret.retrieval.query import read_caption_bank

        return cls(read_caption_bank(path), source=os.fspath(path))

    def __len__(self) -> int:
        return len(self.captions)

    @torch.no_grad()
    def encode(self, key: str, model: Any, max_words: int) -> None:
        """Embed every caption with ``model`` (the adapter active in the bank) under ``key``; once per key."""
        from vidret.retrieval.query import encode_texts

        if key in self._raw:
            return
        parts = [
            encode_texts(model, self.captions[s : s + self.batch], max_words)
            for s in range(0, len(self.captions), self.batch)
        ]
        raw = torch.cat(parts)  # [B, E]
        self._raw[key] = raw
        self._unit[key] = F.normalize(raw, dim=-1)

    @torch.no_grad()
    def scores(self, key: str, index: Any, rows: Sequence[int], model: Any = None) -> Tensor:
        """[len(rows), B] scores of every caption against each of ``rows`` of ``index``.

        Pooled indexes compare the stored unit vectors with the unit caption embeddings (no model needed); a
        frames index runs ``model``'s head (the caller holds the bank's lock with the adapter active).
        """
        if index.kind == "pooled":
            vecs = index.vectors[list(rows)].float()  # [R, E]
            return vecs @ self._unit[key].T  # [R, E] @ [E, B] -> [R, B]
        device = next(p for p in model.parameters() if not p.is_meta).device
        video = VideoFeatures(index.frames[list(rows)].to(device), index.masks[list(rows)].to(device))  # [R, T, E]
        scale = model.logit_scale().float()
        out = []
        for s in range(0, len(self), self.batch):
            text = self._raw[key][s : s + self.batch].to(device)
            out.append((model.similarity(text, video).float() / scale).T.cpu())  # [b, R] -> [R, b]
        return torch.cat(out, dim=1)  # [R, B]

    def rank(
        self, key: str, index: Any, rows: Sequence[int], k: int, model: Any = None
    ) -> list[tuple[int, float, int]]:
        """The ``k`` best captions for the video made of ``rows``: (caption id, score, row of the best window)."""
        s = self.scores(key, index, rows, model)  # [R, B]
        best, which = s.max(dim=0)  # per caption: its best row
        v, i = best.topk(min(k, best.numel()))
        return [(c, score, rows[int(which[c])]) for c, score in zip(i.tolist(), v.tolist())]

    def describe(
        self, name: str, index: Any, key: str, video_id: str, k: int, adapters: Any, adapter: str
    ) -> dict[str, Any]:
        """The ``/captions`` answer for ``video_id`` of ``index`` (served as ``name``); 404 for an unknown id.

        ``adapters`` is the service's AdapterBank: a frames index runs ``adapter``'s head under its lock.
        """
        t0 = time.perf_counter()
        rows = index.rows_of_video(video_id)
        if not rows:
            raise ApiError(404, "unknown video id")
        if index.kind == "pooled":
            ranked = self.rank(key, index, rows, k)
        else:
            with adapters.lock:  # the head runs with this collection's adapter active
                ranked = self.rank(key, index, rows, k, adapters.use(adapter))
        results = []
        for rank, (cid, score, row) in enumerate(ranked, start=1):
            item: dict[str, Any] = {
                "rank": rank,
                "caption": self.captions[cid],
                "caption_id": cid,
                "score": round(float(score), 6) if math.isfinite(score) else None,
            }
            rec = index.records[row]
            if rec.start is not None or rec.end is not None:  # the window the caption matched best
                item["start"], item["end"] = rec.start, rec.end
            results.append(item)
        return {
            "index": name,
            "video_id": video_id,
            "k": min(k, len(self)),
            "took_ms": round((time.perf_counter() - t0) * 1000, 3),
            "results": results,
        }


__all__ = ["CaptionBank"]
