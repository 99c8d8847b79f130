"""The command line: every subcommand has --help; user errors print one line, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vidret.cli import build_parser, main

SUBCOMMANDS = [
    ["demo"],
    ["backbone", "list"],
    ["backbone", "info"],
    ["backbone", "convert"],
    ["adapters", "list"],
    ["adapters", "report"],
    ["data", "convert"],
    ["data", "check"],
    ["data", "preprocess"],
    ["pocket", "generate"],
    ["pretrain"],
    ["train"],
    ["eval"],
    ["plot"],
    ["bench", "decode"],
    ["bench", "train"],
    ["bench", "encode"],
    ["bench", "search"],
    ["index"],
    ["search"],
    ["serve"],
]


@pytest.mark.parametrize("cmd", SUBCOMMANDS, ids=" ".join)
def test_every_subcommand_has_help(cmd: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*cmd, "--help"])
    assert e.value.code == 0
    assert "usage: vidret" in capsys.readouterr().out


def test_top_level_help_runs_as_a_program() -> None:
    r = subprocess.run([sys.executable, "-m", "vidret", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for name in ("demo", "train", "eval", "index", "search", "serve", "bench"):
        assert name in r.stdout


def test_user_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backbone", "info", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vidret: error:") and "Traceback" not in err
    assert main(["adapters", "report", "--method", "nope"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["eval", "--adapter", str(tmp_path), "--manifest", str(tmp_path / "m.jsonl")]) == 2
    assert "not an adapter folder" in capsys.readouterr().err


def test_adapters_report_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            ["adapters", "report", "--method", "cross_modal", "--backbone", "ViT-B-32", "--preset", "msrvtt", "--json"]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["trainable"] == 519_168 and rows[0]["paper"].startswith("0.52M")


def test_eval_cli_on_a_saved_adapter(
    tiny_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from vidret.adapters.io import save_adapter
    from vidret.backbone.clip import create_backbone
    from vidret.eval import metrics
    from vidret.model import build_model

    seen: dict[str, object] = {}
    real_qb_norm = metrics.qb_norm

    def recording_qb_norm(sim, bank, **kw):  # type: ignore[no-untyped-def]
        seen.update(sim_max=float(sim.abs().max()), bank_shape=tuple(bank.shape), **kw)
        return real_qb_norm(sim, bank, **kw)

    monkeypatch.setattr(metrics, "qb_norm", recording_qb_norm)

    save_adapter(build_model(create_backbone("pocket-tiny", seed=0), "frozen"), tmp_path / "a")
    out = tmp_path / "res.json"
    code = main(
        [
            "eval",
            "--adapter",
            str(tmp_path / "a"),
            "--manifest",
            str(tiny_world / "test.jsonl"),
            "--backbone",
            "random:pocket-tiny",
            "--frames",
            "8",
            "--max-words",
            "16",
            "--workers",
            "0",
            "--pairs",
            str(tiny_world / "test_pairs.json"),
            "--qb-bank",
            str(tiny_world / "train.jsonl"),
            "--qb-bank-size",
            "40",
            "--qb-k",
            "2",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "T2V R@1" in text and "time-reversed pairs" in text
    res = json.loads(out.read_text())
    assert res["reversal"]["pair_queries"] > 0
    # a frozen meanP model cannot tell a clip from its time reversal: every pair ties (50%)
    assert res["reversal"]["pair_ties"] == 100.0 and res["reversal"]["pair_accuracy"] == 50.0
    # QB-Norm: 40 training captions against every test video, on the cosine scale (|s| <= 1), k passed through
    qb = res["postprocessed"]["qbnorm"]
    assert qb["bank_queries"] == 40 and qb["k"] == 2 and "T2V with QB-Norm (40 bank captions)" in text
    assert seen["bank_shape"] == (40, res["n_videos"]) and seen["k"] == 2 and seen["beta"] == 20.0
    assert seen["sim_max"] <= 1.0 + 1e-5
    assert set(qb["t2v"]) == set(res["t2v"])
