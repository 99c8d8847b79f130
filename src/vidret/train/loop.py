"""The training loop: plain PyTorch, readable top to bottom (DESIGN.md rule 14).

    vidret train CONFIG [key=value ...]          one process
    torchrun --nproc_per_node 8 -m vidret train CONFIG ...   DDP (NCCL on GPU, gloo on CPU)

Every rank sees the same deterministic order of videos for an epoch (seeded by (seed, epoch)); a global batch is
split into ``grad_accum`` micro-batches and each micro-batch across ranks. Features are all-gathered so the
contrastive loss sees the whole micro-batch's negatives; only rank 0 writes files. A checkpoint (trainable state,
optimiser, position in the epoch, RNG) is written atomically every ``checkpoint_every`` steps and at each epoch
end; ``resume=True`` continues from it and reaches the same result as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vidret.adapters.io import adapter_state_dict, load_trainable_state, save_adapter
from vidret.data.cache import FrameCache
from vidret.data.dataset import TrainVideoDataset
from vidret.data.decode import BadVideoReport
from vidret.data.manifest import read_manifest
from vidret.data.sampling import SamplingConfig
from vidret.errors import VidretError
from vidret.heads import VideoFeatures
from vidret.model import VideoTextModel, build_model
from vidret.train import distributed as D
from vidret.train.config import TrainConfig, save_config
from vidret.train.optim import build_optimizer, lr_factor, set_lr

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainResult:
    """What a finished run produced."""

    out_dir: Path
    steps: int
    final_loss: float
    train_seconds: float
    peak_memory_bytes: int
    adapter_dir: Path
    eval: dict[str, Any] = field(default_factory=dict)
    bad_videos: list[str] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_backbone_for(spec: str):  # -> CLIP
    """``random:<config>`` builds a random backbone (tests, benchmarks); anything else goes to load_backbone."""
    from vidret.backbone.clip import create_backbone
    from vidret.backbone.pretrained import load_backbone

    if spec.startswith("random:"):
        return create_backbone(spec[len("random:") :], seed=0)
    return load_backbone(spec)


def compile_towers(model: VideoTextModel) -> None:
    """``torch.compile`` the two towers in place (parameter names and checkpoints unchanged).

    ``torch.compile(model)`` would compile ``forward`` only, which training never calls: ``contrastive_step``
    goes through ``encode_text`` / ``encode_video``. Compiling each tower's module covers both.
    """
    model.clip.visual.compile()
    model.clip.text.compile()


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def epoch_batches(n_items: int, global_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's global batches (drop last): the same on every rank, a function of (seed, epoch) only."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n_items, generator=g).tolist()
    return [order[i * global_batch : (i + 1) * global_batch] for i in range(n_items // global_batch)]


def rank_micro_batches(batch: list[int], grad_accum: int, info: D.DistInfo) -> list[list[int]]:
    """Split one global batch into micro-batches, then keep this rank's contiguous share of each."""
    micro = len(batch) // grad_accum
    per_rank = micro // info.world_size
    out = []
    for a in range(grad_accum):
        chunk = batch[a * micro : (a + 1) * micro]
        out.append(chunk[info.rank * per_rank : (info.rank + 1) * per_rank])
    return out


