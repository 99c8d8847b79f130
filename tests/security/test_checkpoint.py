"""Training checkpoints are data only (issue 13, row 1): safetensors + JSON, never unpickled, crash-safe.

A checkpoint found in an ``out_dir`` may come from anyone (a shared run folder, a downloaded "resume from here"),
so ``train --resume`` must not run code from it, must refuse a damaged or crafted one with one clear error, and a
kill between writing the tensors and renaming the manifest must leave the previous checkpoint loadable.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.train.test_loop import cfg_dict
from vidret.adapters.io import weights_file
from vidret.atomic import sha256_file
from vidret.errors import VidretError
from vidret.train.config import config_from_dict
from vidret.train.loop import train


def cfg(world: Path, out: Path, **kw: Any) -> Any:
    """The loop tests' tiny MV-Adapter run (10 clips, batch 4: 2 steps per epoch) with overrides."""
    return config_from_dict(cfg_dict(world, out, **kw))


class _Evil:
    """Unpickling this creates ``marker``: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str, str]]:
        return (open, (self.marker, "w"))


def _plant_pickle(out_dir: Path, marker: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"config": _Evil(marker), "position": _Evil(marker)}, out_dir / "checkpoint.pt")


def test_a_pickled_checkpoint_is_never_unpickled(tiny_world: Path, tmp_path: Path) -> None:
    out, marker = tmp_path / "run", tmp_path / "code-ran"
    _plant_pickle(out, marker)
    with pytest.raises(Exception) as info:
        train(cfg(tiny_world, out), resume=True, progress=False)
    assert not marker.exists(), "resume unpickled checkpoint.pt and ran code from it"
    assert isinstance(info.value, VidretError), repr(info.value)
    msg = str(info.value)
    assert "checkpoint.pt" in msg and "no longer" in msg and "delete" in msg
    # without --resume the folder is refused too (it holds an earlier run), still without reading the file
    with pytest.raises(VidretError, match="checkpoint.pt"):
        train(cfg(tiny_world, out), progress=False)
    assert not marker.exists()


def test_a_pickle_beside_a_data_checkpoint_is_ignored(tiny_world: Path, tmp_path: Path) -> None:
    out, marker = tmp_path / "run", tmp_path / "code-ran"
    train(cfg(tiny_world, out, epochs=1), progress=False)
    _plant_pickle(out, marker)
    res = train(cfg(tiny_world, out), resume=True, progress=False)
    assert res.steps == 4 and not marker.exists()


def test_the_checkpoint_is_safetensors_named_by_a_json_manifest(tiny_world: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(cfg(tiny_world, out, epochs=1), progress=False)
    manifest = json.loads((out / "checkpoint.json").read_text())
    data = out / manifest["data"]["file"]
    assert data.suffix == ".safetensors" and data.parent == out
    assert sha256_file(data) == manifest["data"]["sha256"]
    tensors = load_file(str(data))
    assert any(k.startswith("trainable.") for k in tensors) and any(k.startswith("optimizer.") for k in tensors)
    assert manifest["position"] == {"step": 2, "epoch": 1, "step_in_epoch": 0, "loss": manifest["position"]["loss"]}
    # one generation on disk: older data files and temporaries are gone, no pickle anywhere
    assert sorted(p.name for p in out.glob("checkpoint*")) == sorted(["checkpoint.json", data.name])
    assert not list(out.glob(".*.tmp")) and not (out / "checkpoint.pt").exists()


def _fail_manifest_rename(monkeypatch: pytest.MonkeyPatch, after: int) -> list[int]:
    """``os.replace`` onto checkpoint.json raises from its ``after``-th call on: a kill just before the commit."""
    real, calls = os.replace, [0]

    def replace(src: Any, dst: Any, *a: Any, **kw: Any) -> None:
        if Path(dst).name == "checkpoint.json":
            calls[0] += 1
            if calls[0] >= after:
                raise OSError("simulated kill before the manifest rename")
        real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)
    return calls


def test_a_kill_before_the_manifest_rename_keeps_the_previous_checkpoint(
    tiny_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = train(cfg(tiny_world, tmp_path / "full"), progress=False)
    out = tmp_path / "killed"
    with monkeypatch.context() as m:
        _fail_manifest_rename(m, after=3)  # the checkpoint of step 3 writes its tensors, then dies
        with pytest.raises(OSError, match="simulated kill"):
            train(cfg(tiny_world, out), progress=False)
    manifest = json.loads((out / "checkpoint.json").read_text())
    assert manifest["position"]["step"] == 2
    assert len(list(out.glob("checkpoint-*.safetensors"))) == 2  # step 3's data file was written, unreferenced
    resumed = train(cfg(tiny_world, out), resume=True, progress=False)
    assert resumed.steps == ref.steps == 4
    a, b = load_file(str(weights_file(ref.adapter_dir))), load_file(str(weights_file(resumed.adapter_dir)))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed training differs from uninterrupted training"
    assert len(list(out.glob("checkpoint-*.safetensors"))) == 1  # the stray generation was cleaned up


@pytest.fixture(scope="module")
def one_epoch_run(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "run"
    train(cfg(tiny_world, out, epochs=1), progress=False)
    return out


def _data_file(out: Path) -> Path:
    return out / json.loads((out / "checkpoint.json").read_text())["data"]["file"]


def _edit_manifest(out: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    """Edit the manifest in place (``edit``'s return value is ignored)."""
    path = out / "checkpoint.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


def _manifest_as_list(out: Path) -> None:
    path = out / "checkpoint.json"
    path.write_text(json.dumps([json.loads(path.read_text())]))


def _replace_data(out: Path, write: Callable[[Path], None]) -> None:
    """Swap the data file for other bytes and make the manifest's sha256 agree (a crafted, not a damaged, file)."""
    data = _data_file(out)
    write(data)
    _edit_manifest(out, lambda m: m["data"].__setitem__("sha256", sha256_file(data)))


def _bad_exp_avg(data: Path) -> None:
    t = load_file(str(data))
    key = next(k for k in t if k.endswith(".exp_avg"))
    t[key] = torch.zeros(t[key].numel() + 1)
    save_file(t, str(data))


CRAFTED: dict[str, Callable[[Path], None]] = {
    "not json": lambda out: (out / "checkpoint.json").write_text("{not json"),
    "a list": _manifest_as_list,
    "step is a string": lambda out: _edit_manifest(out, lambda m: m["position"].__setitem__("step", "2")),
    "missing rng": lambda out: _edit_manifest(out, lambda m: m.pop("rng")),
    "python rng of wrong type": lambda out: _edit_manifest(out, lambda m: m["rng"].__setitem__("python", {"a": 1})),
    "param_groups a string": lambda out: _edit_manifest(out, lambda m: m["optimizer"].__setitem__("param_groups", "x")),
    "lr is a string": lambda out: _edit_manifest(
        out, lambda m: m["optimizer"]["param_groups"][0].__setitem__("lr", "1")
    ),
    "parameter indices repeated": lambda out: _edit_manifest(
        out,
        lambda m: m["optimizer"]["param_groups"][0].__setitem__(
            "params", [0] * len(m["optimizer"]["param_groups"][0]["params"])
        ),
    ),
    "data file outside the folder": lambda out: _edit_manifest(
        out, lambda m: m["data"].__setitem__("file", "../../../etc/hostname")
    ),
    "data file missing": lambda out: _data_file(out).unlink(),
    "data file damaged": lambda out: _data_file(out).write_bytes(b"\x00" * 64),
    "data file is a pickle": lambda out: _replace_data(out, lambda p: torch.save({"x": 1}, p)),
    "data file is garbage": lambda out: _replace_data(out, lambda p: p.write_bytes(b"\xff" * 100)),
    "optimizer tensor mis-shaped": lambda out: _replace_data(out, _bad_exp_avg),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_a_damaged_or_crafted_checkpoint_is_one_clear_error(
    case: str, one_epoch_run: Path, tiny_world: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    shutil.copytree(one_epoch_run, out)
    CRAFTED[case](out)
    with pytest.raises(VidretError) as info:
        train(cfg(tiny_world, out), resume=True, progress=False)
    msg = str(info.value)
    assert "checkpoint" in msg and "delete" in msg, msg
