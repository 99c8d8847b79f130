"""Benchmark converters on small annotation files written in each benchmark's real format.

Video files are empty: converters only look for them. Each test checks splits, counts, captions,
dropped rows with their reasons, and that a malformed row fails naming its file and line.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest

from vidret.data.converters import DATASETS, REPORT_NAME, ConversionReport, convert, read_benchmark
from vidret.data.manifest import ManifestEntry, read_manifest
from vidret.errors import VidretError


def _touch(root: Path, *names: str) -> None:
    for n in names:
        p = root / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")


def _read(out: Path, split: str) -> dict[str, ManifestEntry]:
    return {e.video_id: e for e in read_manifest(out / f"{split}.jsonl")}


def _balanced(r: ConversionReport) -> None:
    """Every caption row is either kept or dropped for a reason, in every split."""
    for s in r.splits.values():
        assert s.rows_read == s.rows_kept + sum(s.dropped_rows.values()), s
    assert r.rows_dropped() == sum(sum(s.dropped_rows.values()) for s in r.splits.values())


def _line_of(path: Path, needle: str) -> int:
    """Line of the JSON record (its opening brace) that contains ``needle``."""
    text = path.read_text()
    return text.count("\n", 0, text.rindex("{", 0, text.index(needle))) + 1


def test_datasets_listed() -> None:
    assert set(DATASETS) == {"msrvtt", "msvd", "lsmdc", "didemo", "activitynet", "vatex", "generic"}


# -------------------------------------------------------------------------------------------------- MSR-VTT
def _msrvtt(ann: Path, vids: Path, indent: int | None = None) -> None:
    ann.mkdir(parents=True, exist_ok=True)
    sentences = []
    for v in ("video0", "video1", "video2", "video7"):  # video7 is a test video: not in the 9k list
        for k in range(20):
            sentences.append({"caption": f"{v} caption {k}", "video_id": v, "sen_id": len(sentences)})
    sentences[20 + 3]["caption"] = "  "  # video1: one empty caption
    sentences[20 + 4]["caption"] = "video1  caption 5"  # video1: a duplicate of caption 5 once spaces are normalised
    data = {
        "info": {"year": 2016},
        "videos": [
            {"category": 9, "video_id": v, "start time": 1.0, "end time": 9.0, "split": "train", "id": i}
            for i, v in enumerate(("video0", "video1", "video2", "video7"))
        ],  # fmt: skip
        "sentences": sentences,
    }
    (ann / "MSRVTT_data.json").write_text(json.dumps(data, indent=indent))
    (ann / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\nvideo1\nvideo2\n")
    (ann / "MSRVTT_JSFUSION_test.csv").write_text(
        ",key,vid_key,video_id,sentence\n"
        "0,ret0,msr9770,video9770,a person is connecting something to system\n"
        '1,ret1,msr9771,video9771,"a little girl does gymnastics, then smiles"\n'
        "2,ret2,msr9770,video9770,a second sentence for the same test video\n"
    )
    _touch(vids, "TrainValVideo/video0.mp4", "TrainValVideo/video1.mp4", "TestVideo/video9770.mp4",
           "TestVideo/video9771.webm", "TrainValVideo/notes.txt")  # fmt: skip


def test_msrvtt(tmp_path: Path) -> None:
    ann, vids, out = tmp_path / "ann", tmp_path / "videos", tmp_path / "out"
    _msrvtt(ann, vids)
    report = convert("msrvtt", ann, vids, out)
    assert set(report.splits) == {"train", "test"}
    train, test = _read(out, "train"), _read(out, "test")
    assert list(train) == ["video0", "video1"]  # 9k-list order; video2's file is missing
    assert train["video0"].captions == tuple(f"video0 caption {k}" for k in range(20))
    assert len(train["video1"].captions) == 18  # one empty, one duplicate
    assert train["video0"].path == str(vids / "TrainValVideo" / "video0.mp4")  # outside out/: absolute
    assert train["video0"].start is None and train["video0"].end is None
    assert test["video9770"].captions == ("a person is connecting something to system",)
    assert test["video9771"].captions == ("a little girl does gymnastics, then smiles",)
    assert test["video9771"].path.endswith("video9771.webm")

    tr, te = report.splits["train"], report.splits["test"]
    assert (tr.rows_read, tr.rows_kept, tr.videos, tr.captions, tr.videos_dropped) == (60, 38, 2, 38, 1)
    assert tr.dropped_rows["missing video file"] == 20
    assert tr.dropped_rows["empty caption"] == 1 and tr.dropped_rows["duplicate"] == 1
    assert (te.rows_read, te.rows_kept, te.dropped_rows["duplicate"]) == (3, 2, 1)
    _balanced(report)
    reasons = {(d.split, d.video_id, d.reason) for d in report.dropped}
    assert ("train", "video2", "missing video file") in reasons
    assert ("test", "video9770", "duplicate") in reasons
    assert any(d.where.endswith("MSRVTT_JSFUSION_test.csv:4") for d in report.dropped)
    assert any(d.where.endswith("MSRVTT_train.9k.csv:4") for d in report.dropped if d.video_id == "video2")

    saved = json.loads((out / REPORT_NAME).read_text())
    assert saved["splits"]["train"]["rows_kept"] == 38 and saved["manifests"]["test"] == str(out / "test.jsonl")
    assert "train: 2 videos, 38 captions" in report.format_report()


def test_msrvtt_videos_inside_out_dir_are_relative(tmp_path: Path) -> None:
    ann, out = tmp_path / "ann", tmp_path / "ds"
    _msrvtt(ann, out / "videos")
    convert("msrvtt", ann, out / "videos", out)
    line = json.loads((out / "test.jsonl").read_text().splitlines()[0])
    assert line["path"] == "videos/TestVideo/video9770.mp4"
    assert read_manifest(out / "test.jsonl")[0].path == str(out / "videos" / "TestVideo" / "video9770.mp4")


def test_msrvtt_malformed(tmp_path: Path) -> None:
    ann, vids = tmp_path / "ann", tmp_path / "videos"
    _msrvtt(ann, vids, indent=1)
    data_path = ann / "MSRVTT_data.json"
    data = json.loads(data_path.read_text())
    del data["sentences"][45]["caption"]  # a record missing a field
    data_path.write_text(json.dumps(data, indent=1))
    line = _line_of(data_path, '"sen_id": 45')
    with pytest.raises(
        VidretError, match=rf"MSRVTT_data\.json:{line}: .*\['sentences'\]\[45\].*missing field 'caption'"
    ):
        read_benchmark("msrvtt", ann, vids)

    data_path.write_text('{"sentences": [\n{"video_id": "video0",\n "caption": "ok"},\n{"video_id": oops}]}')
    with pytest.raises(VidretError, match=r"MSRVTT_data\.json:4:\d+: not valid JSON"):
        read_benchmark("msrvtt", ann, vids)

    _msrvtt(ann, vids)
    csv_path = ann / "MSRVTT_JSFUSION_test.csv"
    csv_path.write_text(csv_path.read_text() + "3,ret3,msr9772,video9772\n")  # a column short
    with pytest.raises(VidretError, match=r"MSRVTT_JSFUSION_test\.csv:5: expected 5"):
        read_benchmark("msrvtt", ann, vids)
    csv_path.write_text("key,vid_key,video\nret0,msr1,video1\n")
    with pytest.raises(VidretError, match=r"MSRVTT_JSFUSION_test\.csv:1: missing column"):
        read_benchmark("msrvtt", ann, vids)


# ----------------------------------------------------------------------------------------------------- MSVD
def test_msvd(tmp_path: Path) -> None:
    ann, vids, out = tmp_path / "ann", tmp_path / "videos", tmp_path / "out"
    ann.mkdir()
    caps = {
        "-4wsuPCjDBc_5_15": [["a", "squirrel", "is", "eating", "a", "peanut"], ["a", "squirrel", "eats"]],
        "-7KMZQEsJW4_205_208": [["a", "man", "plays", "a", "guitar"], [], ["a", "man", "plays", "a", "guitar"]],
        "-8y1Q0rA3n8_108_115": [["a", "woman", "slices", "a", "tomato"]],
        "0lh_UWF9ZP4_62_69": [["someone", "cooks"]],  # its video file is missing
        "not_in_any_list": [["ignored"]],
    }  # fmt: skip
    with (ann / "raw-captions.pkl").open("wb") as f:
        pickle.dump(caps, f)
    (ann / "train_list.txt").write_text("-4wsuPCjDBc_5_15\n-7KMZQEsJW4_205_208\n\n")
    (ann / "val_list.txt").write_text("-8y1Q0rA3n8_108_115\n")
    (ann / "test_list.txt").write_text("0lh_UWF9ZP4_62_69\nno_captions_for_me\n")
    _touch(vids, "YouTubeClips/-4wsuPCjDBc_5_15.avi", "YouTubeClips/-7KMZQEsJW4_205_208.avi",
           "YouTubeClips/-8y1Q0rA3n8_108_115.avi", "YouTubeClips/no_captions_for_me.avi")  # fmt: skip
    report = convert("msvd", ann, vids, out)
    train = _read(out, "train")
    assert train["-4wsuPCjDBc_5_15"].captions == ("a squirrel is eating a peanut", "a squirrel eats")
    assert train["-7KMZQEsJW4_205_208"].captions == ("a man plays a guitar",)
    assert list(_read(out, "val")) == ["-8y1Q0rA3n8_108_115"]
    assert _read(out, "test") == {}
    s = report.splits
    assert (s["train"].rows_read, s["train"].rows_kept) == (5, 3)
    assert s["train"].dropped_rows["empty caption"] == 1 and s["train"].dropped_rows["duplicate"] == 1
    assert s["test"].dropped_rows["missing video file"] == 1 and s["test"].videos_dropped == 2
    reasons = {d.video_id: d.reason for d in report.dropped if d.split == "test"}
    assert reasons == {"0lh_UWF9ZP4_62_69": "missing video file", "no_captions_for_me": "no captions"}
    assert "split 'test' has no videos left" in report.warnings
    _balanced(report)


def test_msvd_malformed(tmp_path: Path) -> None:
    (tmp_path / "train_list.txt").write_text("vid1\n")
    _touch(tmp_path / "v", "vid1.avi")
    with (tmp_path / "raw-captions.pkl").open("wb") as f:
        pickle.dump({"vid1": [["ok"], 42]}, f)
    with pytest.raises(VidretError, match=r"raw-captions\.pkl \[key 'vid1', caption 1\]: expected a list of word"):
        read_benchmark("msvd", tmp_path, tmp_path / "v")
    (tmp_path / "raw-captions.pkl").write_bytes(b"this is not a pickle")
    with pytest.raises(VidretError, match=r"raw-captions\.pkl: cannot read the pickle"):
        read_benchmark("msvd", tmp_path, tmp_path / "v")


# ---------------------------------------------------------------------------------------------------- LSMDC
_CLIP_A = "0001_American_Beauty_00.00.51.926-00.00.54.129"
_CLIP_B = "0001_American_Beauty_00.01.05.000-00.01.09.500"
_CLIP_C = "1012_Unbreakable_00.05.16.065-00.05.21.608"


def _lsmdc_row(clip: str, sentence: str) -> str:
    return f"{clip}\t00.00.51.926\t00.00.54.129\t00.00.51.688\t00.00.54.129\t{sentence}\n"


def test_lsmdc(tmp_path: Path) -> None:
    ann, vids, out = tmp_path / "ann", tmp_path / "videos", tmp_path / "out"
    ann.mkdir()
    (ann / "LSMDC16_annos_training.csv").write_text(
        _lsmdc_row(_CLIP_A, 'SOMEONE looks at "the car.')  # an unbalanced quote: no CSV quoting
        + _lsmdc_row(_CLIP_A, "A second sentence for the same clip.")
        + _lsmdc_row(_CLIP_B, "   \u2028 ")  # blank; U+2028 is no line break in this format
        + _lsmdc_row("0002_Missing_00.00.01.000-00.00.02.000", "No file for this clip.")
    )
    (ann / "LSMDC16_challenge_1000_publictect.csv").write_text(_lsmdc_row(_CLIP_C, "He opens the door."))
    _touch(vids, f"0001_American_Beauty/{_CLIP_A}.avi", f"0001_American_Beauty/{_CLIP_B}.avi",
           f"1012_Unbreakable/{_CLIP_C}.avi")  # fmt: skip
    report = convert("lsmdc", ann, vids, out)
    assert set(report.splits) == {"train", "test"}  # no val file given
    train, test = _read(out, "train"), _read(out, "test")
    assert list(train) == [_CLIP_A]
    assert train[_CLIP_A].captions == ('SOMEONE looks at "the car.',)
    assert train[_CLIP_A].path.endswith(f"{_CLIP_A}.avi")  # dots inside the id are not an extension
    assert (train[_CLIP_A].start, train[_CLIP_A].end) == (None, None)  # clips are already cut
    assert test[_CLIP_C].captions == ("He opens the door.",)
    d = report.splits["train"].dropped_rows
    assert (d["duplicate"], d["empty caption"], d["missing video file"]) == (1, 1, 1)
    assert {x.where.rsplit(":", 1)[1] for x in report.dropped} == {"2", "3", "4"}
    _balanced(report)


def test_lsmdc_malformed(tmp_path: Path) -> None:
    _touch(tmp_path / "v", f"{_CLIP_A}.avi")
    path = tmp_path / "LSMDC16_annos_val.csv"
    path.write_text(_lsmdc_row(_CLIP_A, "fine") + f"{_CLIP_B}\t00.01.05.000\t00.01.09.500\tToo few columns.\n")
    with pytest.raises(VidretError, match=r"LSMDC16_annos_val\.csv:2: expected 6 tab-separated columns"):
        read_benchmark("lsmdc", tmp_path, tmp_path / "v")
    path.write_text(_lsmdc_row(_CLIP_A, "fine") + _lsmdc_row(_CLIP_B, "x").replace("00.00.51.688", "soon"))
    with pytest.raises(VidretError, match=r"LSMDC16_annos_val\.csv:2: column start_extracted must be a time"):
        read_benchmark("lsmdc", tmp_path, tmp_path / "v")


# --------------------------------------------------------------------------------------------------- DiDeMo
_DIDEMO_A = "12090392@N02_13482799053_87ef417396.mov"
_DIDEMO_B = "10015567@N08_3655084291_d8b58466fa.mp4"


def _didemo_records() -> list[dict[str, object]]:
    def rec(video: str, desc: str, times: list[list[int]]) -> dict[str, object]:
        return {"video": video, "description": desc, "times": times, "annotation_id": 0, "num_segments": 6}

    return [
        rec(_DIDEMO_A, "a dog runs into view.", [[0, 0], [0, 1]]),
        rec(_DIDEMO_B, "the camera pans left", [[2, 2]]),
        rec(_DIDEMO_A, "the dog jumps", [[1, 1]]),
        rec(_DIDEMO_A, "the dog jumps", [[1, 1]]),  # an identical record: duplicate
        rec(_DIDEMO_A, "the dog jumps", [[4, 5]]),  # same words, another moment: kept
        rec("not_in_list.mp4", "ignored", [[0, 0]]),
        rec(_DIDEMO_B, "", [[3, 3]]),
    ]


def test_didemo(tmp_path: Path) -> None:
    ann, vids, out = tmp_path / "ann", tmp_path / "videos", tmp_path / "out"
    ann.mkdir()
    (ann / "train_list.txt").write_text(f"{_DIDEMO_A}\n{_DIDEMO_B}\n")
    (ann / "train_data.json").write_text(json.dumps(_didemo_records()))
    (ann / "test_list.txt").write_text("missing@N00_1_2.avi\n")
    (ann / "test_data.json").write_text(
        json.dumps([{"video": "missing@N00_1_2.avi", "description": "x", "times": [[0, 0]]}])
    )
    _touch(vids, _DIDEMO_A, "12090392@N02_13482799053_87ef417396.mp4", "10015567@N08_3655084291_d8b58466fa.mp4")
    report = convert("didemo", ann, vids, out)
    train = _read(out, "train")
    assert list(train) == [_DIDEMO_A, _DIDEMO_B]
    assert train[_DIDEMO_A].captions == (
        "a dog runs into view. the dog jumps the dog jumps",
    )  # one paragraph, in order
    assert train[_DIDEMO_A].path == str(vids / _DIDEMO_A)  # the exact file name wins over the re-encoded copy
    assert train[_DIDEMO_B].captions == ("the camera pans left",)
    s = report.splits["train"]
    assert (s.rows_read, s.rows_kept, s.captions) == (6, 4, 2)
    assert (s.dropped_rows["duplicate"], s.dropped_rows["empty caption"]) == (1, 1)
    assert report.splits["test"].dropped_rows["missing video file"] == 1
    _balanced(report)


def test_didemo_reencoded_file_and_malformed(tmp_path: Path) -> None:
    (tmp_path / "val_list.txt").write_text(f"{_DIDEMO_A}\n")
    (tmp_path / "val_data.json").write_text(json.dumps(_didemo_records()[:1]))
    _touch(tmp_path / "v", "12090392@N02_13482799053_87ef417396.mp4")  # .mov re-encoded to .mp4
    splits, _ = read_benchmark("didemo", tmp_path, tmp_path / "v")
    assert splits["val"][0].path.endswith("87ef417396.mp4")

    bad = _didemo_records()
    bad[4]["times"] = [["soon", 1]]
    (tmp_path / "val_data.json").write_text(json.dumps(bad, indent=2))
    text = (tmp_path / "val_data.json").read_text()
    line = text.count("\n", 0, text.index('"soon"')) + 1  # the line of the bad value itself
    with pytest.raises(
        VidretError, match=rf"val_data\.json:{line}: record \[4\]\['times'\]\[0\]\[0\]: times\[0\] must"
    ):
        read_benchmark("didemo", tmp_path, tmp_path / "v")
    del bad[4]["times"], bad[2]["description"]
    (tmp_path / "val_data.json").write_text(json.dumps(bad, indent=2))
    with pytest.raises(VidretError, match=r"val_data\.json:\d+: record \[2\]: missing field 'description'"):
        read_benchmark("didemo", tmp_path, tmp_path / "v")
    (tmp_path / "val_data.json").unlink()
    with pytest.raises(VidretError, match=r"val_data\.json not found"):
        read_benchmark("didemo", tmp_path, tmp_path / "v")


# ---------------------------------------------------------------------------------------------- ActivityNet
def _anet(video_sentences: dict[str, list[str]]) -> dict[str, object]:
    return {
        v: {"duration": 82.73, "timestamps": [[i * 2.0, i * 2.0 + 5.5] for i in range(len(s))], "sentences": s}
        for v, s in video_sentences.items()
    }


def test_activitynet(tmp_path: Path) -> None:
    ann, vids, out = tmp_path / "ann", tmp_path / "videos", tmp_path / "out"
    ann.mkdir()
    (ann / "train_ids.json").write_text(json.dumps(["v_QOlSCBRmfWY", "v_ehGHCYKzyZ8"]))
    (ann / "train.json").write_text(json.dumps(_anet({
        "v_ehGHCYKzyZ8": ["A man plays a flute.", " The man keeps playing.", " The man keeps playing."],
        "v_QOlSCBRmfWY": ["A young woman is seen standing in a room.", " ", " She then dances around."],
        "v_notlisted00": ["Not in train_ids.json."],
    })))  # fmt: skip
    (ann / "val_ids.json").write_text(json.dumps(["v_uqiMw7tQ1Cc", "v_missingfile"]))
    (ann / "val_1.json").write_text(json.dumps(_anet({"v_uqiMw7tQ1Cc": ["A weight lifting tutorial."],
                                                     "v_missingfile": ["One.", "Two."]})))  # fmt: skip
    _touch(vids, "v1-2/QOlSCBRmfWY.mp4", "v1-2/v_ehGHCYKzyZ8.mkv", "v1-3/uqiMw7tQ1Cc.webm")
    report = convert("activitynet", ann, vids, out)
    train, val = _read(out, "train"), _read(out, "val")
    assert list(train) == ["v_QOlSCBRmfWY", "v_ehGHCYKzyZ8"]  # ids-file order
    assert train["v_QOlSCBRmfWY"].captions == ("A young woman is seen standing in a room. She then dances around.",)
    assert train["v_QOlSCBRmfWY"].path.endswith("v1-2/QOlSCBRmfWY.mp4")  # file name without "v_"
    assert train["v_ehGHCYKzyZ8"].path.endswith("v_ehGHCYKzyZ8.mkv")  # ... or with it
    assert train["v_ehGHCYKzyZ8"].captions == ("A man plays a flute. The man keeps playing. The man keeps playing.",)
    assert list(val) == ["v_uqiMw7tQ1Cc"]
    assert (report.splits["train"].rows_read, report.splits["train"].rows_kept) == (6, 5)
    assert report.splits["train"].dropped_rows["empty caption"] == 1
    assert report.splits["val"].dropped_rows["missing video file"] == 2
    _balanced(report)


def test_activitynet_malformed(tmp_path: Path) -> None:
    _touch(tmp_path / "v", "abc.mp4")
    data = _anet({"v_abc": ["One."], "v_def": ["Two."], "v_ghi": ["Three."]})
    data["v_def"]["duration"] = "long"  # type: ignore[index]
    (tmp_path / "val_1.json").write_text(json.dumps(data, indent=2))
    text = (tmp_path / "val_1.json").read_text()
    line = text.count("\n", 0, text.index('"long"')) + 1
    with pytest.raises(VidretError, match=rf"val_1\.json:{line}: .*\['v_def'\].*duration must be a number"):
        read_benchmark("activitynet", tmp_path, tmp_path / "v")
    (tmp_path / "val_1.json").write_text(json.dumps(_anet({"v_abc": ["One."]})))
    (tmp_path / "val_ids.json").write_text('["v_abc", 7]')
    with pytest.raises(VidretError, match=r"val_ids\.json:1: record \[1\]: expected a video id string"):
        read_benchmark("activitynet", tmp_path, tmp_path / "v")
    (tmp_path / "val_ids.json").unlink()
    splits, _ = read_benchmark("activitynet", tmp_path, tmp_path / "v")  # no ids file: every record
    assert [e.video_id for e in splits["val"]] == ["v_abc"]


# ---------------------------------------------------------------------------------------------------- VATEX
def _vatex(ids: list[str]) -> list[dict[str, object]]:
    return [{"videoID": v, "enCap": [f"{v} english {k}" for k in range(10)], "chCap": ["中文"] * 10} for v in ids]


def test_vatex(tmp_path: Path) -> None:
    ann, vids, out = tmp_path / "ann", tmp_path / "videos", tmp_path / "out"
    ann.mkdir()
    train_recs = _vatex(["Ptf_2VRj-V0_000122_000132", "--07WQ2iBlw_000001_000011", "gone_000000_000010"])
    train_recs[0]["enCap"][9] = train_recs[0]["enCap"][8]  # type: ignore[index]
    (ann / "vatex_training_v1.0.json").write_text(json.dumps(train_recs, ensure_ascii=False))
    (ann / "vatex_validation_v1.0.json").write_text(json.dumps(_vatex(["abc123_000010_000020"])))
    _touch(vids, "Ptf_2VRj-V0_000122_000132.mp4", "--07WQ2iBlw.mp4", "val/abc123_000010_000020.mp4")
    report = convert("vatex", ann, vids, out)
    train = _read(out, "train")
    assert list(train) == ["Ptf_2VRj-V0_000122_000132", "--07WQ2iBlw_000001_000011"]
    assert len(train["Ptf_2VRj-V0_000122_000132"].captions) == 9  # one duplicate
    a = train["Ptf_2VRj-V0_000122_000132"]
    assert (a.start, a.end) == (None, None)  # file named by videoID: already cut
    b = train["--07WQ2iBlw_000001_000011"]
    assert b.path.endswith("--07WQ2iBlw.mp4") and (b.start, b.end) == (1.0, 11.0)  # full video: the segment
    assert list(_read(out, "val")) == ["abc123_000010_000020"]
    s = report.splits["train"]
    assert (s.rows_read, s.rows_kept, s.dropped_rows["duplicate"], s.dropped_rows["missing video file"]) == (
        30,
        19,
        1,
        10,
    )
    _balanced(report)

    # HGR-style split lists select and order videos from both annotation files
    (ann / "train_list.txt").write_text("--07WQ2iBlw_000001_000011\n")
    (ann / "test_list.txt").write_text("abc123_000010_000020\nPtf_2VRj-V0_000122_000132\n")
    splits, report = read_benchmark("vatex", ann, vids)
    assert set(splits) == {"train", "test"}
    assert [e.video_id for e in splits["test"]] == ["abc123_000010_000020", "Ptf_2VRj-V0_000122_000132"]
    assert [len(v) for v in splits.values()] == [1, 2]
    assert not any("in both" in w for w in report.warnings)


def test_vatex_malformed_and_leak_warning(tmp_path: Path) -> None:
    _touch(tmp_path / "v", "a_000000_000010.mp4")
    recs = _vatex(["a_000000_000010", "b_000000_000010"])
    del recs[1]["enCap"]
    (tmp_path / "vatex_training_v1.0.json").write_text(json.dumps(recs, indent=1))
    line = _line_of(tmp_path / "vatex_training_v1.0.json", '"b_000000_000010"')
    with pytest.raises(VidretError, match=rf"vatex_training_v1\.0\.json:{line}: record \[1\]: missing field 'enCap'"):
        read_benchmark("vatex", tmp_path, tmp_path / "v")
    (tmp_path / "vatex_training_v1.0.json").write_text(json.dumps(_vatex(["a_000000_000010"])))
    (tmp_path / "vatex_validation_v1.0.json").write_text(json.dumps(_vatex(["a_000000_000010"])))
    _, report = read_benchmark("vatex", tmp_path, tmp_path / "v")
    assert any("in both 'train' and 'val'" in w for w in report.warnings)


# -------------------------------------------------------------------------------------------------- generic
def test_generic(tmp_path: Path) -> None:
    ann, vids, out = tmp_path / "ann", tmp_path / "videos", tmp_path / "out"
    ann.mkdir()
    (ann / "train.csv").write_text(
        "path,caption\n"
        'clips/a.mp4,"a cat, sleeping"\n'
        "clips/a.mp4,a cat on a sofa\n"
        "clips/a.mp4,a cat on a sofa\n"
        "clips/b.avi,\n"
        "clips/gone.mp4,nobody here\n"
        f"{vids / 'other' / 'c.mkv'},an absolute path\n"
    )
    (ann / "test.tsv").write_text(
        "video_id\tpath\tcaption\tstart\tend\n"
        "long_1\tclips/long.mp4\tthe first part\t0\t5.5\n"
        "long_2\tclips/long.mp4\tthe second part\t5.5\t\n"
        "long_2\tclips/long.mp4\tstill the second part\t5.5\t\n"
    )
    _touch(vids, "clips/a.mp4", "clips/b.avi", "other/c.mkv", "clips/long.mp4")
    report = convert("generic", ann, vids, out)
    train, test = _read(out, "train"), _read(out, "test")
    assert list(train) == ["clips/a.mp4", str(vids / "other" / "c.mkv")]
    assert train["clips/a.mp4"].captions == ("a cat, sleeping", "a cat on a sofa")
    assert train["clips/a.mp4"].path == str(vids / "clips" / "a.mp4")
    assert (test["long_1"].start, test["long_1"].end) == (0.0, 5.5)
    assert (test["long_2"].start, test["long_2"].end, len(test["long_2"].captions)) == (5.5, None, 2)
    d = report.splits["train"].dropped_rows
    assert (d["duplicate"], d["empty caption"], d["missing video file"]) == (1, 1, 1)
    assert report.video_files_indexed == 0
    _balanced(report)

    # one file instead of a folder; the split is the file's name; segments without ids get their own ids
    single = tmp_path / "mine.csv"
    single.write_text("path,caption,start,end\nclips/long.mp4,part one,0,5\nclips/long.mp4,part two,5,9\n")
    splits, _ = read_benchmark("generic", single, vids)
    assert [e.video_id for e in splits["mine"]] == ["clips/long.mp4#0-5", "clips/long.mp4#5-9"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("path,caption\na.mp4,ok\na.mp4,too,many\n", r"data\.csv:3: expected 2 ','-separated columns"),
        ("path,caption,start\na.mp4,ok,1\na.mp4,bad,soon\n", r"data\.csv:3: column start must be a number"),
        ("path,caption,start,end\na.mp4,ok,4,2\n", r"data\.csv:2: end \(2\.0\) must be after start"),
        ("file,text\na.mp4,ok\n", r"data\.csv:1: missing column\(s\) \['path', 'caption'\]"),
        ("video_id,path,caption\nx,a.mp4,ok\nx,b.mp4,ok\n", r"data\.csv:3: video 'x' has path"),
        ("path,caption\n,no path\n", r"data\.csv:2: empty path"),
        ('path,caption\na.mp4,"unterminated\n', r"data\.csv:\d+: malformed row"),
    ],
)
def test_generic_malformed(tmp_path: Path, body: str, message: str) -> None:
    (tmp_path / "data.csv").write_text(body)
    with pytest.raises(VidretError, match=message):
        read_benchmark("generic", tmp_path / "data.csv", tmp_path)


# ---------------------------------------------------------------------------------------------- user errors
def test_user_errors(tmp_path: Path) -> None:
    ann, vids, out = tmp_path / "ann", tmp_path / "videos", tmp_path / "out"
    with pytest.raises(VidretError, match="unknown dataset 'kinetics'"):
        convert("kinetics", ann, vids, out)  # type: ignore[arg-type]
    with pytest.raises(VidretError, match="annotations folder not found"):
        convert("msrvtt", ann, vids, out)
    ann.mkdir()
    with pytest.raises(VidretError, match="videos folder not found"):
        convert("msrvtt", ann, vids, out)
    _touch(vids, "unrelated.mp4")
    with pytest.raises(VidretError, match=re.escape("MSRVTT_train.9k.csv")):
        convert("msrvtt", ann, vids, out)  # no annotation file at all
    _msrvtt(ann, tmp_path / "elsewhere")
    with pytest.raises(VidretError, match="no msrvtt video could be matched"):
        convert("msrvtt", ann, vids, out)  # every video file missing: the report is still written
    saved = json.loads((out / REPORT_NAME).read_text())
    assert saved["splits"]["train"]["dropped_rows"]["missing video file"] == 58  # 20 + 18 + 20
    assert not (out / "train.jsonl").exists()


def test_convert_command_prints_the_readable_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vidret.cli import main

    ann, vids, out = tmp_path / "ann", tmp_path / "videos", tmp_path / "out"
    ann.mkdir()
    (ann / "train.csv").write_text("path,caption\nclips/a.mp4,a cat\nclips/gone.mp4,nobody here\n")
    _touch(vids, "clips/a.mp4")
    argv = ["data", "convert", "--dataset", "generic", "--annotations", str(ann), "--videos", str(vids)]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ConversionReport(" not in printed  # was the dataclass repr
    assert "train: 1 videos, 1 captions" in printed and "missing video file 1" in printed
