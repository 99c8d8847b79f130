"""The command line: every subcommand has --help; user errors print one line, no traceback.

The rules of vidret/cli.py's docstring: help for every option with its default and choices, an example at the end
of every --help, exit codes 0 / 1 / 2, one error line (a traceback only with VIDRET_DEBUG=1), --json for results.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from vidret.cli import DATASETS, METHODS, build_parser, main

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
    assert main(["backbone", "info", str(tmp_path / "missing.pt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vidret: error:") and "Traceback" not in err
    assert main(["adapters", "report", "--method", "nope"]) == 1
    assert "unknown method" in capsys.readouterr().err
    assert main(["eval", "--adapter", str(tmp_path), "--manifest", str(tmp_path / "m.jsonl")]) == 1
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


# ----------------------------------------------------------------------------- help: every option, every command
def all_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(command path, parser) for the top level, every group and every subcommand."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from all_parsers(sub, (*path, name))


def test_every_option_of_every_subcommand_has_help_default_choices_and_an_example() -> None:
    parsers = list(all_parsers(build_parser()))
    assert len(parsers) > 25  # the top level, 5 groups, every subcommand
    for path, parser in parsers:
        text = parser.format_help()
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = "/".join(action.option_strings) or action.dest
            assert action.help and action.help.strip(), f"vidret {' '.join(path)}: {name} has no help"
            shown = formatter._get_help_string(action) or ""
            d = action.default
            if action.option_strings and d not in (None, False, [], argparse.SUPPRESS):
                assert "default" in shown, f"vidret {' '.join(path)}: {name} does not show its default {d!r}"
            if action.choices:
                assert "{" + ",".join(map(str, action.choices)) + "}" in text, f"{name} does not list its choices"
        last = text.rstrip().splitlines()[-1]
        assert last.startswith("example: vidret " + " ".join(path)), f"vidret {' '.join(path)} --help ends: {last}"
        argv = shlex.split(last.removeprefix("example: "))[1:]
        if path and path[0] != "bench" and "--help" not in argv:
            build_parser().parse_args(argv)  # the example is a valid command line


def test_data_convert_help_lists_the_datasets_and_what_annotations_takes(capsys: pytest.CaptureFixture[str]) -> None:
    from vidret.data.converters import DATASETS as CONVERTERS

    assert DATASETS == CONVERTERS
    with pytest.raises(SystemExit):
        main(["data", "convert", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "{" + ",".join(CONVERTERS) + "}" in text
    assert "folder with the benchmark's annotation files; generic: a .csv/.tsv file" in text


def test_the_method_list_in_help_is_the_registry() -> None:
    from vidret.adapters.base import list_methods

    assert tuple(sorted(list_methods())) == METHODS


# ----------------------------------------------------------------------------- exit codes, one line, VIDRET_DEBUG
def test_exit_codes_usage_2_failure_1_and_one_line_errors(
    tiny_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VIDRET_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:  # a malformed command line: argparse, 2
        main(["data", "convert", "--dataset", "kinetics", "--annotations", "a", "--videos", "v", "--out", "o"])
    assert e.value.code == 2 and "invalid choice: 'kinetics'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a value out of range is the command line's fault too
        main(["data", "check", str(tiny_world / "test.jsonl"), "--max-videos", "-3"])
    assert e.value.code == 2 and "argument --max-videos: must be >= 0, got -3" in capsys.readouterr().err
    # a group without its subcommand: its help on stderr, nothing on stdout, 2
    assert main(["data"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "usage: vidret data" in err and err.rstrip().endswith("needs a subcommand (listed above)")
    # the command ran and failed: one line, 1
    assert main(["data", "check", str(tmp_path / "none.jsonl")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("vidret: error: manifest not found")
    # the operating system refused (a file where the cache folder must go): one line with the path, 1
    (tmp_path / "file").write_text("")
    argv = ["data", "preprocess", str(tiny_world / "test.jsonl"), "--cache", str(tmp_path / "file/c"), "--workers", "0"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    last = err.rstrip().splitlines()[-1]  # after the progress bar
    assert last.startswith(f"vidret: error: Not a directory: {tmp_path / 'file/c'}") and "Traceback" not in err
    # VIDRET_DEBUG=1: the traceback too, the one line last
    monkeypatch.setenv("VIDRET_DEBUG", "1")
    assert main(["data", "check", str(tmp_path / "none.jsonl")]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.rstrip().splitlines()[-1].startswith("vidret: error:")


def test_exit_code_of_the_real_process(tmp_path: Path) -> None:
    env = {**os.environ, "VIDRET_DEBUG": ""}
    r = subprocess.run(
        [sys.executable, "-m", "vidret", "data", "check", str(tmp_path / "none.jsonl")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 1 and r.stdout == "" and r.stderr.startswith("vidret: error:")
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "vidret", "eval"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "the following arguments are required: --adapter, --manifest" in r.stderr


# ----------------------------------------------------------------------------- --json on every result, paths
def test_json_and_human_output_of_the_listing_commands(capsys: pytest.CaptureFixture[str]) -> None:
    from vidret.adapters.base import list_methods

    assert main(["backbone", "list", "--json"]) == 0
    rows = {r["name"]: r["pretrained"] for r in json.loads(capsys.readouterr().out)}
    assert rows["ViT-B-16"] is True and rows["pocket-tiny"] is False
    assert main(["backbone", "info", "pocket-tiny", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"]["vision"]["image_size"] == 32
    assert main(["backbone", "info", "pocket-tiny"]) == 0
    text = capsys.readouterr().out
    assert "vision: 32 px, patch 8" in text and f"total {info['parameters']['total']:,}" in text
    assert main(["adapters", "list", "--json"]) == 0
    methods = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in methods] == list(list_methods()) and "pocket" in methods[0]["presets"]


def test_data_commands_json_and_normalised_paths(tiny_world: Path, tmp_path: Path, capsys) -> None:
    # data check: a manifest named through a detour, and videos named relative to it through another
    sub = tmp_path / "sub"
    sub.mkdir()
    manifest = sub / "m.jsonl"
    rows = [json.loads(x) for x in (tiny_world / "test.jsonl").read_text().splitlines()][:2]
    rows[0]["path"] = os.path.relpath(tiny_world / rows[0]["path"], sub)  # ../../.../videos/test/x.mp4
    rows[1]["path"] = "../sub/../gone.mp4"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    detour = str(tmp_path / "sub" / ".." / "sub" / "m.jsonl")
    assert main(["data", "check", detour, "--no-decode"]) == 1
    text = capsys.readouterr().out
    assert f"manifest: {manifest}" in text and f"  {tmp_path / 'gone.mp4'}" in text and "/../" not in text
    assert main(["data", "check", detour, "--no-decode", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["missing"] == [str(tmp_path / "gone.mp4")] and report["videos"] == 2

    # data convert (generic CSV): JSON report, and the human one with normalised paths
    csv = tmp_path / "ann" / "test.csv"
    csv.parent.mkdir()
    with csv.open("w", newline="") as f:
        import csv as csv_module

        csv_module.writer(f).writerows([["path", "caption"], [rows[0]["path"], rows[0]["captions"][0]]])
    argv = ["data", "convert", "--dataset", "generic", "--annotations", str(tmp_path / "ann/../ann/test.csv")]
    argv += ["--videos", str(sub), "--out", str(tmp_path / "out")]
    assert main([*argv, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["splits"]["test"]["videos"] == 1 and rep["annotations"] == str(csv)
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert f"from {csv}" in text and "/../" not in text

    # data preprocess: the cache report
    argv = ["data", "preprocess", str(tmp_path / "out/test.jsonl"), "--cache", str(tmp_path / "c"), "--workers", "0"]
    assert main([*argv, "--image-size", "64", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert (rep["total"], rep["built"], rep["cache"]) == (1, 1, str(tmp_path / "c"))


def test_train_json_summary_and_one_resize_note(tiny_world: Path, tmp_path: Path, capsys) -> None:
    argv = ["train", str(REPO / "configs/pocket/lora.yaml"), "backbone=random:pocket-tiny", "max_steps=1"]
    argv += ["global_batch=4", f"data.train_manifest={tiny_world / 'train.jsonl'}", "data.test_manifest="]
    argv += ["data.cache_dir=", f"out_dir={tmp_path / 'run'}", "--no-progress", "--json"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert summary["steps"] == 1 and Path(summary["adapter"], "adapter.json").is_file() and summary["eval"] == {}
    # the config's 64 px frames on a 32 px backbone: said once, on stderr
    notes = [line for line in err.splitlines() if "positional embedding is interpolated" in line]
    assert len(notes) == 1 and "frames are resized to 64 px but the backbone random:pocket-tiny takes 32 px" in notes[0]
    assert "data.image_size=32 matches it" in notes[0]


def test_eval_json(tiny_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vidret.adapters.io import save_adapter
    from vidret.backbone.clip import create_backbone
    from vidret.model import build_model

    save_adapter(build_model(create_backbone("pocket-tiny", seed=0), "frozen"), tmp_path / "a")
    argv = ["eval", "--adapter", str(tmp_path / "a"), "--manifest", str(tiny_world / "test.jsonl")]
    argv += ["--backbone", "random:pocket-tiny", "--frames", "8", "--max-words", "16", "--workers", "0", "--json"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    res = json.loads(out)
    assert set(res["t2v"]) >= {"R1", "R5", "R10", "MdR", "MnR"} and res["n_videos"] == 12
    # an adapter without recorded settings is evaluated at the backbone's own size: no resize note
    assert "interpolated" not in err


@pytest.mark.parametrize("name", ["decode", "encode", "hostpath", "train"])
def test_benchmark_help_shows_defaults_and_ends_with_an_example(name: str, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["bench", name, "--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0 and "(default: " in text
    assert text.rstrip().splitlines()[-1].startswith(f"example: vidret bench {name} --")
