"""Adapter folders are untrusted input (issue 13, rows 7, 9, 11 and 13).

Sizes in ``adapter.json`` are bounded before anything is built, tensors must be finite, the JSON is
schema-checked with one clear error, and a save killed at any point leaves the previous adapter loadable.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save, save_file

import vidret.model
from vidret.adapters.io import load_adapter, read_adapter, save_adapter
from vidret.backbone.clip import CLIP, create_backbone
from vidret.errors import VidretError
from vidret.model import VideoTextModel, build_model

REPO = Path(__file__).resolve().parents[2]
TINY: dict[str, dict[str, Any]] = {
    "lora": {"r": 4},
    "mv_adapter": {"r": 8, "cmt_layers": [0, 1], "num_frames": 4, "max_words": 16},
}


def _model(method: str = "lora", seed: int = 0) -> VideoTextModel:
    torch.manual_seed(seed)
    model = build_model(create_backbone("pocket-tiny", seed=0), method, **TINY.get(method, {}))
    with torch.no_grad():  # non-identity weights, different per seed
        for _, p in model.trainable_named_parameters():
            p.add_(torch.randn_like(p))
    return model


def _state(model: VideoTextModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.trainable_named_parameters()}


def _saved(tmp_path: Path, method: str = "lora", seed: int = 0) -> Path:
    folder = tmp_path / "a"
    save_adapter(_model(method, seed), folder)
    return folder


def _meta(folder: Path) -> Any:
    return json.loads((folder / "adapter.json").read_text())


def _write_meta(folder: Path, meta: Any) -> None:
    (folder / "adapter.json").write_text(json.dumps(meta))


def _weights_path(folder: Path) -> Path:
    meta = _meta(folder)
    return folder / (meta["weights"]["file"] if "weights" in meta else "adapter.safetensors")


def _rewrite_weights(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Replace the adapter's tensors consistently (content name and checksum), as a crafted folder would."""
    meta = _meta(folder)
    if "weights" not in meta:
        save_file(tensors, str(folder / "adapter.safetensors"))
        return
    data = save(tensors)
    digest = hashlib.sha256(data).hexdigest()
    name = f"adapter-{digest[:12]}.safetensors"
    (folder / meta["weights"]["file"]).unlink()
    (folder / name).write_bytes(data)
    meta["weights"] = {"file": name, "sha256": digest}
    _write_meta(folder, meta)


def _load(folder: Path) -> VideoTextModel:
    return load_adapter(create_backbone("pocket-tiny", seed=0), folder)


