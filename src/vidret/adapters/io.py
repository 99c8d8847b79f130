"""Adapter folders: ``adapter.json`` (what it is, for which backbone) + a content-named tensors file.

Tensor names are independent of the adapter's in-memory name (see ``base.adapter_named_parameters``):
``<hooked module path>.<param>`` for branches, ``root.<param>`` for shared parameters, ``backbone.<name>`` for
backbone tensors the method trains (e.g. MV-Adapter's biases) and ``head.<param>`` for a trained head.

Layout and crash safety (``vidret.atomic``): the trainable state is written as ``adapter-<sha256[:12]>.safetensors``
and ``adapter.json`` names it (``"weights": {"file", "sha256"}``); the JSON is replaced last, so a save killed at
any point leaves either the previous adapter or the new one, never a mix. Folders written before this layout hold
``adapter.safetensors`` and a JSON without ``weights``; they still load.

Adapter folders are downloaded from strangers, so reading one trusts nothing (issue 13): the JSON is
schema-checked, the weights file must be a bare name in the folder with the recorded SHA-256, the tensor header is
read and bounded by the backbone's own size before any tensor is loaded, tensors must be finite, and the config's
parameter shapes are planned on the ``meta`` device (no memory) and compared with the file before anything is
built for real.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor

from vidret import __version__
from vidret.adapters.base import DEFAULT_ADAPTER, AdapterConfig, backbone_state_dict, get_method, list_methods
from vidret.atomic import remove_unreferenced, replace_json, sha256_file, sweep_temporaries, write_content_named
from vidret.backbone.clip import CLIP, CLIPConfig, TextConfig, VisionConfig, fingerprint
from vidret.errors import VidretError
from vidret.heads import make_head

FORMAT_VERSION = 1
META_FILE = "adapter.json"
WEIGHTS_STEM, WEIGHTS_SUFFIX = "adapter", ".safetensors"  # weights file: adapter-<sha256[:12]>.safetensors
LEGACY_WEIGHTS_FILE = "adapter.safetensors"  # fixed name of folders written before the content-named layout
_WEIGHTS_NAME = re.compile(r"adapter-[0-9a-f]{12}\.safetensors")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors dtype codes a trainable parameter can have
_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit on the JSON header
_FIX = "the adapter folder is damaged or not a vidret adapter; save it again or get an intact copy"
# extra.eval: the training recipe's evaluation settings, the defaults of `vidret eval` / `vidret index`. The
# literals repeat vidret.data's FrameRule (less segment_random) and CaptionProtocol: model code imports no data
# code, and a test keeps them equal.
EvalSampling = Literal["segment_centre", "mvadapter_floor", "cma_linspace"]
EvalProtocol = Literal["single", "multi", "paragraph"]
EVAL_SETTINGS: dict[str, Any] = {
    "num_frames": int,  # T frames per video (data.num_frames)
    "max_words": int,  # text length in tokens (data.max_words)
    "sampling": EvalSampling,  # which T of the N candidate frames (data.eval_sampling)
    "fps": float,  # candidate frame rate (data.fps)
    "max_candidates": int,  # cap on candidates per video
    "protocol": EvalProtocol,  # test protocol (data.test_protocol)
    "image_size": int,  # frame side in pixels (data.image_size; the backbone interpolates its positions)
}
# bounds on what a crafted adapter.json can make eval decode per video, far beyond any trainable recipe
_MAX_EVAL_FRAMES = 512
_MAX_EVAL_CANDIDATES = 4096
_MAX_EVAL_FPS = 1000.0
_MAX_EVAL_IMAGE_SIZE = 2048


# ----------------------------------------------------------------------------- writing


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
    """Write the adapter's weights and ``adapter.json`` into ``out_dir`` crash-safely; returns the folder.

    The weights go to a content-named file first; replacing ``adapter.json`` is the single commit point. Older
    weights generations and temporary files of interrupted saves are removed afterwards.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _sweep(out)
    meta = adapter_metadata(model)
    if extra:
        meta["extra"] = extra
    data = save(adapter_state_dict(model), metadata={"method": model.method})

    def write(f: IO[bytes]) -> None:
        f.write(data)

    name, digest = write_content_named(out, WEIGHTS_STEM, WEIGHTS_SUFFIX, write)
    meta["weights"] = {"file": name, "sha256": digest}
    replace_json(out / META_FILE, meta)
    remove_unreferenced(out, [WEIGHTS_STEM], [name])
    (out / LEGACY_WEIGHTS_FILE).unlink(missing_ok=True)
    _sweep(out)
    return out


