"""Experiment configuration: frozen, typed dataclasses that round-trip through YAML/JSON.

A config file (``configs/<dataset>/<method>_<backbone>.yaml``) plus ``key.sub=value`` overrides from the command
line become a :class:`TrainConfig`. A wrong key or value fails before any work, naming the key.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from vidret.data.dataset import CaptionMode, CaptionProtocol
from vidret.data.sampling import FrameRule, SamplingConfig, SamplingMode
from vidret.errors import VidretError

Precision = Literal["fp32", "bf16", "fp16"]
OptimizerName = Literal["adamw", "bert_adam"]
Schedule = Literal["cosine", "bert_warmup_cosine"]
DecayRule = Literal["ndim", "mvadapter_names"]


@dataclass(frozen=True)
class DataConfig:
    """Where the videos are and how they become model inputs."""

    train_manifest: str = ""  # JSONL manifest of the training split
    test_manifest: str = ""  # JSONL manifest evaluated after training ("" = skip)
    val_manifest: str = ""  # optional per-epoch validation manifest ("" = none)
    num_frames: int = 12  # T frames per video (12 short-video recipes, 32 for DiDeMo/ActivityNet)
    fps: float = 1.0  # candidate frame rate before uniform subsampling to T
    image_size: int = 224  # frames are resized (short side) and centre-cropped to this
    max_words: int = 32  # text length in tokens (32, or 64 for paragraph datasets)
    caption_mode: CaptionMode = "random_per_video"  # one random caption per video per epoch, or all_pairs
    train_sampling: FrameRule = "segment_random"  # which T of the N candidate frames training takes
    eval_sampling: FrameRule = "segment_centre"  # which T evaluation takes (deterministic rules only)
    test_protocol: CaptionProtocol = "single"  # single caption / every caption a query / paragraph
    cache_dir: str = ""  # frame cache folder ("" = decode on the fly)
    num_workers: int = 2  # DataLoader worker processes
    max_bad_fraction: float = 0.05  # stop when more than this share of videos cannot be decoded

    def __post_init__(self) -> None:
        _positive(self, "num_frames", "fps", "image_size", "max_words")
        if self.num_workers < 0:
            raise ValueError("data.num_workers must be >= 0")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError("data.max_bad_fraction must be in [0, 1]")
        if self.eval_sampling == "segment_random":
            raise ValueError("data.eval_sampling must be deterministic: not 'segment_random'")

    def sampling(self, mode: SamplingMode) -> SamplingConfig:
        """The frame sampling these settings describe, in train or eval mode."""
        return SamplingConfig(
            num_frames=self.num_frames,
            fps=self.fps,
            mode=mode,
            train_sampling=self.train_sampling,
            eval_sampling=self.eval_sampling,
        )


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser, schedule, clipping and decay groups.

    The defaults are the project's own recipe (AdamW, cosine restarted after warmup, decay on tensors with 2+
    dimensions); the paper configs select the official codes' BertAdam recipe (docs/methods.md, "Recipes").
    """

    name: OptimizerName = "adamw"  # adamw (torch, bias-corrected) or bert_adam (official codes: no bias correction)
    schedule: Schedule = "cosine"  # cosine: restarted after warmup; bert_warmup_cosine: one cosine over the whole run
    lr: float = 1e-5  # peak learning rate of adapter parameters
    backbone_lr: float | None = None  # lr of backbone tensors a method trains (MV-Adapter biases); None = lr
    weight_decay: float = 0.2  # on the adapter tensors decay_rule selects; the others get 0
    backbone_weight_decay: float = 0.2  # on backbone tensors a method trains (released MV-Adapter code: 0.2)
    decay_rule: DecayRule = "ndim"  # ndim: decay tensors with 2+ dims; mvadapter_names: every name without "bias"
    betas: tuple[float, float] = (0.9, 0.98)  # CLIP's Adam betas
    eps: float = 1e-6  # CLIP's Adam epsilon
    warmup_ratio: float = 0.1  # share of steps with linear warmup
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    per_tensor_clip: float = 0.0  # bert_adam's max_grad_norm: each tensor's grad clipped to this norm (0 = off)

    def __post_init__(self) -> None:
        _positive(self, "lr", "eps")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError("optim.warmup_ratio must be in [0, 1)")
        if self.grad_clip < 0 or self.weight_decay < 0 or self.per_tensor_clip < 0:
            raise ValueError("optim.grad_clip, optim.per_tensor_clip and optim.weight_decay must be >= 0")
        if self.per_tensor_clip > 0 and self.name != "bert_adam":
            raise ValueError("optim.per_tensor_clip is BertAdam's max_grad_norm: set optim.name=bert_adam or use 0")


