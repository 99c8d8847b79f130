"""Adapter files: ``adapter.safetensors`` (trainable state only) + ``adapter.json`` (what it is, for which backbone).

Tensor names are independent of the adapter's in-memory name (see ``base.adapter_named_parameters``):
``<hooked module path>.<param>`` for branches, ``root.<param>`` for shared parameters, ``backbone.<name>`` for
backbone tensors the method trains (e.g. MV-Adapter's biases) and ``head.<param>`` for a trained head.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from vidret import __version__
from vidret.adapters.base import DEFAULT_ADAPTER, backbone_state_dict, get_method
from vidret.backbone.clip import CLIP, fingerprint
from vidret.errors import VidretError

FORMAT_VERSION = 1
WEIGHTS_FILE = "adapter.safetensors"
META_FILE = "adapter.json"


def adapter_state_dict(model: Any) -> dict[str, Tensor]:
    """The trainable state of a VideoTextModel, contiguous CPU fp32-or-native tensors."""
    return {n: p.detach().cpu().contiguous() for n, p in model.trainable_named_parameters()}


def adapter_metadata(model: Any) -> dict[str, Any]:
    clip: CLIP = model.clip
    return {
        "format_version": FORMAT_VERSION,
        "vidret_version": __version__,
        "method": model.method,
        "preset": model.preset,
        "config": model.config.to_dict(),
        "backbone": {
            "name": clip.name,
            "fingerprint": model.backbone_fingerprint,
            "config": clip.config.to_dict(),
        },
        "trainable_parameters": sum(p.numel() for _, p in model.trainable_named_parameters()),
    }


def save_adapter(model: Any, out_dir: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> Path:
    """Write ``adapter.safetensors`` + ``adapter.json`` into ``out_dir`` atomically; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = adapter_metadata(model)
    if extra:
        meta["extra"] = extra
    tensors = adapter_state_dict(model)
    tmp_w = out / (WEIGHTS_FILE + ".tmp")
    tmp_m = out / (META_FILE + ".tmp")
    save_file(tensors, str(tmp_w), metadata={"method": model.method})
    tmp_m.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp_w, out / WEIGHTS_FILE)
    os.replace(tmp_m, out / META_FILE)
    return out


def read_adapter(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read an adapter folder's metadata and tensors, with clear errors for missing or corrupt files."""
    p = Path(path)
    meta_path, weights_path = p / META_FILE, p / WEIGHTS_FILE
    if not meta_path.is_file() or not weights_path.is_file():
        raise VidretError(f"{p} is not an adapter folder: expected {META_FILE} and {WEIGHTS_FILE} in it")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise VidretError(f"{meta_path} is not valid JSON ({e.msg}); the adapter folder is damaged") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise VidretError(f"{meta_path}: unsupported adapter format version {meta.get('format_version')!r}")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise VidretError(f"{weights_path} could not be read ({e}); the adapter file is damaged") from e
    return meta, tensors


def check_backbone(meta: dict[str, Any], clip: CLIP, where: str = "adapter") -> None:
    """Refuse an adapter made for another backbone, naming both."""
    want = meta["backbone"]
    have_fp = fingerprint(backbone_state_dict(clip))
    if want["config"] != clip.config.to_dict() or want["fingerprint"] != have_fp:
        raise VidretError(
            f"this {where} was trained on backbone {want['name']!r} (fingerprint {want['fingerprint']}), "
            f"but the loaded backbone is {clip.name!r} (fingerprint {have_fp}); load the backbone it was "
            "trained with (`--backbone NAME|PATH`)"
        )


def load_adapter(
    clip: CLIP, path: str | os.PathLike[str], adapter_name: str = DEFAULT_ADAPTER, check: bool = True
) -> Any:
    """Rebuild the model saved in ``path`` over ``clip`` and load its state strictly.

    Refuses an adapter trained on another backbone (architecture or weights fingerprint differ).
    """
    meta, tensors = read_adapter(path)
    if check:
        check_backbone(meta, clip)
    return build_from_adapter_state(clip, meta, tensors, adapter_name, source=str(path))


def build_from_adapter_state(
    clip: CLIP, meta: dict[str, Any], tensors: dict[str, Tensor], adapter_name: str, source: str = "adapter"
) -> Any:
    """Build the model described by ``meta`` over ``clip`` and load ``tensors`` into it."""
    from vidret.model import build_model

    spec = get_method(meta["method"])
    config = spec.config_cls.from_dict(meta["config"])
    model = build_model(clip, meta["method"], preset=meta.get("preset"), adapter_name=adapter_name, config=config)
    load_trainable_state(model, tensors, source=source)
    return model


def load_trainable_state(model: Any, tensors: dict[str, Tensor], source: str = "state") -> None:
    """Copy tensors into the model's trainables; every missing, unexpected or mis-shaped key is an error."""
    params = dict(model.trainable_named_parameters())
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    bad_shape = sorted(k for k in set(params) & set(tensors) if tuple(params[k].shape) != tuple(tensors[k].shape))
    if missing or unexpected or bad_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", bad_shape)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise VidretError(f"{source} does not match the method's parameters: " + "; ".join(parts))
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k].to(p.dtype))