def _sweep(folder: Path) -> None:
    sweep_temporaries(folder)
    for name in (LEGACY_WEIGHTS_FILE + ".tmp", META_FILE + ".tmp"):  # left by saves of the older layout
        (folder / name).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- reading


def read_adapter_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and schema-check an adapter folder's ``adapter.json`` (one clear error naming file and field)."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise VidretError(f"{Path(path)} is not an adapter folder: expected {META_FILE} in it")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VidretError(f"{meta_path} is not valid JSON ({e}); {_FIX}") from e
    _check_meta(meta, meta_path)
    return meta


def weights_file(path: str | os.PathLike[str]) -> Path:
    """The weights file an adapter folder's ``adapter.json`` names (``adapter.safetensors`` in older folders)."""
    return _weights_path(Path(path), read_adapter_meta(path))


def read_adapter(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read an adapter folder's metadata and tensors, refusing anything malformed, oversized or non-finite.

    Order: schema of ``adapter.json``; weights file name and SHA-256; the tensor header (names, dtypes, shapes)
    bounded by the size of the backbone ``adapter.json`` names; only then the tensors, which must be finite.
    """
    p = Path(path)
    meta = read_adapter_meta(p)
    weights = _weights_path(p, meta)
    if not weights.is_file():
        raise VidretError(f"{p}: the weights file {weights.name} named by {META_FILE} is missing; {_FIX}")
    recorded = meta.get("weights", {}).get("sha256")
    if recorded is not None and (actual := sha256_file(weights)) != recorded:
        raise VidretError(
            f"{weights}: its sha256 {actual[:12]}... differs from the {recorded[:12]}... recorded in {META_FILE}; "
            f"the file was changed after saving: {_FIX}"
        )
    header = _read_header(weights)
    total = sum(math.prod(shape) for _, shape in header.values())
    arch = _clip_config(meta, p / META_FILE)
    config = get_method(meta["method"]).config_cls.from_dict(meta["config"])
    backbone, head = _size_bound(arch, config.head, p / META_FILE)
    if total > backbone + head:
        raise VidretError(
            f"{weights} declares {total:,} values, more than the whole backbone {arch.name!r} has ({backbone:,} "
            f"parameters, + {head:,} for the head); an adapter is never larger than its backbone: {_FIX}"
        )
    stated = meta.get("trainable_parameters")
    if stated is not None and stated != total:
        raise VidretError(
            f"{p / META_FILE}: field 'trainable_parameters' says {stated:,} but {weights.name} holds {total:,} "
            f"values; {_FIX}"
        )
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise VidretError(f"{weights} could not be read ({e}); the adapter file is damaged") from e
    for name, t in tensors.items():
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise VidretError(
                f"adapter {p}: tensor {name!r} has {bad} NaN/Inf values; the adapter is damaged "
                "(train it again or get an intact copy)"
            )
    return meta, tensors


def check_backbone(meta: dict[str, Any], clip: CLIP, where: str = "adapter", have_fp: str | None = None) -> None:
    """Refuse an adapter made for another backbone, naming both.

    ``have_fp``: the backbone's fingerprint when ``clip`` does not hold all of its weights (a text-only model
    loaded from a checkpoint whose full state was fingerprinted); computed from ``clip`` otherwise.
    """
    want = meta["backbone"]
    have_fp = have_fp or fingerprint(backbone_state_dict(clip))
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
    """Build the model described by ``meta`` over ``clip`` and load ``tensors`` into it.

    The config is first built on the ``meta`` device over ``clip``'s architecture: its parameter count must not
    exceed the backbone's and its shapes must equal the tensors', so no oversized module is ever allocated.
    """
    from vidret.model import build_model

    spec = get_method(meta["method"])
    config = spec.config_cls.from_dict(meta["config"])
    planned, backbone = _plan(clip.config, meta["method"], meta.get("preset"), config, source)
    own = sum(math.prod(shape) for n, shape in planned.items() if not n.startswith("head."))
    if own > backbone:
        raise VidretError(
            f"{source}: the config in {META_FILE} ({_size_fields(config)}) would create {own:,} trainable "
            f"parameters, more than the whole backbone {clip.name!r} has ({backbone:,}); an adapter is never larger "
            f"than its backbone: {_FIX}"
        )
    _check_names_and_shapes(planned, {k: tuple(t.shape) for k, t in tensors.items()}, source)
    model = build_model(clip, meta["method"], preset=meta.get("preset"), adapter_name=adapter_name, config=config)
    load_trainable_state(model, tensors, source=source)
    return model


def load_trainable_state(model: Any, tensors: dict[str, Tensor], source: str = "state") -> None:
    """Copy tensors into the model's trainables; every missing, unexpected or mis-shaped key is an error."""
    params = dict(model.trainable_named_parameters())
    _check_names_and_shapes(
        {k: tuple(p.shape) for k, p in params.items()}, {k: tuple(t.shape) for k, t in tensors.items()}, source
    )
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k].to(p.dtype))