@dataclass(frozen=True)
class TrainConfig:
    """One training run: backbone + method + data + recipe."""

    backbone: str = "ViT-B-32"  # pretrained name or checkpoint path (see `vidret backbone list`)
    method: str = "mv_adapter"  # registered method (see `vidret adapters list`)
    preset: str | None = None  # method preset, e.g. "msrvtt"
    method_options: Mapping[str, Any] = field(default_factory=dict)  # overrides of the method config
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: int = 5  # passes over the training set
    global_batch: int = 128  # videos per optimiser step across all ranks and accumulation steps
    grad_accum: int = 1  # micro-batches per optimiser step (negatives come from one micro-batch)
    precision: Precision = "bf16"  # autocast dtype; trainable weights always stay fp32
    grad_checkpointing: bool = False  # recompute activations in backward to save memory
    frozen_prefix_no_grad: bool = True  # run frozen leading blocks without storing activations
    compile: bool = False  # torch.compile the model
    seed: int = 42  # everything random derives from it
    out_dir: str = "runs/run"  # checkpoints, logs, the final adapter and results
    checkpoint_every: int = 200  # optimiser steps between resumable checkpoints (and at each epoch end)
    log_every: int = 10  # optimiser steps between log lines
    max_steps: int = 0  # stop after this many optimiser steps (0 = run all epochs)
    eval_batch: int = 64  # videos per batch when encoding for evaluation
    device: str = "auto"  # "auto" = cuda if available, else cpu

    def __post_init__(self) -> None:
        _positive(self, "epochs", "global_batch", "grad_accum", "log_every", "eval_batch")
        if self.checkpoint_every < 0 or self.max_steps < 0:
            raise ValueError("checkpoint_every and max_steps must be >= 0")
        if self.global_batch % self.grad_accum:
            raise ValueError(f"global_batch {self.global_batch} is not divisible by grad_accum {self.grad_accum}")

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        if getattr(obj, n) <= 0:
            raise ValueError(f"{n} must be positive, got {getattr(obj, n)!r}")


def _plain(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check/convert one value against its type hint; errors name the key."""
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise VidretError(f"config key {key!r} must be a mapping")
        return _build(hint, value, key + ".")  # type: ignore[arg-type]
    if origin is Literal:
        if value not in get_args(hint):
            raise VidretError(f"config key {key!r} must be one of {list(get_args(hint))}, got {value!r}")
        return value
    if hint is Any or origin in (Mapping, dict) or hint is Mapping:
        if origin in (Mapping, dict) and not isinstance(value, Mapping):
            raise VidretError(f"config key {key!r} must be a mapping")
        return dict(value) if isinstance(value, Mapping) else value
    args = get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        rest = [a for a in args if a is not type(None)]
        return _coerce(value, rest[0], key)
    if origin is tuple:
        if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != len(args):
            raise VidretError(f"config key {key!r} must be a list of {len(args)} values")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if hint is bool:
        if not isinstance(value, bool):
            raise VidretError(f"config key {key!r} must be true or false, got {value!r}")
        return value
    if hint in (int, float):
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept any plain number spelling.
            try:
                value = float(value) if hint is float else int(value)
            except ValueError:
                raise VidretError(f"config key {key!r} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise VidretError(f"config key {key!r} must be a number, got {value!r}")
        if hint is int and float(value) != int(value):
            raise VidretError(f"config key {key!r} must be an integer, got {value!r}")
        return hint(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise VidretError(f"config key {key!r} must be a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, d: Mapping[str, Any], prefix: str = "") -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in d:
        if k not in names:
            raise VidretError(f"unknown config key {prefix + k!r}; valid keys here: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in d.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise VidretError(f"invalid config ({prefix or 'top level'}): {e}") from e


def config_from_dict(d: Mapping[str, Any]) -> TrainConfig:
    """Validate and build a TrainConfig; an unknown key or bad value raises VidretError naming it."""
    return _build(TrainConfig, d)


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["optim.lr=1e-4", "epochs=2"]`` -> nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise VidretError(f"override {item!r} must look like key=value (e.g. optim.lr=1e-4)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise VidretError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config (relative manifest paths resolve against the file's folder) and apply overrides."""
    d: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise VidretError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise VidretError(f"{p}: not valid YAML ({e})") from e
        if not isinstance(loaded, dict):
            raise VidretError(f"{p}: the top level must be a mapping of keys")
        d = loaded
    return config_from_dict(deep_merge(d, parse_overrides(overrides)))


def save_config(cfg: TrainConfig, path: str | os.PathLike[str]) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
