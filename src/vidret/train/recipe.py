"""The recipe card: what ``vidret train CONFIG`` would run, shown without training.

    vidret recipe CONFIG [key=value ...] [--json]
    vidret train CONFIG [key=value ...] --dry-run

Steps per epoch and in total (when the training manifest exists), the lr factor along the run, the parameter
groups (tensors, parameters, lr, weight decay), frames / words / frame rule for training and evaluation,
precision, optimiser, schedule and clipping. The model is built on the ``meta`` device from the backbone's
architecture: the counts depend only on it, so no weights are downloaded or allocated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vidret.errors import VidretError
from vidret.train.config import TrainConfig

LR_POINTS = (0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)  # progress through the run
NOMINAL_STEPS = 1000  # schedule resolution when the manifest (and so the step count) is unknown


def backbone_architecture(spec: str) -> Any:  # -> CLIPConfig
    """The architecture of a backbone spec without downloading anything (a local checkpoint file is read)."""
    from vidret.backbone.clip import get_config, list_configs
    from vidret.backbone.pretrained import PRETRAINED, load_checkpoint

    if spec.startswith("random:"):
        return get_config(spec[len("random:") :])
    if spec in PRETRAINED:
        return get_config(PRETRAINED[spec].config)
    if spec in list_configs():
        return get_config(spec)
    path = Path(spec).expanduser()
    if path.exists():
        return load_checkpoint(path).config
    raise VidretError(
        f"backbone {spec!r} is neither a named backbone ({', '.join(list_configs())}) nor an existing file; "
        "pass backbone=NAME|PATH"
    )


def _param_groups(cfg: TrainConfig) -> list[dict[str, Any]]:
    from vidret.backbone.clip import CLIP
    from vidret.model import build_model
    from vidret.train.optim import param_groups

    arch = backbone_architecture(cfg.backbone)
    with torch.device("meta"):
        clip = CLIP(arch)
    model = build_model(clip, cfg.method, preset=cfg.preset, **dict(cfg.method_options))
    named = model.trainable_named_parameters()
    return [
        {
            "name": g["name"],
            "tensors": len(g["params"]),
            "params": sum(p.numel() for p in g["params"]),
            "lr": g["lr"],
            "weight_decay": g["weight_decay"],
        }
        for g in param_groups(named, cfg.optim)
    ]


def recipe_card(cfg: TrainConfig, config_path: str | None = None) -> dict[str, Any]:
    """The effective recipe of ``cfg`` as a JSON-ready dict (see the module docstring)."""
    from vidret.data.dataset import caption_items
    from vidret.data.manifest import read_manifest
    from vidret.train.loop import step_plan
    from vidret.train.optim import lr_factor

    d, o = cfg.data, cfg.optim
    manifest: dict[str, Any] = {"path": d.train_manifest, "found": False}
    steps: dict[str, Any] = {
        "epochs": cfg.epochs,
        "global_batch": cfg.global_batch,
        "grad_accum": cfg.grad_accum,
        "max_steps": cfg.max_steps,
        "per_epoch": None,
        "total": None,
    }
    if d.train_manifest and Path(d.train_manifest).is_file():
        entries = read_manifest(d.train_manifest)
        n_items = len(caption_items(entries, d.caption_mode))
        manifest.update(found=True, videos=len(entries), items_per_epoch=n_items)
        steps["per_epoch"], steps["total"] = step_plan(n_items, cfg)
    over = steps["total"] or NOMINAL_STEPS
    sampling = {"num_frames": d.num_frames, "fps": d.fps, "max_candidates": d.sampling("train").max_candidates}
    groups = _param_groups(cfg)
    return {
        "config": config_path,
        "backbone": cfg.backbone,
        "method": cfg.method,
        "preset": cfg.preset,
        "method_options": dict(cfg.method_options),
        "train_manifest": manifest,
        "steps": steps,
        "train": {
            **sampling,
            "frames": d.train_sampling,
            "max_words": d.max_words,
            "caption_mode": d.caption_mode,
            "image_size": d.image_size,
        },
        "eval": {
            **sampling,
            "frames": d.eval_sampling,
            "max_words": d.max_words,
            "protocol": d.test_protocol,
            "image_size": d.image_size,
            "manifest": d.test_manifest,
        },
        "precision": {"autocast": cfg.precision, "trainable_weights": "fp32"},
        "optimizer": {
            "name": o.name,
            "betas": list(o.betas),
            "eps": o.eps,
            "decay_rule": o.decay_rule,
            "global_grad_clip": o.grad_clip,
            "per_tensor_clip": o.per_tensor_clip,
        },
        "schedule": {
            "name": o.schedule,
            "warmup_ratio": o.warmup_ratio,
            "steps": over,
            "steps_known": steps["total"] is not None,
            "lr_factor": {str(x): lr_factor(round(x * over), over, o.warmup_ratio, o.schedule) for x in LR_POINTS},
        },
        "param_groups": groups,
        "trainable_params": sum(g["params"] for g in groups),
    }


def format_card(card: dict[str, Any]) -> str:
    """The card as aligned text lines."""
    st, m, tr, ev, op, sc = (card[k] for k in ("steps", "train_manifest", "train", "eval", "optimizer", "schedule"))
    lines = [f"recipe        {card['config'] or '(overrides only)'}"]
    preset = f" (preset {card['preset']})" if card["preset"] else ""
    opts = f", options {card['method_options']}" if card["method_options"] else ""
    lines.append(f"model         {card['method']}{preset} on {card['backbone']}{opts}")
    if m["found"]:
        lines.append(
            f"train data    {m['path']}: {m['videos']} videos -> {m['items_per_epoch']} items/epoch "
            f"({tr['caption_mode']})"
        )
        cap = f" (max_steps {st['max_steps']})" if st["max_steps"] else ""
        lines.append(
            f"steps         {st['per_epoch']}/epoch x {st['epochs']} epochs -> {st['total']} steps{cap}; "
            f"global batch {st['global_batch']}, {st['grad_accum']} accumulation step(s)"
        )
    else:
        lines.append(
            f"train data    {m['path'] or '(data.train_manifest not set)'}: MISSING, so steps per epoch are unknown "
            f"({tr['caption_mode']}; global batch {st['global_batch']}, {st['epochs']} epochs)"
        )
    frames = "{num_frames} frames ({frames}) of {fps:g} fps candidates (<= {max_candidates}), {max_words} words"
    lines.append(f"train frames  {frames.format(**tr)}, {tr['image_size']} px")
    lines.append(f"eval frames   {frames.format(**ev)}, protocol {ev['protocol']}")
    lines.append(f"precision     {card['precision']['autocast']} autocast, trainable weights fp32")
    lines.append(
        f"optimizer     {op['name']} betas {tuple(op['betas'])} eps {op['eps']:g}; global grad clip "
        f"{op['global_grad_clip']:g}, per-tensor clip {op['per_tensor_clip']:g}; decay rule {op['decay_rule']}"
    )
    over = f"{sc['steps']} steps" if sc["steps_known"] else f"a nominal {sc['steps']} steps"
    lines.append(f"schedule      {sc['name']}, warmup {sc['warmup_ratio']:g}; lr factor over {over}:")
    lines.append("              " + "  ".join(f"{x}: {f:.4f}" for x, f in sc["lr_factor"].items()))
    for i, g in enumerate(card["param_groups"]):
        head = "param groups  " if i == 0 else "              "
        lines.append(
            f"{head}{g['name']:9s} {g['tensors']:5d} tensors {g['params']:>12,d} params  lr {g['lr']:.3g}  "
            f"weight decay {g['weight_decay']:g}"
        )
    lines.append(f"trainable     {card['trainable_params']:,d} parameters")
    return "\n".join(lines)
