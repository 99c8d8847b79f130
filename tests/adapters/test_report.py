"""`vidret adapters report`: presets listed against the backbone family they are sized for, aligned columns."""

from __future__ import annotations

from vidret.adapters.base import get_method
from vidret.adapters.report import format_report, method_report, preset_fits


def test_preset_all_lists_only_the_presets_sized_for_the_backbone() -> None:
    every = set(get_method("mv_adapter").presets)
    vitl = {p for p in every if p.endswith("_vitl")}
    assert vitl, "the ViT-L presets this test is about are gone"
    on_b16 = {r["preset"] for r in method_report("mv_adapter", "ViT-B-16", "all")}
    on_l14 = {r["preset"] for r in method_report("mv_adapter", "ViT-L-14", "all")}
    assert on_b16 and not on_b16 & vitl
    assert on_l14 == vitl and all(r["backbone_params"] > 300e6 for r in method_report("mv_adapter", "ViT-L-14", "all"))
    assert preset_fits("msrvtt", "ViT-B-32") and not preset_fits("msrvtt_vitl", "ViT-B-16")


def test_long_preset_names_keep_the_columns_aligned() -> None:
    rows = method_report("mv_adapter", "ViT-B-16", "msrvtt_paper")
    rows.append({**rows[0], "preset": "a_preset_name_longer_than_twenty_characters"})
    lines = format_report(rows).splitlines()
    header, table = lines[0], lines[2:4]
    col = header.index("trainable") + len("trainable")  # right-aligned numbers end under the header
    assert all(line[col - 1].isdigit() and line[col] == " " for line in table)
