"""`vidret demo --quick`: the whole pipeline (world, pretraining, six methods, table, plot) on a tiny budget."""

from __future__ import annotations

import json
from pathlib import Path

from vidret.cli import main


def test_quick_demo_runs_end_to_end(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "| method | T2V R@1" in out
    res = json.loads((tmp_path / "demo/results.json").read_text())
    methods = [r["method"] for r in res["rows"]]
    assert methods == ["frozen", "full", "mv_adapter", "cross_modal", "lora", "bottleneck"]
    by = {r["method"]: r for r in res["rows"]}
    assert by["frozen"]["trainable"] == 0 and by["full"]["percent"] > 99.99  # all but the frozen logit scale
    assert 0 < by["mv_adapter"]["trainable"] < by["full"]["trainable"]
    # order-blind methods tie every reversal pair exactly: 50%
    assert by["frozen"]["pair_accuracy"] == 50.0
    assert (tmp_path / "demo/results.md").read_text().count("\n") == 2 + len(methods)
    assert (tmp_path / "demo/results.png").read_bytes()[:4] == b"\x89PNG"
    # a second run reuses the world and the pretrained backbone
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 0
    assert "reusing" in capsys.readouterr().out
