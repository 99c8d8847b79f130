"""The pocket world generator: determinism, real decodable clips, exact time-reversed twins, idempotency."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest

from vidret.data import pocket as P
from vidret.data import pocket_scenes as S
from vidret.data.manifest import read_manifest
from vidret.data.pocket import (
    PocketConfig,
    generate_pocket_world,
    load_pocket_info,
    load_pretrain_set,
    load_reversal_pairs,
)
from vidret.errors import VidretError

TINY = PocketConfig.from_size("tiny", seed=3)
SPLITS = ("train", "val", "test", "probe")


def decode_all(path: str | Path) -> np.ndarray:
    """Every frame of a video, uint8 [T, H, W, 3]."""
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pocket") / "world"
    generate_pocket_world(out, TINY, workers=1)
    return out


def test_layout_counts_and_info(world: Path) -> None:
    info = load_pocket_info(world)
    assert info["version"] == P.GENERATOR_VERSION and info["seed"] == 3
    assert PocketConfig.from_dict(info["config"]) == TINY
    twins = TINY.reversed_twins()
    assert twins == TINY.test_clips // 2 > 0
    expected = {"train": TINY.train_clips, "val": TINY.val_clips, "test": TINY.test_clips + twins}
    expected["probe"] = TINY.probe_clips
    for split, n in expected.items():
        entries = read_manifest(world / f"{split}.jsonl")
        assert len(entries) == n == info["counts"][split]
        events = (world / f"{split}_events.jsonl").read_text().splitlines()
        assert [json.loads(line)["video_id"] for line in events] == [e.video_id for e in entries]
        for e in entries:
            assert Path(e.path).is_file()
            assert len(e.captions) >= 1 and all(c.strip() for c in e.captions)
    # relative paths in the files themselves, so the folder can move
    first = json.loads((world / "train.jsonl").read_text().splitlines()[0])
    assert first["path"] == "videos/train/train_00000.mp4"
    train = read_manifest(world / "train.jsonl")
    assert all(len(set(e.captions)) == TINY.train_captions for e in train)  # distinct paraphrases
    assert info["counts"]["reversal_pairs"] == twins


def test_clips_decode_to_t_frames_one_per_second(world: Path) -> None:
    for split in SPLITS:
        for e in read_manifest(world / f"{split}.jsonl"):
            with av.open(e.path) as c:
                stream = c.streams.video[0]
                assert stream.codec_context.name == "h264"
                frames = list(c.decode(stream))
            assert len(frames) == TINY.frames
            assert all((f.width, f.height) == (64, 64) and f.format.name == "yuv420p" for f in frames)
            assert [round(float(f.time), 6) for f in frames] == [float(t) for t in range(TINY.frames)]


def test_project_sampler_returns_every_frame_once(world: Path) -> None:
    """With fps=1 and T = config.frames, the project's 1-fps sampling picks each frame exactly once."""
    decode = pytest.importorskip("vidret.data.decode")
    sampling = pytest.importorskip("vidret.data.sampling")
    e = read_manifest(world / "test.jsonl")[1]
    info = decode.probe(e.path)
    times, mask = sampling.sample_timestamps(info.duration, sampling.SamplingConfig(num_frames=TINY.frames))
    assert mask.all()
    np.testing.assert_array_equal(decode.decode_frames(e.path, times), decode_all(e.path))


def test_reversed_twins_hold_the_same_frames_backwards(world: Path) -> None:
    pairs = load_reversal_pairs(world)
    assert len(pairs) == TINY.reversed_twins()
    by_id = {e.video_id: e for e in read_manifest(world / "test.jsonl")}
    for fwd, rev in pairs:
        assert rev == f"{fwd}_rev"
        a, b = decode_all(by_id[fwd].path), decode_all(by_id[rev].path)
        # intra-only coding: a frame decodes the same wherever it sits, so this is exact
        np.testing.assert_array_equal(a[::-1], b)
        assert not np.array_equal(a, b)  # not a palindrome: order is the only difference
        # an order-blind pooling of the two is identical
        np.testing.assert_array_equal(a.mean(0), b.mean(0))
        assert set(by_id[fwd].captions).isdisjoint(by_id[rev].captions)