@pytest.fixture
def real_builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every adapter injected into a real (not meta-device) backbone."""
    calls: list[str] = []
    real_inject = vidret.model.inject

    def spy(clip: CLIP, config: Any, adapter: str = "default") -> list[str]:
        if not next(clip.parameters()).is_meta:
            calls.append(config.method)
        return real_inject(clip, config, adapter)

    monkeypatch.setattr(vidret.model, "inject", spy)
    return calls


# ----------------------------------------------------------------------------- row 7: sizes bounded first


def test_config_larger_than_the_backbone_is_refused_before_building(tmp_path: Path, real_builds: list[str]) -> None:
    folder = _saved(tmp_path)
    meta = _meta(folder)
    meta["config"]["r"] = 12000  # the case: 14.6 GB on ViT-B before any shape check
    _write_meta(folder, meta)
    real_builds.clear()
    with pytest.raises(VidretError, match=r"adapter\.json.*config\.r.*12000.*backbone") as e:
        _load(folder)
    assert "parameters" in str(e.value)
    assert real_builds == []


def test_huge_size_is_a_clear_error_not_an_allocation_failure(tmp_path: Path, real_builds: list[str]) -> None:
    folder = _saved(tmp_path)
    meta = _meta(folder)
    meta["config"]["r"] = 2**44  # far beyond any machine's memory: must never reach an allocator
    _write_meta(folder, meta)
    real_builds.clear()
    with pytest.raises(VidretError, match=r"config\.r"):
        _load(folder)
    assert real_builds == []


def test_shapes_that_disagree_with_the_config_are_refused_before_building(
    tmp_path: Path, real_builds: list[str]
) -> None:
    folder = _saved(tmp_path)
    meta = _meta(folder)
    meta["config"]["r"] = 8  # plausible size, but the file holds rank-4 tensors
    _write_meta(folder, meta)
    real_builds.clear()
    with pytest.raises(VidretError, match="mis-shaped"):
        _load(folder)
    assert real_builds == []


@pytest.mark.parametrize(
    ("method", "field", "value", "message"),
    [
        ("lora", "r", 5e7, r"config\.r.*integer.*5e\+07|config\.r.*integer.*50000000\.0"),
        ("lora", "r", True, r"config\.r.*integer.*True"),
        ("lora", "r", "8", r"config\.r.*integer.*'8'"),
        ("mv_adapter", "r", 64.0, r"config\.r.*integer.*64\.0"),
        ("mv_adapter", "scale", "0.1", r"config\.scale.*number"),
        ("mv_adapter", "cmt_layers", [0, 1.5], r"config\.cmt_layers.*integer"),
        ("lora", "r", -1, r"config.*r must be a positive integer"),
        ("lora", "r", 0, r"config.*r must be a positive integer"),
        ("lora", "rank", 4, r"config.*unknown option.*rank"),
    ],
)
def test_bad_config_values_name_the_field_and_the_file(
    tmp_path: Path, method: str, field: str, value: Any, message: str
) -> None:
    folder = _saved(tmp_path, method)
    meta = _meta(folder)
    meta["config"][field] = value
    _write_meta(folder, meta)
    with pytest.raises(VidretError, match=message) as e:
        _load(folder)
    assert str(folder / "adapter.json") in str(e.value)


def test_tensors_file_larger_than_the_backbone_is_refused_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _saved(tmp_path)
    backbone = sum(p.numel() for p in create_backbone("pocket-tiny", seed=0).parameters())
    _rewrite_weights(folder, {"root.blob": torch.zeros(backbone + 1000)})

    def no_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the tensors were loaded before their declared size was checked")

    monkeypatch.setattr("vidret.adapters.io.load_file", no_load)
    with pytest.raises(VidretError, match=r"declares .* values.*more than.*backbone") as e:
        read_adapter(folder)
    assert _weights_path(folder).name in str(e.value)


def test_integer_tensors_are_refused(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    tensors = load_file(str(_weights_path(folder)))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].to(torch.int64)
    _rewrite_weights(folder, tensors)
    with pytest.raises(VidretError, match=rf"tensor '{re.escape(name)}'.*I64"):
        read_adapter(folder)


# ----------------------------------------------------------------------------- row 9: finite weights


def test_nan_and_inf_tensors_are_refused_with_the_tensor_name(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    tensors = load_file(str(_weights_path(folder)))
    name = sorted(tensors)[-1]
    flat = tensors[name].view(-1)
    flat[:6] = float("nan")
    flat[6:12] = float("inf")
    _rewrite_weights(folder, tensors)
    with pytest.raises(VidretError, match=rf"tensor '{re.escape(name)}' has 12 NaN/Inf values.*damaged"):
        _load(folder)


# ----------------------------------------------------------------------------- row 13: one schema check


def _set(path: str, value: Any) -> Any:
    def edit(meta: dict[str, Any]) -> Any:
        *parents, last = path.split(".")
        d = meta
        for k in parents:
            d = d[k]
        d[last] = value
        return meta

    return edit


def _drop(path: str) -> Any:
    def edit(meta: dict[str, Any]) -> Any:
        *parents, last = path.split(".")
        d = meta
        for k in parents:
            d = d[k]
        del d[last]
        return meta

    return edit


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda meta: [meta], "top level"),
        (lambda meta: "adapter", "top level"),
        (_drop("backbone"), "backbone"),
        (_set("backbone", "ViT-B-16"), "backbone"),
        (_drop("backbone.config"), "backbone.config"),
        (_set("backbone.fingerprint", 12), "backbone.fingerprint"),
        (_set("backbone.config.vision.width", 32.0), "backbone.config.vision.width"),
        (_set("backbone.config.text", []), "backbone.config.text"),
        (_set("method", "nope"), "method"),
        (_set("method", ["lora"]), "method"),
        (_drop("method"), "method"),
        (_set("config", ["r", 4]), "config"),
        (_drop("config"), "config"),
        (_drop("format_version"), "format_version"),
        (_set("format_version", "1"), "format_version"),
        (_set("format_version", 99), "format_version"),
        (_set("preset", 3), "preset"),
        (_set("extra", []), "extra"),
        (_set("trainable_parameters", -5), "trainable_parameters"),
    ],
)
def test_malformed_adapter_json_is_one_clear_error(tmp_path: Path, edit: Any, field: str) -> None:
    folder = _saved(tmp_path)
    _write_meta(folder, edit(_meta(folder)))
    for read in (lambda: read_adapter(folder), lambda: _load(folder)):
        with pytest.raises(VidretError) as e:
            read()
        msg = str(e.value)
        assert str(folder / "adapter.json") in msg, msg
        assert f"'{field}'" in msg or (field == "top level" and "JSON object" in msg), msg


# ----------------------------------------------------------------------------- row 11: atomic save


def test_save_writes_content_named_weights_named_by_the_json(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    (folder / "adapter-notes.txt").write_text("mine")  # not a weights generation: must survive saves
    meta = _meta(folder)
    first = meta["weights"]["file"]
    assert re.fullmatch(r"adapter-[0-9a-f]{12}\.safetensors", first)
    assert hashlib.sha256((folder / first).read_bytes()).hexdigest() == meta["weights"]["sha256"]
    assert first[len("adapter-") : -len(".safetensors")] == meta["weights"]["sha256"][:12]
    second = _model(seed=1)
    save_adapter(second, folder)
    now = _meta(folder)["weights"]["file"]
    assert now != first
    assert sorted(p.name for p in folder.iterdir()) == sorted(["adapter.json", now, "adapter-notes.txt"])
    loaded = _state(_load(folder))
    assert all(torch.equal(loaded[k], v) for k, v in _state(second).items())


def test_legacy_folder_loads_and_is_migrated_by_the_next_save(tmp_path: Path) -> None:
    model = _model()
    folder = tmp_path / "legacy"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in _state(model).items()}, str(folder / "adapter.safetensors"))
    from vidret.adapters.io import adapter_metadata

    _write_meta(folder, adapter_metadata(model))  # the layout written before issue 13
    loaded = _state(_load(folder))
    assert all(torch.equal(loaded[k], v) for k, v in _state(model).items())
    save_adapter(_model(seed=1), folder)
    assert not (folder / "adapter.safetensors").exists()
    assert len(list(folder.glob("adapter-*.safetensors"))) == 1


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"file": "../adapter-000000000000.safetensors"}, r"'weights\.file'"),
        ({"file": "/etc/hostname"}, r"'weights\.file'"),
        ({"file": "adapter.json"}, r"'weights\.file'"),
        ({"sha256": "0" * 64}, r"sha256"),
        ({"sha256": 5}, r"'weights\.sha256'"),
        ("adapter.safetensors", r"'weights'"),
    ],
)
def test_weights_entry_is_checked(tmp_path: Path, weights: Any, message: str) -> None:
    folder = _saved(tmp_path)
    meta = _meta(folder)
    meta["weights"] = {**meta.get("weights", {}), **weights} if isinstance(weights, dict) else weights
    _write_meta(folder, meta)
    with pytest.raises(VidretError, match=message):
        _load(folder)


def test_weights_changed_after_saving_are_refused(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    path = _weights_path(folder)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # one bit of one value
    path.write_bytes(bytes(data))
    with pytest.raises(VidretError, match=r"sha256.*damaged"):
        _load(folder)


_KILL = r"""
import builtins, io, os, sys
from pathlib import Path

