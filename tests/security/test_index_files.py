"""Index folders are untrusted data (issue 13, rows 3, 5, 8, 9 and 13).

Indexes get shared: ``index.json`` and its data files may come from a stranger. Loading one must never serve a
file outside the collection it was built over, never load a backbone file it names, never hand NaN to JSON, and
turn every malformed file into one clear VidretError. An interrupted ``index --update`` must leave the previous
index loadable and updatable.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vidret
from tests.retrieval.helpers import BACKBONE, COLOURS, save_adapter_for, write_clip
from vidret.atomic import sha256_file
from vidret.cli import main
from vidret.data.manifest import ManifestEntry, write_manifest
from vidret.errors import VidretError
from vidret.retrieval.backends import faiss_available
from vidret.retrieval.build import build_index, load_backbone_spec, open_model_for_index, resolve_backbone
from vidret.retrieval.index import VideoIndex
from vidret.retrieval.index_files import IndexSettings

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss not installed (the [ann] extra)")


# ------------------------------------------------------------------------------------------ fixtures and helpers


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_adapter_for(tmp_path_factory.mktemp("adapters") / "lora", "lora", seed=1)


@pytest.fixture(scope="module")
def model(adapter: Path) -> Any:
    return vidret.load_adapter(load_backbone_spec(BACKBONE), adapter).eval()


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("collection") / "videos"
    for name in ("red", "green", "blue"):
        write_clip(root / f"{name}.mp4", COLOURS[name], seconds=1.0)
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, videos: Path, adapter: Path, model: Any) -> Path:
    out = tmp_path_factory.mktemp("indexes") / "ix"
    build_index(model, videos, out, backbone_spec=BACKBONE, adapter_path=str(adapter))
    return out


def copy_of(index: Path, dest: Path) -> Path:
    shutil.copytree(index, dest)
    return dest


def read_meta(ix: Path) -> dict[str, Any]:
    return json.loads((ix / "index.json").read_text())


def write_meta(ix: Path, meta: Any) -> None:
    (ix / "index.json").write_text(json.dumps(meta))


def rewrite(ix: Path, role: str, data: bytes) -> None:
    """Replace a data file's bytes and fix its checksum in index.json: what a crafted index does."""
    meta = read_meta(ix)
    (ix / meta["files"][role]["file"]).write_bytes(data)
    meta["files"][role]["sha256"] = sha256_file(ix / meta["files"][role]["file"])
    write_meta(ix, meta)


def rows_of(ix: Path) -> list[dict[str, Any]]:
    meta = read_meta(ix)
    lines = (ix / meta["files"]["videos"]["file"]).read_text().splitlines()
    return [json.loads(ln) for ln in lines if ln.strip()]


def write_rows(ix: Path, rows: list[dict[str, Any]]) -> None:
    rewrite(ix, "videos", "".join(json.dumps(r) + "\n" for r in rows).encode())


