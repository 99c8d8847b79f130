"""Index backends, the on-disk format and building / updating an index from videos."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vidret
from tests.retrieval.helpers import BACKBONE, COLOURS, save_adapter_for, touch_later, write_clip
from vidret.backbone.tokenizer import tokenize
from vidret.data.manifest import ManifestEntry, write_manifest
from vidret.errors import VidretError
from vidret.retrieval.backends import ExactIndex, FaissIndex, default_nlist, default_nprobe, faiss_available
from vidret.retrieval.build import build_index, collect_videos, load_backbone_spec, video_query_vector
from vidret.retrieval.index import VideoIndex, model_identity
from vidret.retrieval.index_files import IndexSettings

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss not installed (the [ann] extra)")


def clustered(n: int, dim: int, centres: int = 20, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centres, dim, generator=g)
    x = c[torch.randint(0, centres, (n,), generator=g)] + 0.3 * torch.randn(n, dim, generator=g)
    return F.normalize(x, dim=-1)


def recall(a: torch.Tensor, b: torch.Tensor) -> float:
    return sum(len(set(x) & set(y)) for x, y in zip(a.tolist(), b.tolist())) / b.numel()


# ------------------------------------------------------------------------------------------ backends


def test_exact_index_matches_brute_force_across_chunks() -> None:
    x = clustered(1000, 16)
    q = F.normalize(torch.randn(5, 16), dim=-1)
    scores, rows = ExactIndex(x, chunk_rows=37).search(q, 10)  # many chunks: exercises the top-k merge
    ref_s, ref_i = (q @ x.T).topk(10, dim=1)
    assert torch.equal(rows, ref_i)
    assert torch.allclose(scores, ref_s)
    s_all, r_all = ExactIndex(x).search(q, 5000)  # k above N is clamped
    assert r_all.shape == (5, 1000)
    assert sorted(r_all[0].tolist()) == list(range(1000))
    assert bool((s_all[:, :-1] >= s_all[:, 1:]).all())


def test_exact_index_rejects_wrong_query_shape() -> None:
    with pytest.raises(VidretError, match=r"\[Q, 16\]"):
        ExactIndex(clustered(10, 16)).search(torch.randn(2, 8), 3)


@needs_faiss
def test_faiss_recall_vs_exact_and_the_nprobe_knob(tmp_path: Path) -> None:
    x = clustered(3000, 32, seed=1)
    q = F.normalize(torch.randn(50, 32, generator=torch.Generator().manual_seed(3)), dim=-1)
    _, truth = ExactIndex(x).search(q, 10)
    fi = FaissIndex(x, nlist=16, nprobe=16)
    assert fi.nlist == 16 and len(fi) == 3000
    _, rows = fi.search(q, 10)
    assert recall(rows, truth) == 1.0  # every list probed: exact
    fi.nprobe = 1
    _, rows1 = fi.search(q, 10)
    r1 = recall(rows1, truth)
    assert 0.1 < r1 < 1.0  # one list of 16: approximate
    fi.nprobe = 4
    assert recall(fi.search(q, 10)[1], truth) >= r1
    fi.save(tmp_path / "f.index")
    again = FaissIndex.load(tmp_path / "f.index", nprobe=4)
    assert torch.equal(again.search(q, 10)[1], fi.search(q, 10)[1])
    with pytest.raises(VidretError, match="nprobe"):
        fi.nprobe = -1
    fi.nprobe = 0  # 0: chosen from the size (3000 vectors in 16 lists: every list)
    assert fi.nprobe == default_nprobe(3000, 16) == 16


def test_default_nlist() -> None:
    assert default_nlist(8) == 1
    assert default_nlist(3000) == 76  # 4 sqrt(3000) = 219, but >= 39 training points per list
    assert default_nlist(10_000) == 256
    assert default_nlist(100_000) == 1024  # 4 sqrt(N) = 1264, capped
    assert default_nlist(1_000_000) == 1024


def test_default_nprobe_scans_5000_vectors_and_a_sixteenth_of_the_lists() -> None:
    assert default_nprobe(10_000, 256) == 128  # small collections: half the lists (recall@10 0.957 measured)
    assert default_nprobe(100_000, 1024) == 64  # 0.960 measured
    assert default_nprobe(1_000_000, 1024) == 64
    assert default_nprobe(8, 1) == 1 and default_nprobe(3000, 76) == 76  # never more than nlist
    assert default_nprobe(0, 0) == 1


@pytest.mark.slow  # ~8 s on 2 shared cores
@needs_faiss
def test_automatic_faiss_settings_reach_recall_095_on_clustered_vectors() -> None:
    """The size rule on the benchmark's own generator (1000 centres, dim 512) at 20k vectors."""
    from vidret.bench.search import synthetic_vectors

    x = synthetic_vectors(20_000, 512, 0, "clustered")
    q = F.normalize(torch.randn(100, 512, generator=torch.Generator().manual_seed(1)), dim=-1)
    _, truth = ExactIndex(x).search(q, 10)
    fi = FaissIndex(x)  # nlist 0, nprobe 0: both from the size
    assert (fi.nlist, fi.nprobe) == (512, 128)
    assert recall(fi.search(q, 10)[1], truth) >= 0.95
    fi.nprobe = 8  # a user's explicit value wins, and is worse here
    assert recall(fi.search(q, 10)[1], truth) < 0.95


