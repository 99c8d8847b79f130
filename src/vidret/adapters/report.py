"""`vidret adapters report`: a method's trainable parameters on a backbone, next to the papers' numbers.

Counts come from the project's own modules, built on the ``meta`` device (no memory, no weights), through
the same ``build_model`` + ``parameter_report`` path that training uses.
"""

from __future__ import annotations

from typing import Any

import torch

from vidret.adapters.base import get_method
from vidret.backbone.clip import CLIP, get_config

# (method, preset, backbone) -> what the paper reports, as text. Sources: ../shared/METHODS.md.
PAPER: dict[tuple[str, str, str], str] = {
    ("mv_adapter", "msrvtt_paper", "ViT-B-16"): "2.39% (MV-Adapter, MSR-VTT)",
    ("mv_adapter", "msvd", "ViT-B-16"): "2.39% (MV-Adapter, MSVD)",
    ("mv_adapter", "lsmdc", "ViT-B-16"): "2.42% (MV-Adapter, LSMDC)",
    ("mv_adapter", "didemo_paper", "ViT-B-16"): "2.42% (MV-Adapter, DiDeMo)",
    ("mv_adapter", "activitynet_paper", "ViT-B-16"): "2.40% (MV-Adapter, ActivityNet)",
    ("cross_modal", "msrvtt", "ViT-B-32"): "0.52M, 0.34% (Cross-Modal Adapter, MSR-VTT)",
    ("cross_modal", "msvd", "ViT-B-32"): "1.00M (Cross-Modal Adapter, MSVD)",
    ("cross_modal", "didemo", "ViT-B-32"): "0.52M (Cross-Modal Adapter, DiDeMo)",
    ("cross_modal", "vatex", "ViT-B-32"): "0.99M (Cross-Modal Adapter, VATEX)",
    ("cross_modal", "activitynet", "ViT-B-32"): "0.81M (Cross-Modal Adapter, ActivityNet)",
    ("bottleneck", "mvadapter_table", "ViT-B-16"): "2.78% (MV-Adapter's bottleneck baseline)",
    ("convpass", "mvadapter_table", "ViT-B-16"): "2.80% (MV-Adapter's Convpass baseline)",
    ("st_adapter", "mvadapter_table", "ViT-B-16"): "5.93% (MV-Adapter's ST-Adapter baseline)",
}


def _meta_backbone(backbone: str) -> CLIP:
    with torch.device("meta"):
        return CLIP(get_config(backbone))


def preset_fits(preset: str, backbone: str) -> bool:
    """Whether a preset is sized for ``backbone``'s family: ``*_vitl`` for ViT-L, ``pocket*`` for the pocket CLIPs."""
    family = "vitl" if backbone.startswith("ViT-L") else "pocket" if backbone.startswith("pocket") else "vitb"
    named = "vitl" if preset.endswith("_vitl") else "pocket" if preset.startswith("pocket") else "vitb"
    return family == named


def method_report(method: str, backbone: str = "ViT-B-16", preset: str | None = None, **overrides: Any) -> list[dict]:
    """One row per preset (``preset="all"`` for every preset): counts, share, file size, the paper's figure."""
    from vidret.model import build_model, parameter_report

    spec = get_method(method)
    if preset == "all":
        presets: list[str | None] = [p for p in sorted(spec.presets) if preset_fits(p, backbone)]
    else:
        presets = [preset]
    rows = []
    for p in presets:
        with torch.device("meta"):  # the adapter modules too: counting must not allocate a ViT-L's adapters
            model = build_model(_meta_backbone(backbone), method, preset=p, **overrides)
        rep = parameter_report(model)
        rows.append(
            {
                "method": method,
                "preset": p,
                "backbone": backbone,
                "trainable": rep["trainable"],
                "adapter_modules": rep["adapter_modules"],
                "backbone_trained": rep["backbone_trained"],
                "backbone_params": rep["backbone"],
                "percent": rep["percent"],
                "mb_fp32": rep["bytes_fp32"] / 1e6,
                "mb_fp16": rep["bytes_fp16"] / 1e6,
                "paper": PAPER.get((method, p or "", backbone), ""),
                "config": model.config.to_dict(),
            }
        )
    return rows


def format_report(rows: list[dict]) -> str:
    """A plain-text table of ``method_report`` rows, with the method's reference note."""
    w = max([20, *(len(str(r["preset"])) + 1 for r in rows)])  # long preset names must not shift the columns
    b = max([9, *(len(r["backbone"]) for r in rows)])
    head = (
        f"{'preset':{w}s} {'backbone':{b}s} {'trainable':>11s} {'(adapter':>10s} {'+backbone)':>11s} {'share %':>8s} "
        f"{'fp32 MB':>8s}  paper"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{str(r['preset']):{w}s} {r['backbone']:{b}s} {r['trainable']:>11,d} {r['adapter_modules']:>10,d} "
            f"{r['backbone_trained']:>11,d} {r['percent']:>8.3f} {r['mb_fp32']:>8.2f}  {r['paper']}"
        )
    if rows:
        spec = get_method(rows[0]["method"])
        lines.append("")
        lines.append(f"share = trainable / backbone parameters ({rows[0]['backbone_params']:,}).")
        if spec.reference:
            lines.append(f"reference: {spec.reference}")
    return "\n".join(lines)
