"""The query path: a text-side model (no vision weights), an LRU cache of query embeddings, int8 quantisation.

Searching an index never runs the vision tower: a pooled index stores the video vectors and a frames index
stores per-frame features that the head compares with the text. So a query needs the text tower, the
adapter's text branches and the head only. :func:`open_text_model_for_index` builds exactly that: the CLIP
is created on the ``meta`` device and given uninitialised storage (never touched, so it costs no memory or
time), only the text-side tensors of the checkpoint are copied in, the adapter is loaded as usual (its
computation unchanged) and checked against the index, then every frozen vision tensor is released back to
``meta``. What identifies the backbone (its fingerprint) is computed from the checkpoint's full state dict,
so an index built on another backbone is still refused.
"""

from __future__ import annotations

import collections
import os
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vidret.errors import VidretError


def _text_side_backbone(spec: str) -> tuple[Any, dict[str, Tensor] | None, str | None]:
    """(CLIP with text weights loaded and vision storage uninitialised, the full state dict, its fingerprint).

    ``random:<config>`` specs (tests, benchmarks) are built whole: their weights come from a seeded init that
    must run in full to give the same text weights.
    """
    from vidret.backbone.clip import CLIP, create_backbone, fingerprint
    from vidret.backbone.pretrained import _resolve, load_checkpoint

    if spec.startswith("random:"):
        return create_backbone(spec[len("random:") :], seed=0).eval(), None, None
    path, expected = _resolve(spec, None, True)
    ckpt = load_checkpoint(path)
    if expected is not None:
        from vidret.backbone.clip import get_config

        if not ckpt.config.same_architecture(get_config(expected)):
            raise VidretError(f"{path} holds a {ckpt.config.name} architecture, not {expected}")
    with torch.device("meta"):
        clip = CLIP(ckpt.config)
    clip = clip.to_empty(device="cpu")  # vision storage: allocated, never written or read (no resident pages)
    text_sd = {k: v for k, v in ckpt.state_dict.items() if not k.startswith("visual.")}
    with torch.no_grad():
        missing, unexpected = clip.load_state_dict(text_sd, strict=False)
    bad_missing = [k for k in missing if not k.startswith("visual.")]
    if bad_missing or unexpected:
        raise VidretError(
            f"{path}: text tower keys do not match (missing {bad_missing[:3]}, unexpected {unexpected[:3]})"
        )
    return clip.eval(), ckpt.state_dict, fingerprint(ckpt.state_dict)


def drop_vision(model: Any, keep: set[int] | None = None) -> int:
    """Release every frozen backbone tensor of the vision tower to ``meta``; returns the elements freed.

    Trainable tensors (adapter branches, MV-Adapter's trained biases) stay: they are the adapter's identity.
    The model can then encode text and score stored video features, but not encode videos. ``keep``: ids of
    further parameters to keep (an AdapterBank's swapped backbone tensors).
    """
    from vidret.adapters.base import AdapterRoot, Branch, Hook

    keep = {id(p) for _, p in model.trainable_named_parameters()} | (keep or set())
    freed = 0

    def walk(module: nn.Module) -> None:
        nonlocal freed
        if isinstance(module, (Branch, AdapterRoot)):
            return
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) in keep or p.is_meta:
                continue
            freed += p.numel()
            setattr(module, name, nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))
        for name, child in module.named_children():
            if isinstance(module, Hook) and name != "base":
                continue
            walk(child)

    walk(model.clip.visual)
    model.text_only = True
    return freed


def open_text_model_for_index(
    index: Any, backbone: str | None = None, adapter: str | None = None, device: str = "cpu"
) -> Any:
    """The model an index was built with, text side only (see the module docstring); checked against the index.

    Same trust rules as :func:`vidret.retrieval.build.open_model_for_index`: the recorded adapter folder is read
    as data, a recorded backbone is followed only by pretrained name.
    """
    from vidret.adapters.base import DEFAULT_ADAPTER, backbone_state_dict
    from vidret.adapters.io import build_from_adapter_state, check_backbone, read_adapter
    from vidret.retrieval.build import index_adapter, resolve_backbone

    where, adapter_path = index_adapter(index, adapter)
    meta, tensors = read_adapter(adapter_path)
    spec = resolve_backbone(backbone, meta, index.identity.backbone_spec, where=where, adapter=adapter_path)
    clip, full_sd, fp = _text_side_backbone(spec)
    # fp: the full checkpoint's fingerprint (None for a random: spec, which is built whole)
    check_backbone(meta, clip, f"adapter ({adapter_path})", have_fp=fp)
    model = build_from_adapter_state(clip, meta, tensors, DEFAULT_ADAPTER, source=str(adapter_path))
    if fp is not None:
        model.backbone_fingerprint = fp
        if not model.trainable_named_parameters() and full_sd is not None:
            # nothing trained: the adapter's identity is the whole backbone's, so it needs the vision weights
            with torch.no_grad():
                vis = {k: v for k, v in full_sd.items() if k.startswith("visual.")}
                params = dict(backbone_state_dict(model.clip))
                for k, v in vis.items():
                    params[k].copy_(v)
    del full_sd
    model.eval()
    index.check_model(model, adapter_path=str(Path(adapter_path).absolute()))
    drop_vision(model)
    # the text side only: meta tensors cannot move
    model.clip.text.to(device)
    model.head.to(device)
    return model


