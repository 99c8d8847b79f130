"""Sharded index building: the in-process protocol (split, shard files, resume) and a 2-process torchrun run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import vidret.retrieval.build as build_mod
from tests.retrieval.helpers import BACKBONE
from vidret.data.manifest import ManifestEntry
from vidret.errors import VidretError
from vidret.retrieval.build import build_index
from vidret.retrieval.index import VideoIndex
from vidret.retrieval.index_files import IndexSettings
from vidret.retrieval.shards import SHARDS_DIR, Sharding, ShardStore, split_rows

SETTINGS = IndexSettings(image_size=32, num_frames=4, dtype="float32")


def test_split_keeps_each_video_on_one_rank_and_balances_rows() -> None:
    todo = [ManifestEntry(f"a#{i}", "a.mp4") for i in range(4)] + [ManifestEntry(v, f"{v}.mp4") for v in "bcdef"]
    shares = split_rows(todo, lambda rid: rid.split("#")[0], 2)
    assert sorted(i for s in shares for i in s) == list(range(9))
    assert shares == [[0, 1, 2, 3, 8], [4, 5, 6, 7]]  # a's 4 windows together; the rest balance (ties: rank 0)
    assert split_rows(todo, lambda rid: rid.split("#")[0], 2) == shares  # deterministic


def _assert_same_index(a: Path, b: Path) -> None:
    x, y = VideoIndex.load(a), VideoIndex.load(b)
    assert x.records == y.records
    assert x.vectors is not None and y.vectors is not None
    assert torch.allclose(x.vectors, y.vectors, atol=1e-5)


def test_ranks_write_shards_rank0_assembles_and_a_rerun_reuses_finished_shards(
    collection_dir: Path, lora_model, lora_adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    single = tmp_path / "single"
    build_index(
        lora_model, collection_dir, single, settings=SETTINGS, backbone_spec=BACKBONE, adapter_path=str(lora_adapter)
    )

    encoded: list[list[str]] = []
    real = build_mod._encode_entries

    def counting(model, entries, *a, **kw):  # type: ignore[no-untyped-def]
        encoded.append([e.video_id for e in entries])
        return real(model, entries, *a, **kw)

    monkeypatch.setattr(build_mod, "_encode_entries", counting)
    out = tmp_path / "sharded"
    kw = dict(settings=SETTINGS, backbone_spec=BACKBONE, adapter_path=str(lora_adapter))
    # rank 0 runs first and finds rank 1's shard missing (rank 1 "crashed"): an error, its own shard kept
    with pytest.raises(VidretError, match="rank 1 left no shard"):
        build_index(lora_model, collection_dir, out, sharding=Sharding(0, 2), **kw)
    assert not (out / "index.json").exists() and (out / SHARDS_DIR / "shard-0of2.json").is_file()
    report = build_index(lora_model, collection_dir, out, sharding=Sharding(1, 2), **kw)
    assert report.indexed == 0 and not (out / "index.json").exists()  # only rank 0 writes the index
    assert len(encoded) == 2 and not set(encoded[0]) & set(encoded[1])
    assert sorted(encoded[0] + encoded[1]) == sorted(VideoIndex.load(single).ids)
    encoded.clear()
    report = build_index(lora_model, collection_dir, out, sharding=Sharding(0, 2), **kw)  # the rerun
    assert encoded == []  # both shards were reused
    assert report.indexed == len(VideoIndex.load(single))
    assert not (out / SHARDS_DIR).exists()
    _assert_same_index(single, out)


def test_a_shard_of_another_plan_is_not_reused_and_a_damaged_one_is_refused(tmp_path: Path) -> None:
    store = ShardStore(tmp_path, 2)
    feats = {"v1": (torch.ones(4), None), "v2": (torch.zeros(4), None)}
    store.write(1, "k1", feats, [("v3", "/x/v3.mp4", "cannot decode")])
    got = store.read(1, "k1", ["v1", "v2", "v3"])
    assert (
        got is not None
        and torch.equal(got[0]["v1"][0], torch.ones(4))
        and got[1] == [("v3", "/x/v3.mp4", "cannot decode")]
    )
    assert store.read(1, "other-key", ["v1", "v2"]) is None  # other videos/model/settings: encode again
    with pytest.raises(VidretError, match="lists rows"):
        store.read(1, "k1", ["v1"])
    data = next(p for p in store.folder.iterdir() if p.suffix == ".npy")
    data.write_bytes(data.read_bytes()[:-4] + b"\xff\xff\xff\x7f")
    with pytest.raises(VidretError, match="damaged"):
        store.read(1, "k1", ["v1", "v2"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.ddp
def test_two_process_gloo_index_matches_single_process(
    collection_dir: Path, lora_adapter: Path, tmp_path: Path
) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["index", "--adapter", str(lora_adapter), "--backbone", BACKBONE, "--videos", str(collection_dir)]
    common += ["--frames", "4", "--dtype", "float32", "--workers", "0", "--device", "cpu", "--json"]
    t0 = time.perf_counter()
    r1 = subprocess.run(
        [sys.executable, "-m", "vidret", *common, "--out", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    t1 = time.perf_counter()
    assert r1.returncode == 0, r1.stderr
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    r2 = subprocess.run(
        [*run, "--master_port", str(_free_port()), "-m", "vidret", *common, "--out", str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    t2 = time.perf_counter()
    assert r2.returncode == 0, r2.stderr
    report = json.loads(r2.stdout)  # only rank 0 prints
    assert report["indexed"] == len(VideoIndex.load(tmp_path / "one"))
    _assert_same_index(tmp_path / "one", tmp_path / "two")
    assert not (tmp_path / "two" / SHARDS_DIR).exists()
    print(f"wall time: 1 process {t1 - t0:.1f} s, 2 processes {t2 - t1:.1f} s, ratio {(t2 - t1) / (t1 - t0):.2f}")