import torch

from vidret.adapters.io import save_adapter
from vidret.backbone.clip import create_backbone
from vidret.model import build_model

folder, point = Path(sys.argv[1]), sys.argv[2]
torch.manual_seed(7)
model = build_model(create_backbone("pocket-tiny", seed=0), "lora", r=4)
with torch.no_grad():
    for _, p in model.trainable_named_parameters():
        p.add_(torch.randn_like(p))

if point == "json_replace":  # the weights are complete; die at the rename that would commit the json
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == "adapter.json":
            os._exit(137)
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace
else:  # die half-way through writing the json's temporary file
    real_open = io.open

    class Dying:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            os._exit(137)

    def dying_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        name = Path(os.fspath(file)).name if isinstance(file, (str, os.PathLike)) else ""
        if "w" in mode and "adapter.json" in name and name.endswith(".tmp"):
            return Dying(f)
        return f

    builtins.open = io.open = dying_open
save_adapter(model, folder)
"""


@pytest.mark.parametrize("point", ["json_replace", "json_write"])
def test_save_killed_before_the_json_commit_keeps_the_previous_adapter(tmp_path: Path, point: str) -> None:
    previous = _model(seed=0)
    folder = tmp_path / "a"
    save_adapter(previous, folder)
    json_before = (folder / "adapter.json").read_bytes()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", _KILL, str(folder), point], cwd=REPO, env=env, capture_output=True, timeout=300
    )
    assert run.returncode == 137, run.stderr.decode()[-2000:]
    assert (folder / "adapter.json").read_bytes() == json_before
    loaded = _state(_load(folder))
    assert all(torch.equal(loaded[k], v) for k, v in _state(previous).items())

    nxt = _model(seed=2)
    save_adapter(nxt, folder)
    names = sorted(p.name for p in folder.iterdir())
    assert not [n for n in names if n.endswith(".tmp")], names
    assert names == sorted(["adapter.json", _meta(folder)["weights"]["file"]])
    loaded = _state(_load(folder))
    assert all(torch.equal(loaded[k], v) for k, v in _state(nxt).items())