def _check_names_and_shapes(
    want: Mapping[str, tuple[int, ...]], have: Mapping[str, tuple[int, ...]], source: str
) -> None:
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    bad_shape = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or unexpected or bad_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", bad_shape)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise VidretError(f"{source} does not match the method's parameters: " + "; ".join(parts))


# ----------------------------------------------------------------------------- sizes without memory


def backbone_parameter_count(config: CLIPConfig) -> int:
    """Parameters of a CLIP of this architecture, counted on the ``meta`` device at a cost independent of depth."""
    one = dataclasses.replace(
        config, vision=dataclasses.replace(config.vision, layers=1), text=dataclasses.replace(config.text, layers=1)
    )
    with torch.device("meta"):
        clip = CLIP(one)
    total = sum(p.numel() for p in clip.parameters())
    for tower, cfg in ((clip.visual, config.vision), (clip.text, config.text)):
        # every residual block of a tower has the same parameters as its first
        total += (cfg.layers - 1) * sum(p.numel() for p in tower.transformer.resblocks[0].parameters())
    return total


def _size_bound(arch: CLIPConfig, head: str, meta_path: Path) -> tuple[int, int]:
    """(backbone parameters, head parameters) of an architecture named by an adapter.json, without memory."""
    try:
        backbone = backbone_parameter_count(arch)
        with torch.device("meta"):
            head_n = sum(p.numel() for p in make_head(head, arch.embed_dim).parameters())
    except (RuntimeError, ValueError, OverflowError) as e:
        raise VidretError(f"{meta_path}: field 'backbone.config' is not a buildable CLIP ({e}); {_FIX}") from e
    return backbone, head_n


def _plan(
    arch: CLIPConfig, method: str, preset: str | None, config: AdapterConfig, source: str
) -> tuple[dict[str, tuple[int, ...]], int]:
    """Trainable parameter shapes ``config`` creates over ``arch``, and the backbone's size; all on ``meta``."""
    from vidret.model import build_model

    try:
        with torch.device("meta"):
            clip = CLIP(arch)
            model = build_model(clip, method, preset=preset, config=config)
    except VidretError as e:
        raise VidretError(f"{source}: {e}") from e
    except (RuntimeError, ValueError, TypeError, OverflowError) as e:
        raise VidretError(
            f"{source}: the config in {META_FILE} cannot be built on backbone {arch.name!r} ({e}); {_FIX}"
        ) from e
    backbone = sum(t.numel() for t in backbone_state_dict(clip).values())
    return {n: tuple(p.shape) for n, p in model.trainable_named_parameters()}, backbone


def _size_fields(config: AdapterConfig) -> str:
    """The integer options that differ from the method's defaults, e.g. ``config.r=12000``: where sizes come from."""
    try:
        default: AdapterConfig | None = type(config)()
    except (TypeError, ValueError, VidretError):
        default = None
    parts = []
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if isinstance(v, int) and not isinstance(v, bool) and (default is None or v != getattr(default, f.name)):
            parts.append(f"config.{f.name}={v}")
    return ", ".join(parts) or "its size options"


# ----------------------------------------------------------------------------- files and schema


def _weights_path(folder: Path, meta: Mapping[str, Any]) -> Path:
    return folder / (meta["weights"]["file"] if "weights" in meta else LEGACY_WEIGHTS_FILE)