# ------------------------------------------------------------------------------------------ int8


def quantize_text_tower(model: Any) -> int:
    """Replace the text tower's plain backbone Linears by int8 dynamically quantised ones (CPU); returns how many.

    Linears wrapped by an adapter Hook (LoRA, ...) and everything inside adapter branches keep fp32: a branch
    may read its base module's weight, and the adapter's computation must not change.
    """
    from torch.ao.nn.quantized.dynamic import Linear as QLinear
    from torch.ao.quantization import default_dynamic_qconfig

    from vidret.adapters.base import AdapterRoot, Branch, Hook

    count = 0

    def walk(module: nn.Module) -> None:
        nonlocal count
        for name, child in list(module.named_children()):
            if isinstance(child, (Hook, Branch, AdapterRoot)):
                continue
            if type(child) is nn.Linear:
                child.qconfig = default_dynamic_qconfig  # type: ignore[assignment]
                with warnings.catch_warnings():  # torch deprecates quantized tensors in favour of torchao
                    warnings.simplefilter("ignore", UserWarning)
                    q = QLinear.from_float(child)
                if isinstance(module, nn.ModuleList):
                    module[int(name)] = q
                else:
                    setattr(module, name, q)
                count += 1
            else:
                walk(child)

    walk(model.clip.text)
    return count


# ------------------------------------------------------------------------------------------ the cache


class TextCache:
    """A thread-safe LRU cache of query embeddings: (key, text) -> [E] CPU tensor."""

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self._d: collections.OrderedDict[tuple[str, str], Tensor] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str, text: str) -> Tensor | None:
        with self._lock:
            v = self._d.get((key, text))
            if v is None:
                self.misses += 1
                return None
            self._d.move_to_end((key, text))
            self.hits += 1
            return v

    def put(self, key: str, text: str, value: Tensor) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._d[(key, text)] = value
            self._d.move_to_end((key, text))
            while len(self._d) > self.size:
                self._d.popitem(last=False)

    def __len__(self) -> int:
        return len(self._d)


def encode_texts(
    model: Any, texts: Sequence[str], max_words: int, cache: TextCache | None = None, key: str = ""
) -> Tensor:
    """Raw text embeddings [Q, E] (float32, CPU) of ``texts``, through ``cache`` when given."""
    from vidret.backbone.tokenizer import tokenize

    out: list[Tensor | None] = [cache.get(key, t) if cache is not None else None for t in texts]
    todo = [i for i, v in enumerate(out) if v is None]
    if todo:
        device = next(p for p in model.parameters() if not p.is_meta).device
        tokens = tokenize([texts[i] for i in todo], context_length=max_words, truncate=True)
        with torch.no_grad():
            feats = model.encode_text(tokens.to(device)).float().cpu()  # [len(todo), E]
        for j, i in enumerate(todo):
            out[i] = feats[j]
            if cache is not None:
                cache.put(key, texts[i], feats[j])
    return torch.stack([v for v in out if v is not None]) if out else torch.zeros(0, 0)


# ------------------------------------------------------------------------------------------ caption banks


def read_caption_bank(path: str | os.PathLike[str], limit: int = 1_000_000) -> list[str]:
    """Captions to rank for a video: a ``.jsonl`` of strings or ``{"caption": ...}`` / ``{"text": ...}`` objects,
    or a text file with one caption per line. Blank lines are skipped; the file is untrusted data."""
    import json

    p = Path(path)
    if not p.is_file():
        raise VidretError(f"caption bank {p} is not a file")
    out: list[str] = []
    with p.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            if p.suffix.lower() == ".jsonl":
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise VidretError(f"{p}:{n} is not JSON ({e}); one caption per line") from e
                if isinstance(obj, dict):
                    obj = obj.get("caption", obj.get("text"))
                if not isinstance(obj, str):
                    raise VidretError(f'{p}:{n}: expected a string or {{"caption": "..."}}')
                line = obj.strip()
            if line and len(line) <= 10_000:
                out.append(line)
            if len(out) > limit:
                raise VidretError(f"{p} holds more than {limit} captions")
    if not out:
        raise VidretError(f"caption bank {p} holds no captions")
    return out


@torch.no_grad()
def rank_captions(
    model: Any, video_path: str | os.PathLike[str], captions: Sequence[str], settings: Any, k: int, batch: int = 256
) -> list[tuple[int, float]]:
    """Video -> text: the ``k`` captions that best describe a video file, as (caption number, score) best first.

    Scores are the head's similarity divided by its logit scale (cosine for meanP), so text-conditioned heads
    rank captions the way they rank videos.
    """
    from vidret.retrieval.build import encode_video_file

    video = encode_video_file(model, video_path, settings)  # [1, T, E]
    scale = model.logit_scale().float()
    scores = []
    for s in range(0, len(captions), batch):
        text = encode_texts(model, captions[s : s + batch], settings.max_words).to(video.frames.device)
        scores.append((model.similarity(text, video).float() / scale)[:, 0].cpu())  # [Q, 1] -> [Q]
    allv = torch.cat(scores)
    v, i = allv.topk(min(k, allv.numel()))
    return list(zip(i.tolist(), v.tolist()))


__all__ = [
    "TextCache",
    "drop_vision",
    "encode_texts",
    "open_text_model_for_index",
    "quantize_text_tower",
    "rank_captions",
    "read_caption_bank",
]
