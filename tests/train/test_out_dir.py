"""A failed run leaves no folder behind: out_dir appears only when training starts, and goes if it fails first."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train.test_loop import cfg_dict
from vidret.errors import VidretError
from vidret.train import loop
from vidret.train.config import config_from_dict
from vidret.train.loop import train


def test_a_run_that_fails_on_its_inputs_creates_nothing(tiny_world: Path, tmp_path: Path) -> None:
    d = cfg_dict(tiny_world, tmp_path / "new" / "run", backbone=str(tmp_path / "missing.pt"))
    with pytest.raises(VidretError, match="missing.pt"):
        train(config_from_dict(d), progress=False)
    assert not (tmp_path / "new").exists()
    # a method option the backbone cannot take (MV-Adapter tying block 10 of a 2-block model) fails the same way
    d = cfg_dict(tiny_world, tmp_path / "new" / "run", method_options={"cmt_layers": [10, 11]})
    with pytest.raises(VidretError, match=r"method_options\.cmt_layers=\[-2,-1\]"):
        train(config_from_dict(d), progress=False)
    assert not (tmp_path / "new").exists()


def test_a_run_that_fails_before_its_first_checkpoint_removes_what_it_created(
    tiny_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_step(*args: object, **kwargs: object) -> None:
        assert (tmp_path / "new/run/config.yaml").is_file()  # the run had started writing
        raise RuntimeError("step failed")

    monkeypatch.setattr(loop, "contrastive_step", broken_step)
    with pytest.raises(RuntimeError, match="step failed"):
        train(config_from_dict(cfg_dict(tiny_world, tmp_path / "new" / "run")), progress=False)
    assert not (tmp_path / "new").exists() and tmp_path.is_dir()  # the parent it made too; tmp_path was there


def test_a_folder_that_was_there_and_a_resumable_run_are_kept(
    tiny_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_step = loop.contrastive_step
    calls = {"n": 0}

    def fail_at(step: int) -> object:
        def contrastive_step(*args: object, **kwargs: object) -> object:
            calls["n"] += 1
            if calls["n"] == step:
                raise RuntimeError(f"step {step} failed")
            return real_step(*args, **kwargs)  # type: ignore[arg-type]

        return contrastive_step

    # the user's own folder: never removed, whatever fails
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    monkeypatch.setattr(loop, "contrastive_step", fail_at(1))
    with pytest.raises(RuntimeError, match="step 1 failed"):
        train(config_from_dict(cfg_dict(tiny_world, mine)), progress=False)
    assert (mine / "notes.txt").read_text() == "the user's"
    # checkpoint_every=1: step 1 is checkpointed, step 2 fails; the run can be resumed, so it stays
    calls["n"] = 0
    monkeypatch.setattr(loop, "contrastive_step", fail_at(2))
    with pytest.raises(RuntimeError, match="step 2 failed"):
        train(config_from_dict(cfg_dict(tiny_world, tmp_path / "run")), progress=False)
    assert (tmp_path / "run" / loop.CHECKPOINT).is_file()
    monkeypatch.setattr(loop, "contrastive_step", real_step)
    assert train(config_from_dict(cfg_dict(tiny_world, tmp_path / "run")), resume=True, progress=False).steps == 4