# ------------------------------------------------------------------------------------------ format


def test_save_load_round_trip_and_checksum(tmp_path: Path) -> None:
    x = clustered(200, 16)
    idx = VideoIndex.from_vectors(x, ids=[f"clip/{i}" for i in range(200)], settings=IndexSettings(dtype="float32"))
    idx.save(tmp_path / "ix")
    meta = json.loads((tmp_path / "ix" / "index.json").read_text())
    assert meta["format_version"] == 1 and meta["kind"] == "pooled" and meta["count"] == 200
    assert set(meta["files"]) == {"features", "videos"}
    again = VideoIndex.load(tmp_path / "ix")
    assert again.ids == idx.ids
    assert torch.equal(again.vectors, idx.vectors)  # float32 storage is exact
    q = x[:3]
    assert torch.equal(again.search(q, 1)[1][:, 0], torch.arange(3))
    # a damaged feature file is refused
    feat = tmp_path / "ix" / meta["files"]["features"]["file"]
    data = bytearray(feat.read_bytes())
    data[-1] ^= 0xFF
    feat.write_bytes(bytes(data))
    with pytest.raises(VidretError, match="checksum"):
        VideoIndex.load(tmp_path / "ix")


def test_float16_storage_and_rewrite_drops_old_files(tmp_path: Path) -> None:
    x = clustered(100, 16)
    idx = VideoIndex.from_vectors(x)
    idx.save(tmp_path / "ix")
    again = VideoIndex.load(tmp_path / "ix")
    assert (again.vectors - x).abs().max() < 1e-3
    idx2 = VideoIndex.from_vectors(clustered(50, 16, seed=5))
    idx2.save(tmp_path / "ix")
    assert len([p for p in (tmp_path / "ix").iterdir() if p.name.startswith("features-")]) == 1
    assert len(VideoIndex.load(tmp_path / "ix")) == 50