def _read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Names -> (dtype, shape) from a safetensors file's JSON header, without reading any tensor data."""

    def damaged(why: str) -> VidretError:
        return VidretError(f"{path} could not be read ({why}); the adapter file is damaged")

    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise damaged("shorter than a safetensors header")
        n = int.from_bytes(prefix, "little")
        if n > min(size - 8, _MAX_HEADER_BYTES):
            raise damaged(f"header length {n} does not fit the file")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise damaged(f"header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise damaged("header is not a JSON object")
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(_matches(d, int) and d >= 0 for d in shape):
            raise damaged(f"tensor {name!r} has no valid shape")
        dtype = entry.get("dtype")
        if dtype not in _FLOAT_DTYPES:
            raise VidretError(
                f"{path}: tensor {name!r} has dtype {dtype}; adapter tensors are floating point "
                f"({', '.join(_FLOAT_DTYPES)}): {_FIX}"
            )
        out[name] = (dtype, tuple(shape))
    return out


def _bad(meta_path: Path, field: str, problem: str) -> VidretError:
    return VidretError(f"{meta_path}: field '{field}' {problem}; {_FIX}")


def _require(d: Mapping[str, Any], key: str, tp: Any, prefix: str, meta_path: Path, required: bool = True) -> None:
    field = f"{prefix}{key}"
    if key not in d:
        if required:
            raise _bad(meta_path, field, f"is missing (it must be {_describe(tp)[0]})")
        return
    if not _matches(d[key], tp):
        raise _bad(meta_path, field, f"must be {_describe(tp)[0]}, got {d[key]!r}")


def _check_meta(meta: Any, meta_path: Path) -> None:
    """The schema of adapter.json: every field the loader reads, with its type, and the method config's types."""
    if not isinstance(meta, dict):
        raise VidretError(f"{meta_path}: the top level must be a JSON object, got {type(meta).__name__}; {_FIX}")
    _require(meta, "format_version", int, "", meta_path)
    if meta["format_version"] != FORMAT_VERSION:
        raise VidretError(
            f"{meta_path}: field 'format_version' is {meta['format_version']}, but this vidret reads adapter format "
            f"{FORMAT_VERSION}; use the vidret version that wrote it ({meta.get('vidret_version', 'unknown')})"
        )
    _require(meta, "method", str, "", meta_path)
    if meta["method"] not in list_methods():
        raise _bad(meta_path, "method", f"names unknown method {meta['method']!r} (known: {', '.join(list_methods())})")
    _require(meta, "preset", str | None, "", meta_path, required=False)
    _require(meta, "config", dict, "", meta_path)
    _require(meta, "backbone", dict, "", meta_path)
    _require(meta, "extra", dict, "", meta_path, required=False)
    if "extra" in meta:  # `vidret eval` / `index` follow this backbone when it is a pretrained name
        _require(meta["extra"], "backbone_source", str, "extra.", meta_path, required=False)
        _require(meta["extra"], "eval", dict, "extra.", meta_path, required=False)
    stated = meta.get("trainable_parameters")
    if stated is not None and not (_matches(stated, int) and stated >= 0):
        raise _bad(meta_path, "trainable_parameters", f"must be a non-negative integer, got {stated!r}")
    for key in ("name", "fingerprint"):
        _require(meta["backbone"], key, str, "backbone.", meta_path)
    _require(meta["backbone"], "config", dict, "backbone.", meta_path)
    arch = _clip_config(meta, meta_path)
    if "eval" in meta.get("extra", {}):
        _check_eval_settings(meta["extra"]["eval"], arch, meta_path)
    spec = get_method(meta["method"])
    _check_types(spec.config_cls, meta["config"], "config", meta_path)
    try:
        spec.config_cls.from_dict(meta["config"])
    except VidretError as e:
        raise _bad(meta_path, "config", f"is invalid: {e}") from e
    if "weights" in meta:
        w = meta["weights"]
        if not isinstance(w, dict):
            raise _bad(meta_path, "weights", f"must be a JSON object with 'file' and 'sha256', got {w!r}")
        _require(w, "file", str, "weights.", meta_path)
        _require(w, "sha256", str, "weights.", meta_path)
        if not _WEIGHTS_NAME.fullmatch(w["file"]):
            raise _bad(
                meta_path, "weights.file", f"must be a bare name like adapter-<12 hex>.safetensors, got {w['file']!r}"
            )
        if not _SHA256.fullmatch(w["sha256"]):
            raise _bad(meta_path, "weights.sha256", f"must be 64 lowercase hex digits, got {w['sha256']!r}")


def recorded_eval_settings(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The evaluation settings an adapter's training recipe recorded (``extra.eval``; {} for older adapters).

    ``meta`` comes from :func:`read_adapter_meta` / :func:`read_adapter`, which checked the block's types and
    ranges; the keys are those of :data:`EVAL_SETTINGS`, each present only if recorded.
    """
    extra = meta.get("extra")
    block = extra.get("eval") if isinstance(extra, Mapping) else None
    return dict(block) if isinstance(block, Mapping) else {}


def _check_eval_settings(block: Mapping[str, Any], arch: CLIPConfig, meta_path: Path) -> None:
    """``extra.eval``: known keys only, each of its type and within the range the backbone and decoding allow."""
    unknown = sorted(set(block) - set(EVAL_SETTINGS))
    if unknown:
        raise _bad(meta_path, "extra.eval", f"has unknown keys {unknown} (known: {', '.join(EVAL_SETTINGS)})")
    for key, tp in EVAL_SETTINGS.items():
        _require(block, key, tp, "extra.eval.", meta_path, required=False)
    frames = block.get("num_frames", 1)
    bounds: dict[str, tuple[float, float, str]] = {
        "num_frames": (1, _MAX_EVAL_FRAMES, ""),
        "max_words": (2, arch.text.context_length, " (the backbone's text context length)"),
        "max_candidates": (frames, _MAX_EVAL_CANDIDATES, " (and at least num_frames)"),
    }
    for key, (lo, hi, why) in bounds.items():
        if key in block and not lo <= block[key] <= hi:
            raise _bad(meta_path, f"extra.eval.{key}", f"must be between {lo} and {hi}{why}, got {block[key]!r}")
    if "fps" in block and not 0 < block["fps"] <= _MAX_EVAL_FPS:
        raise _bad(meta_path, "extra.eval.fps", f"must be in (0, {_MAX_EVAL_FPS:g}], got {block['fps']!r}")
    size, patch = block.get("image_size"), arch.vision.patch_size
    if size is not None and not patch <= size <= _MAX_EVAL_IMAGE_SIZE:
        raise _bad(
            meta_path,
            "extra.eval.image_size",
            f"must be between the backbone's patch size {patch} and {_MAX_EVAL_IMAGE_SIZE}, got {size!r}",
        )


def _clip_config(meta: Mapping[str, Any], meta_path: Path) -> CLIPConfig:
    d = meta["backbone"]["config"]
    prefix = "backbone.config"
    _require(d, "name", str, prefix + ".", meta_path)
    _require(d, "embed_dim", int, prefix + ".", meta_path)
    for key, cls in (("vision", VisionConfig), ("text", TextConfig)):
        _require(d, key, dict, prefix + ".", meta_path)
        _check_types(cls, d[key], f"{prefix}.{key}", meta_path)
    try:
        return CLIPConfig.from_dict(d)
    except (TypeError, ValueError, KeyError) as e:
        raise _bad(meta_path, prefix, f"is not a valid CLIP architecture ({e})") from e


def _check_types(cls: type, d: Mapping[str, Any], prefix: str, meta_path: Path) -> None:
    """Each value of ``d`` against the declared type of the dataclass field of that name (JSON lists for tuples)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in d and not _matches(d[f.name], hints[f.name]):
            raise _bad(meta_path, f"{prefix}.{f.name}", f"must be {_describe(hints[f.name])[0]}, got {d[f.name]!r}")


def _matches(value: Any, tp: Any) -> bool:
    """Whether a JSON value fits a field's declared type; types this check does not know are left to the config."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp in (str, dict):
        return isinstance(value, tp)
    if tp is type(None):
        return value is None
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args, strict=True))
    return True


def _describe(tp: Any) -> tuple[str, str]:
    """(singular, plural) words for a declared type, for error messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    simple = {
        bool: ("true or false", "true/false values"),
        int: ("an integer", "integers"),
        float: ("a number", "numbers"),
        str: ("a string", "strings"),
        dict: ("a JSON object", "JSON objects"),
        type(None): ("null", "nulls"),
    }
    if tp in simple:
        return simple[tp]
    if origin is Literal:
        values = ", ".join(repr(a) for a in args)
        return f"one of {values}", f"values from {values}"
    if origin in (typing.Union, types.UnionType):
        words = [_describe(a) for a in args]
        return " or ".join(w[0] for w in words), " or ".join(w[1] for w in words)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])[1]}", f"lists of {_describe(args[0])[1]}"
        return f"a list of {len(args)} values", f"lists of {len(args)} values"
    return f"a {getattr(tp, '__name__', tp)}", f"{getattr(tp, '__name__', tp)} values"
