"""Benchmark converters: the annotation files users have -> the vidret JSONL manifest.

One reader per benchmark (the CLIP4Clip-style layouts of ``DATA.md``) plus a generic CSV/TSV reader.
Each returns per-split lists of :class:`ManifestEntry` and a :class:`ConversionReport` that accounts
for every caption row: ``rows_read == rows_kept + rows dropped`` (missing video file, empty caption,
duplicate, caption too long). A malformed row raises :class:`VidretError` naming the file and line (JSON: the line of
the offending record). :func:`convert` writes ``<out>/<split>.jsonl`` and ``conversion_report.json``.

What counts as a *duplicate* depends on the benchmark's caption shape:
- caption sets (MSR-VTT train, MSVD, VATEX, generic): the same caption text twice for one video;
- one caption per video (MSR-VTT 1k-A test, LSMDC): any second row for the same video;
- DiDeMo paragraphs: an identical record (same description and times) for the same video;
- ActivityNet paragraphs: never (a paragraph may repeat a sentence on purpose).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

from vidret.data.annotation_files import (
    MAX_CAPTION_CHARS,
    JsonDoc,
    RowLocation,
    check_spans,
    json_field,
    json_type,
    need_files,
    read_lines,
    read_list,
    read_table,
)
from vidret.data.manifest import ManifestEntry, write_manifest
from vidret.errors import VidretError
from vidret.safe_pickle import load_plain_pickle

logger = logging.getLogger(__name__)

DatasetName = Literal["msrvtt", "msvd", "lsmdc", "didemo", "activitynet", "vatex", "generic"]
DATASETS: tuple[str, ...] = get_args(DatasetName)
VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".avi", ".webm", ".mkv", ".mov")  # preference order
DropReason = Literal["missing video file", "empty caption", "duplicate", "no captions", "caption too long"]
REPORT_NAME = "conversion_report.json"

# (split, video_id) -> (path, start, end), or None when no video file exists for it
_Resolver = Callable[[str, str], "tuple[str, float | None, float | None] | None"]


# ---------------------------------------------------------------------------------------------- reports
@dataclass(frozen=True)
class DroppedRow:
    """Caption rows left out of the manifest, and why."""

    split: str
    video_id: str
    reason: DropReason
    where: str  # "file:line" or "file [record]"
    rows: int = 1  # caption rows removed (a missing video removes all its captions; "no captions": 0)


@dataclass(frozen=True)
class SplitReport:
    """Counts for one split. ``rows_read == rows_kept + sum(dropped_rows.values())``."""

    split: str
    rows_read: int  # caption rows (sentences) annotated for videos of this split
    rows_kept: int  # caption rows that reached the manifest (paragraph datasets: sentences)
    videos: int  # manifest entries written
    captions: int  # captions written (paragraph datasets: one per video)
    videos_dropped: int  # videos listed or annotated for the split but not written
    dropped_rows: Mapping[str, int] = field(default_factory=dict)  # reason -> caption rows


@dataclass(frozen=True)
class ConversionReport:
    """What a conversion read, kept and dropped; ``format_report()`` is the human summary."""

    dataset: str
    annotations: str
    videos_dir: str
    splits: Mapping[str, SplitReport]
    dropped: tuple[DroppedRow, ...] = ()
    warnings: tuple[str, ...] = ()
    video_files_indexed: int = 0  # video files found under videos_dir (0 for the generic converter)
    manifests: Mapping[str, str] = field(default_factory=dict)  # split -> written manifest (by convert)

    def rows_dropped(self, reason: DropReason | None = None) -> int:
        """Caption rows dropped in all splits, for one reason or all."""
        return sum(d.rows for d in self.dropped if reason is None or d.reason == reason)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format_report(self, max_examples: int = 10) -> str:
        """A short text summary: per-split counts, warnings, the first dropped rows."""
        lines = [
            f"{self.dataset}: {len(self.splits)} split(s) from {self.annotations}"
            + (f" (videos: {self.videos_dir}, {self.video_files_indexed} files indexed)" if self.videos_dir else "")
        ]
        for s in self.splits.values():
            drops = ", ".join(f"{k} {v}" for k, v in sorted(s.dropped_rows.items()) if v) or "none"
            lines.append(
                f"  {s.split}: {s.videos} videos, {s.captions} captions; caption rows read {s.rows_read}, "
                f"kept {s.rows_kept}; dropped rows: {drops}; videos dropped {s.videos_dropped}"
            )
            if s.split in self.manifests:
                lines.append(f"    -> {self.manifests[s.split]}")
        lines += [f"  warning: {w}" for w in self.warnings]
        if self.dropped:
            lines.append(f"  dropped ({len(self.dropped)} entries, first {min(max_examples, len(self.dropped))}):")
            lines += [f"    {d.where}: {d.split}/{d.video_id}: {d.reason}" for d in self.dropped[:max_examples]]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------- split builder
@dataclass
class _Video:
    video_id: str
    where: str  # where it was first listed or annotated
    captions: list[str] = field(default_factory=list)
    keys: set[object] = field(default_factory=set)
    rows: int = 0


class _Split:
    """Collects caption rows for one split, dropping empty and duplicate captions as they come."""

    def __init__(self, name: str, warnings: list[str], *, paragraph: bool, one_caption: bool, dedupe: bool):
        self.name = name
        self.paragraph = paragraph  # captions joined into one paragraph per video
        self.one_caption = one_caption  # a second row for a video is a duplicate
        self.dedupe = dedupe
        self.videos: dict[str, _Video] = {}
        self.dropped: list[DroppedRow] = []
        self.rows_read = 0
        self._warnings = warnings

    def declare(self, video_id: str, where: str) -> None:
        """Add a video from a split list (captions come later, from the annotation file)."""
        if not video_id:
            raise VidretError(f"{where}: empty video id")
        if video_id in self.videos:
            self._warnings.append(f"{where}: {video_id!r} listed twice in split {self.name!r}; kept once")
            return
        self.videos[video_id] = _Video(video_id, where)

    def has(self, video_id: str) -> bool:
        return video_id in self.videos

    def add(self, video_id: str, caption: str, where: str | RowLocation, extra_key: object = None) -> None:
        """One caption row; ``extra_key`` widens what must match for a duplicate (DiDeMo's times)."""
        if not video_id:
            raise VidretError(f"{where}: empty video id")
        v = self.videos.get(video_id)
        if v is None:
            v = self.videos[video_id] = _Video(video_id, str(where))
        self.rows_read += 1
        v.rows += 1
        if len(caption) > MAX_CAPTION_CHARS:  # checked first: no splitting/joining of a huge string
            self.dropped.append(DroppedRow(self.name, video_id, "caption too long", str(where)))
            return
        text = " ".join(caption.split())  # newlines / tabs / runs of spaces inside a caption mean nothing
        key = (text, extra_key)
        if not text:
            self.dropped.append(DroppedRow(self.name, video_id, "empty caption", str(where)))
        elif (self.one_caption and v.captions) or (self.dedupe and key in v.keys):
            self.dropped.append(DroppedRow(self.name, video_id, "duplicate", str(where)))
        else:
            v.keys.add(key)
            v.captions.append(text)

    def finish(self, resolve: _Resolver) -> tuple[list[ManifestEntry], SplitReport]:
        entries: list[ManifestEntry] = []
        rows_kept = 0
        for v in self.videos.values():
            if not v.captions:
                if v.rows == 0:  # listed, never annotated; rows dropped for other reasons are already counted
                    self.dropped.append(DroppedRow(self.name, v.video_id, "no captions", v.where, rows=0))
                continue
            found = resolve(self.name, v.video_id)
            if found is None:
                n = len(v.captions)
                self.dropped.append(DroppedRow(self.name, v.video_id, "missing video file", v.where, rows=n))
                continue
            path, start, end = found
            captions = (" ".join(v.captions),) if self.paragraph else tuple(v.captions)
            entries.append(ManifestEntry(v.video_id, path, captions, start, end))
            rows_kept += len(v.captions)
        by_reason: dict[str, int] = {r: 0 for r in get_args(DropReason)}
        for d in self.dropped:
            by_reason[d.reason] += d.rows
        n_captions = sum(len(e.captions) for e in entries)
        dropped_videos = len(self.videos) - len(entries)
        return entries, SplitReport(
            self.name, self.rows_read, rows_kept, len(entries), n_captions, dropped_videos, by_reason
        )


class _Conversion:
    """The splits of one conversion and the warnings shared by them."""

    def __init__(self) -> None:
        self.splits: dict[str, _Split] = {}
        self.warnings: list[str] = []

    def split(self, name: str, *, paragraph: bool = False, one_caption: bool = False, dedupe: bool = True) -> _Split:
        if name in self.splits:
            raise VidretError(f"split {name!r} comes from two annotation files; keep one")
        s = self.splits[name] = _Split(name, self.warnings, paragraph=paragraph, one_caption=one_caption, dedupe=dedupe)
        return s

    def finish(
        self, dataset: str, annotations: Path, videos_dir: str, resolve: _Resolver, indexed: int
    ) -> tuple[dict[str, list[ManifestEntry]], ConversionReport]:
        out: dict[str, list[ManifestEntry]] = {}
        reports: dict[str, SplitReport] = {}
        dropped: list[DroppedRow] = []
        for name, s in self.splits.items():
            out[name], reports[name] = s.finish(resolve)
            dropped += s.dropped
            if not out[name]:
                self.warnings.append(f"split {name!r} has no videos left")
        names = list(out)
        for i, a in enumerate(names):  # the same video in two splits leaks test data into training
            ids_a = {e.video_id for e in out[a]}
            for b in names[i + 1 :]:
                both = sorted(ids_a.intersection(e.video_id for e in out[b]))
                if both:
                    self.warnings.append(f"{len(both)} video(s) are in both {a!r} and {b!r}, e.g. {both[:3]}")
        warnings = tuple(self.warnings)
        where = os.path.abspath(annotations)  # printed and recorded normalised, like videos_dir
        return out, ConversionReport(dataset, where, videos_dir, reports, tuple(dropped), warnings, indexed)


# ---------------------------------------------------------------------------------------- video index
class _VideoIndex:
    """Every file under a folder (recursive, one walk), looked up by name or by id (name minus extension)."""

    def __init__(self, root: str | os.PathLike[str]):
        top = os.path.abspath(root)
        if not os.path.isdir(top):
            raise VidretError(f"videos folder not found: {top} (pass the folder that holds the video files)")
        self.root = top
        self.by_name: dict[str, str] = {}
        stems: dict[str, list[str]] = {}
        seen: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen:  # a symlink loop
                dirnames[:] = []
                continue
            seen.add(real)
            dirnames.sort()
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                self.by_name.setdefault(name, full)
                stem, ext = os.path.splitext(name)
                if ext.lower() in VIDEO_EXTENSIONS:
                    stems.setdefault(stem, []).append(full)
        rank = {e: i for i, e in enumerate(VIDEO_EXTENSIONS)}
        self.by_stem = {s: min(ps, key=lambda p: rank[os.path.splitext(p)[1].lower()]) for s, ps in stems.items()}
        self.ambiguous = {s: ps for s, ps in stems.items() if len(ps) > 1}
        self.n_videos = sum(len(ps) for ps in stems.values())

    def find(self, candidates: Sequence[str]) -> str | None:
        """The first candidate that is a file name, or a video file's name without its extension."""
        for c in candidates:
            hit = self.by_name.get(c) or self.by_stem.get(c)
            if hit is not None:
                return hit
        return None

    def warnings(self) -> list[str]:
        if not self.ambiguous:
            return []
        s, ps = next(iter(self.ambiguous.items()))
        return [
            f"{len(self.ambiguous)} video id(s) match several files, e.g. {s!r}: {ps}; using the first "
            f"by extension order {VIDEO_EXTENSIONS}"
        ]


# -------------------------------------------------------------------------------------------- readers
def _by_id(index: _VideoIndex, candidates: Callable[[str], Sequence[str]] = lambda v: (v,)) -> _Resolver:
    def resolve(split: str, video_id: str) -> tuple[str, float | None, float | None] | None:
        path = index.find(candidates(video_id))
        return None if path is None else (path, None, None)

    return resolve


def _read_msrvtt(ann: Path, index: _VideoIndex, conv: _Conversion) -> _Resolver:
    """Train: 9k ids from ``MSRVTT_train.9k.csv``, all their captions from ``MSRVTT_data.json``;
    test (1k-A): one caption per video from ``MSRVTT_JSFUSION_test.csv``."""
    train_csv, test_csv = ann / "MSRVTT_train.9k.csv", ann / "MSRVTT_JSFUSION_test.csv"
    need_files(ann, "MSR-VTT", [train_csv.name, test_csv.name])
    if train_csv.is_file():
        data_json = ann / "MSRVTT_data.json"
        if not data_json.is_file():
            raise VidretError(f"{data_json} not found: the MSR-VTT train split takes its captions from it")
        train = conv.split("train")
        for where, row in read_table(train_csv, ",", ["video_id"]):
            train.declare(row["video_id"].strip(), where)
        doc = JsonDoc(data_json)
        sentences = json_field(doc, (), doc.top(dict), "sentences", list)
        for i, s in enumerate(sentences):
            vid = json_field(doc, ("sentences", i), s, "video_id", str)
            cap = json_field(doc, ("sentences", i), s, "caption", str)
            if train.has(vid):
                train.add(vid, cap, doc.loc("sentences", i))
    if test_csv.is_file():
        test = conv.split("test", one_caption=True)
        for where, row in read_table(test_csv, ",", ["video_id", "sentence"]):
            test.add(row["video_id"].strip(), row["sentence"], where)
    return _by_id(index)


def _read_msvd(ann: Path, index: _VideoIndex, conv: _Conversion) -> _Resolver:
    """``{train,val,test}_list.txt`` + ``raw-captions.pkl`` (id -> list of token lists)."""
    lists = [f"{s}_list.txt" for s in ("train", "val", "test")]
    need_files(ann, "MSVD", lists)
    pkl = ann / "raw-captions.pkl"
    if not pkl.is_file():
        raise VidretError(f"{pkl} not found: MSVD captions come from it")
    # Restricted: plain containers and str only; a pickle naming any Python global is refused, never run.
    captions = load_plain_pickle(pkl, "a dict of video id -> caption lists")
    if not isinstance(captions, dict):
        raise VidretError(f"{pkl}: expected a dict video id -> captions, got {type(captions).__name__}")
    for name in lists:
        if not (ann / name).is_file():
            continue
        split = conv.split(name.removesuffix("_list.txt"))
        for where, vid in read_list(ann / name):
            split.declare(vid, where)
        for vid in list(split.videos):
            caps = captions.get(vid)
            if caps is None:
                continue
            if not isinstance(caps, (list, tuple)):
                raise VidretError(f"{pkl}: key {vid!r}: expected a list of captions, got {type(caps).__name__}")
            for j, toks in enumerate(caps):
                where = f"{pkl} [key {vid!r}, caption {j}]"
                if isinstance(toks, str):
                    text = toks
                elif isinstance(toks, (list, tuple)) and all(isinstance(t, str) for t in toks):
                    text = " ".join(toks)
                else:
                    raise VidretError(f"{where}: expected a list of word strings, got {toks!r}"[:300])
                split.add(vid, text, where)
    return _by_id(index)


_LSMDC_FILES = {
    "train": "LSMDC16_annos_training.csv",
    "val": "LSMDC16_annos_val.csv",
    "test": "LSMDC16_challenge_1000_publictect.csv",
}
_LSMDC_COLUMNS = ("CLIP_ID", "start_aligned", "end_aligned", "start_extracted", "end_extracted", "SENTENCE")
_LSMDC_TIME = re.compile(r"^[0-9]+([.:][0-9]+)*$")  # e.g. 00.00.51.926


def _read_lsmdc(ann: Path, index: _VideoIndex, conv: _Conversion) -> _Resolver:
    """Tab-separated, no header, 6 columns; one caption per clip; clip files are already cut."""
    need_files(ann, "LSMDC", list(_LSMDC_FILES.values()))
    for name, fname in _LSMDC_FILES.items():
        path = ann / fname
        if not path.is_file():
            continue
        split = conv.split(name, one_caption=True)
        # not the csv module: LSMDC sentences hold unbalanced quotes, and there is no quoting
        for where, line in read_lines(path):
            cols = line.split("\t")
            if len(cols) != len(_LSMDC_COLUMNS):
                raise VidretError(
                    f"{where}: expected {len(_LSMDC_COLUMNS)} tab-separated columns {list(_LSMDC_COLUMNS)}, "
                    f"found {len(cols)}"
                )
            for col, value in zip(_LSMDC_COLUMNS[1:5], cols[1:5]):
                if not _LSMDC_TIME.match(value.strip()):
                    raise VidretError(f"{where}: column {col} must be a time like 00.00.51.926, got {value!r}")
            split.add(cols[0].strip(), cols[5], where)
    return _by_id(index)


def _read_didemo(ann: Path, index: _VideoIndex, conv: _Conversion) -> _Resolver:
    """``{split}_list.txt`` + ``{split}_data.json``; a video's descriptions form one paragraph, in file order."""
    need_files(ann, "DiDeMo", [f"{s}_list.txt" for s in ("train", "val", "test")])
    for name in ("train", "val", "test"):
        list_path, data_path = ann / f"{name}_list.txt", ann / f"{name}_data.json"
        if not list_path.is_file():
            continue
        if not data_path.is_file():
            raise VidretError(f"{data_path} not found: it holds the descriptions for {list_path.name}")
        split = conv.split(name, paragraph=True)
        for where, vid in read_list(list_path):
            split.declare(vid, where)
        doc = JsonDoc(data_path)
        for i, rec in enumerate(doc.top(list)):
            vid = json_field(doc, (i,), rec, "video", str)
            desc = json_field(doc, (i,), rec, "description", str)
            times = rec.get("times")
            if times is not None:
                check_spans(doc, (i, "times"), times, "times")
            if split.has(vid):
                split.add(vid, desc, doc.loc(i), extra_key=json.dumps(times))
    # list ids carry the original extension ("x.mov"); re-encoded copies are often "x.mp4" or "x.mov.mp4"
    return _by_id(index, lambda v: (v, os.path.splitext(v)[0]))


def _read_activitynet(ann: Path, index: _VideoIndex, conv: _Conversion) -> _Resolver:
    """``train.json`` / ``val_1.json`` ({id: {duration, timestamps, sentences}}), filtered and ordered by
    ``{train,val}_ids.json`` when present; sentences joined into one paragraph per video."""
    pairs = {"train": ("train_ids.json", "train.json"), "val": ("val_ids.json", "val_1.json")}
    need_files(ann, "ActivityNet Captions", [p[1] for p in pairs.values()])
    for name, (ids_name, data_name) in pairs.items():
        ids_path, data_path = ann / ids_name, ann / data_name
        if not data_path.is_file():
            if ids_path.is_file():
                raise VidretError(f"{ids_path} found but not {data_path}, which holds its captions")
            continue
        split = conv.split(name, paragraph=True, dedupe=False)
        listed = ids_path.is_file()
        if listed:
            ids_doc = JsonDoc(ids_path)
            for i, vid in enumerate(ids_doc.top(list)):
                if not isinstance(vid, str):
                    raise ids_doc.fail((i,), f"expected a video id string, got {vid!r}")
                split.declare(vid, str(ids_doc.loc(i)))
        doc = JsonDoc(data_path)
        for vid, rec in doc.top(dict).items():
            sentences = json_field(doc, (vid,), rec, "sentences", list)
            json_field(doc, (vid,), rec, "duration", float)
            check_spans(doc, (vid, "timestamps"), json_field(doc, (vid,), rec, "timestamps", list), "timestamps")
            if listed and not split.has(vid):
                continue
            for j, s in enumerate(sentences):
                if not isinstance(s, str):
                    raise doc.fail((vid, "sentences", j), f"sentences[{j}] must be a string, got {json_type(s)}")
                split.add(vid, s, doc.loc(vid, "sentences", j))

    def names(vid: str) -> Sequence[str]:  # ids are "v_xxx"; most downloads name the file "xxx.mp4"
        return (vid, vid[2:]) if vid.startswith("v_") else (vid, "v_" + vid)

    return _by_id(index, names)


_VATEX_FILES = {"train": "vatex_training_v1.0.json", "val": "vatex_validation_v1.0.json"}
_VATEX_ID = re.compile(r"^(.+)_([0-9]+)_([0-9]+)$")  # youtubeid_start_end, seconds


def _add_vatex(split: _Split, recs: Sequence[tuple[str, list[str], JsonDoc, int]]) -> None:
    for vid, caps, doc, i in recs:
        for j, c in enumerate(caps):
            split.add(vid, c, doc.loc(i, "enCap", j))


def _read_vatex(ann: Path, index: _VideoIndex, conv: _Conversion) -> _Resolver:
    """``vatex_{training,validation}_v1.0.json`` ([{videoID, enCap}]) -> train / val; when split lists
    ``{train,val,test}_list.txt`` exist (e.g. the HGR 25991/1500/1500 split) they define the splits."""
    need_files(ann, "VATEX", list(_VATEX_FILES.values()))
    records: dict[str, list[tuple[str, list[str], JsonDoc, int]]] = {}  # file's split -> (id, caps, doc, i)
    for name, fname in _VATEX_FILES.items():
        if not (ann / fname).is_file():
            continue
        doc = JsonDoc(ann / fname)
        recs = records[name] = []
        for i, rec in enumerate(doc.top(list)):
            vid = json_field(doc, (i,), rec, "videoID", str)
            caps = json_field(doc, (i,), rec, "enCap", list)
            for j, c in enumerate(caps):
                if not isinstance(c, str):
                    raise doc.fail((i, "enCap", j), f"enCap[{j}] must be a string, got {json_type(c)}")
            recs.append((vid, caps, doc, i))
    lists = [s for s in ("train", "val", "test") if (ann / f"{s}_list.txt").is_file()]
    if lists:
        pool: dict[str, tuple[str, list[str], JsonDoc, int]] = {}
        for recs in records.values():
            for r in recs:
                pool.setdefault(r[0], r)
        for name in lists:
            split = conv.split(name)
            for where, vid in read_list(ann / f"{name}_list.txt"):
                split.declare(vid, where)
            chosen = [pool[v] for v in split.videos if v in pool]  # listed ids without captions: reported
            _add_vatex(split, chosen)
    else:
        for name, recs in records.items():
            _add_vatex(conv.split(name), recs)

    def resolve(split: str, vid: str) -> tuple[str, float | None, float | None] | None:
        path = index.find((vid,))
        if path is not None:
            return path, None, None
        m = _VATEX_ID.match(vid)  # a full YouTube download: cut the segment the id names
        if m and int(m[3]) > int(m[2]):
            path = index.find((m[1],))
            if path is not None:
                return path, float(int(m[2])), float(int(m[3]))
        return None

    return resolve


def _time_cell(value: str | None, where: str, column: str) -> float | None:
    if value is None or not value.strip():
        return None
    try:
        t = float(value)
    except ValueError:
        raise VidretError(f"{where}: column {column} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(t) or t < 0:
        raise VidretError(f"{where}: column {column} must be a finite number >= 0, got {value!r}")
    return t


def _read_generic(ann: Path, videos_dir: Path, conv: _Conversion) -> _Resolver:
    """CSV/TSV files with a header: ``path, caption`` [+ ``video_id, start, end``]; one split per file (its
    stem). Relative paths are relative to ``videos_dir``; rows sharing a video (id, else path + segment)
    are that video's captions."""
    files = [ann] if ann.is_file() else sorted(p for p in ann.glob("*") if p.suffix.lower() in (".csv", ".tsv"))
    if not files:
        raise VidretError(f"no .csv or .tsv file in {ann}: write one with columns path,caption (see DATA.md)")
    videos: dict[tuple[str, str], tuple[str, float | None, float | None, str]] = {}
    for path in files:
        if path.suffix.lower() == ".tsv":
            delim = "\t"
        else:  # a .csv may still be tab-separated: trust the header line
            with path.open(encoding="utf-8-sig", errors="replace") as f:
                delim = "\t" if "\t" in f.readline() else ","
        split = conv.split(path.stem)
        for where, row in read_table(path, delim, ["path", "caption"]):
            rel = row["path"].strip()
            if not rel:
                raise VidretError(f"{where}: empty path")
            start, end = _time_cell(row.get("start"), where, "start"), _time_cell(row.get("end"), where, "end")
            if start is not None and end is not None and end <= start:
                raise VidretError(f"{where}: end ({end}) must be after start ({start})")
            vid = (row.get("video_id") or "").strip()
            if not vid:
                vid = Path(rel).as_posix()
                if start is not None or end is not None:  # segments of one file are separate videos
                    vid += f"#{'' if start is None else f'{start:g}'}-{'' if end is None else f'{end:g}'}"
            prev = videos.setdefault((split.name, vid), (rel, start, end, where))
            if prev[:3] != (rel, start, end):
                raise VidretError(
                    f"{where}: video {vid!r} has path/start/end {(rel, start, end)} here but {prev[:3]} at "
                    f"{prev[3]}; rows of one video must agree (or give them different video_id values)"
                )
            split.add(vid, row["caption"], where)
    exists: dict[str, bool] = {}

    def resolve(split: str, vid: str) -> tuple[str, float | None, float | None] | None:
        rel, start, end, _ = videos[(split, vid)]
        full = os.path.abspath(os.path.join(videos_dir, os.path.expanduser(rel)))
        if full not in exists:
            exists[full] = os.path.isfile(full)
        return (full, start, end) if exists[full] else None

    return resolve


_READERS: dict[str, Callable[[Path, _VideoIndex, _Conversion], _Resolver]] = {
    "msrvtt": _read_msrvtt,
    "msvd": _read_msvd,
    "lsmdc": _read_lsmdc,
    "didemo": _read_didemo,
    "activitynet": _read_activitynet,
    "vatex": _read_vatex,
}


# ------------------------------------------------------------------------------------------ public API
def read_benchmark(
    dataset: DatasetName, annotations_dir: str | os.PathLike[str], videos_dir: str | os.PathLike[str]
) -> tuple[dict[str, list[ManifestEntry]], ConversionReport]:
    """Read one benchmark's annotation files into manifest entries (absolute video paths) per split.

    Args:
        dataset: one of :data:`DATASETS`.
        annotations_dir: folder with the annotation files of ``DATA.md`` (generic: a folder of
            ``<split>.csv``/``.tsv`` files, or one such file).
        videos_dir: folder searched recursively for the video files (generic: the base of relative paths).

    Returns:
        ``({split: entries}, report)``.

    Raises:
        VidretError: unknown dataset, missing folders/files, or a malformed row (message names file:line).
    """
    if dataset not in DATASETS:
        raise VidretError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    ann = Path(annotations_dir)
    if not ann.exists():
        what = "annotation file or folder" if dataset == "generic" else f"{dataset} annotations folder"
        raise VidretError(f"{what} not found: {os.path.normpath(ann)}; check --annotations")
    if dataset != "generic" and not ann.is_dir():
        raise VidretError(f"{ann} is a file: pass the folder that holds the {dataset} annotation files")
    conv = _Conversion()
    if dataset == "generic":
        if not Path(videos_dir).is_dir():
            raise VidretError(f"videos folder not found: {videos_dir} (relative paths in the CSV start there)")
        resolve = _read_generic(ann, Path(videos_dir), conv)
        indexed = 0
    else:
        index = _VideoIndex(videos_dir)
        if not index.by_name:
            raise VidretError(f"no files under the videos folder {index.root}; pass the folder with the videos")
        resolve = _READERS[dataset](ann, index, conv)
        conv.warnings += index.warnings()
        indexed = index.n_videos
    splits, report = conv.finish(dataset, ann, os.path.abspath(videos_dir), resolve, indexed)
    logger.info("%s", report.format_report())
    return splits, report


def _manifest_path(path: str, out_dir: str) -> str:
    """Relative to the manifest folder when the video lies under it (the folder can then move)."""
    ap = os.path.abspath(path)
    try:
        inside = os.path.commonpath([ap, out_dir]) == out_dir
    except ValueError:  # different drives on Windows
        inside = False
    return Path(os.path.relpath(ap, out_dir)).as_posix() if inside else ap


def convert(
    dataset: DatasetName,
    annotations_dir: str | os.PathLike[str],
    videos_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
) -> ConversionReport:
    """Convert a benchmark to ``out_dir/<split>.jsonl`` plus ``out_dir/conversion_report.json``.

    Video paths are written relative to ``out_dir`` when the videos lie under it, else absolute.

    Raises:
        VidretError: as :func:`read_benchmark`, or when no video at all could be matched to the
            annotations (the report is still written, to show what was dropped).
    """
    splits, report = read_benchmark(dataset, annotations_dir, videos_dir)
    out = os.path.abspath(out_dir)
    os.makedirs(out, exist_ok=True)
    total = sum(len(v) for v in splits.values())
    manifests: dict[str, str] = {}
    if total:
        for name, entries in splits.items():
            target = os.path.join(out, f"{name}.jsonl")
            write_manifest(target, [replace(e, path=_manifest_path(e.path, out)) for e in entries])
            manifests[name] = target
    report = replace(report, manifests=manifests)
    report_path = os.path.join(out, REPORT_NAME)
    tmp = report_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report.to_dict(), f, indent=1, ensure_ascii=False)
    os.replace(tmp, report_path)
    if not total:
        missing = report.rows_dropped("missing video file")
        raise VidretError(
            f"no {dataset} video could be matched to its annotations ({missing} caption rows lost to missing "
            f"video files; {report.video_files_indexed} video files found under {report.videos_dir}); check "
            f"--videos, and see {report_path}"
        )
    return report
