"""Pocket pretraining: the stand-in for CLIP's image-text pretraining (POCKET.md step 1).

A tiny CLIP learns colours, shapes, sizes and positions contrastively from the pocket world's static
image-caption set. It is trained ONCE with the default recipe and the result ships inside the package as
``backbone/weights/pocket-small.safetensors`` (the pretrained name ``pocket-small``); this module is how that
file is regenerated (the exact command is in ``backbone/weights/README.md``)::

    vidret pretrain --out src/vidret/backbone/weights/pocket-small.safetensors

The default recipe (1,200 steps of 128 pairs, 60 warmup steps, cosine, AdamW lr 1e-3) was chosen from a study
of this world: 400 steps stop at 38% held-out R@1 with the loss still falling; 1,200 reach the high 80s.

Output formats, by the file name: ``.safetensors`` (vidret layout, architecture in the metadata, fp16 by
default) or ``.pt`` (a plain OpenAI-layout state dict, the format real CLIP checkpoints come in). Both are read
back by the normal loader (``vidret.load_backbone(path)``). The held-out recall written beside the checkpoint
(``<out>.json``) is measured on the weights AS SAVED (after the fp16 rounding).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from vidret.backbone.clip import CLIP, create_backbone, get_config
from vidret.backbone.convert import to_openai
from vidret.backbone.tokenizer import tokenize
from vidret.data.pocket import PocketConfig, generate_pocket_world, load_pretrain_set
from vidret.data.transforms import normalize
from vidret.errors import VidretError

log = logging.getLogger(__name__)

StoreDtype = Literal["fp16", "fp32"]
HOLDOUT_IMAGES = 512  # the last images of the set: never trained on, for the held-out check


@dataclass(frozen=True)
class PretrainConfig:
    """Tiny-CLIP pretraining on the pocket image-caption set (defaults: the recipe of the shipped checkpoint)."""

    out: str  # output checkpoint: .safetensors (vidret layout + config metadata) or .pt (OpenAI layout)
    world: str = ""  # pocket world folder; "" = generate the pretraining images (only) in a temporary folder
    world_seed: int = 0  # seed of that generated pretraining set (ignored when world is given)
    pretrain_images: int = 20000  # size of that generated set (ignored when world is given)
    config: str = "pocket-small"  # backbone architecture
    steps: int = 1200  # optimiser steps (400 stopped at 38% held-out R@1, loss still falling)
    warmup: int = 60  # linear warmup steps, then cosine to 0
    batch: int = 128  # image-caption pairs per step
    lr: float = 1e-3  # AdamW peak lr (5e-3 stalls: held-out R@1 0.4% after 200 steps vs 34% at 1e-3)
    weight_decay: float = 0.1  # on tensors with 2+ dimensions
    max_words: int = 40  # caption tokens; the longest pretraining caption is 33 with SOT/EOT
    seed: int = 0  # model init and batch order
    store: StoreDtype = "fp16"  # dtype of the saved .safetensors (.pt files are saved in fp32)
    eval_every: int = 0  # log held-out R@1 every this many steps (0 = only at the end)

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch <= 1 or not self.lr > 0:
            raise VidretError("pretrain: steps and lr must be positive and batch > 1")
        if not 0 <= self.warmup < self.steps:
            raise VidretError(f"pretrain: warmup must be in [0, steps), got {self.warmup}")
        if self.store not in ("fp16", "fp32"):
            raise VidretError(f"pretrain: store must be fp16 or fp32, got {self.store!r}")
        if not self.out.endswith((".safetensors", ".pt")):
            raise VidretError(f"pretrain: the output {self.out!r} must end in .safetensors or .pt")
        if self.eval_every < 0 or self.max_words < 2 or self.pretrain_images < 0:
            raise VidretError("pretrain: eval_every and pretrain_images must be >= 0, max_words >= 2")


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warmup over ``cfg.warmup`` steps, then one cosine from the peak to 0 at ``cfg.steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))


def pretrain(cfg: PretrainConfig, progress: bool = True) -> Path:
    """Train the tiny CLIP and write it to ``cfg.out``; returns the path. Deterministic for a seed on CPU."""
    if cfg.world:
        return _pretrain(cfg, Path(cfg.world), progress)
    with tempfile.TemporaryDirectory(prefix="vidret-pocket-pretrain-") as tmp:
        world = PocketConfig(
            seed=cfg.world_seed,
            pretrain_images=cfg.pretrain_images,
            train_clips=0,
            val_clips=0,
            test_clips=0,
            probe_clips=0,
        )
        t0 = time.perf_counter()
        generate_pocket_world(tmp, world)
        log.info("generated %d pretraining images in %.1fs", cfg.pretrain_images, time.perf_counter() - t0)
        return _pretrain(cfg, Path(tmp), progress)


def _pretrain(cfg: PretrainConfig, world: Path, progress: bool) -> Path:
    data = load_pretrain_set(world)
    arch = get_config(cfg.config)
    if data.images.shape[1] != arch.vision.image_size:
        raise VidretError(
            f"pocket images are {data.images.shape[1]} px but {cfg.config} expects {arch.vision.image_size} px"
        )
    n_all = len(data.captions)
    n_holdout = min(HOLDOUT_IMAGES, n_all // 10)  # the last images: never trained on
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
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, desc="pretrain pocket CLIP", unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    order = torch.randperm(n, generator=gen)
    pos = 0
    curve: list[dict[str, float]] = []
    loss = torch.zeros(())
    for step in range(cfg.steps):
        if pos + cfg.batch > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + cfg.batch]
        pos += cfg.batch
        x = normalize(torch.from_numpy(images[idx.numpy()]))  # [B, 3, H, W]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
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
        if cfg.eval_every and n_holdout and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            rec = {"step": step + 1, "loss": float(loss.item()), "seconds": time.perf_counter() - t0}
            rec.update(_holdout_recall(model, images[n:], tokens[n:]))
            curve.append(rec)
            log.info(
                "step %d: held-out R@1 image->caption %.1f, caption->image %.1f", step + 1, rec["i2t_R1"], rec["t2i_R1"]
            )
            model.train()
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    log.info("pretrained %s for %d steps in %.1fs, final loss %.3f", cfg.config, cfg.steps, seconds, loss.item())
    out = Path(cfg.out)
    _save(model, out, cfg)
    # measured on the weights as stored (fp16 rounding included), read back by the normal loader
    from vidret.backbone.pretrained import load_backbone

    saved = load_backbone(out)
    holdout = _holdout_recall(saved, images[n:], tokens[n:]) if n_holdout else {}
    if n_holdout:
        curve.append({"step": cfg.steps, "loss": float(loss.item()), "seconds": seconds, **holdout})
    summary: dict[str, Any] = {
        "config": asdict(cfg),
        "final_loss": float(loss.item()),
        "seconds": seconds,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "pretrain_images": n_all,
        "holdout_images": n_holdout,
        "holdout": holdout,
        "curve": curve,
    }
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info(
        "held-out image->caption R@1 %.1f, caption->image R@1 %.1f (%d pairs)",
        holdout.get("i2t_R1", float("nan")),
        holdout.get("t2i_R1", float("nan")),
        n_holdout,
    )
    return out


def _save(model: CLIP, out: Path, cfg: PretrainConfig) -> None:
    """Write atomically: .safetensors in vidret layout with the architecture in its metadata, or an OpenAI .pt."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if out.suffix == ".pt":
        torch.save(to_openai(sd), tmp)
    else:
        from safetensors.torch import save_file

        dtype = torch.float16 if cfg.store == "fp16" else torch.float32
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        # ONE metadata key: safetensors writes several in a random order, and the file must be the same bytes on
        # every run (its sha256 is pinned in the pretrained table). The recipe goes to the .json beside it.
        save_file(tensors, str(tmp), metadata={"vidret_config": json.dumps(model.config.to_dict(), sort_keys=True)})
    os.replace(tmp, out)


@torch.no_grad()
def _holdout_recall(model: CLIP, images: np.ndarray, tokens: torch.Tensor) -> dict[str, float]:
    """Image<->caption R@1 on images never trained on.

    Two images may share a caption string word for word; image->caption then counts either copy as a hit (the
    text is literally the right caption), which the optimistic tie rule does.
    """
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
