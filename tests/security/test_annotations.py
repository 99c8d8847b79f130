"""Issue 13 row 14: one over-long caption fails its row (dropped, named, counted), not the whole conversion."""

from __future__ import annotations

import csv
import pickle
import re
from pathlib import Path

import pytest

from vidret.data import annotation_files
from vidret.data.converters import MAX_CAPTION_CHARS, convert, read_benchmark
from vidret.errors import VidretError

LONG = "word " * 40_000  # 200,000 characters: over python csv's default 131,072-character field limit


def _videos(root: Path, *names: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for n in names:
        (root / n).write_bytes(b"")
    return root


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_one_huge_caption_drops_its_row_only(tmp_path: Path, suffix: str) -> None:
    vids = _videos(tmp_path / "videos", "a.mp4", "b.mp4")
    sep = "\t" if suffix == ".tsv" else ","
    table = tmp_path / f"train{suffix}"
    rows = [["path", "caption"], ["a.mp4", "a dog runs"], ["b.mp4", LONG], ["b.mp4", "a cat sleeps"]]
    with table.open("w", newline="") as f:
        csv.writer(f, delimiter=sep).writerows(rows)
    before = csv.field_size_limit()

    report = convert("generic", table, vids, tmp_path / "out")

    s = report.splits["train"]
    assert (s.rows_read, s.rows_kept, s.dropped_rows["caption too long"]) == (3, 2, 1)
    (drop,) = [d for d in report.dropped if d.reason == "caption too long"]
    assert drop.where == f"{table}:3" and drop.video_id == "b.mp4"
    assert "caption too long" in report.format_report()
    assert csv.field_size_limit() == before  # the process-wide csv limit is restored


def test_caption_limit_is_inclusive(tmp_path: Path) -> None:
    vids = _videos(tmp_path / "videos", "a.mp4")
    table = tmp_path / "train.csv"
    table.write_text(f"path,caption\na.mp4,{'x' * MAX_CAPTION_CHARS}\na.mp4,{'y' * (MAX_CAPTION_CHARS + 1)}\n")
    splits, report = read_benchmark("generic", table, vids)
    assert [len(c) for c in splits["train"][0].captions] == [MAX_CAPTION_CHARS]
    assert report.splits["train"].dropped_rows["caption too long"] == 1


def test_field_over_the_read_bound_names_file_and_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(annotation_files, "CSV_FIELD_LIMIT", 50_000)  # the real bound (16 MiB) makes a slow test
    vids = _videos(tmp_path / "videos", "a.mp4")
    table = tmp_path / "train.csv"
    table.write_text(f"path,caption\na.mp4,ok\na.mp4,{'z' * 60_000}\n")
    before = csv.field_size_limit()
    with pytest.raises(VidretError, match=rf"{re.escape(str(table))}:3: .*longer than 50000 characters"):
        read_benchmark("generic", table, vids)
    assert csv.field_size_limit() == before


def test_long_caption_in_a_pickle_or_json_is_dropped_too(tmp_path: Path) -> None:
    ann = tmp_path / "ann"
    ann.mkdir()
    with (ann / "raw-captions.pkl").open("wb") as f:
        pickle.dump({"v1": [["a", "squirrel"], LONG.split()]}, f)
    (ann / "train_list.txt").write_text("v1\n")
    vids = _videos(tmp_path / "videos", "v1.avi")
    splits, report = read_benchmark("msvd", ann, vids)
    assert splits["train"][0].captions == ("a squirrel",)
    (drop,) = report.dropped
    assert (drop.reason, drop.where) == ("caption too long", f"{ann / 'raw-captions.pkl'} [key 'v1', caption 1]")
