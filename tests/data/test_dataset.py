"""Datasets and collate: frames, masks, tokens, captions per epoch, bad videos through a DataLoader."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from vidret.backbone.tokenizer import tokenize
from vidret.data.cache import FrameCache, preprocess
from vidret.data.dataset import EvalTextDataset, EvalVideoDataset, TrainVideoDataset, collate
from vidret.data.decode import BadVideoReport
from vidret.data.manifest import ManifestEntry
from vidret.data.sampling import SamplingConfig
from vidret.errors import VidretError

MakeVideo = Callable[..., Path]
FrameIndex = Callable[..., int]
SIZE = 32
T = 4
EVAL = SamplingConfig(num_frames=T, max_candidates=8)
TRAIN = SamplingConfig(num_frames=T, mode="train", max_candidates=8)


def _entries(make_video: MakeVideo, lengths: list[int]) -> list[ManifestEntry]:
    return [
        ManifestEntry(
            f"v{i}",
            str(make_video(f"v{i}.mp4", num_frames=n, fps=10)),
            tuple(f"video {i} caption {c}" for c in range(3)),
        )
        for i, n in enumerate(lengths)
    ]


def _indices(frames: torch.Tensor, mask: torch.Tensor, frame_index: FrameIndex) -> list[int]:
    return [frame_index(f) for f, m in zip(frames, mask) if m]


@pytest.fixture()
def entries(make_video: MakeVideo) -> list[ManifestEntry]:
    return _entries(make_video, [80, 25, 130])  # 8 s, 2.5 s (padded to T=4), 13 s


def test_eval_videos_cache_equals_raw(tmp_path: Path, entries: list[ManifestEntry], frame_index: FrameIndex) -> None:
    cache = FrameCache(tmp_path / "cache", EVAL, image_size=SIZE)
    raw = EvalVideoDataset(entries, EVAL, image_size=SIZE)
    cached = EvalVideoDataset(entries, EVAL, cache=cache, image_size=SIZE)
    # v0: candidates at 0.5..7.5 s -> centres of runs {0,1} {2,3} {4,5} {6,7}; v1: 0.5, 1.5, 2.25 s (padded);
    # v2: 13 s capped to 8 candidates of 1.625 s (frames 8, 24, 40, 56, 73, 89, 105, 121)
    want = [[5, 25, 45, 65], [5, 15, 22], [8, 40, 73, 105]]
    for i in range(len(entries)):
        a, b = raw[i], cached[i]
        assert a["valid"] and b["valid"] and a["video_index"].item() == i
        assert a["frames"].shape == (T, 3, SIZE, SIZE) and a["frames"].dtype == torch.float32
        assert torch.equal(a["frames"], b["frames"]) and torch.equal(a["frame_mask"], b["frame_mask"])
        assert _indices(a["frames"], a["frame_mask"], frame_index) == want[i]
    short = raw[1]
    assert short["frame_mask"].tolist() == [True, True, True, False]
    assert torch.count_nonzero(short["frames"][3]) == 0  # padding is zeros
    assert EvalVideoDataset(entries, TRAIN, image_size=SIZE).sampling.mode == "eval"


@pytest.mark.parametrize(
    ("rule", "want"),
    [
        # 8 candidates, T = 4. MV-Adapter: candidate floor(i * 8 / 4) = 0, 2, 4, 6;
        # Cross-Modal Adapter: np.linspace(0, 7, 4, dtype=int) = 0, 2, 4, 7 (2.33 and 4.67 truncated)
        ("mvadapter_floor", [[5, 25, 45, 65], [5, 15, 22], [8, 40, 73, 105]]),
        ("cma_linspace", [[5, 25, 45, 75], [5, 15, 22], [8, 40, 73, 121]]),
    ],
)
def test_official_frame_rules_train_and_eval_alike(
    tmp_path: Path, entries: list[ManifestEntry], frame_index: FrameIndex, rule: str, want: list[list[int]]
) -> None:
    train = SamplingConfig(T, mode="train", max_candidates=8, train_sampling=rule, eval_sampling=rule)  # type: ignore[arg-type]
    cache = FrameCache(tmp_path / "cache", train, image_size=SIZE)
    raw = TrainVideoDataset(entries, train, seed=1, image_size=SIZE)
    cached = TrainVideoDataset(entries, train, seed=1, cache=cache, image_size=SIZE)
    evals = EvalVideoDataset(entries, train, image_size=SIZE)
    for epoch in range(3):  # the same frames every epoch: the official rules draw nothing
        raw.set_epoch(epoch)
        cached.set_epoch(epoch)
        for i in range(len(entries)):
            a, b, e = raw[i], cached[i], evals[i]
            assert torch.equal(a["frames"], b["frames"]) and torch.equal(a["frames"], e["frames"])
            assert _indices(a["frames"], a["frame_mask"], frame_index) == want[i]
    with pytest.raises(VidretError, match="deterministic"):
        SamplingConfig(T, eval_sampling="segment_random")


def test_cache_with_other_settings_is_refused(tmp_path: Path, entries: list[ManifestEntry]) -> None:
    cache = FrameCache(tmp_path / "cache", EVAL, image_size=SIZE)
    with pytest.raises(VidretError, match="frame cache"):
        EvalVideoDataset(entries, EVAL, cache=cache, image_size=SIZE * 2)


def test_segments_sample_inside_start_end(make_video: MakeVideo, frame_index: FrameIndex) -> None:
    path = str(make_video("movie.mp4", num_frames=200, fps=10))
    ds = EvalVideoDataset([ManifestEntry("clip", path, ("c",), start=12.0, end=16.0)], EVAL, image_size=SIZE)
    assert _indices(ds[0]["frames"], ds[0]["frame_mask"], frame_index) == [125, 135, 145, 155]


def test_train_random_caption_per_epoch(entries: list[ManifestEntry], frame_index: FrameIndex) -> None:
    ds = TrainVideoDataset(entries, TRAIN, max_words=16, seed=3, image_size=SIZE)
    assert len(ds) == 3
    a, b = ds[0], ds[0]
    assert torch.equal(a["frames"], b["frames"]) and torch.equal(a["tokens"], b["tokens"])  # deterministic
    assert a["tokens"].shape == (16,) and a["tokens"].dtype == torch.long
    assert torch.equal(a["tokens"], tokenize(entries[0].captions[a["caption_index"]], context_length=16)[0])
    chosen, frame_sets = set(), set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        s = ds[2]
        chosen.add(s["caption_index"])
        idx = _indices(s["frames"], s["frame_mask"], frame_index)
        cands = [8, 24, 40, 56, 73, 89, 105, 121]  # 8 capped candidates in 4 runs of 2
        assert all(x in cands[2 * r : 2 * r + 2] for r, x in enumerate(idx)), idx
        frame_sets.add(tuple(idx))
    assert chosen == {0, 1, 2} and len(frame_sets) > 3  # captions and frame positions change per epoch
    other_seed = TrainVideoDataset(entries, TRAIN, max_words=16, seed=4, image_size=SIZE)
    assert any(
        not torch.equal(other_seed[i]["frames"], ds[i]["frames"])
        or other_seed[i]["caption_index"] != ds[i]["caption_index"]
        for i in range(3)
    )


def test_train_cache_matches_raw_and_all_pairs(
    tmp_path: Path, entries: list[ManifestEntry], frame_index: FrameIndex
) -> None:
    cache = FrameCache(tmp_path / "cache", TRAIN, image_size=SIZE)
    raw = TrainVideoDataset(entries, TRAIN, seed=1, image_size=SIZE)
    cached = TrainVideoDataset(entries, TRAIN, seed=1, cache=cache, image_size=SIZE)
    for i in range(3):  # the same generator draws give the same frames from either source
        assert torch.equal(raw[i]["frames"], cached[i]["frames"])
    per = TrainVideoDataset(entries + [ManifestEntry("nocap", entries[0].path)], TRAIN, caption_mode="all_pairs")
    assert len(per) == 9  # 3 videos x 3 captions; the caption-less entry is left out
    assert [(per[k]["video_index"].item(), per[k]["caption_index"]) for k in (0, 4, 8)] == [(0, 0), (1, 1), (2, 2)]
    with pytest.raises(VidretError, match="caption_mode"):
        TrainVideoDataset(entries, TRAIN, caption_mode="all")  # type: ignore[arg-type]
    with pytest.raises(VidretError, match="max_words"):
        TrainVideoDataset(entries, TRAIN, max_words=1)


def test_eval_text_protocols(entries: list[ManifestEntry]) -> None:
    es = entries + [ManifestEntry("empty", entries[0].path)]
    single = EvalTextDataset(es, max_words=20, caption_protocol="single")
    assert single.texts == [e.captions[0] for e in entries] and single.video_indices == [0, 1, 2]
    multi = EvalTextDataset(es, caption_protocol="multi")
    assert len(multi) == 9 and multi.video_indices == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    para = EvalTextDataset(es, max_words=64, caption_protocol="paragraph")
    assert para.texts[1] == "video 1 caption 0 video 1 caption 1 video 1 caption 2"
    item = para[1]
    assert item["video_index"].item() == 1 and item["tokens"].shape == (64,)
    assert torch.equal(item["tokens"], tokenize(para.texts[1], context_length=64)[0])
    batch = next(iter(DataLoader(multi, batch_size=4)))
    assert batch["tokens"].shape == (4, 32) and batch["video_index"].tolist() == [0, 0, 0, 1]
    with pytest.raises(VidretError, match="caption_protocol"):
        EvalTextDataset(es, caption_protocol="all")  # type: ignore[arg-type]


def _corrupt(tmp_path: Path, good: Path) -> list[ManifestEntry]:
    data = good.read_bytes()
    d = tmp_path / "corrupt"
    d.mkdir()
    (d / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (d / "random.mp4").write_bytes(np.random.default_rng(5).bytes(10_000))
    (d / "wrong_ext.webm").write_text("{'json': 'not a video'}\n" * 40)
    (d / "zero.mp4").write_bytes(b"")
    names = ["truncated.mp4", "random.mp4", "wrong_ext.webm", "zero.mp4", "missing.mp4"]
    return [ManifestEntry(f"bad_{n.split('.')[0]}", str(d / n), ("a bad one",)) for n in names]


@pytest.mark.parametrize("use_cache", [False, True])
def test_corrupt_files_through_dataloader_workers(
    tmp_path: Path, make_video: MakeVideo, frame_index: FrameIndex, use_cache: bool
) -> None:
    good = _entries(make_video, [30, 40, 50, 60, 70, 25, 35])
    bad = _corrupt(tmp_path, Path(good[0].path))
    entries = [x for pair in zip(good, bad) for x in pair] + good[len(bad) :]
    cache = FrameCache(tmp_path / "cache", TRAIN, image_size=SIZE) if use_cache else None
    ds = TrainVideoDataset(entries, TRAIN, max_words=16, cache=cache, seed=0, image_size=SIZE)
    loader = DataLoader(ds, batch_size=3, shuffle=True, num_workers=2, collate_fn=collate)
    report = BadVideoReport(total=len(entries))
    seen: list[str] = []
    for batch in loader:
        report.update(batch)
        b = batch["frames"].shape[0]
        assert batch["frames"].shape == (b, T, 3, SIZE, SIZE) and batch["frames"].dtype == torch.float32
        assert batch["frame_mask"].shape == (b, T) and batch["frame_mask"].dtype == torch.bool
        assert batch["tokens"].shape == (b, 16) and batch["tokens"].dtype == torch.long
        assert batch["video_index"].shape == (b,) and len(batch["bad"]) + b <= 3
        for k in range(b):
            vi = int(batch["video_index"][k])
            assert entries[vi].video_id == batch["video_ids"][k]
            frames, mask = batch["frames"][k], batch["frame_mask"][k]
            assert mask.any()
            n_frames = [30, 40, 50, 60, 70, 25, 35][int(entries[vi].video_id[1:])]
            assert all(0 <= x < n_frames for x in _indices(frames, mask, frame_index))
        seen += batch["video_ids"]
    assert sorted(seen) == sorted(e.video_id for e in good)  # every good file loaded, once
    assert sorted(v for v, _, _ in report.items) == sorted(e.video_id for e in bad)  # every bad one reported
    report.check(0.5)
    with pytest.raises(VidretError, match="bad"):
        report.check(0.05)


def test_collate_all_bad_gives_empty_batch(tmp_path: Path) -> None:
    ds = EvalVideoDataset([ManifestEntry("gone", str(tmp_path / "gone.mp4"), ("x",))], EVAL, image_size=SIZE)
    sample = ds[0]
    assert not sample["valid"] and "not found" in sample["reason"] and not sample["frame_mask"].any()
    batch = collate([sample, sample])
    assert batch["frames"].shape == (0, T, 3, SIZE, SIZE) and batch["video_index"].shape == (0,)
    assert batch["bad"] == ["gone", "gone"]


def test_distributed_sampler_covers_every_item(tmp_path: Path, entries: list[ManifestEntry]) -> None:
    cache = FrameCache(tmp_path / "cache", EVAL, image_size=SIZE)
    preprocess(entries, cache, progress=False)
    ds = TrainVideoDataset(entries, TRAIN, caption_mode="all_pairs", cache=cache, image_size=SIZE)
    pairs: list[tuple[int, tuple[int, ...]]] = []
    frames_of: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(1)
        ds.set_epoch(1)
        for batch in DataLoader(ds, batch_size=2, sampler=sampler, collate_fn=collate):
            for k in range(batch["frames"].shape[0]):
                key = (int(batch["video_index"][k]), tuple(batch["tokens"][k].tolist()))
                if key in frames_of:  # the padded repeat: the same item gives the same sample
                    assert torch.equal(frames_of[key], batch["frames"][k])
                frames_of[key] = batch["frames"][k]
                pairs.append(key)
    assert len(pairs) == 10  # 9 items split over 2 ranks, one repeated to even them out
    want = {(i, tuple(tokenize(c, context_length=32)[0].tolist())) for i, e in enumerate(entries) for c in e.captions}
    assert set(pairs) == want
