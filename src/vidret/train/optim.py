"""Optimisers and schedules: parameter groups from the model's declared trainables, AdamW or BertAdam, two schedules.

Two recipes, each implemented once (docs/methods.md, "Recipes"):

- the project's own: ``torch.optim.AdamW`` (bias-corrected), linear warmup then a cosine restarted after it
  (``schedule="cosine"``), weight decay on tensors with two or more dimensions (``decay_rule="ndim"``);
- the official codes' (MV-Adapter ``optimizer/bert_adam.py`` + ``optimizer/build.py``; Cross-Modal Adapter and
  CLIP4Clip ``modules/optimization.py``): :class:`BertAdam` (no bias correction, decoupled decay added to the
  update before the lr multiplies it, optional per-tensor gradient clipping), ``warmup_cosine`` over the whole
  run (``schedule="bert_warmup_cosine"``), decay on every tensor whose name lacks "bias"
  (``decay_rule="mvadapter_names"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from vidret.errors import VidretError
from vidret.train.config import DecayRule, OptimConfig, Schedule


def decays(name: str, param: nn.Parameter, rule: DecayRule) -> bool:
    """Whether an adapter tensor is weight-decayed under ``rule``.

    "ndim": matrices and higher (biases, norms, tokens, factors excluded). "mvadapter_names": the official
    MV-Adapter (and Cross-Modal Adapter) rule, ``"bias" not in name``: LayerNorm weights, the CC token, the CMT
    factors and positional embeddings are decayed too.
    """
    if rule == "mvadapter_names":
        return "bias" not in name
    return param.ndim >= 2


def param_groups(named: list[tuple[str, nn.Parameter]], cfg: OptimConfig) -> list[dict]:
    """Adapter tensors ``decay_rule`` decays, the other adapter tensors (no decay), and backbone tensors.

    Backbone tensors a method trains (names starting "backbone.") get their own lr and weight decay whatever the
    rule, as in the released MV-Adapter code (its CLIP biases: lr 1e-7, decay 0.2).
    """
    decay, no_decay, backbone = [], [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        if name.startswith("backbone."):
            backbone.append(p)
        elif decays(name, p, cfg.decay_rule):
            decay.append(p)
        else:
            no_decay.append(p)
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


class BertAdam(torch.optim.Optimizer):
    """BertAdam as the official MV-Adapter / Cross-Modal Adapter / CLIP4Clip code runs it, schedule left outside.

    Per tensor p with gradient g, in order:
        if max_grad_norm > 0: clip_grad_norm_(p, max_grad_norm)      # this tensor's gradient alone
        m = b1 * m + (1 - b1) * g;  v = b2 * v + (1 - b2) * g^2       # no bias correction
        update = m / (sqrt(v) + eps)
        if weight_decay > 0: update += weight_decay * p               # decoupled, before the lr
        p -= lr * update                                              # lr = the group's scheduled lr
    The official class multiplies ``lr`` by its schedule inside ``step``; here ``set_lr`` sets the group's lr
    from :func:`lr_factor` before each step, which is the same product. State: ``exp_avg`` (m), ``exp_avg_sq`` (v).
    """

    def __init__(
        self,
        params: list[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        max_grad_norm: float = 0.0,
    ) -> None:
        if lr < 0 or eps < 0 or max_grad_norm < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid BertAdam settings: lr={lr}, betas={betas}, eps={eps}, max={max_grad_norm}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "max_grad_norm": max_grad_norm}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("BertAdam does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["max_grad_norm"] > 0:
                    torch.nn.utils.clip_grad_norm_(p, group["max_grad_norm"])
                grad = p.grad
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                update = m / (v.sqrt() + group["eps"])
                if group["weight_decay"] > 0.0:
                    update += group["weight_decay"] * p
                p.add_(-(group["lr"] * update))
        return loss


def build_optimizer(named: list[tuple[str, nn.Parameter]], cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(named, cfg)
    if not groups:
        raise VidretError(
            "nothing to train: the method declares no trainable parameters (frozen is zero-shot: save its adapter "
            "with vidret.save_adapter(vidret.build_model(clip, 'frozen'), DIR), then vidret eval --adapter DIR)"
        )
    for g in groups:
        g["initial_lr"] = g["lr"]
    if cfg.name == "bert_adam":
        return BertAdam(groups, betas=cfg.betas, eps=cfg.eps, max_grad_norm=cfg.per_tensor_clip)
    # The fused kernel is several times faster on CPU and GPU alike; identical update rule.
    return torch.optim.AdamW(groups, betas=cfg.betas, eps=cfg.eps, fused=True)


def lr_factor(step: int, total_steps: int, warmup_ratio: float, schedule: Schedule = "cosine") -> float:
    """The lr multiplier for optimiser step ``step`` (0-based: the number of steps already taken) of ``total_steps``.

    "cosine" (the project's): linear warmup to 1 over the first ``int(total_steps * warmup_ratio)`` steps, then a
    cosine from 1 to 0 over the remaining steps (restarted after warmup).
    "bert_warmup_cosine" (official ``warmup_cosine``): with x = step / total_steps and w = warmup_ratio,
    x / w for x < w, else 0.5 * (1 + cos(pi * x)): one cosine over the whole run, so the factor jumps from
    about 1 to 0.5 * (1 + cos(pi * w)) at x = w, and the first step has factor 0.
    """
    if schedule == "bert_warmup_cosine":
        x = step / max(1, total_steps)
        if x < warmup_ratio:
            return x / warmup_ratio
        return 0.5 * (1.0 + math.cos(math.pi * x))
    warmup = int(total_steps * warmup_ratio)
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(opt: torch.optim.Optimizer, factor: float) -> None:
    for g in opt.param_groups:
        g["lr"] = g["initial_lr"] * factor