def npy_bytes(arr: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def synthetic(ix: Path, n: int = 200, dim: int = 16, backend: str = "exact") -> Path:
    g = torch.Generator().manual_seed(0)
    settings = IndexSettings(backend=backend, nlist=4, nprobe=4)  # type: ignore[arg-type]
    VideoIndex.from_vectors(torch.randn(n, dim, generator=g), settings=settings, backend=backend).save(ix)  # type: ignore[arg-type]
    return ix


# ------------------------------------------------------------------------------------------ row 5: the collection root


def test_build_records_the_collection_root(built: Path, videos: Path) -> None:
    assert read_meta(built)["root"] == os.path.realpath(videos)
    idx = VideoIndex.load(built)
    assert idx.root == os.path.realpath(videos)
    assert all(r.path.startswith(idx.root + os.sep) and r.identity for r in idx.records)


def test_root_is_the_real_folder_when_given_through_a_symlink(tmp_path: Path, videos: Path, model: Any) -> None:
    os.symlink(videos, tmp_path / "link")
    build_index(model, tmp_path / "link", tmp_path / "ix")
    idx = VideoIndex.load(tmp_path / "ix")
    assert idx.root == os.path.realpath(videos)
    assert all(os.path.commonpath([r.path, idx.root]) == idx.root for r in idx.records)


def test_manifest_root_is_the_common_parent(tmp_path: Path, videos: Path, model: Any) -> None:
    entries = [ManifestEntry("r", str(videos / "red.mp4")), ManifestEntry("b", str(videos / "blue.mp4"))]
    write_manifest(tmp_path / "m.jsonl", entries)
    build_index(model, tmp_path / "m.jsonl", tmp_path / "ix")
    assert VideoIndex.load(tmp_path / "ix").root == os.path.realpath(videos)


@pytest.mark.parametrize(
    "edit",
    [
        {"path": "/etc/hostname", "real_path": "/etc/hostname", "identity": ""},  # the reported case
        {"path": "/etc/hostname", "real_path": "/etc/hostname"},  # with a plausible identity
        {"real_path": "/etc/hostname"},  # only the served path moved
        {"path": "{root}/../../../etc/hostname", "real_path": "{root}/../../../etc/hostname"},  # '..' escape
        {"path": "{root}-evil/x.mp4", "real_path": "{root}-evil/x.mp4"},  # a sibling sharing the prefix
        {"path": "relative/x.mp4", "real_path": "relative/x.mp4"},
    ],
)
def test_record_outside_the_root_is_refused(tmp_path: Path, built: Path, edit: dict[str, str]) -> None:
    ix = copy_of(built, tmp_path / "ix")
    root = read_meta(ix)["root"]
    rows = rows_of(ix)
    rows[1].update({k: v.format(root=root) for k, v in edit.items()})
    write_rows(ix, rows)
    with pytest.raises(VidretError, match="outside") as e:
        VideoIndex.load(ix)
    assert rows[1]["video_id"] in str(e.value) and root in str(e.value)


def test_record_with_a_path_but_no_identity_is_refused(tmp_path: Path, built: Path) -> None:
    ix = copy_of(built, tmp_path / "ix")
    rows = rows_of(ix)
    rows[0]["identity"] = ""  # the service's size/mtime check would be skipped
    write_rows(ix, rows)
    with pytest.raises(VidretError, match="identity") as e:
        VideoIndex.load(ix)
    assert rows[0]["video_id"] in str(e.value)


def test_index_without_root_still_loads_with_an_empty_root(tmp_path: Path, built: Path) -> None:
    ix = copy_of(built, tmp_path / "ix")
    meta = read_meta(ix)
    del meta["root"]  # written before roots were recorded
    write_meta(ix, meta)
    idx = VideoIndex.load(ix)
    assert idx.root == "" and len(idx) == 3


def test_update_keeps_the_root_and_refuses_another_folder(tmp_path: Path, videos: Path, model: Any) -> None:
    mine = tmp_path / "mine"
    shutil.copytree(videos, mine)
    build_index(model, mine, tmp_path / "ix")
    write_clip(mine / "sub" / "cyan.mp4", COLOURS["cyan"], seconds=1.0)
    build_index(model, mine, tmp_path / "ix", update=True)
    idx = VideoIndex.load(tmp_path / "ix")
    assert idx.root == os.path.realpath(mine) and len(idx) == 4
    with pytest.raises(VidretError, match="build a new index") as e:
        build_index(model, videos, tmp_path / "ix", update=True)
    assert str(os.path.realpath(mine)) in str(e.value)


# ------------------------------------------------------------------------------------------ row 3: recorded backbone


def test_recorded_backbone_file_is_not_loaded_without_the_flag(
    tmp_path: Path, built: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    evil = tmp_path / "backbone.pt"
    evil.write_bytes(b"PK\x03\x04 a TorchScript archive whose __setstate__ writes files")
    ix = copy_of(built, tmp_path / "ix")
    meta = read_meta(ix)
    meta["model"]["backbone_spec"] = str(evil)
    write_meta(ix, meta)
    opened: list[str] = []
    import vidret.backbone.pretrained as pretrained

    monkeypatch.setattr(pretrained, "load_checkpoint", lambda p: opened.append(str(p)) or 1 / 0)
    with pytest.raises(VidretError, match=r"pass --backbone") as e:
        open_model_for_index(VideoIndex.load(ix))
    assert str(evil) in str(e.value) and str(ix) in str(e.value)
    assert main(["search", str(ix), "red"]) == 1
    assert f"--backbone {evil}" in capsys.readouterr().err
    assert opened == []


def test_resolve_backbone_follows_only_names_unless_told() -> None:
    assert resolve_backbone(None, {}, "ViT-B-32") == "ViT-B-32"  # a pretrained name: sha256-checked download
    assert resolve_backbone(None, {}, "random:pocket-tiny") == "random:pocket-tiny"  # loads no file
    hub_id = "openai/clip-vit-base-patch16"  # a Hub repo id: config.json + weights fetched by name, read as data
    assert resolve_backbone(None, {}, hub_id) == hub_id
    assert resolve_backbone("/my/backbone.pt", {}, "ViT-B-32") == "/my/backbone.pt"  # the user's explicit choice
    for recorded in ("/tmp/backbone.pt", "random:../../../tmp/x", "pocket-tiny/../../x"):
        with pytest.raises(VidretError, match="--backbone"):
            resolve_backbone(None, {}, recorded, where="index X")
    # the adapter folder travels with the index: its backbone_source is no more trusted
    with pytest.raises(VidretError, match="--backbone /tmp/b.pt"):
        resolve_backbone(None, {"extra": {"backbone_source": "/tmp/b.pt"}})
    assert resolve_backbone(None, {"extra": {"backbone_source": "ViT-B-16"}}) == "ViT-B-16"


# ------------------------------------------------------------------------------------------ row 8: kill at rename


class Killed(BaseException):
    """Stands for SIGKILL: nothing catches it, so no later step of the save runs."""


def _kill_update(monkeypatch: pytest.MonkeyPatch, fire: Callable[[str, int], str | None]) -> None:
    """Make os.replace die: ``fire(name, n)`` returns "before" / "after" to die around the n-th rename of ``name``."""
    real = os.replace
    count = [0]

    def replace(src: Any, dst: Any) -> None:
        count[0] += 1
        when = fire(Path(dst).name, count[0])
        if when == "before":
            raise Killed(dst)
        real(src, dst)
        if when == "after":
            raise Killed(dst)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("die_after", [0, 1, 2, 3])  # 0: right before index.json is replaced; n: after data file n
def test_killed_update_leaves_the_previous_index_usable(
    tmp_path: Path, videos: Path, model: Any, monkeypatch: pytest.MonkeyPatch, die_after: int
) -> None:
    if die_after == 3 and not faiss_available():
        pytest.skip("the third data file is the FAISS index")
    mine = tmp_path / "videos"
    shutil.copytree(videos, mine)
    out = tmp_path / "ix"
    backend = "faiss" if faiss_available() else "exact"
    build_index(model, mine, out, settings=IndexSettings(image_size=32, dtype="float32", backend=backend, nlist=1))
    before = VideoIndex.load(out)
    write_clip(mine / "cyan.mp4", COLOURS["cyan"], seconds=1.0)  # the update adds a row: every data file changes
    data_renames = [0]

    def fire(name: str, n: int) -> str | None:
        if name == "index.json":
            return "before" if die_after == 0 else None
        if name.startswith(("features", "masks", "faiss", "videos")):
            data_renames[0] += 1
            return "after" if data_renames[0] == die_after else None
        return None

    _kill_update(monkeypatch, fire)
    with pytest.raises(Killed):
        build_index(model, mine, out, update=True)
    monkeypatch.undo()
    (out / ".features.12345.deadbeef.tmp").write_bytes(b"left by a killed write")

    again = VideoIndex.load(out)  # the previous index, intact
    assert again.ids == before.ids
    q = before.vectors[:1] if before.vectors is not None else None
    assert q is not None and again.records[int(again.search(q, 1)[1][0, 0])].video_id == before.ids[0]

    rep = build_index(model, mine, out, update=True)  # and --update completes
    assert (rep.added, rep.kept) == (1, 3)
    after = VideoIndex.load(out)
    assert sorted(after.ids) == ["blue", "cyan", "green", "red"]
    meta = read_meta(out)
    named = {f["file"] for f in meta["files"].values()}
    data = {p.name for p in out.iterdir() if p.is_file() and p.name not in ("index.json", "build_report.json")}
    assert data == named  # no older generation and no temporary left behind
    assert meta["files"]["videos"]["file"].startswith("videos-")


def test_index_of_the_previous_format_loads_and_updates(tmp_path: Path, built: Path, model: Any, videos: Path) -> None:
    ix = copy_of(built, tmp_path / "ix")
    meta = read_meta(ix)
    (ix / meta["files"]["videos"]["file"]).rename(ix / "videos.jsonl")  # the format before content-named videos
    meta["files"]["videos"]["file"] = "videos.jsonl"
    del meta["root"]
    write_meta(ix, meta)
    assert len(VideoIndex.load(ix)) == 3
    build_index(model, videos, ix, update=True)
    assert not (ix / "videos.jsonl").exists()
    assert read_meta(ix)["root"] == os.path.realpath(videos) and len(VideoIndex.load(ix)) == 3


# ------------------------------------------------------------------------------------------ row 9: non-finite vectors


def test_build_refuses_non_finite_vectors(tmp_path: Path, videos: Path, adapter: Path) -> None:
    broken = vidret.load_adapter(load_backbone_spec(BACKBONE), adapter).eval()
    with torch.no_grad():
        for _, p in broken.trainable_named_parameters():
            p.fill_(float("nan"))
    with pytest.raises(VidretError, match="NaN") as e:
        build_index(broken, videos, tmp_path / "ix")
    assert "red" in str(e.value)
    assert not (tmp_path / "ix" / "index.json").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_load_refuses_non_finite_features(tmp_path: Path, bad: float) -> None:
    ix = synthetic(tmp_path / "ix", dim=8)
    feats = np.load(ix / read_meta(ix)["files"]["features"]["file"])
    feats[3, 2] = bad
    rewrite(ix, "features", npy_bytes(feats))
    with pytest.raises(VidretError, match="NaN/Inf"):
        VideoIndex.load(ix)


def test_search_json_is_always_valid_json(
    built: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    nan = torch.tensor([[float("nan"), float("inf"), 0.5]])
    monkeypatch.setattr(VideoIndex, "search_text", lambda self, m, t, k: (nan, torch.tensor([[0, 1, 2]])))
    capsys.readouterr()
    assert main(["search", str(built), "red", "-k", "3", "--json"]) == 0

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    res = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert [r["score"] for r in res["results"]] == [None, None, 0.5]
    assert main(["search", str(built), "red", "-k", "3"]) == 0  # the table copes too


def test_save_refuses_non_finite_vectors(tmp_path: Path) -> None:
    idx = VideoIndex.from_vectors(torch.randn(4, 8))
    assert idx.vectors is not None
    idx.vectors[1, 0] = float("inf")
    with pytest.raises(VidretError, match="NaN/Inf"):
        idx.save(tmp_path / "ix")


# ------------------------------------------------------------------------------------------ row 13: malformed files


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], Any]:
    def edit(meta: dict[str, Any]) -> Any:
        *parents, last = path.split(".")
        d = meta
        for p in parents:
            d = d[p]
        if value is KeyError:
            del d[last]
        else:
            d[last] = value
        return meta

    return edit


MALFORMED = {
    "a list": lambda meta: [meta],
    "a string": lambda meta: "index",
    "no files": _set("files", KeyError),
    "files as a string": _set("files", "features.npy"),
    "file entry as a string": _set("files.features", "features.npy"),
    "file name a path": _set("files.features.file", "../../features.npy"),
    "file name absolute": _set("files.videos.file", "/etc/passwd"),
    "file name not a string": _set("files.features.file", 7),
    "sha256 not a string": _set("files.features.sha256", None),
    "unknown file role": _set("files.extra", {"file": "x", "sha256": "0" * 64}),
    "no model": _set("model", KeyError),
    "model as a list": _set("model", ["ViT-B-32"]),
    "model field wrong type": _set("model.backbone_fingerprint", 5),
    "model unknown field": _set("model.evil", "x"),
    "settings as a string": _set("settings", "fast"),
    "settings value wrong type": _set("settings.num_frames", "12"),
    "wrong kind": _set("kind", "graph"),
    "kind not a string": _set("kind", ["pooled"]),
    "count a string": _set("count", "200"),
    "count negative": _set("count", -1),
    "count a bool": _set("count", True),
    "dim a float": _set("dim", 16.0),
    "count mismatch": _set("count", 199),
    "dim mismatch": _set("dim", 15),
    "format version a bool": _set("format_version", True),
    "backend unknown": _set("backend", "annoy"),
    "root relative": _set("root", "videos"),
    "root not a string": _set("root", 0),
}


# Caught against the data rather than by the schema: their messages say what disagrees.
MALFORMED_MESSAGE = {
    "count mismatch": "holds 200 videos but index.json says 199",
    "dim mismatch": r"has shape \(200, 16\), expected \(200, 15\)",
    "format version a bool": "format version True",
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_index_json_is_one_clear_error(tmp_path: Path, case: str) -> None:
    ix = synthetic(tmp_path / "ix")
    write_meta(ix, MALFORMED[case](read_meta(ix)))
    with pytest.raises(VidretError, match=MALFORMED_MESSAGE.get(case, "index.json is not a valid vidret index")):
        VideoIndex.load(ix)
    with pytest.raises(VidretError, match="rebuild"):
        VideoIndex.load(ix)


@pytest.mark.parametrize(
    "line",
    [
        '{"video_id": 5}',
        '{"video_id": ""}',
        '{"video_id": "a", "duration": "long"}',
        '{"video_id": "a", "duration": NaN}',
        '{"video_id": "a", "start": true}',
        '{"video_id": "a", "captions": "one"}',
        '{"video_id": "a", "path": 3}',
        "[1, 2]",
        '{"video_id": "v0000000"}',  # a duplicate id
    ],
)
def test_malformed_videos_file_is_one_clear_error(tmp_path: Path, line: str) -> None:
    ix = synthetic(tmp_path / "ix", n=3)
    lines = [json.dumps(r) for r in rows_of(ix)]
    lines[2] = line
    rewrite(ix, "videos", ("\n".join(lines) + "\n").encode())
    with pytest.raises(VidretError, match="rebuild"):
        VideoIndex.load(ix)


@pytest.mark.parametrize(
    "arr",
    [
        np.array([[1.0] * 16] * 200, dtype=object),  # object dtype: would need pickle
        np.zeros((200, 16), dtype=np.int64),  # not a float dtype
        np.zeros((200, 17), dtype=np.float32),  # wrong dim
        np.zeros((199, 16), dtype=np.float32),  # wrong count
        np.zeros((200, 2, 16), dtype=np.float32),  # wrong rank for a pooled index
        np.zeros((200, 16), dtype=">f4"),  # not native byte order
    ],
    ids=["object", "int64", "dim", "count", "rank", "big-endian"],
)
def test_features_of_the_wrong_dtype_or_shape_are_refused(tmp_path: Path, arr: np.ndarray) -> None:
    ix = synthetic(tmp_path / "ix")
    rewrite(ix, "features", npy_bytes(arr, allow_pickle=arr.dtype == object))
    with pytest.raises(VidretError, match="features"):
        VideoIndex.load(ix)


def test_truncated_or_garbage_npy_is_refused(tmp_path: Path) -> None:
    ix = synthetic(tmp_path / "ix")
    good = (ix / read_meta(ix)["files"]["features"]["file"]).read_bytes()
    for data in (good[:-100], b"not a numpy file at all", good[:8]):
        rewrite(ix, "features", data)
        with pytest.raises(VidretError, match="features"):
            VideoIndex.load(ix)


def test_frames_masks_must_be_bool(tmp_path: Path, videos: Path) -> None:
    clip = load_backbone_spec(BACKBONE)
    tc = vidret.build_model(clip, "frozen", head="text_conditioned").eval()
    ix = tmp_path / "ix"
    build_index(tc, videos, ix, settings=IndexSettings(num_frames=4, image_size=32))
    masks = np.load(ix / read_meta(ix)["files"]["masks"]["file"])
    rewrite(ix, "masks", npy_bytes(masks.astype(np.uint8) * 7))
    with pytest.raises(VidretError, match="masks"):
        VideoIndex.load(ix)


@needs_faiss
def test_faiss_file_that_is_garbage_is_refused(tmp_path: Path) -> None:
    ix = synthetic(tmp_path / "ix", backend="faiss")
    good = (ix / read_meta(ix)["files"]["faiss"]["file"]).read_bytes()
    for data in (b"IwFl garbage", good[: len(good) // 2], b""):
        rewrite(ix, "faiss", data)
        with pytest.raises(VidretError, match="FAISS"):
            VideoIndex.load(ix)


@needs_faiss
def test_faiss_ids_out_of_range_are_refused(tmp_path: Path) -> None:
    import faiss

    ix = synthetic(tmp_path / "ix", backend="faiss")
    path = ix / read_meta(ix)["files"]["faiss"]["file"]
    index = faiss.read_index(str(path))
    invlists = index.invlists
    for i in range(index.nlist):
        n = invlists.list_size(i)
        if n:
            ids = faiss.rev_swig_ptr(invlists.get_ids(i), n)
            ids[0] = 3_600_000_000_000_000_000  # what a flipped byte gave in the report
            break
    rewrite(ix, "faiss", faiss.serialize_index(index).tobytes())
    with pytest.raises(VidretError, match="ids"):
        VideoIndex.load(ix)


@needs_faiss
@pytest.mark.parametrize("other", [{"n": 150}, {"dim": 8}], ids=["ntotal", "dim"])
def test_faiss_file_of_another_collection_is_refused(tmp_path: Path, other: dict[str, int]) -> None:
    ix = synthetic(tmp_path / "ix", backend="faiss")
    src = synthetic(tmp_path / "other", backend="faiss", **other)
    rewrite(ix, "faiss", (src / read_meta(src)["files"]["faiss"]["file"]).read_bytes())
    with pytest.raises(VidretError, match="FAISS"):
        VideoIndex.load(ix)


@needs_faiss
def test_valid_faiss_index_still_loads(tmp_path: Path) -> None:
    ix = synthetic(tmp_path / "ix", backend="faiss")
    idx = VideoIndex.load(ix)
    assert idx.backend_name == "faiss" and len(idx.backend) == 200
    q = F.normalize(torch.randn(2, 16), dim=-1)
    assert idx.search(q, 3)[1].min() >= 0


def test_cli_reports_a_malformed_index_without_a_traceback(
    tmp_path: Path, built: Path, adapter: Path, videos: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ix = copy_of(built, tmp_path / "ix")
    meta = read_meta(ix)
    meta["files"] = "features.npy"
    write_meta(ix, meta)
    capsys.readouterr()
    assert main(["search", str(ix), "red"]) == 1
    update = ["index", "--update", "--adapter", str(adapter), "--videos", str(videos), "--out", str(ix)]
    assert main([*update, "--workers", "0"]) == 1
    err = capsys.readouterr().err
    assert err.count("is not a valid vidret index: files must be an object") == 2 and "Traceback" not in err