def test_twin_captions_describe_the_reversed_events(world: Path) -> None:
    events = {}
    for line in (world / "test_events.jsonl").read_text().splitlines():
        rec = json.loads(line)
        events[rec["video_id"]] = rec
    opposite = {**S._OPPOSITE, "recolour": "recolour", "move": "move"}
    for fwd, rev in load_reversal_pairs(world):
        f, r = events[fwd]["events"], events[rev]["events"]
        assert events[rev]["reversed_of"] == fwd
        assert [e["kind"] for e in r] == [opposite[e["kind"]] for e in reversed(f)]
        assert [e["arg"] for e in r if e["kind"] == "move"] == [
            S._OPPOSITE[e["arg"]] for e in reversed(f) if e["kind"] == "move"
        ]


def test_captions_name_the_events(world: Path) -> None:
    for split in ("train", "test"):
        captions = {e.video_id: e.captions for e in read_manifest(world / f"{split}.jsonl")}
        for line in (world / f"{split}_events.jsonl").read_text().splitlines():
            rec = json.loads(line)
            for ev in rec["events"]:
                words = S._MOVE_WORDS[ev["arg"]] if ev["kind"] == "move" else S._EVENT_WORDS[ev["kind"]]
                stems = [w.split(" {")[0] for w in words]  # "turns {c}" -> "turns"
                for cap in captions[rec["video_id"]]:
                    assert any(s in cap for s in stems), (cap, ev)