def train_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack every sample, bad ones included (zero frames, ``valid`` False), so ranks gather equal shapes."""
    return {
        "frames": torch.stack([s["frames"] for s in samples]),  # [b, T, 3, S, S]
        "frame_mask": torch.stack([s["frame_mask"] for s in samples]),  # [b, T]
        "tokens": torch.stack([s["tokens"] for s in samples]),  # [b, L]
        "valid": torch.tensor([bool(s["valid"]) for s in samples]),  # [b]
        "bad_reasons": [(s["video_id"], s["path"], s["reason"]) for s in samples if not s["valid"]],
    }


def contrastive_step(
    model: VideoTextModel, batch: dict[str, Any], info: D.DistInfo, device: torch.device, precision: str
) -> Tensor:
    """Encode a local micro-batch, gather features over ranks, return the global symmetric InfoNCE loss."""
    frames = batch["frames"].to(device, non_blocking=True)
    mask = batch["frame_mask"].to(device, non_blocking=True)
    tokens = batch["tokens"].to(device, non_blocking=True)
    valid = batch["valid"].to(device, non_blocking=True)
    with autocast_for(device, precision):
        text = model.encode_text(tokens)  # [b, E]
        video = model.encode_video(frames, mask)  # [b, T, E]
    text_all = D.all_gather_with_grad(text.float(), info)  # [N, E]
    frames_all = D.all_gather_with_grad(video.frames.float(), info)  # [N, T, E]
    mask_all = D.all_gather_with_grad(mask, info)
    valid_all = D.all_gather_with_grad(valid, info)
    logits = model.similarity(text_all, VideoFeatures(frames_all, mask_all))  # [N, N]
    # Undecodable videos stay in the batch (so every rank gathers equal shapes) but leave the loss.
    return valid_symmetric_infonce(logits, valid_all)


def valid_symmetric_infonce(logits: Tensor, valid: Tensor) -> Tensor:
    """``symmetric_infonce(logits[valid][:, valid])`` without boolean indexing.

    Boolean indexing (forward ``index`` and its backward ``index_put``) sizes its output from the data, so on a
    GPU each of the four calls waits for the device; masking keeps the step free of host-device syncs. Invalid
    pairs leave both softmaxes (their logits are -inf) and both means (their rows are ignored); with every pair
    valid this is exactly ``symmetric_infonce(logits)``.
    """
    n = logits.shape[0]
    target = torch.arange(n, device=logits.device).masked_fill(~valid, -100)  # -100: F.cross_entropy's ignore
    lg = logits.float()
    t2v = F.cross_entropy(lg.masked_fill(~valid[None, :], float("-inf")), target, ignore_index=-100)
    v2t = F.cross_entropy(lg.t().masked_fill(~valid[None, :], float("-inf")), target, ignore_index=-100)
    return 0.5 * (t2v + v2t)


@dataclass
class _Checkpoint:
    step: int
    epoch: int
    step_in_epoch: int
    loss: float


def save_checkpoint(
    path: Path,
    model: VideoTextModel,
    opt: torch.optim.Optimizer,
    pos: _Checkpoint,
    cfg: TrainConfig,
    bad: list[list[str]],
) -> None:
    """Atomic: a kill during the write leaves the previous checkpoint intact."""
    state = {
        "trainable": adapter_state_dict(model),
        "optimizer": opt.state_dict(),
        "position": pos.__dict__,
        "config": cfg.to_dict(),
        "bad_videos": bad,
        "rng": {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        },
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(
    path: Path, model: VideoTextModel, opt: torch.optim.Optimizer, cfg: TrainConfig
) -> tuple[_Checkpoint, list[str]]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a damaged file is the user's to delete, with a clear message
        raise VidretError(f"cannot read checkpoint {path} ({e}); delete it to start over") from e
    saved = state["config"]
    for key in ("backbone", "method", "preset", "method_options", "global_batch", "grad_accum", "seed"):
        if saved.get(key) != cfg.to_dict().get(key):
            raise VidretError(
                f"checkpoint {path} was written with {key}={saved.get(key)!r} but the config says "
                f"{cfg.to_dict().get(key)!r}; resume with the same config or use another out_dir"
            )
    load_trainable_state(model, state["trainable"], source=str(path))
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    return _Checkpoint(**state["position"]), list(state.get("bad_videos", []))


class _MetricsLog:
    """JSON lines (and TensorBoard when installed) on rank 0."""

    def __init__(self, out_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"))
            except Exception:  # tensorboard is optional
                self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record.get("step", 0))


def _fault_injection_step() -> int:
    # Test hook: VIDRET_KILL_AFTER_STEP=N sends SIGKILL to this process after step N (a real, unclean kill).
    return int(os.environ.get("VIDRET_KILL_AFTER_STEP", "0"))


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train ``cfg.method`` on ``cfg.data.train_manifest``; returns where everything was written."""
    device = resolve_device(cfg.device)
    info = D.init_from_env(device.type)
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / CHECKPOINT
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not resume and ckpt_path.exists():
            raise VidretError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another out_dir")
        save_config(cfg, out_dir / "config.yaml")

    # --- data: read everything that can fail before building the model
    if not cfg.data.train_manifest:
        raise VidretError("data.train_manifest is not set")
    entries = read_manifest(cfg.data.train_manifest)
    sampling = SamplingConfig(num_frames=cfg.data.num_frames, fps=cfg.data.fps, mode="train")
    cache = FrameCache(cfg.data.cache_dir, sampling, cfg.data.image_size) if cfg.data.cache_dir else None
    dataset = TrainVideoDataset(
        entries,
        sampling,
        max_words=cfg.data.max_words,
        cache=cache,
        caption_mode=cfg.data.caption_mode,
        seed=cfg.seed,
        image_size=cfg.data.image_size,
    )
    micro_per_rank, rem = divmod(cfg.global_batch, cfg.grad_accum * info.world_size)
    if rem or micro_per_rank == 0:
        raise VidretError(
            f"global_batch {cfg.global_batch} must be divisible by grad_accum x world_size "
            f"({cfg.grad_accum} x {info.world_size})"
        )
    steps_per_epoch = len(dataset) // cfg.global_batch
    if steps_per_epoch == 0:
        raise VidretError(
            f"the training set has {len(dataset)} items, fewer than one global batch ({cfg.global_batch})"
        )
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)

    # --- model: identical initialisation on every rank (same seed), trainables in fp32
    seed_everything(cfg.seed)
    clip = load_backbone_for(cfg.backbone)
    model = build_model(clip, cfg.method, preset=cfg.preset, **dict(cfg.method_options))
    clip.set_grad_checkpointing(cfg.grad_checkpointing)
    model.set_frozen_prefix(cfg.frozen_prefix_no_grad)
    model.to(device)
    named = model.trainable_named_parameters()
    params = [p for _, p in named]
    head_params = {id(p) for p in model.head.parameters()}
    opt = build_optimizer(named, cfg.optim)
    if cfg.compile:
        compile_towers(model)

    pos = _Checkpoint(step=0, epoch=0, step_in_epoch=0, loss=float("nan"))
    bad = BadVideoReport(total=len(entries))
    if resume and ckpt_path.exists():
        pos, bad_items = load_checkpoint(ckpt_path, model, opt, cfg)
        bad.items = [tuple(x) for x in bad_items]  # type: ignore[misc]
        log.info(
            "resumed from %s at step %d (epoch %d, step %d in epoch)", ckpt_path, pos.step, pos.epoch, pos.step_in_epoch
        )
    metrics = _MetricsLog(out_dir, info.is_main)
    if info.is_main:
        log.info(
            "global batch %d = %d ranks x %d micro-batch x %d accumulation; %d steps/epoch, %d steps",
            cfg.global_batch,
            info.world_size,
            micro_per_rank,
            cfg.grad_accum,
            steps_per_epoch,
            total_steps,
        )

    bar = None
    if progress and info.is_main:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=pos.step, desc=f"train {cfg.method}", unit="step", dynamic_ncols=True)
    kill_after = _fault_injection_step()
    t_start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    step = pos.step
    last_loss = pos.loss
    clips_seen = 0
    for epoch in range(pos.epoch, cfg.epochs):
        if step >= total_steps:
            break
        dataset.set_epoch(epoch)
        batches = epoch_batches(len(dataset), cfg.global_batch, cfg.seed, epoch)
        first = pos.step_in_epoch if epoch == pos.epoch else 0
        micro_lists = [m for b in batches[first:] for m in rank_micro_batches(b, cfg.grad_accum, info)]
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=micro_lists,
            collate_fn=train_collate,
            num_workers=cfg.data.num_workers,
            persistent_workers=False,
            pin_memory=device.type == "cuda",
        )
        it: Iterator[dict[str, Any]] = iter(loader)
        for step_in_epoch in range(first, steps_per_epoch):
            if step >= total_steps:
                break
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            for _ in range(cfg.grad_accum):
                batch = next(it)
                bad.update(batch)
                loss = contrastive_step(model, batch, info, device, cfg.precision)
                (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach() / cfg.grad_accum
                clips_seen += int(batch["frames"].shape[0]) * info.world_size
            D.all_reduce_grads(params, info)
            if info.enabled:
                # The head runs on gathered features on every rank: each rank already holds its full gradient.
                for p in params:
                    if id(p) in head_params and p.grad is not None:
                        p.grad.div_(info.world_size)
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            factor = lr_factor(step, total_steps, cfg.optim.warmup_ratio)
            set_lr(opt, factor)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bad.check(cfg.data.max_bad_fraction)  # stop early, with the list, when too much is undecodable

            if step % cfg.log_every == 0 or step == total_steps:
                last_loss = float(loss_sum.item())  # the only host sync, once per log interval
                dt = time.perf_counter() - t0
                rec = {
                    "step": step,
                    "epoch": epoch,
                    "loss": last_loss,
                    "lr": opt.param_groups[0]["lr"],
                    "clips_per_s": cfg.global_batch / max(dt, 1e-9),
                    "elapsed_s": time.perf_counter() - t_start,
                }
                metrics.write(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{rec['lr']:.2e}", clips_s=f"{rec['clips_per_s']:.1f}")
            if bar is not None:
                bar.update(1)
            at_epoch_end = step_in_epoch + 1 == steps_per_epoch
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or at_epoch_end or step == total_steps:
                nxt = _Checkpoint(
                    step,
                    epoch + 1 if at_epoch_end else epoch,
                    0 if at_epoch_end else step_in_epoch + 1,
                    float(loss_sum.item()),
                )
                if info.is_main:
                    save_checkpoint(ckpt_path, model, opt, nxt, cfg, [list(x) for x in bad.items])
                D.barrier(info)
            if kill_after and step == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        del it, loader
    if bar is not None:
        bar.close()
    D.check_in_sync(params, info)
    train_seconds = time.perf_counter() - t_start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_rss()

    result = TrainResult(
        out_dir,
        step,
        last_loss,
        train_seconds,
        peak,
        out_dir / "adapter",
        bad_videos=sorted(v for v, _, _ in bad.items),
    )
    if info.is_main:
        save_adapter(
            model,
            out_dir / "adapter",
            extra={
                "backbone_source": cfg.backbone,
                "train": {
                    "steps": step,
                    "seed": cfg.seed,
                    "world_size": info.world_size,
                    "global_batch": cfg.global_batch,
                },
            },
        )
        (out_dir / "bad_videos.json").write_text(json.dumps(bad.to_dict(), indent=1))
    if cfg.data.test_manifest and info.is_main:
        from vidret.eval.evaluate import evaluate_model

        model.eval()
        result.eval = evaluate_model(
            model,
            cfg.data.test_manifest,
            cfg.data,
            device=device,
            precision=cfg.precision,
            batch_size=cfg.eval_batch,
            extra={"seed": cfg.seed, "world_size": info.world_size, "global_batch": cfg.global_batch},
        )
        (out_dir / "results.json").write_text(json.dumps(result.eval, indent=2))
    D.barrier(info)
    return result


def _peak_rss() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