def test_load_refuses_non_index_and_future_format(tmp_path: Path) -> None:
    with pytest.raises(VidretError, match="not a vidret index"):
        VideoIndex.load(tmp_path)
    VideoIndex.from_vectors(clustered(20, 8)).save(tmp_path / "ix")
    meta = json.loads((tmp_path / "ix" / "index.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "ix" / "index.json").write_text(json.dumps(meta))
    with pytest.raises(VidretError, match="format version"):
        VideoIndex.load(tmp_path / "ix")


@needs_faiss
def test_faiss_backend_persisted(tmp_path: Path) -> None:
    x = clustered(2000, 16)
    idx = VideoIndex.from_vectors(x, settings=IndexSettings(backend="faiss", nlist=8, nprobe=8), backend="faiss")
    idx.save(tmp_path / "ix")
    meta = json.loads((tmp_path / "ix" / "index.json").read_text())
    assert "faiss" in meta["files"] and meta["backend"] == "faiss"
    again = VideoIndex.load(tmp_path / "ix")
    assert isinstance(again.backend, FaissIndex) and again.backend.nlist == 8
    exact = VideoIndex.load(tmp_path / "ix", backend="exact")
    q = x[:20]
    assert torch.equal(again.search(q, 5)[1], exact.search(q, 5)[1])  # nprobe == nlist: same as exact


@needs_faiss
def test_automatic_faiss_settings_are_chosen_at_load_and_explicit_ones_win(tmp_path: Path) -> None:
    x = clustered(8000, 16)
    idx = VideoIndex.from_vectors(x, settings=IndexSettings(backend="faiss"), backend="faiss")
    assert (idx.settings.nlist, idx.settings.nprobe) == (0, 0)  # automatic, and recorded as such
    idx.save(tmp_path / "ix")
    meta = json.loads((tmp_path / "ix" / "index.json").read_text())
    assert meta["settings"]["nprobe"] == 0 and meta["files"]["faiss"]["nlist"] == "205"  # 8000 // 39
    again = VideoIndex.load(tmp_path / "ix")
    assert isinstance(again.backend, FaissIndex)
    assert (again.backend.nlist, again.backend.nprobe) == (205, default_nprobe(8000, 205)) == (205, 129)
    assert VideoIndex.load(tmp_path / "ix", nprobe=3).backend.nprobe == 3  # `--nprobe` wins
    explicit = VideoIndex.from_vectors(x, settings=IndexSettings(backend="faiss", nlist=20, nprobe=2), backend="faiss")
    explicit.save(tmp_path / "ex")
    loaded = VideoIndex.load(tmp_path / "ex")
    assert (loaded.backend.nlist, loaded.backend.nprobe) == (20, 2)  # type: ignore[attr-defined]
    rule = VideoIndex.load(tmp_path / "ex", nprobe=0)  # `--nprobe 0`: the size rule over a recorded value
    assert rule.backend.nprobe == default_nprobe(8000, 20) == 13 and rule.settings.nprobe == 0  # type: ignore[attr-defined]
    with pytest.raises(VidretError, match="nprobe must be an int >= 0"):
        IndexSettings(nprobe=-1)


# ------------------------------------------------------------------------------------------ building


def test_collect_videos_ids_recursion_and_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "v"
    write_clip(root / "a.mp4", COLOURS["red"])
    write_clip(root / "sub" / "b.MOV", COLOURS["blue"])
    (root / "notes.txt").write_text("not a video")
    (root / ".hidden.mp4").write_bytes(b"x")
    outside = write_clip(tmp_path / "outside.mp4", COLOURS["green"])
    os.symlink(outside, root / "escape.mp4")
    os.symlink(root / "a.mp4", root / "alias.mp4")
    entries, skipped = collect_videos(root)
    assert [e.video_id for e in entries] == ["a", "alias", "sub/b"]
    assert all(os.path.isabs(e.path) for e in entries)
    assert [s[0] for s in skipped] == ["escape"]
    assert "outside" in skipped[0][2]


def test_build_index_from_folder(built_index: Path, lora_model) -> None:
    idx = VideoIndex.load(built_index)
    assert idx.kind == "pooled" and len(idx) == len(COLOURS)
    assert set(idx.ids) == {"red", "green", "blue", "yellow", "magenta", "cyan", "more/white", "more/black"}
    assert torch.allclose(idx.vectors.norm(dim=1), torch.ones(len(idx)), atol=2e-3)
    red = idx.record("red")
    assert red is not None and red.duration == pytest.approx(2.0, abs=0.2) and red.identity
    idx.check_model(lora_model)
    report = json.loads((built_index / "build_report.json").read_text())
    assert report["added"] == len(COLOURS) and report["bad"]["num_bad"] == 0
    assert (built_index / "cache").is_dir()  # the frame cache lives in the index folder by default
    # a clip queried by itself comes first, with cosine ~1
    for name in ("red", "more/black"):
        q = video_query_vector(lora_model, idx.record(name).path, idx.settings)
        scores, rows = idx.search(q, 3)
        assert idx.records[rows[0, 0]].video_id == name
        assert scores[0, 0] > 0.99


def test_build_refuses_existing_index_without_update(built_index: Path, lora_model, collection_dir: Path) -> None:
    with pytest.raises(VidretError, match="--update"):
        build_index(lora_model, collection_dir, built_index)


def test_update_adds_removes_and_reencodes(tmp_path: Path, lora_adapter: Path, lora_model) -> None:
    videos = tmp_path / "videos"
    for name in ("red", "green", "blue", "yellow"):
        write_clip(videos / f"{name}.mp4", COLOURS[name])
    out = tmp_path / "ix"
    first = build_index(lora_model, videos, out, backbone_spec=BACKBONE, adapter_path=str(lora_adapter))
    assert (first.added, first.kept, first.removed) == (4, 0, 0)
    before = VideoIndex.load(out)
    (videos / "green.mp4").unlink()  # removed
    write_clip(videos / "cyan.mp4", COLOURS["cyan"])  # added
    write_clip(videos / "blue.mp4", COLOURS["white"])  # changed content, same name
    touch_later(videos / "blue.mp4")
    rep = build_index(lora_model, videos, out, update=True, backbone_spec=BACKBONE, adapter_path=str(lora_adapter))
    assert (rep.added, rep.updated, rep.kept, rep.removed, rep.indexed) == (1, 1, 2, 1, 4)
    after = VideoIndex.load(out)
    assert sorted(after.ids) == ["blue", "cyan", "red", "yellow"]
    for vid in ("red", "yellow"):  # kept rows are the very same vectors
        assert torch.equal(after.vectors[after.row_of(vid)], before.vectors[before.row_of(vid)])
    assert not torch.allclose(after.vectors[after.row_of("blue")], before.vectors[before.row_of("blue")], atol=1e-3)
    # nothing changed: everything kept
    rep2 = build_index(lora_model, videos, out, update=True)
    assert (rep2.added, rep2.updated, rep2.kept, rep2.removed) == (0, 0, 4, 0)


def test_update_refuses_other_adapter_or_settings(
    built_index: Path, collection_dir: Path, other_lora_adapter: Path, lora_model
) -> None:
    other = vidret.load_adapter(load_backbone_spec(BACKBONE), other_lora_adapter).eval()
    with pytest.raises(VidretError, match="built with adapter") as e:
        build_index(other, collection_dir, built_index, update=True)
    assert VideoIndex.load(built_index).identity.adapter_fingerprint in str(e.value)
    with pytest.raises(VidretError, match="num_frames=12"):
        build_index(
            lora_model, collection_dir, built_index, update=True, settings=IndexSettings(num_frames=4, image_size=32)
        )


def test_bad_videos_skipped_and_bounded(tmp_path: Path, lora_model) -> None:
    videos = tmp_path / "videos"
    for name in ("red", "green", "blue"):
        write_clip(videos / f"{name}.mp4", COLOURS[name])
    (videos / "garbage.mp4").write_bytes(os.urandom(3000))
    (videos / "empty.mp4").write_bytes(b"")
    with pytest.raises(VidretError, match="2 of 5 videos are bad"):
        build_index(lora_model, videos, tmp_path / "strict", max_bad_fraction=0.1)
    rep = build_index(lora_model, videos, tmp_path / "ix", max_bad_fraction=0.5)
    assert rep.indexed == 3
    assert sorted(v for v, _, _ in rep.bad.items) == ["empty", "garbage"]
    assert sorted(VideoIndex.load(tmp_path / "ix").ids) == ["blue", "green", "red"]


def test_build_from_manifest_with_captions_and_segments(tmp_path: Path, collection_dir: Path, lora_model) -> None:
    entries = [
        ManifestEntry("r", str(collection_dir / "red.mp4"), ("a red clip",)),
        ManifestEntry("r-first-half", str(collection_dir / "red.mp4"), ("the first second",), 0.0, 1.0),
        ManifestEntry("missing", str(tmp_path / "nope.mp4"), ("gone",)),
    ]
    write_manifest(tmp_path / "m.jsonl", entries)
    rep = build_index(lora_model, tmp_path / "m.jsonl", tmp_path / "ix", max_bad_fraction=0.5)
    assert rep.indexed == 2 and [v for v, _, _ in rep.bad.items] == ["missing"]
    idx = VideoIndex.load(tmp_path / "ix")
    assert idx.record("r").captions == ("a red clip",)
    assert idx.record("r-first-half").end == 1.0


def test_text_conditioned_head_gives_frames_index(tmp_path: Path, collection_dir: Path) -> None:
    clip = load_backbone_spec(BACKBONE)
    model = vidret.build_model(clip, "frozen", head="text_conditioned").eval()
    build_index(model, collection_dir, tmp_path / "ix", settings=IndexSettings(num_frames=4, image_size=32))
    idx = VideoIndex.load(tmp_path / "ix")
    assert idx.kind == "frames" and idx.frames.shape == (8, 4, 32) and idx.masks.dtype == torch.bool
    text = model.encode_text(tokenize(["red", "blue"], 32))
    scores, rows = idx.search_text(model, text, 8)
    # same ranking as the model's own similarity over all videos
    from vidret.heads import VideoFeatures

    ref = model.similarity(text, VideoFeatures(idx.frames, idx.masks)) / model.logit_scale()
    ref_s, ref_i = ref.topk(8, dim=1)
    assert torch.equal(rows, ref_i) and torch.allclose(scores, ref_s, atol=1e-5)
    with pytest.raises(VidretError, match="exact"):
        idx.use_backend("faiss")


def test_check_model_names_both_backbones(built_index: Path, tmp_path: Path) -> None:
    idx = VideoIndex.load(built_index)
    path = save_adapter_for(tmp_path / "ad", "lora", seed=1, backbone_seed=7)
    other = vidret.load_adapter(vidret.create_backbone("pocket-tiny", seed=7), path).eval()
    with pytest.raises(VidretError) as e:
        idx.check_model(other)
    msg = str(e.value)
    assert idx.identity.backbone_fingerprint in msg and other.backbone_fingerprint in msg
    assert "pocket-tiny" in msg


def test_model_identity_is_stable_across_save_and_load(lora_adapter: Path, lora_model) -> None:
    again = vidret.load_adapter(load_backbone_spec(BACKBONE), lora_adapter, adapter_name="other").eval()
    assert model_identity(again).adapter_fingerprint == model_identity(lora_model).adapter_fingerprint


def test_copying_the_collection_keeps_records_absolute(tmp_path: Path, built_index: Path) -> None:
    shutil.copytree(built_index, tmp_path / "copy", ignore=shutil.ignore_patterns("cache"))
    idx = VideoIndex.load(tmp_path / "copy")
    assert all(os.path.isabs(r.path) and Path(r.path).is_file() for r in idx.records)
    assert np.isfinite(idx.vectors.numpy()).all()


def test_float16_storage_keeps_cosine_scores_at_most_one(tmp_path: Path) -> None:
    # Vectors are normalised in float32, then rounded to float16 on disk: renormalised after the cast on load, a
    # video queried with its own (float32) vector scores 1, not 1.0001.
    vectors = torch.nn.functional.normalize(torch.randn(64, 512, generator=torch.Generator().manual_seed(0)), dim=-1)
    VideoIndex.from_vectors(vectors, settings=IndexSettings(dtype="float16")).save(tmp_path / "ix")
    loaded = VideoIndex.load(tmp_path / "ix")
    scores, rows = loaded.search(vectors, 1)
    assert rows[:, 0].tolist() == list(range(64))
    assert float(scores.max()) <= 1.0 + 1e-6 and float(scores.min()) > 0.999