def test_determinism_and_seed_sensitivity(world: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate_pocket_world(again, TINY, workers=2)  # a process pool gives the same bytes
    for f in sorted(p.relative_to(world) for p in world.rglob("*") if p.is_file()):
        assert (again / f).read_bytes() == (world / f).read_bytes(), f
    other = tmp_path / "other"
    generate_pocket_world(other, replace(TINY, seed=4), workers=1)
    for name in ("train.jsonl", "pretrain.jsonl"):
        assert (other / name).read_bytes() != (world / name).read_bytes()
    assert not np.array_equal(
        decode_all(other / "videos/train/train_00000.mp4"), decode_all(world / "videos/train/train_00000.mp4")
    )
    assert not np.array_equal(load_pretrain_set(other).images, load_pretrain_set(world).images)


def test_pretrain_set(world: Path) -> None:
    images, captions = load_pretrain_set(world)
    assert images.dtype == np.uint8 and images.shape == (TINY.pretrain_images, 64, 64, 3)
    assert len(captions) == TINY.pretrain_images and all(captions)
    assert len(set(captions)) > TINY.pretrain_images // 2
    recs = [json.loads(line) for line in (world / "pretrain.jsonl").read_text().splitlines()]
    assert [r["image"] for r in recs] == list(range(TINY.pretrain_images))
    for img, rec in zip(images, recs):
        assert 1 <= len(rec["objects"]) <= 2
        for obj in rec["objects"]:
            # the named colour is really drawn: some pixel is close to it
            dist = np.abs(img.astype(int) - np.array(S._COLOURS[obj["colour"]])).sum(-1)
            assert dist.min() < 30, rec
            assert any(w in rec["caption"] for w in S._COLOUR_WORDS[obj["colour"]])
            assert any(w in rec["caption"] for w in S._SHAPE_WORDS[obj["shape"]])


def test_probe_clips_are_static(world: Path) -> None:
    for e in read_manifest(world / "probe.jsonl"):
        frames = decode_all(e.path)
        assert (frames == frames[:1]).all()


def test_idempotent_and_refuses_another_config(world: Path, tmp_path: Path) -> None:
    stamp = {p: p.stat().st_mtime_ns for p in world.rglob("*") if p.is_file()}
    report = generate_pocket_world(world, TINY)
    assert report.reused and report.seconds == 0.0
    assert {p: p.stat().st_mtime_ns for p in world.rglob("*") if p.is_file()} == stamp
    with pytest.raises(VidretError, match="another config"):
        generate_pocket_world(world, replace(TINY, seed=99))

    out = tmp_path / "w"
    small = replace(TINY, pretrain_images=4, train_clips=2, val_clips=1, test_clips=2, probe_clips=1)
    first = generate_pocket_world(out, small, workers=1)
    assert not first.reused and first.counts["test"] == 3
    (out / "pocket_world.json").unlink()  # as if the run had been interrupted before the end
    assert not generate_pocket_world(out, small, workers=1).reused
    bigger = replace(small, train_clips=3)
    assert generate_pocket_world(out, bigger, workers=1, overwrite=True).counts["train"] == 3
    assert load_pocket_info(out)["config"]["train_clips"] == 3


def test_missing_world_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(VidretError, match="vidret pocket generate"):
        load_pretrain_set(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(VidretError, match="not a folder"):
        generate_pocket_world(tmp_path / "f", TINY)


def test_config_validation_and_round_trip() -> None:
    cfg = PocketConfig.from_size("small", seed=7)
    assert PocketConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert PocketConfig.from_size("default") == PocketConfig()
    with pytest.raises(VidretError, match="image_size"):
        PocketConfig(image_size=63)
    with pytest.raises(VidretError, match="seed"):
        PocketConfig(seed=-1)  # numpy seeds must be non-negative
    with pytest.raises(VidretError, match="frames"):
        PocketConfig(frames=8.5)  # type: ignore[arg-type]
    with pytest.raises(VidretError, match="test_reversed_fraction"):
        PocketConfig(test_reversed_fraction=1.5)
    with pytest.raises(VidretError, match="colour"):
        PocketConfig.from_dict({"colour": 1})
    with pytest.raises(VidretError, match="pocket size"):
        PocketConfig.from_size("huge")  # type: ignore[arg-type]


def _centroid(frame: np.ndarray, colour: str) -> tuple[float, float] | None:
    mask = np.abs(frame.astype(int) - np.array(S._COLOURS[colour])).sum(-1) < 40
    if not mask.any():
        return None
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def test_events_are_visible_at_64px() -> None:
    cfg = TINY
    red = S.Obj("circle", "red", 10.0, True, x=14.0, y=20.0)
    blue = S.Obj("square", "blue", 18.0, False, x=44.0, y=46.0)
    events = [S.Event(0, "move", "right", 22.0), S.Event(1, "appear")]
    frames = S.render_clip([red, blue], events, 20, cfg)
    assert frames.shape == (cfg.frames, 64, 64, 3)
    start, end = _centroid(frames[0], "red"), _centroid(frames[-1], "red")
    assert start is not None and end is not None
    assert end[0] - start[0] > 15 and abs(end[1] - start[1]) < 1  # moved right, only right
    assert _centroid(frames[0], "blue") is None and _centroid(frames[-1], "blue") is not None
    # the object is drawn at the promised size
    grown = S.render_clip([red], [S.Event(0, "grow")], 20, cfg)
    area = [(np.abs(f.astype(int) - np.array(S._COLOURS["red"])).sum(-1) < 40).sum() for f in grown]
    assert area[0] < area[-1] and 50 < area[0] < 120 and area[-1] > 200


def test_reversal_is_an_involution_and_renders_backwards() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        objs, events = S.sample_scene(rng, TINY)
        r_objs, r_events = S.reverse_scene(objs, events, 64)
        again = S.reverse_scene(r_objs, r_events, 64)
        assert [S._symbolic(e) for e in again[1]] == [S._symbolic(e) for e in events]
        assert [S._symbolic(e) for e in r_events] != [S._symbolic(e) for e in events]
        # the reversed scene renders the reversed frames: a twin looks like any other clip
        fwd = S.render_clip(objs, events, 20, TINY).astype(int)
        bwd = S.render_clip(r_objs, r_events, 20, TINY).astype(int)
        assert np.abs(fwd[::-1] - bwd).max() <= 1


def test_event_grammar_is_reversal_symmetric() -> None:
    """Counts of an event and of its inverse match, so "appears" is no likelier than "disappears"."""
    rng = np.random.default_rng(1)
    kinds: Counter[str] = Counter()
    for _ in range(3000):
        _, events = S.sample_scene(rng, TINY)
        kinds.update(e.arg if e.kind == "move" else e.kind for e in events)
    for a, b in (("appear", "disappear"), ("grow", "shrink"), ("left", "right"), ("up", "down")):
        n = kinds[a] + kinds[b]
        assert n > 300 and abs(kinds[a] - kinds[b]) < 4 * np.sqrt(n), (a, b, kinds)
    assert kinds["recolour"] > 300


# --------------------------------------------------------------------------- static + event captions (version 2)


def _pretraining_vocabulary(n: int = 20000) -> set[str]:
    """Every word the pretraining captions use (sampled generously from their own generator)."""
    words: set[str] = set()
    for i in range(n):
        rng = np.random.default_rng([0, 0, i])
        objs, cells = S.sample_static(rng, PocketConfig())
        words.update(S.static_caption(objs, cells, rng, 64).replace(",", " ").split())
    return words


def test_every_caption_is_a_static_clause_then_an_event_clause(world: Path) -> None:
    vocab = _pretraining_vocabulary()
    tok = pytest.importorskip("vidret.backbone.tokenizer").default_tokenizer()
    for split in ("train", "val", "test"):
        records = {
            json.loads(x)["video_id"]: json.loads(x) for x in (world / f"{split}_events.jsonl").read_text().splitlines()
        }
        for e in read_manifest(world / f"{split}.jsonl"):
            rec = records[e.video_id]
            assert len(rec["static_clauses"]) == len(e.captions) and rec["first_frame"]
            for cap, static in zip(e.captions, rec["static_clauses"]):
                assert cap.startswith(static) and len(cap) > len(static) + 5, (cap, static)
                # nothing static is out of the pretraining vocabulary
                assert set(static.replace(",", " ").split()) <= vocab, static
                # every object of the first frame is named with its size word, colour word and position
                for obj in rec["first_frame"]:
                    assert any(w in static for w in S._COLOUR_WORDS[obj["colour"]]), (static, obj)
                    assert any(w in static for w in S._SHAPE_WORDS[obj["shape"]]), (static, obj)
                assert len(tok.encode(cap)) + 2 <= S.CAPTION_TOKENS  # never truncated


def test_first_frame_record_matches_the_pixels(world: Path) -> None:
    """Objects sit near their grid cell's centre in the first frame, in the recorded colour."""
    by_id = {e.video_id: e for e in read_manifest(world / "test.jsonl")}
    for line in (world / "test_events.jsonl").read_text().splitlines():
        rec = json.loads(line)
        first = decode_all(by_id[rec["video_id"]].path)[0]
        for obj in rec["first_frame"]:
            c = _centroid(first, obj["colour"])
            assert c is not None, rec
            row, col = obj["cell"]
            assert abs(c[0] - (col + 0.5) * 64 / 3) < 7 and abs(c[1] - (row + 0.5) * 64 / 3) < 7, (c, obj)


def test_moves_are_one_grid_cell_and_stay_on_the_grid() -> None:
    rng = np.random.default_rng(5)
    for _ in range(300):
        objs, events = S.sample_scene(rng, TINY)
        starts, final = S._start_states(objs, events, 64)
        assert any(o.present for o in objs) and any(o.present for o in final)  # no empty first or last frame
        for e in events:
            if e.kind == "move":
                assert e.dist == pytest.approx(64 / 3)
        for o in (*objs, *final):
            half = o.size / 2
            assert half <= o.x <= 64 - half and half <= o.y <= 64 - half
            row, col = S.cell_of(o, 64)
            assert abs(o.x - (col + 0.5) * 64 / 3) <= 0.05 * 64 + 1e-6
            assert abs(o.y - (row + 0.5) * 64 / 3) <= 0.05 * 64 + 1e-6


def test_default_world_keeps_128_reversal_pairs() -> None:
    assert PocketConfig().reversed_twins() >= 128


def test_a_world_of_an_older_generator_version_is_not_reused(world: Path, tmp_path: Path) -> None:
    out = tmp_path / "old"
    small = replace(TINY, pretrain_images=4, train_clips=2, val_clips=1, test_clips=2, probe_clips=1)
    generate_pocket_world(out, small, workers=1)
    info = json.loads((out / "pocket_world.json").read_text())
    info["version"] = P.GENERATOR_VERSION - 1
    (out / "pocket_world.json").write_text(json.dumps(info))
    with pytest.raises(VidretError, match="generator version"):
        generate_pocket_world(out, small, workers=1)
    report = generate_pocket_world(out, small, workers=1, overwrite=True)
    assert not report.reused and load_pocket_info(out)["version"] == P.GENERATOR_VERSION
