"""The README's pocket-world walk-through, run from the README's own text, and the configs it uses.

The commands are read from the block after the ``<!-- walkthrough ... -->`` marker and run through ``main([...])``
in a scratch folder that looks like the repository root (``configs`` linked in, ``data/pocket`` linked to the tiny
test world). Only what makes it fast changes: the tiny world replaces ``pocket generate``'s default one, training
stops after two steps of four clips, frames load in-process, and ``serve`` listens on a free port and hands its app
to a test client instead of serving forever.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO
from vidret.cli import build_parser, main

MARKER = "<!-- walkthrough"
FAST_TRAIN = ["max_steps=2", "global_batch=4"]


def walkthrough_commands() -> list[list[str]]:
    """The README block after the marker, one argv (without ``vidret``) per command line."""
    text = (REPO / "README.md").read_text()
    assert MARKER in text, "README.md lost its walk-through marker"
    block = re.search(r"```bash\n(.*?)```", text[text.index(MARKER) :], re.S)
    assert block is not None
    commands = [shlex.split(line, comments=True) for line in block.group(1).splitlines() if line.strip()]
    assert all(c[0] == "vidret" for c in commands), commands
    return [c[1:] for c in commands]


def pocket_small_ships() -> bool:
    from vidret.backbone.pretrained import PRETRAINED, download

    if "pocket-small" not in PRETRAINED or not PRETRAINED["pocket-small"].package_file:
        return False
    try:
        download("pocket-small", progress=False)
    except Exception:
        return False
    return True


def test_the_readme_walkthrough_runs_as_written(
    tiny_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    commands = walkthrough_commands()
    steps = [c[0] if c[0] != "data" else f"data {c[1]}" for c in commands]
    assert steps == [
        "pocket",
        "data check",
        "data preprocess",
        "data preprocess",
        "train",
        "eval",
        "index",
        "search",
        "serve",
    ]
    (tmp_path / "data").mkdir()
    (tmp_path / "data/pocket").symlink_to(tiny_world)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    # the shipped pocket CLIP when it is there, else its architecture with random weights (same shapes and sizes)
    backbone = [] if pocket_small_ships() else ["backbone=random:pocket-small"]
    test_ids = {json.loads(line)["video_id"] for line in (tiny_world / "test.jsonl").read_text().splitlines()}

    for argv in commands:
        build_parser().parse_args(argv)  # every line parses, including the two not run below
        step = argv[0] if argv[0] != "data" else f"data {argv[1]}"
        if step == "pocket":
            continue  # the tiny world stands in for the default one (minutes to generate)
        if step == "serve":
            check_serve(argv, monkeypatch, capsys, test_ids)
            continue
        extra = {
            "train": [*FAST_TRAIN, *backbone],
            "eval": ["--workers", "0"],
            "index": ["--workers", "0"],
            "data preprocess": ["--workers", "0"],
        }.get(step, [])
        if step in ("eval", "index") and backbone:
            extra += ["--backbone", "random:pocket-small"]
        capsys.readouterr()
        assert main([*argv, *extra]) == 0, (argv, capsys.readouterr().err)
        out = capsys.readouterr().out
        if step == "data check":
            assert out.rstrip().endswith("OK")
        elif step == "train":
            assert "adapter written to runs/pocket/mv_adapter/adapter after 2 steps" in out
        elif step == "eval":
            assert "T2V R@1" in out and "time-reversed pairs" in out
        elif step == "search":
            assert any(vid in out for vid in test_ids), out
    assert (tmp_path / "runs/pocket/mv_adapter/adapter/adapter.json").is_file()
    assert (tmp_path / "runs/pocket/index/index.json").is_file()
    assert any((tmp_path / "cache/pocket").rglob("*.npy"))


def check_serve(argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: Any, test_ids: set[str]) -> None:
    """``vidret serve`` as written, on a free port; its app answers a search instead of serving forever."""
    if importlib.util.find_spec("uvicorn") is None or importlib.util.find_spec("fastapi") is None:
        return  # the [serve] extra is not installed: the line was parsed, that is all that can be checked
    import uvicorn
    from fastapi.testclient import TestClient

    seen: dict[str, Any] = {}

    def fake_run(self: Any, sockets: list | None = None) -> None:
        seen["app"] = self.config.app

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    assert main([*argv, "--port", "0"]) == 0, capsys.readouterr().err
    with TestClient(seen["app"], base_url="http://localhost") as client:
        found = client.get("/search", params={"q": "a red circle", "k": 3}).json()["results"]
    assert len(found) == 3 and {r["video_id"] for r in found} <= test_ids


METHODS_TRAINED = ["bottleneck", "convpass", "cross_modal", "full", "lora", "mv_adapter", "prompt", "st_adapter"]


def test_configs_pocket_has_one_runnable_config_per_trained_method(tmp_path: Path) -> None:
    from vidret.adapters.base import list_methods
    from vidret.train.config import load_config
    from vidret.train.recipe import recipe_card

    files = sorted((REPO / "configs/pocket").glob("*.yaml"))
    assert [f.stem for f in files] == sorted([*METHODS_TRAINED, "frozen"])
    assert set(list_methods()) == {*METHODS_TRAINED, "frozen"}  # frozen: a zero-shot run (0 steps)
    for f in files:
        cfg = load_config(str(f), [])
        assert cfg.method == f.stem and cfg.backbone == "pocket-small" and cfg.out_dir == f"runs/pocket/{f.stem}"
        assert (cfg.data.num_frames, cfg.data.image_size, cfg.data.fps) == (8, 64, 1.0)
        assert cfg.data.train_manifest == "data/pocket/train.jsonl"
        # builds on the pocket CLIP's 4 + 4 blocks (meta device: no weights), e.g. MV-Adapter's CMT layers fit
        card = recipe_card(cfg, config_path=str(f))
        assert (sum(g["params"] for g in card["param_groups"]) > 0) == (f.stem != "frozen")


def test_configs_pocket_match_the_demo() -> None:
    from vidret.data.pocket import PocketConfig
    from vidret.demo import POCKET_METHODS, DemoConfig

    world, demo = PocketConfig(), DemoConfig()
    for method, settings in POCKET_METHODS.items():
        if method == "frozen":
            continue
        raw = yaml.safe_load((REPO / f"configs/pocket/{method}.yaml").read_text())
        assert raw["backbone"] == demo.backbone
        assert raw.get("preset") == settings.get("preset")
        assert raw["optim"]["lr"] == settings.get("lr", 1e-4)
        assert raw["optim"].get("backbone_lr") == settings.get("backbone_lr")
        assert (raw["epochs"], raw["global_batch"]) == (demo.train_epochs, demo.global_batch)
        d = raw["data"]
        assert (d["num_frames"], d["fps"], d["image_size"]) == (world.frames, world.fps, world.image_size)
        assert d["max_words"] == demo.max_words
