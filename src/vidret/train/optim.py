"""Optimiser and schedule: AdamW param groups from the model's declared trainables, warmup + cosine."""

from __future__ import annotations

import math

import torch
from torch import nn

from vidret.train.config import OptimConfig


def param_groups(named: list[tuple[str, nn.Parameter]], cfg: OptimConfig) -> list[dict]:
    """Adapter matrices (decayed), adapter vectors (biases, norms, tokens: no decay) and backbone tensors.

    Backbone tensors a method trains (names starting "backbone.") get their own lr and weight decay,
    as in the released MV-Adapter code.
    """
    decay, no_decay, backbone = [], [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        if name.startswith("backbone."):
            backbone.append(p)
        elif p.ndim < 2:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "lr": cfg.lr},
        {
            "name": "backbone",
            "params": backbone,
            "weight_decay": cfg.backbone_weight_decay,
            "lr": cfg.backbone_lr if cfg.backbone_lr is not None else cfg.lr,
        },
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(named: list[tuple[str, nn.Parameter]], cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(named, cfg)
    if not groups:
        raise ValueError("nothing to train: the method declares no trainable parameters")
    for g in groups:
        g["initial_lr"] = g["lr"]
    # The fused kernel is several times faster on CPU and GPU alike; identical update rule.
    return torch.optim.AdamW(groups, betas=cfg.betas, eps=cfg.eps, fused=True)


def lr_factor(step: int, total_steps: int, warmup_ratio: float) -> float:
    """Linear warmup over the first ``warmup_ratio`` of steps, then cosine decay to 0."""
    warmup = int(total_steps * warmup_ratio)
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(opt: torch.optim.Optimizer, factor: float) -> None:
    for g in opt.param_groups:
        g["lr"] = g["initial_lr"] * factor
