"""Annotation files read with errors that name the file and line: JSON documents, CSV/TSV tables, line lists.

The benchmark readers in :mod:`vidret.data.converters` are built on these. Every reader treats its file as
untrusted: JSON errors name the line of the offending record, a malformed table row names its line, and fields are
bounded (CSV fields up to ``CSV_FIELD_LIMIT`` characters; longer captions are dropped by the converters).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from vidret.errors import VidretError

# CLIP reads 77 tokens; a caption past this many characters is junk (or an attack on memory): its row is
# dropped as "caption too long", the rest of the file still converts.
MAX_CAPTION_CHARS = 10_000
# csv's default field limit (131,072) would abort a whole file at one long caption; fields up to this many
# characters are read (and over-long captions then dropped), a longer field fails naming its line.
CSV_FIELD_LIMIT = 16 << 20


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\n\r":
        i += 1
    return i


def _json_offset(text: str, keys: Sequence[str | int]) -> int | None:
    """Character offset of the value at ``keys`` in a JSON text (re-scanned only to report an error)."""
    dec = json.JSONDecoder()

    def past(i: int, ch: str) -> int:  # past the punctuation ``ch`` at i and the whitespace after it
        if text[i] != ch:
            raise ValueError(f"expected {ch!r}")
        return _skip_ws(text, i + 1)

    try:
        idx = _skip_ws(text, 0)
        for key in keys:
            if isinstance(key, int):
                idx = past(idx, "[")
                for _ in range(key):  # skip the elements before it
                    idx = past(_skip_ws(text, dec.raw_decode(text, idx)[1]), ",")
                continue
            idx = past(idx, "{")
            while True:
                if text[idx] != '"':
                    return None
                name, idx = json.decoder.scanstring(text, idx + 1)  # type: ignore[attr-defined]
                idx = past(_skip_ws(text, idx), ":")
                if name == key:
                    break
                idx = past(_skip_ws(text, dec.raw_decode(text, idx)[1]), ",")
        return idx
    except (IndexError, ValueError):
        return None


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise VidretError(f"{path}: not UTF-8 text ({e}); is this the right file?") from e


def _label(keys: Sequence[str | int]) -> str:
    return "".join(f"[{k!r}]" if isinstance(k, str) else f"[{k}]" for k in keys)


class RowLocation:
    """A JSON record's location, formatted only when a row is dropped (most rows never are)."""

    __slots__ = ("keys", "path")

    def __init__(self, path: Path, keys: tuple[str | int, ...]):
        self.path, self.keys = path, keys

    def __str__(self) -> str:
        return f"{self.path} {_label(self.keys)}"


class JsonDoc:
    """A parsed JSON file that can name the line of one of its records in an error."""

    def __init__(self, path: Path):
        self.path = path
        self.text = read_text(path)
        try:
            self.data: Any = json.loads(self.text)
        except json.JSONDecodeError as e:
            raise VidretError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}); fix or re-download it") from e

    def loc(self, *keys: str | int) -> RowLocation:
        """Location of a row for the report (no line number: that needs a re-scan)."""
        return RowLocation(self.path, keys)

    def fail(self, keys: Sequence[str | int], msg: str) -> VidretError:
        off = _json_offset(self.text, keys)
        label = _label(keys) or "top level"
        line = f":{self.text.count(chr(10), 0, off) + 1}" if off is not None else ""
        return VidretError(f"{self.path}{line}: record {label}: {msg}")

    def top(self, kind: type) -> Any:
        if not isinstance(self.data, kind):
            raise self.fail((), f"expected a JSON {'list' if kind is list else 'object'}, got {json_type(self.data)}")
        return self.data


def json_type(v: object) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean"}.get(type(v), type(v).__name__)


def json_field(doc: JsonDoc, keys: tuple[str | int, ...], rec: Any, name: str, kind: type) -> Any:
    """``rec[name]``, which must be of ``kind`` (list / str / float); errors name the record's line."""
    if not isinstance(rec, dict):
        raise doc.fail(keys, f"expected an object with field {name!r}, got {json_type(rec)}")
    if name not in rec:
        raise doc.fail(keys, f"missing field {name!r}")
    v = rec[name]
    if kind is float:
        return json_number(doc, (*keys, name), v, name)
    if not isinstance(v, kind):
        raise doc.fail((*keys, name), f"field {name!r} must be a {json_type(kind())}, got {json_type(v)}")
    return v


