"""The adapter records its recipe's evaluation settings; `vidret eval` / `vidret index` use them (issue 12, item 3).

One tiny adapter is trained with 4 frames, 16 words and the official MV-Adapter frame rule over a backbone given as
a relative file path; eval and index must then need no flags to evaluate it the way it was trained, flags override
with a one-line note, a malformed record is refused, and the recorded backbone file is loaded only when named.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, get_args

import pytest
from safetensors.torch import save_file

from tests.train.test_loop import cfg_dict
from vidret.adapters import io as adapter_io
from vidret.backbone.clip import create_backbone
from vidret.cli import EVAL_RULES, main
from vidret.data.dataset import CaptionProtocol
from vidret.data.manifest import read_manifest
from vidret.data.sampling import FRAME_RULES
from vidret.errors import VidretError
from vidret.eval.evaluate import settings_for_adapter
from vidret.retrieval import build
from vidret.retrieval.index import VideoIndex
from vidret.train.config import config_from_dict
from vidret.train.loop import load_backbone_for, train

RECORDED = {"num_frames": 4, "max_words": 16, "sampling": "mvadapter_floor"}


@pytest.fixture(scope="module")
def run(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained run folder; its backbone file is ``bb.safetensors`` beside it, named relatively at training."""
    root = tmp_path_factory.mktemp("recorded")
    clip = create_backbone("pocket-tiny", seed=0)
    meta = {"format": "pt", "vidret_config": json.dumps(clip.config.to_dict())}
    save_file({k: v.detach().contiguous().clone() for k, v in clip.state_dict().items()}, root / "bb.safetensors", meta)
    d = cfg_dict(tiny_world, root / "run", method="lora", backbone="bb.safetensors", epochs=1, max_steps=1)
    d["data"].update(
        num_frames=4, max_words=16, eval_sampling="mvadapter_floor", test_manifest=str(tiny_world / "test.jsonl")
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        train(config_from_dict(d), progress=False)
    return root / "run"


def _backbone(run: Path) -> str:
    return str(run.parent / "bb.safetensors")


def _copy_adapter(run: Path, dst: Path, edit: Any = None) -> Path:
    shutil.copytree(run / "adapter", dst)
    if edit is not None:
        meta = json.loads((dst / "adapter.json").read_text())
        edit(meta)
        (dst / "adapter.json").write_text(json.dumps(meta))
    return dst


def _eval(
    capsys: pytest.CaptureFixture[str], adapter: Path, world: Path, out: Path, *flags: str
) -> tuple[dict[str, Any], str]:
    capsys.readouterr()
    argv = ["eval", "--adapter", str(adapter), "--manifest", str(world / "test.jsonl"), "--workers", "0"]
    assert main([*argv, "--out", str(out), *flags]) == 0
    return json.loads(out.read_text()), capsys.readouterr().err


def test_train_records_eval_settings_and_the_absolute_backbone_path(run: Path) -> None:
    meta = json.loads((run / "adapter/adapter.json").read_text())
    assert meta["extra"]["eval"] == {
        **RECORDED,
        "fps": 1.0,
        "max_candidates": 64,
        "protocol": "single",
        "image_size": 32,
    }
    assert meta["extra"]["backbone_source"] == _backbone(run)  # given as "bb.safetensors", recorded absolute
    # the evaluation at the end of training followed data.eval_sampling too
    res = json.loads((run / "results.json").read_text())
    assert {k: res["settings"][k] for k in RECORDED} == RECORDED


def test_eval_uses_the_recorded_settings(
    run: Path, tiny_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    res, err = _eval(capsys, run / "adapter", tiny_world, tmp_path / "r.json", "--backbone", _backbone(run))
    assert {k: res["settings"][k] for k in RECORDED} == RECORDED
    assert res["protocol"] == "single" and res["settings"]["image_size"] == 32
    assert "note:" not in err


def test_eval_flags_override_with_a_note(
    run: Path, tiny_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--backbone", _backbone(run), "--frames", "6", "--sampling", "cma_linspace", "--max-words", "16"]
    res, err = _eval(capsys, run / "adapter", tiny_world, tmp_path / "r.json", *flags)
    assert res["settings"]["num_frames"] == 6 and res["settings"]["sampling"] == "cma_linspace"
    assert res["settings"]["max_words"] == 16
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert notes == [
        "note: --frames 6 overrides the adapter's 4 frames",
        "note: --sampling cma_linspace overrides the adapter's mvadapter_floor sampling",
    ]  # --max-words 16 equals the record: nothing to note


def test_older_adapters_keep_the_defaults(
    run: Path, tiny_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = _copy_adapter(run, tmp_path / "old", lambda m: m["extra"].pop("eval"))
    res, err = _eval(capsys, old, tiny_world, tmp_path / "r.json", "--backbone", _backbone(run), "--frames", "4")
    assert res["settings"]["sampling"] == "segment_centre" and res["settings"]["max_words"] == 32
    assert res["settings"]["num_frames"] == 4 and "note:" not in err


def test_settings_precedence() -> None:
    defaults = {"num_frames": 12, "max_words": 32, "protocol": "single"}
    got, notes = settings_for_adapter({"num_frames": 8, "protocol": "paragraph"}, {"protocol": "multi"}, defaults)
    assert got == {"num_frames": 8, "max_words": 32, "protocol": "multi"}
    assert notes == ["note: --protocol multi overrides the adapter's paragraph protocol"]
    assert settings_for_adapter({}, {"num_frames": 3}, defaults) == ({**defaults, "num_frames": 3}, [])


def test_index_uses_the_recorded_settings(
    run: Path, tiny_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[int, str]] = []
    real = build.EvalVideoDataset

    def spy(entries, sampling, **kw):  # type: ignore[no-untyped-def]
        seen.append((sampling.num_frames, sampling.rule))
        return real(entries, sampling, **kw)

    monkeypatch.setattr(build, "EvalVideoDataset", spy)
    base = ["index", "--adapter", str(run / "adapter"), "--backbone", _backbone(run), "--workers", "0", "--json"]
    manifest = str(tiny_world / "test.jsonl")

    capsys.readouterr()
    assert main([*base, "--manifest", manifest, "--out", str(tmp_path / "ix")]) == 0
    assert "note:" not in capsys.readouterr().err
    settings = json.loads((tmp_path / "ix/index.json").read_text())["settings"]
    assert {k: settings[k] for k in RECORDED} == RECORDED
    assert seen == [(4, "mvadapter_floor")]

    # `search --video` encodes the query the way the index's videos were
    video = read_manifest(manifest)[0].path
    assert main(["search", str(tmp_path / "ix"), "--video", video, "--backbone", _backbone(run), "--json"]) == 0
    assert seen[-1] == (4, "mvadapter_floor")

    assert main([*base, "--manifest", manifest, "--out", str(tmp_path / "ix2"), "--frames", "2"]) == 0
    assert "note: --frames 2 overrides the adapter's 4 frames" in capsys.readouterr().err
    settings = json.loads((tmp_path / "ix2/index.json").read_text())["settings"]
    assert settings["num_frames"] == 2 and settings["sampling"] == "mvadapter_floor"

    # an index written before sampling was recorded took segment centres, and --update keeps them
    doc = json.loads((tmp_path / "ix/index.json").read_text())
    del doc["settings"]["sampling"]
    doc["settings"]["num_frames"] = 4
    (tmp_path / "ix/index.json").write_text(json.dumps(doc))
    assert VideoIndex.load(tmp_path / "ix").settings.sampling == "segment_centre"
    assert main([*base, "--manifest", manifest, "--out", str(tmp_path / "ix"), "--update"]) == 0
    assert json.loads((tmp_path / "ix/index.json").read_text())["settings"]["sampling"] == "segment_centre"
    # changing the rule of an existing index is refused like any other sampling change
    argv = [*base, "--manifest", manifest, "--out", str(tmp_path / "ix"), "--update", "--sampling", "cma_linspace"]
    assert main(argv) == 1
    assert "sampling=segment_centre" in capsys.readouterr().err


BAD_BLOCKS = [
    ({"num_frames": 0}, "extra.eval.num_frames"),
    ({"num_frames": "8"}, "extra.eval.num_frames"),
    ({"num_frames": 100_000}, "extra.eval.num_frames"),
    ({"max_words": 500}, "extra.eval.max_words"),  # beyond the backbone's 77-token context
    ({"sampling": "segment_random"}, "extra.eval.sampling"),
    ({"protocol": "all"}, "extra.eval.protocol"),
    ({"fps": -1}, "extra.eval.fps"),
    ({"max_candidates": 2}, "extra.eval.max_candidates"),  # fewer than num_frames (4)
    ({"image_size": 4}, "extra.eval.image_size"),  # smaller than one 8 px patch
    ({"image_size": 100_000}, "extra.eval.image_size"),
    ({"frames": 4}, "extra.eval"),  # unknown key
]


@pytest.mark.parametrize(("change", "field"), BAD_BLOCKS, ids=[f for _, f in BAD_BLOCKS])
def test_a_malformed_eval_block_is_refused(run: Path, tmp_path: Path, change: dict[str, Any], field: str) -> None:
    bad = _copy_adapter(run, tmp_path / "bad", lambda m: m["extra"]["eval"].update(change))
    with pytest.raises(VidretError) as e:
        adapter_io.read_adapter_meta(bad)
    assert str(bad / "adapter.json") in str(e.value) and f"field '{field}'" in str(e.value)


def test_eval_refuses_a_malformed_block_in_one_line(
    run: Path, tiny_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _copy_adapter(run, tmp_path / "bad", lambda m: m["extra"].update(eval=[4, 16]))
    capsys.readouterr()
    argv = ["eval", "--adapter", str(bad), "--manifest", str(tiny_world / "test.jsonl"), "--backbone", _backbone(run)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "field 'extra.eval' must be a JSON object" in err and "Traceback" not in err


def test_eval_loads_a_recorded_backbone_file_only_when_named(
    run: Path, tiny_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["eval", "--manifest", str(tiny_world / "test.jsonl"), "--workers", "0"]
    capsys.readouterr()
    assert main([*argv, "--adapter", str(run / "adapter")]) == 1
    err = capsys.readouterr().err
    assert f"pass --backbone {_backbone(run)}" in err and str(run / "adapter/adapter.json") in err

    gone = _copy_adapter(run, tmp_path / "gone", lambda m: m["extra"].update(backbone_source="/nowhere/bb.pt"))
    assert main([*argv, "--adapter", str(gone)]) == 1
    err = capsys.readouterr().err
    assert "/nowhere/bb.pt" in err and "not there now" in err and "--backbone PATH" in err
    assert str(gone / "adapter.json") in err

    # a recorded name that loads no local file is followed
    named = _copy_adapter(run, tmp_path / "named", lambda m: m["extra"].update(backbone_source="random:pocket-tiny"))
    res, _ = _eval(capsys, named, tiny_world, tmp_path / "r.json")
    assert res["settings"]["num_frames"] == 4


def test_train_download_hint_names_the_train_syntax(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VIDRET_OFFLINE", "1")
    monkeypatch.setenv("VIDRET_CACHE", str(tmp_path / "cache"))
    with pytest.raises(VidretError) as e:
        load_backbone_for("ViT-B-32")
    assert "backbone=/path/" in str(e.value) and "--backbone" not in str(e.value)


def test_the_recorded_literals_match_the_data_code() -> None:
    deterministic = tuple(r for r in FRAME_RULES if r != "segment_random")
    assert get_args(adapter_io.EvalSampling) == deterministic == EVAL_RULES
    assert get_args(adapter_io.EvalProtocol) == get_args(CaptionProtocol)
