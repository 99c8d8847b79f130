"""Torch datasets over a manifest: training pairs, evaluation videos and evaluation queries.

Video samples are dicts ``{"frames": float [T, 3, S, S] (CLIP-normalised, zeros where padded),
"frame_mask": bool [T], "video_index": long [], "video_id": str, "valid": bool, ...}``; training samples
add ``"tokens": long [L]``. Frames come from a ``FrameCache`` when one is given (built on a miss), else
straight from the decoder.

A bad video never raises inside ``__getitem__`` (which would kill a DataLoader worker): the sample comes
back with ``valid=False``, zero frames, an all-false mask and the reason. ``collate`` drops such samples
and lists them under ``batch["bad"]`` / ``batch["bad_reasons"]`` so they reach the main process, where
``BadVideoReport.update(batch)`` records each once (one warning each) and ``.check(max_bad_fraction)``
stops a run that has too many. A batch can therefore be smaller than the batch size, even empty (B=0).

Randomness (the training caption, ``segment_random`` frame positions) comes from a generator seeded by
(seed, epoch, index), so it does not depend on workers, samplers or order: any sampler works,
``DistributedSampler`` included. Call ``set_epoch`` before each epoch (with ``persistent_workers=True``
the workers keep the epoch they started with).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from vidret.backbone.tokenizer import tokenize
from vidret.data.cache import FrameCache
from vidret.data.decode import BadVideoError, PyAVDecoder, VideoDecoder
from vidret.data.manifest import ManifestEntry
from vidret.data.sampling import SamplingConfig, SamplingMode, sample_timestamps, select_indices
from vidret.data.transforms import normalize, resize_crop
from vidret.errors import VidretError

logger = logging.getLogger(__name__)

CaptionMode = Literal["random_per_video", "all_pairs"]
CAPTION_MODES: tuple[CaptionMode, ...] = get_args(CaptionMode)
CaptionProtocol = Literal["single", "multi", "paragraph"]


class _FrameLoader:
    """Frames of one entry, from the cache or the decoder: (float [T, 3, S, S], bool [T])."""

    def __init__(
        self,
        sampling: SamplingConfig,
        image_size: int,
        cache: FrameCache | None,
        decoder: VideoDecoder | None,
    ) -> None:
        if cache is not None and not cache.compatible_with(sampling, image_size):
            raise VidretError(
                f"frame cache at {cache.root} holds fps={cache.sampling.fps}, max_candidates="
                f"{cache.sampling.max_candidates}, size={cache.image_size} frames but the dataset asks for "
                f"fps={sampling.fps}, max_candidates={sampling.max_candidates}, size={image_size}; "
                "use matching settings or another cache folder"
            )
        self.sampling = sampling
        self.image_size = image_size
        self.cache = cache
        self.decoder = decoder or (cache.decoder if cache is not None else PyAVDecoder())

    def load(
        self, entry: ManifestEntry, mode: SamplingMode, generator: np.random.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        t, s = self.sampling.num_frames, self.image_size
        cfg = self.sampling.with_mode(mode)
        if self.cache is not None:
            cands = self.cache.get(entry)  # [N, S, S, 3] uint8 (memory-mapped)
            idx, mask = select_indices(len(cands), t, cfg.rule, generator)
            frames = np.asarray(cands[idx[mask]])  # [T', S, S, 3]
        else:
            chosen: dict[str, np.ndarray] = {}

            def plan(info: Any) -> np.ndarray:
                try:
                    times, chosen["mask"] = sample_timestamps(info.duration, cfg, entry.start, entry.end, generator)
                except ValueError as e:  # segment outside the video
                    raise BadVideoError(entry.path, str(e)) from e
                return times

            _, frames = self.decoder.probe_and_decode(
                entry.path, plan, frame_fn=lambda f: resize_crop(f, self.image_size)
            )
            mask = chosen["mask"]
        k = len(frames)  # valid slots come first: mask == [True] * k + [False] * (T - k)
        out = torch.empty(t, 3, s, s)
        out[k:].zero_()  # padded slots are zeros
        normalize(frames, out=out[:k])  # [k, S, S, 3] uint8 -> [k, 3, S, S] float, in place
        return out, torch.from_numpy(mask)

    def invalid(self) -> tuple[torch.Tensor, torch.Tensor]:
        t, s = self.sampling.num_frames, self.image_size
        return torch.zeros(t, 3, s, s), torch.zeros(t, dtype=torch.bool)


def _video_sample(
    loader: _FrameLoader,
    entry: ManifestEntry,
    video_index: int,
    mode: SamplingMode,
    generator: np.random.Generator | None,
) -> dict[str, Any]:
    reason = ""
    try:
        frames, mask = loader.load(entry, mode, generator)
    except BadVideoError as e:
        logger.debug("bad video %s: %s", entry.video_id, e.reason)  # warned once in the main process
        frames, mask = loader.invalid()
        reason = e.reason
    return {
        "frames": frames,
        "frame_mask": mask,
        "video_index": torch.tensor(video_index, dtype=torch.long),
        "video_id": entry.video_id,
        "path": entry.path,
        "valid": not reason,
        "reason": reason,
    }


def caption_items(entries: Sequence[ManifestEntry], caption_mode: CaptionMode) -> list[tuple[int, int]]:
    """The training items of an epoch: (video index into ``entries``, caption index or -1 for "draw one").

    "all_pairs": every (video, caption) pair, as both official codes iterate (a paragraph dataset's manifest
    holds one paragraph per video, so there it is one item per video); "random_per_video": one item per video,
    its caption drawn anew each epoch. Videos without captions give no item.
    """
    if caption_mode not in CAPTION_MODES:
        raise VidretError(f"caption_mode must be one of {list(CAPTION_MODES)}, got {caption_mode!r}")
    with_captions = [i for i, e in enumerate(entries) if e.captions]
    if caption_mode == "all_pairs":
        return [(i, c) for i in with_captions for c in range(len(entries[i].captions))]
    return [(i, -1) for i in with_captions]


def _check_max_words(max_words: int) -> None:
    if isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < 2:
        raise VidretError(f"max_words must be an int >= 2 (room for start and end tokens), got {max_words!r}")


class TrainVideoDataset(Dataset[dict[str, Any]]):
    """Training (video, caption) pairs.

    Args:
        entries: Manifest entries; entries without captions are left out.
        sampling: Frame sampling (``mode="train"``: its ``train_sampling`` rule picks the frames).
        max_words: Token length L (with start and end tokens).
        cache: Frame cache to read (and fill on misses); None decodes every time.
        caption_mode: "random_per_video": one item per video, its caption drawn anew each epoch;
            "all_pairs": one item per (video, caption) pair (see ``caption_items``).
        seed: Base seed of the per-item generators.
        image_size: Frame side S.
        decoder: Decoder for cache misses / no cache (default PyAV).
    """

    def __init__(
        self,
        entries: Sequence[ManifestEntry],
        sampling: SamplingConfig,
        max_words: int = 32,
        cache: FrameCache | None = None,
        caption_mode: CaptionMode = "random_per_video",
        seed: int = 0,
        image_size: int = 224,
        decoder: VideoDecoder | None = None,
    ) -> None:
        _check_max_words(max_words)
        self._items = caption_items(entries, caption_mode)
        self.entries = list(entries)
        self.sampling = sampling
        self.max_words = max_words
        self.caption_mode: CaptionMode = caption_mode
        self.seed = seed
        self.epoch = 0
        self._loader = _FrameLoader(sampling, image_size, cache, decoder)
        n_without = sum(1 for e in self.entries if not e.captions)
        if n_without:
            logger.info("%d videos without captions left out", n_without)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose captions and frame positions the items draw."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        vi, ci = self._items[index]
        entry = self.entries[vi]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if ci < 0:
            ci = int(rng.integers(len(entry.captions)))
        sample = _video_sample(self._loader, entry, vi, self.sampling.mode, rng)
        sample["tokens"] = tokenize(entry.captions[ci], context_length=self.max_words, truncate=True)[0]  # [L]
        sample["caption_index"] = ci
        return sample


class EvalVideoDataset(Dataset[dict[str, Any]]):
    """Evaluation videos (one item per entry, eval-mode sampling whatever ``sampling.mode`` says)."""

    def __init__(
        self,
        entries: Sequence[ManifestEntry],
        sampling: SamplingConfig,
        cache: FrameCache | None = None,
        image_size: int = 224,
        decoder: VideoDecoder | None = None,
    ) -> None:
        self.entries = list(entries)
        self.sampling = sampling.with_mode("eval")
        self._loader = _FrameLoader(self.sampling, image_size, cache, decoder)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return _video_sample(self._loader, self.entries[index], index, "eval", None)


class EvalTextDataset(Dataset[dict[str, Any]]):
    """Evaluation queries: ``{"tokens": long [L], "video_index": long [], "text": str}``.

    Protocols: "single" (each video's first caption; the 1k-A style), "multi" (every caption is a query:
    MSVD, VATEX), "paragraph" (a video's captions joined with spaces into one query: DiDeMo,
    ActivityNet). Videos without captions give no query. ``video_index`` indexes ``entries``.
    """

    def __init__(
        self,
        entries: Sequence[ManifestEntry],
        max_words: int = 32,
        caption_protocol: CaptionProtocol = "single",
    ) -> None:
        _check_max_words(max_words)
        if caption_protocol not in ("single", "multi", "paragraph"):
            raise VidretError(f"caption_protocol must be 'single', 'multi' or 'paragraph', got {caption_protocol!r}")
        self.caption_protocol: CaptionProtocol = caption_protocol
        self.texts: list[str] = []
        self.video_indices: list[int] = []
        for i, e in enumerate(entries):
            if not e.captions:
                continue
            if caption_protocol == "multi":
                caps = list(e.captions)
            elif caption_protocol == "paragraph":
                caps = [" ".join(c.strip() for c in e.captions)]
            else:
                caps = [e.captions[0]]
            self.texts.extend(caps)
            self.video_indices.extend([i] * len(caps))
        self.tokens = (
            tokenize(self.texts, context_length=max_words, truncate=True)
            if self.texts
            else torch.zeros(0, max_words, dtype=torch.long)
        )  # [N, L]

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "tokens": self.tokens[index],
            "video_index": torch.tensor(self.video_indices[index], dtype=torch.long),
            "text": self.texts[index],
        }


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch video samples, dropping invalid ones.

    Returns:
        ``{"frames": float [B, T, 3, S, S], "frame_mask": bool [B, T], "video_index": long [B],
        "video_ids": list[str], "tokens": long [B, L] (training samples only), "bad": list[str] (video ids),
        "bad_reasons": list[(video_id, path, reason)]}``; B counts valid samples only and may be 0.
    """
    if not samples:
        raise ValueError("collate got no samples")
    good = [s for s in samples if s["valid"]]
    bad = [s for s in samples if not s["valid"]]
    ref = samples[0]

    def stack(key: str) -> torch.Tensor:
        if good:
            # default_collate stacks straight into shared memory inside a worker (one copy fewer)
            return default_collate([s[key] for s in good])
        return torch.empty((0, *ref[key].shape), dtype=ref[key].dtype)

    batch: dict[str, Any] = {
        "frames": stack("frames"),
        "frame_mask": stack("frame_mask"),
        "video_index": stack("video_index"),
        "video_ids": [s["video_id"] for s in good],
        "bad": [s["video_id"] for s in bad],
        "bad_reasons": [(s["video_id"], s["path"], s["reason"]) for s in bad],
    }
    if "tokens" in ref:
        batch["tokens"] = stack("tokens")
    return batch


__all__ = [
    "CAPTION_MODES",
    "CaptionMode",
    "CaptionProtocol",
    "EvalTextDataset",
    "EvalVideoDataset",
    "TrainVideoDataset",
    "caption_items",
    "collate",
]