def json_number(doc: JsonDoc, keys: tuple[str | int, ...], v: Any, what: str) -> float:
    try:
        if isinstance(v, bool):
            raise ValueError
        x = float(v)
    except (TypeError, ValueError):
        raise doc.fail(keys, f"{what} must be a number, got {v!r}") from None
    if not math.isfinite(x):
        raise doc.fail(keys, f"{what} must be finite, got {v!r}")
    return x


def check_spans(doc: JsonDoc, keys: tuple[str | int, ...], spans: Any, what: str) -> None:
    """A list of [start, end] number pairs (DiDeMo times, ActivityNet timestamps)."""
    if not isinstance(spans, list):
        raise doc.fail(keys, f"{what} must be a list of [start, end] pairs, got {json_type(spans)}")
    for j, span in enumerate(spans):
        if not isinstance(span, list) or len(span) != 2:
            raise doc.fail((*keys, j), f"{what}[{j}] must be a [start, end] pair, got {span!r}")
        for k, t in enumerate(span):
            json_number(doc, (*keys, j, k), t, f"{what}[{j}]")


def _next_row(reader: Iterator[list[str]]) -> list[str] | None:
    """The next row, read with the field limit raised to CSV_FIELD_LIMIT (csv's limit is process-wide: it is
    restored before returning, so the generator never leaves it changed while suspended)."""
    old = csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        return next(reader, None)
    finally:
        csv.field_size_limit(old)


def read_table(path: Path, delimiter: str, required: Sequence[str]) -> Iterator[tuple[str, dict[str, str]]]:
    """Rows of a delimited file with a header, as ``("file:line", {column: value})``."""
    sep = "tab" if delimiter == "\t" else repr(delimiter)
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter, strict=True)
        try:
            header = [h.strip() for h in _next_row(reader) or []]
            if not header:
                raise VidretError(f"{path}: empty file; expected a header line with columns {list(required)}")
            missing = [c for c in required if c not in header]
            if missing:
                raise VidretError(f"{path}:1: missing column(s) {missing} in the header {header} ({sep}-separated)")
            while (row := _next_row(reader)) is not None:
                where = f"{path}:{reader.line_num}"
                if not any(c.strip() for c in row):
                    continue
                if len(row) != len(header):
                    raise VidretError(
                        f"{where}: expected {len(header)} {sep}-separated columns {header}, found {len(row)}"
                    )
                yield where, dict(zip(header, row))
        except csv.Error as e:
            if "field larger than field limit" in str(e):
                raise VidretError(
                    f"{path}:{reader.line_num}: a field is longer than {CSV_FIELD_LIMIT} characters; captions "
                    f"are at most {MAX_CAPTION_CHARS} (check the quoting: an unclosed quote swallows the file)"
                ) from e
            raise VidretError(f"{path}:{reader.line_num}: malformed row ({e})") from e
        except UnicodeDecodeError as e:
            raise VidretError(f"{path}: not UTF-8 text ({e})") from e


def read_lines(path: Path) -> Iterator[tuple[str, str]]:
    """Non-blank lines as ``("file:line", line)``; only "\n" ends a line (str.splitlines would also split
    a caption at U+2028 or a form feed and shift every line number after it)."""
    for lineno, line in enumerate(read_text(path).split("\n"), start=1):
        if line.strip():
            yield f"{path}:{lineno}", line.removesuffix("\r")


def read_list(path: Path) -> Iterator[tuple[str, str]]:
    """Ids of a one-id-per-line split list, as ``("file:line", id)``."""
    for where, line in read_lines(path):
        yield where, line.strip()


def need_files(ann: Path, dataset: str, names: Sequence[str]) -> None:
    if not any((ann / n).is_file() for n in names):
        raise VidretError(f"no {dataset} annotation files in {ann}: expected at least one of {list(names)}")


__all__ = [
    "CSV_FIELD_LIMIT",
    "MAX_CAPTION_CHARS",
    "JsonDoc",
    "RowLocation",
    "check_spans",
    "json_field",
    "json_number",
    "json_type",
    "need_files",
    "read_lines",
    "read_list",
    "read_table",
    "read_text",
]
