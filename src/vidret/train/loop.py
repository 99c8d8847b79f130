"""The training loop: plain PyTorch, readable top to bottom (DESIGN.md rule 14).

    vidret train CONFIG [key=value ...]          one process
    torchrun --nproc_per_node 8 -m vidret train CONFIG ...   DDP (NCCL on GPU, gloo on CPU)

Every rank sees the same deterministic order of videos for an epoch (seeded by (seed, epoch)); a global batch is
split into ``grad_accum`` micro-batches and each micro-batch across ranks. Features are all-gathered so the
contrastive loss sees the whole micro-batch's negatives; only rank 0 writes files. A checkpoint (trainable state,
optimiser, position in the epoch, RNG; data only: safetensors + a JSON manifest) is written atomically every
``checkpoint_every`` steps and at each epoch end; ``resume=True`` continues from it and reaches the same result as an
uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from vidret import atomic
from vidret.adapters.io import adapter_state_dict, load_trainable_state, save_adapter
from vidret.data.cache import FrameCache
from vidret.data.dataset import TrainVideoDataset
from vidret.data.decode import BadVideoReport
from vidret.data.manifest import read_manifest
from vidret.errors import VidretError
from vidret.heads import VideoFeatures
from vidret.model import VideoTextModel, build_model
from vidret.procs import dataloader_worker_init
from vidret.train import distributed as D
from vidret.train.config import TrainConfig, save_config
from vidret.train.optim import BertAdam, build_optimizer, lr_factor, set_lr

log = logging.getLogger(__name__)


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
    try:
        return load_backbone(spec)
    except VidretError as e:
        # the download hint names the --backbone flag of eval/index/search/serve; train takes backbone=PATH
        if "--backbone /" not in str(e):
            raise
        raise VidretError(str(e).replace("--backbone /", "backbone=/")) from e


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


def step_plan(n_items: int, cfg: TrainConfig) -> tuple[int, int]:
    """(optimiser steps per epoch, total steps) for ``n_items`` training items: last partial batch dropped,
    ``max_steps`` caps the total (the schedule then spans the capped run)."""
    steps_per_epoch = n_items // cfg.global_batch
    total = steps_per_epoch * cfg.epochs
    return steps_per_epoch, min(total, cfg.max_steps) if cfg.max_steps else total


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


# A training checkpoint is data only, by construction (a shared out_dir may come from anyone):
#   checkpoint-<sha256[:12]>.safetensors   every tensor: "trainable.<name>", "optimizer.<param index>.<key>",
#                                          "rng.torch"
#   checkpoint.json                        everything else (position, config, bad videos, optimiser param groups
#                                          and scalar state, numpy / python RNG state) and the data file's sha256
# The manifest is replaced last (vidret.atomic), so a kill at any point leaves a loadable checkpoint.
CHECKPOINT = "checkpoint.json"
CHECKPOINT_STEM = "checkpoint"
LEGACY_CHECKPOINT = "checkpoint.pt"  # pickled, by earlier versions; never read (unpickling can run code)
CHECKPOINT_FORMAT = "vidret-train-checkpoint"
CHECKPOINT_VERSION = 1
_DATA_NAME = re.compile(rf"{CHECKPOINT_STEM}-[0-9a-f]{{{atomic.HASH_CHARS}}}\.safetensors")
# what a resumed run must share with the checkpoint (dotted: nested keys): the model, the optimiser state's layout
# and the item order of an epoch
_CONFIG_KEYS = (
    "backbone",
    "method",
    "preset",
    "method_options",
    "global_batch",
    "grad_accum",
    "seed",
    "optim.name",
    "optim.decay_rule",
    "data.caption_mode",
)


def save_checkpoint(
    out_dir: Path,
    model: VideoTextModel,
    opt: torch.optim.Optimizer,
    pos: _Checkpoint,
    cfg: TrainConfig,
    bad: list[list[str]],
) -> None:
    """Write the checkpoint into ``out_dir``; a kill during the write leaves the previous one loadable."""
    opt_state = opt.state_dict()
    tensors = {f"trainable.{k}": v for k, v in adapter_state_dict(model).items()}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in opt_state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    payload = save_tensors(tensors)

    def write(f: IO[bytes]) -> None:
        f.write(payload)

    name, digest = atomic.write_content_named(out_dir, CHECKPOINT_STEM, ".safetensors", write)
    loss = pos.loss if math.isfinite(pos.loss) else None  # JSON has no NaN
    atomic.replace_json(
        out_dir / CHECKPOINT,
        {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "data": {"file": name, "sha256": digest},
            "position": {**pos.__dict__, "loss": loss},
            "config": cfg.to_dict(),
            "bad_videos": bad,
            "optimizer": {
                "param_groups": [
                    {k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in opt_state["param_groups"]
                ],
                "state": scalars,
            },
            "rng": {
                "numpy": [np_kind, np.asarray(np_keys).tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
                "python": [py_version, list(py_internal), py_gauss],
            },
        },
    )
    atomic.remove_unreferenced(out_dir, [CHECKPOINT_STEM], keep=[name])
    atomic.sweep_temporaries(out_dir)


def load_checkpoint(
    out_dir: Path, model: VideoTextModel, opt: torch.optim.Optimizer, cfg: TrainConfig
) -> tuple[_Checkpoint, list[str]]:
    """Restore model trainables, optimiser and RNG from ``out_dir``'s checkpoint; returns (position, bad videos).

    Raises:
        VidretError: the checkpoint is damaged or malformed, or was written with a different config.
    """
    path = out_dir / CHECKPOINT
    fix = f"delete {path} and the {CHECKPOINT_STEM}-*.safetensors beside it to start over"

    def bad_file(why: str) -> VidretError:
        return VidretError(f"cannot read checkpoint {path}: {why}; {fix}")

    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise bad_file(str(e)) from e
    try:
        _check_manifest(meta)
    except KeyError as e:
        raise bad_file(f"malformed manifest (no field {e})") from e
    except (TypeError, ValueError) as e:
        raise bad_file(f"malformed manifest ({e})") from e
    if meta["format"] != CHECKPOINT_FORMAT or meta["version"] != CHECKPOINT_VERSION:
        raise bad_file(f"unsupported format {meta['format']!r} version {meta['version']!r}")
    saved = meta["config"]
    current = json.loads(json.dumps(cfg.to_dict()))  # compare as the manifest stores it (tuples are lists)
    defaults = json.loads(json.dumps(TrainConfig().to_dict()))  # a key older checkpoints lack meant its default
    for key in _CONFIG_KEYS:
        was, now = _dotted(saved, key, _dotted(defaults, key)), _dotted(current, key)
        if was != now:
            raise VidretError(
                f"checkpoint {path} was written with {key}={was!r} but the config says "
                f"{now!r}; resume with the same config or use another out_dir"
            )
    data = out_dir / meta["data"]["file"]
    try:
        digest = atomic.sha256_file(data)
    except OSError as e:
        raise bad_file(f"its data file cannot be read ({e})") from e
    if digest != meta["data"]["sha256"]:
        raise bad_file(f"{data.name} does not match its sha256 (damaged or replaced)")
    try:
        tensors = load_tensors(str(data))  # safetensors: data only, whatever the file holds
    except Exception as e:  # safetensors raises its own error types for a malformed file
        raise bad_file(f"{data.name} is not a valid safetensors file ({e})") from e

    trainable = {k[len("trainable.") :]: v for k, v in tensors.items() if k.startswith("trainable.")}
    load_trainable_state(model, trainable, source=f"checkpoint {path}")
    try:
        opt.load_state_dict(_optimizer_state(opt, meta["optimizer"], tensors))
    except (KeyError, TypeError, ValueError) as e:
        raise bad_file(f"its optimiser state does not fit this run ({e})") from e
    try:
        torch.set_rng_state(tensors["rng.torch"])
        np_kind, np_keys, np_pos, np_has_gauss, np_gauss = meta["rng"]["numpy"]
        np.random.set_state((np_kind, np.asarray(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_gauss))
        py_version, py_internal, py_gauss = meta["rng"]["python"]
        random.setstate((py_version, tuple(py_internal), py_gauss))
    except (KeyError, TypeError, ValueError, IndexError, OverflowError, RuntimeError) as e:
        raise bad_file(f"invalid RNG state ({e})") from e
    p = meta["position"]
    loss = float("nan") if p["loss"] is None else float(p["loss"])
    return _Checkpoint(p["step"], p["epoch"], p["step_in_epoch"], loss), list(meta["bad_videos"])


def _dotted(d: Any, key: str, missing: Any = None) -> Any:
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return missing
        d = d[part]
    return d


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(what)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_manifest(meta: Any) -> None:
    """Types of every field ``load_checkpoint`` uses (ValueError/KeyError/TypeError name the first bad one)."""
    _expect(isinstance(meta, dict), f"a JSON object expected, got {type(meta).__name__}")
    _expect(isinstance(meta["format"], str) and _is_int(meta["version"]), "format / version")
    data = meta["data"]
    _expect(
        isinstance(data, dict) and isinstance(data["file"], str) and _DATA_NAME.fullmatch(data["file"]) is not None,
        f"data.file must name a {CHECKPOINT_STEM}-<hash>.safetensors file in the run folder",
    )
    _expect(isinstance(data["sha256"], str), "data.sha256")
    pos = meta["position"]
    _expect(isinstance(pos, dict) and set(pos) == {"step", "epoch", "step_in_epoch", "loss"}, "position keys")
    _expect(all(_is_int(pos[k]) and pos[k] >= 0 for k in ("step", "epoch", "step_in_epoch")), "position values")
    _expect(pos["loss"] is None or _is_number(pos["loss"]), "position.loss")
    _expect(isinstance(meta["config"], dict), "config")
    bad = meta["bad_videos"]
    _expect(
        isinstance(bad, list)
        and all(isinstance(b, list) and len(b) == 3 and all(isinstance(x, str) for x in b) for b in bad),
        "bad_videos must be [video_id, path, reason] lists",
    )
    o = meta["optimizer"]
    _expect(isinstance(o, dict) and isinstance(o["param_groups"], list) and isinstance(o["state"], dict), "optimizer")
    _expect(all(isinstance(g, dict) for g in o["param_groups"]), "optimizer.param_groups")
    rng = meta["rng"]
    _expect(isinstance(rng, dict) and isinstance(rng["numpy"], list) and len(rng["numpy"]) == 5, "rng.numpy")
    _expect(isinstance(rng["python"], list) and len(rng["python"]) == 3, "rng.python")
    version, internal, gauss = rng["python"]
    _expect(_is_int(version) and (gauss is None or _is_number(gauss)), "rng.python")
    _expect(isinstance(internal, list) and all(_is_int(x) for x in internal), "rng.python state")
    kind, keys, *rest = rng["numpy"]
    _expect(isinstance(kind, str) and all(_is_number(x) for x in rest), "rng.numpy")
    _expect(isinstance(keys, list) and all(_is_int(x) and 0 <= x < 2**32 for x in keys), "rng.numpy keys")


def _optimizer_state(opt: torch.optim.Optimizer, saved: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Any]:
    """Rebuild ``opt.state_dict()`` from the manifest's groups and scalar state and the data file's tensors.

    Checked against ``opt`` itself (group sizes, value types, per-parameter tensor shapes) so that a crafted
    checkpoint fails here, not as a traceback inside ``opt.step()``.
    """
    groups = opt.param_groups
    params = [p for g in groups for p in g["params"]]
    _expect(
        len(saved["param_groups"]) == len(groups),
        f"{len(saved['param_groups'])} parameter groups, expected {len(groups)}",
    )
    param_groups = []
    for i, (g_saved, g_now) in enumerate(zip(saved["param_groups"], groups)):
        ids = g_saved["params"]
        _expect(isinstance(ids, list) and len(ids) == len(g_now["params"]), f"group {i}: parameter count")
        _expect(all(_is_int(x) and 0 <= x < len(params) for x in ids), f"group {i}: parameter indices")
        g: dict[str, Any] = {"params": ids}
        for key, value in g_saved.items():
            if key == "params":
                continue
            now = g_now.get(key)
            if isinstance(now, tuple):  # e.g. betas: JSON stores a list
                _expect(isinstance(value, list) and len(value) == len(now) and all(map(_is_number, value)), key)
                value = tuple(value)
            elif isinstance(now, (bool, str)):
                _expect(value is None or type(value) is type(now), f"group {i}: {key}")
            elif _is_number(now):
                _expect(_is_number(value) and math.isfinite(value), f"group {i}: {key}")
            else:  # None (e.g. foreach) or a key this optimiser does not have: plain JSON scalars only
                _expect(now is None, f"group {i}: {key}")
                _expect(value is None or isinstance(value, (bool, int, float, str)), f"group {i}: {key}")
            g[key] = value
        param_groups.append(g)
    all_ids_in_order = [pid for g in param_groups for pid in g["params"]]
    _expect(sorted(all_ids_in_order) == list(range(len(params))), "parameter indices must number each parameter once")
    state: dict[int, dict[str, Any]] = {}
    for idx, values in saved["state"].items():
        _expect(isinstance(values, dict), "optimizer.state")
        _expect(all(v is None or isinstance(v, (bool, int, float)) for v in values.values()), "optimizer.state")
        state.setdefault(int(idx), {}).update(values)
    for name, t in tensors.items():
        if name.startswith("optimizer."):
            idx, key = name[len("optimizer.") :].split(".", 1)
            state.setdefault(int(idx), {})[key] = t
    group_of = {pid: gi for gi, g in enumerate(param_groups) for pid in g["params"]}
    param_of = dict(zip(all_ids_in_order, params))  # how load_state_dict pairs saved indices with parameters
    for idx, per_param in state.items():
        _expect(idx in group_of, f"state of parameter {idx}: no such parameter")
        required: set[str] = set()
        if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):  # what AdamW.step() reads without checking
            required = {"step", "exp_avg", "exp_avg_sq"} | (
                {"max_exp_avg_sq"} if groups[group_of[idx]].get("amsgrad") else set()
            )
        elif isinstance(opt, BertAdam):
            required = {"exp_avg", "exp_avg_sq"}
        _expect(required <= set(per_param), f"state of parameter {idx}: missing {sorted(required - set(per_param))}")
        for key, t in per_param.items():
            if not isinstance(t, Tensor):
                continue
            shape = () if key == "step" else tuple(param_of[idx].shape)
            _expect(
                tuple(t.shape) == shape,
                f"state {key!r} of parameter {idx} has shape {tuple(t.shape)}, expected {shape}",
            )
    return {"state": state, "param_groups": param_groups}


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
    """Train ``cfg.method`` on ``cfg.data.train_manifest``; returns where everything was written.

    ``out_dir`` is created only once the inputs have been read and the model built; a run that still fails before
    its first checkpoint removes the folders it created (nothing there could be resumed), so no half-made run is
    left behind. A folder that existed before is never removed.
    """
    out_dir = Path(cfg.out_dir).absolute()
    created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]  # deepest first
    try:
        return _train(cfg, resume, progress)
    except BaseException:
        if created and int(os.environ.get("RANK", "0")) == 0 and not (out_dir / CHECKPOINT).exists():
            shutil.rmtree(out_dir, ignore_errors=True)
            for parent in created[1:]:  # empty parents this run made; another run's files stop the walk
                with contextlib.suppress(OSError):
                    parent.rmdir()
        raise


def _train(cfg: TrainConfig, resume: bool, progress: bool) -> TrainResult:
    device = resolve_device(cfg.device)
    info = D.init_from_env(device.type)
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / CHECKPOINT
    if info.is_main:
        if not resume and ckpt_path.exists():
            raise VidretError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another out_dir")
        if not resume and (out_dir / LEGACY_CHECKPOINT).exists():
            raise VidretError(
                f"{out_dir / LEGACY_CHECKPOINT} holds a run of an earlier vidret version: choose another out_dir, "
                "or delete that file to train into this one"
            )

    # --- data: read everything that can fail before building the model
    if not cfg.data.train_manifest:
        raise VidretError("data.train_manifest is not set")
    entries = read_manifest(cfg.data.train_manifest)
    sampling = cfg.data.sampling("train")
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
    steps_per_epoch, total_steps = step_plan(len(dataset), cfg)
    if steps_per_epoch == 0:
        raise VidretError(
            f"the training set has {len(dataset)} items, fewer than one global batch ({cfg.global_batch})"
        )

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
    # A method with nothing to train (frozen) is a zero-shot run: no step, but the same adapter folder and
    # evaluation as a trained run, so the papers' frozen rows come from the same command and configs.
    opt = build_optimizer(named, cfg.optim) if named else None
    if opt is None:
        total_steps = 0
        log.info("%s has no trainable parameters: a zero-shot run (0 steps), saved and evaluated", cfg.method)
    if cfg.compile:
        compile_towers(model)

    pos = _Checkpoint(step=0, epoch=0, step_in_epoch=0, loss=float("nan"))
    bad = BadVideoReport(total=len(entries))
    if resume and not ckpt_path.exists() and (out_dir / LEGACY_CHECKPOINT).exists():
        raise VidretError(
            f"{out_dir / LEGACY_CHECKPOINT} is a pickled checkpoint of an earlier vidret version; pickled "
            "checkpoints are no longer read (loading one can run any code it holds). Retrain: delete it, or "
            "choose another out_dir"
        )
    if resume and ckpt_path.exists() and opt is not None:
        pos, bad_items = load_checkpoint(out_dir, model, opt, cfg)
        bad.items = [tuple(x) for x in bad_items]  # type: ignore[misc]
        log.info(
            "resumed from %s at step %d (epoch %d, step %d in epoch)", ckpt_path, pos.step, pos.epoch, pos.step_in_epoch
        )
    if info.is_main:  # the first write of this run: everything that can fail on the inputs has been read
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
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
        if step >= total_steps or opt is None:
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
            worker_init_fn=dataloader_worker_init(),  # workers die with this process, even on kill -9
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
            factor = lr_factor(step, total_steps, cfg.optim.warmup_ratio, cfg.optim.schedule)
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
                    save_checkpoint(out_dir, model, opt, nxt, cfg, [list(x) for x in bad.items])
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
                # a local file by absolute path (eval/index load it only when the user names it); names as names
                "backbone_source": (
                    os.path.abspath(os.path.expanduser(cfg.backbone))
                    if not cfg.backbone.startswith("random:") and os.path.exists(os.path.expanduser(cfg.backbone))
                    else cfg.backbone
                ),
                # how the recipe evaluates: the defaults of `vidret eval` / `vidret index` (checked in adapters/io.py)
                "eval": {
                    "num_frames": cfg.data.num_frames,
                    "max_words": cfg.data.max_words,
                    "sampling": cfg.data.eval_sampling,
                    "fps": cfg.data.fps,
                    "max_candidates": cfg.data.sampling("eval").max_candidates,
                    "protocol": cfg.data.test_protocol,
                    "image_size": cfg.data.image_size,
                },
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
