"""Pocket pretraining: the stand-in for CLIP's image-text pretraining (POCKET.md step 1).

A tiny CLIP learns colours, shapes, sizes and positions contrastively from the pocket world's static
image-caption set. The result is saved as a plain OpenAI-layout state dict (``.pt``), the format real CLIP
checkpoints come in, and is read back by the normal loader (``vidret.load_backbone(path)``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vidret.backbone.clip import CLIP, create_backbone, get_config
from vidret.backbone.convert import to_openai
from vidret.backbone.tokenizer import tokenize
from vidret.data.pocket import load_pretrain_set
from vidret.data.transforms import normalize
from vidret.errors import VidretError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainConfig:
    """Tiny-CLIP pretraining on the pocket image-caption set."""

    world: str  # pocket world folder
    out: str  # output checkpoint path (.pt, OpenAI layout)
    config: str = "pocket-small"  # backbone architecture
    steps: int = 400  # optimiser steps
    batch: int = 128  # image-caption pairs per step
    lr: float = 1e-3  # AdamW peak lr (5e-3 stalls: held-out R@1 0.4% after 200 steps vs 34% at 1e-3)
    weight_decay: float = 0.1
    warmup_ratio: float = 0.05
    max_words: int = 32  # caption tokens (the positional embedding keeps CLIP's 77 rows)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch <= 1 or self.lr <= 0:
            raise ValueError("steps and lr must be positive and batch > 1")


def pretrain(cfg: PretrainConfig, progress: bool = True) -> Path:
    """Train the tiny CLIP and write it to ``cfg.out``; returns the path. Deterministic for a seed on CPU."""
    data = load_pretrain_set(cfg.world)
    arch = get_config(cfg.config)
    if data.images.shape[1] != arch.vision.image_size:
        raise VidretError(
            f"pocket images are {data.images.shape[1]} px but {cfg.config} expects {arch.vision.image_size} px"
        )
    n_all = len(data.captions)
    n_holdout = min(512, n_all // 10)  # the last images: never trained on, for a zero-shot check at the end
    n = n_all - n_holdout
    if n < cfg.batch:
        raise VidretError(f"the pretraining set has {n} images, fewer than one batch ({cfg.batch})")
    tokens = tokenize(data.captions, context_length=cfg.max_words)  # [N, L], tokenised once
    images = np.asarray(data.images)  # [N, H, W, 3] uint8

    torch.manual_seed(cfg.seed)
    model = create_backbone(arch, seed=cfg.seed)
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    warmup = max(1, int(cfg.steps * cfg.warmup_ratio))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, desc="pretrain pocket CLIP", unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    order = torch.randperm(n, generator=gen)
    pos = 0
    for step in range(cfg.steps):
        if pos + cfg.batch > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + cfg.batch]
        pos += cfg.batch
        x = normalize(torch.from_numpy(images[idx.numpy()]))  # [B, 3, H, W]
        lr = cfg.lr * (
            (step + 1) / warmup
            if step < warmup
            else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, cfg.steps - warmup)))
        )
        for g in opt.param_groups:
            g["lr"] = lr
        img = F.normalize(model.encode_image(x), dim=-1)
        txt = F.normalize(model.encode_text(tokens[idx]), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.t()
        target = torch.arange(len(idx))
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    if bar is not None:
        bar.close()
    log.info(
        "pretrained %s for %d steps in %.1fs, final loss %.3f",
        cfg.config,
        cfg.steps,
        time.perf_counter() - t0,
        float(loss.item()),
    )
    holdout = _holdout_recall(model, images[n:], tokens[n:]) if n_holdout else {}
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(to_openai(sd), tmp)
    os.replace(tmp, out)
    summary = {
        "config": cfg.__dict__,
        "final_loss": float(loss.item()),
        "seconds": time.perf_counter() - t0,
        "holdout_images": n_holdout,
        "holdout": holdout,
    }
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    log.info(
        "held-out image->caption R@1 %.1f, caption->image R@1 %.1f (%d pairs)",
        holdout.get("i2t_R1", float("nan")),
        holdout.get("t2i_R1", float("nan")),
        n_holdout,
    )
    return out


@torch.no_grad()
def _holdout_recall(model: CLIP, images: np.ndarray, tokens: torch.Tensor) -> dict[str, float]:
    """Image<->caption R@1 on images never trained on (captions may repeat across images: ties are optimistic)."""
    from vidret.eval.metrics import retrieval_metrics

    model.eval()
    img = torch.cat(
        [
            F.normalize(model.encode_image(normalize(torch.from_numpy(np.array(images[i : i + 256])))), dim=-1)
            for i in range(0, len(images), 256)
        ]
    )
    txt = torch.cat([F.normalize(model.encode_text(tokens[i : i + 256]), dim=-1) for i in range(0, len(tokens), 256)])
    sim = img @ txt.t()
    return {"i2t_R1": retrieval_metrics(sim)["R1"], "t2i_R1": retrieval_metrics(sim.t())["R1"]}
