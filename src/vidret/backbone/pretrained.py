"""Backbone weights: pretrained names -> sha256-checked downloads, and local checkpoints of every format.

``load_backbone(name_or_path)`` accepts

* a pretrained name from :data:`PRETRAINED` (downloaded once into the cache dir, sha256-verified; the pocket CLIP,
  ``pocket-small``, ships inside the package and is read from there, sha256-verified too);
* a file, recognised by its content rather than its extension: an OpenAI TorchScript archive (``.pt``), a
  plain ``torch.save`` state dict (``.pt/.pth/.bin``, also open_clip training checkpoints), or
  ``.safetensors`` (HF keys, OpenAI keys, or ours as written by :func:`convert_checkpoint`);
* an HF ``CLIPModel`` directory (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``, sharded
  or not);
* a Hugging Face Hub repo id, ``owner/name`` that is not a local path (``openai/clip-vit-base-patch16``): its
  ``config.json`` and weights only, through ``huggingface_hub``'s cache and offline mode (:mod:`vidret.backbone.hub`),
  then read as an HF directory.

Safety: no file is ever unpickled with code. ``torch.load`` always runs with ``weights_only=True``, which
refuses any pickle that would construct arbitrary Python objects. OpenAI publishes TorchScript archives,
which ``weights_only`` cannot read; TorchScript itself is never used to load them (its loader would run
scripted ``__setstate__`` methods, which can write files). :func:`vidret.safe_pickle.torchscript_state_dict`
reads them as data instead: the zip's ``data.pkl`` through a restricted unpickler, tensors from its
``data/`` entries, giving the state dict TorchScript's ``state_dict()`` would give.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from vidret.atomic import sha256_file
from vidret.backbone import hub
from vidret.backbone.clip import CLIP, CLIPConfig, fingerprint, get_config, list_configs
from vidret.backbone.convert import (
    Layout,
    check_state_dict,
    detect_layout,
    from_hf,
    from_openai,
    infer_config,
    load_state_dict_strict,
    unwrap,
)
from vidret.errors import VidretError
from vidret.safe_pickle import torchscript_state_dict

__all__ = [
    "PRETRAINED",
    "Checkpoint",
    "PretrainedSource",
    "backbone_info",
    "convert_checkpoint",
    "download",
    "list_backbones",
    "load_backbone",
    "load_checkpoint",
    "resolve_cache_dir",
]

log = logging.getLogger(__name__)

FileFormat = Literal["torchscript", "torch", "safetensors", "hf-directory"]


@dataclass(frozen=True)
class PretrainedSource:
    """Where a pretrained backbone comes from."""

    config: str  # named architecture the weights must have (configs/<config>.json)
    url: str  # direct download URL ("" for weights that ship inside the package)
    sha256: str  # hex digest of the whole file
    package_file: str = ""  # path inside the vidret package of weights shipped with it ("" = downloaded)

    @property
    def filename(self) -> str:
        return (self.package_file or self.url).rsplit("/", 1)[-1]


def packaged_path(src: PretrainedSource) -> Path:
    """Where weights that ship inside the package are installed (editable or normal install alike)."""
    from importlib.resources import files

    return Path(str(files("vidret").joinpath(src.package_file)))


def _openai(config: str, sha256: str, filename: str) -> PretrainedSource:
    # OpenAI puts the file's sha256 in the URL path, as in clip/clip.py's `_download`.
    return PretrainedSource(config, f"https://openaipublic.azureedge.net/clip/models/{sha256}/{filename}", sha256)


# OpenAI's public CLIP ViT checkpoints (TorchScript archives, fp16), from OpenAI clip/clip.py `_MODELS`.
# Written from memory of that table and cross-checked against copies of it in public repositories; not
# downloaded while writing this (no network). Whoever first runs with network should confirm each one
# (a wrong hash fails loudly: the download is deleted and the error names the digest it got).
PRETRAINED: dict[str, PretrainedSource] = {
    "ViT-B-32": _openai("ViT-B-32", "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
    "ViT-B-16": _openai("ViT-B-16", "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
    "ViT-L-14": _openai("ViT-L-14", "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"),
    "ViT-L-14-336": _openai(
        "ViT-L-14-336", "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02", "ViT-L-14-336px.pt"
    ),
    # The pocket CLIP (POCKET.md), pretrained once on the pocket world's static image-caption set and shipped in
    # the package (fp16 safetensors). Regenerate: see backbone/weights/README.md for the exact command.
    "pocket-small": PretrainedSource(
        "pocket-small",
        "",
        "730088dcbdeda4beecdec74a2585ae82e1bded70143822f21d573a06ca523fea",
        package_file="backbone/weights/pocket-small.safetensors",
    ),
}

_CHUNK = 1 << 20
_TIMEOUT_S = 60.0  # per socket operation, not per file
_RETRY_WAITS_S: tuple[float, ...] = (1.0, 4.0, 10.0)  # pauses between attempts (each resumes the .part file)
_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def list_backbones() -> list[str]:
    """Names of the bundled architectures (pretrained or not); ``PRETRAINED`` says which have weights."""
    return list_configs()


def resolve_cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The download cache: ``override``, else ``$VIDRET_CACHE``, else ``$XDG_CACHE_HOME/vidret`` (~/.cache)."""
    if override is not None:
        return Path(override).expanduser()
    if os.environ.get("VIDRET_CACHE"):
        return Path(os.environ["VIDRET_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "vidret"


def _offline() -> bool:
    return hub.env_flag("VIDRET_OFFLINE")


# --------------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------------


class _FatalHTTP(Exception):
    """An HTTP answer that retrying cannot fix (404, 403, ...)."""


def _manual_hint(name: str, src: PretrainedSource, target: Path, reason: str) -> str:
    return (
        f"cannot download backbone {name!r}: {reason}. Fetch {src.url} yourself (sha256 {src.sha256}) and "
        f"either put it at {target} or pass its path: vidret.load_backbone('/path/{src.filename}') "
        f"or --backbone /path/{src.filename}"
    )


def _stamp_path(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _write_stamp(target: Path, digest: str) -> None:
    # Remember (digest, size, mtime) so a cache hit need not re-hash a 900 MB file on every load.
    try:
        st = target.stat()
        _stamp_path(target).write_text(f"{digest} {st.st_size} {st.st_mtime_ns}\n")
    except OSError as e:  # a read-only cache still works: it is re-hashed on each load
        log.debug("cannot write %s: %s", _stamp_path(target), e)


def _stamp_ok(target: Path, digest: str) -> bool:
    try:
        got, size, mtime = _stamp_path(target).read_text().split()
        st = target.stat()
    except (OSError, ValueError):
        return False
    return got == digest and int(size) == st.st_size and int(mtime) == st.st_mtime_ns


def download(name: str, cache_dir: str | os.PathLike[str] | None = None, *, progress: bool = True) -> Path:
    """Download a pretrained backbone once into the cache and return its path.

    The file streams into ``<name>.part`` (resumed with an HTTP Range request after an interruption,
    retried a few times), is checked against its sha256 and only then renamed into place, so the cache
    never holds an unverified file under the final name.

    Raises:
        VidretError: unknown name; ``VIDRET_OFFLINE=1`` or no network (the message says which URL to
            fetch and how to pass the file as a path); a sha256 mismatch (only the bad download is deleted).
    """
    if name not in PRETRAINED:
        raise VidretError(f"no pretrained weights named {name!r}; available: {', '.join(PRETRAINED)}")
    src = PRETRAINED[name]
    if src.package_file:
        return _packaged(name, src)
    root = resolve_cache_dir(cache_dir)
    target = root / src.filename
    if target.is_file():
        if _stamp_ok(target, src.sha256):
            return target
        digest = sha256_file(target)
        if digest == src.sha256:
            _write_stamp(target, digest)
            return target
        log.warning(
            "cached %s has sha256 %s, expected %s: deleting it and downloading again", target, digest, src.sha256
        )
        target.unlink()
    if _offline():
        raise VidretError(_manual_hint(name, src, target, "VIDRET_OFFLINE is set and the file is not in the cache"))
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VidretError(f"cannot create the cache dir {root} ({e}); set VIDRET_CACHE to a writable folder") from e
    with _file_lock(target.with_name(target.name + ".lock")):
        if target.is_file() and _stamp_ok(target, src.sha256):
            return target  # another process (e.g. another DDP rank) finished it while we waited
        return _download_locked(name, src, target, progress)


def _packaged(name: str, src: PretrainedSource) -> Path:
    """The shipped weights of ``name``, sha256-checked (a few MB: hashed on every load)."""
    path = packaged_path(src)
    regen = "reinstall vidret, or regenerate the file as backbone/weights/README.md says"
    if not path.is_file():
        raise VidretError(
            f"the weights of {name!r} should ship with vidret at {path}, but the file is missing: {regen}"
        )
    digest = sha256_file(path)
    if digest != src.sha256:
        raise VidretError(f"{path} has sha256 {digest}, not the {src.sha256} vidret expects for {name!r}: {regen}")
    return path


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so concurrent processes never append to the same ``.part`` file."""
    try:
        import fcntl
    except ImportError:  # not POSIX (Windows): no lock; concurrent downloads of one file are not guarded
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download_locked(name: str, src: PretrainedSource, target: Path, progress: bool) -> Path:
    part = target.with_name(target.name + ".part")
    last_error: BaseException | None = None
    for attempt in range(len(_RETRY_WAITS_S) + 1):
        try:
            _fetch(src.url, part, progress)
            break
        except _FatalHTTP as e:
            raise VidretError(_manual_hint(name, src, target, str(e))) from e
        except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets, early close
            last_error = e
            if _no_network(e):  # retrying a failed name lookup only delays the offline message by ~20 s
                raise VidretError(_manual_hint(name, src, target, f"no network ({e})")) from e
            if attempt < len(_RETRY_WAITS_S):
                log.warning("download of %s interrupted (%s); retrying", src.url, e)
                time.sleep(_RETRY_WAITS_S[attempt])
    else:
        attempts = len(_RETRY_WAITS_S) + 1
        raise VidretError(
            _manual_hint(name, src, target, f"{attempts} attempts failed, last: {last_error}")
        ) from last_error
    digest = sha256_file(part)
    if digest != src.sha256:
        part.unlink()
        raise VidretError(
            f"sha256 mismatch for {src.url}: got {digest}, expected {src.sha256}. Deleted the bad download "
            f"{part} (and nothing else). Try again; if it persists, fetch the file yourself, check its sha256 "
            f"and pass its path: vidret.load_backbone('/path/{src.filename}')"
        )
    try:
        os.replace(part, target)  # atomic: the final name only ever holds a verified file
    except OSError as e:
        raise VidretError(f"cannot move the verified download {part} to {target}: {e}") from e
    _write_stamp(target, digest)
    return target


def _no_network(e: BaseException) -> bool:
    """A failure no retry can fix: the host name does not resolve (offline machine, no DNS)."""
    reason = e.reason if isinstance(e, urllib.error.URLError) else e
    return isinstance(reason, socket.gaierror)


def _fetch(url: str, part: Path, progress: bool) -> None:
    """Stream ``url`` into ``part``, resuming from its current size when the server honours Range."""
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": "vidret"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            return  # nothing left to fetch: the .part already holds the whole file; the hash decides
        if e.code >= 500 or e.code == 429:
            raise  # server trouble: worth a retry
        raise _FatalHTTP(f"HTTP {e.code} {e.reason} from {url}") from e
    with resp:
        if offset and resp.status == 206:
            start = resp.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
            if start.strip() != str(offset):
                part.unlink()
                raise http.client.HTTPException(f"server resumed at byte {start!r}, not {offset}; restarting")
            mode = "ab"
        else:
            offset, mode = 0, "wb"  # no Range support (plain 200): start over
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        with (
            open(part, mode) as f,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name.removesuffix(".part"),
                disable=not progress,
            ) as bar,
        ):
            while chunk := resp.read(_CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    if total is not None and part.stat().st_size < total:
        raise http.client.IncompleteRead(b"", total - part.stat().st_size)


# --------------------------------------------------------------------------------------------------
# Reading checkpoint files
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read from disk, converted to vidret's layout and checked against its architecture."""

    path: Path
    format: FileFormat  # container: TorchScript archive, torch.save pickle, safetensors, HF directory
    layout: Layout  # key layout found in the file
    config: CLIPConfig  # architecture (inferred from shapes unless the file states it)
    state_dict: dict[str, Tensor]  # vidret layout, tensors as stored (dtype unchanged)


def _sniff(path: Path) -> Literal["zip", "pickle", "safetensors", "unknown"]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{":
        header_len = int.from_bytes(head[:8], "little")
        if header_len < size:
            return "safetensors"
        raise VidretError(f"{path}: safetensors header says {header_len} bytes but the file has {size}: truncated")
    if head[:1] == b"\x80":  # pickle protocol marker: the pre-1.6 torch.save format
        return "pickle"
    return "unknown"


def _corrupt(path: Path, e: BaseException) -> VidretError:
    return VidretError(
        f"cannot read {path} ({path.stat().st_size} bytes): the file is corrupt or truncated ({e}). "
        "Download or convert it again"
    )


def _torch_load(path: Path, mmap: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        if mmap and "weights_only" not in str(e) and "Weights only" not in str(e):
            return _torch_load(path, mmap=False)  # some filesystems refuse mmap; the error (if any) repeats
        msg = str(e)
        if "Weights only load failed" in msg or "weights_only" in msg:
            raise VidretError(
                f"{path} contains pickled Python objects besides tensors (e.g. a whole model saved with "
                "torch.save(model)); vidret never unpickles code. Save weights only, torch.save(model.state_dict(), "
                "path), or as safetensors"
            ) from e
        raise _corrupt(path, e) from e


def _read_torch_file(path: Path) -> tuple[FileFormat, Any]:
    kind = _sniff(path)
    if kind == "zip":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise _corrupt(path, e) from e
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            # A TorchScript archive (OpenAI's published format): weights_only cannot read it. See module doc.
            return "torchscript", torchscript_state_dict(path)
        return "torch", _torch_load(path, mmap=True)
    if kind == "pickle":
        return "torch", _torch_load(path, mmap=False)
    if kind == "safetensors":
        try:
            tensors = load_file(str(path), device="cpu")
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as e:
            raise _corrupt(path, e) from e
        return "safetensors", (tensors, meta)
    raise VidretError(
        f"{path} is not a checkpoint vidret can read (not a torch .pt/.pth/.bin, TorchScript or safetensors "
        "file; or it is corrupt)"
    )


def _hf_heads(config_path: Path) -> tuple[int, int]:
    """(vision heads, text heads) from an HF CLIPModel config.json; refuses activations we do not implement."""
    try:
        cfg = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise VidretError(f"cannot read {config_path}: {e}") from e
    if cfg.get("model_type", "clip") != "clip":
        raise VidretError(f"{config_path}: model_type {cfg.get('model_type')!r}; vidret loads CLIPModel ('clip') only")
    heads = []
    # Old HF configs keep overrides in *_config_dict, which HF itself applies on top of *_config.
    for tower, default_heads in (("vision", 12), ("text", 8)):
        tcfg = {**(cfg.get(f"{tower}_config") or {}), **(cfg.get(f"{tower}_config_dict") or {})}
        act = tcfg.get("hidden_act", "quick_gelu")
        if act != "quick_gelu":
            raise VidretError(
                f"{config_path}: the {tower} tower uses activation {act!r}; vidret's CLIP implements OpenAI's "
                "QuickGELU only, so these weights would give wrong embeddings"
            )
        heads.append(int(tcfg.get("num_attention_heads", default_heads)))
    return heads[0], heads[1]


def _read_hf_dir(path: Path) -> dict[str, Tensor]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError) as e:
                raise VidretError(f"cannot read the shard index {index}: {e}") from e
            sd: dict[str, Tensor] = {}
            for shard in shards:
                sd.update(_tensors_of(path / shard))
            return sd
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return _tensors_of(path / name)
    raise VidretError(f"{path} has a config.json but no model.safetensors or pytorch_model.bin")


def _tensors_of(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise VidretError(f"missing checkpoint file {path}")
    fmt, obj = _read_torch_file(path)
    return unwrap(obj[0] if fmt == "safetensors" else obj)


def _expected(config: CLIPConfig) -> dict[str, Tensor]:
    """The state dict shapes of ``config`` without allocating memory."""
    with torch.device("meta"):
        return CLIP(config).state_dict()


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read any supported checkpoint file or HF directory into vidret's layout, checked strictly.

    Raises:
        VidretError: missing, corrupt, truncated or unrecognised files; pickles holding code; tensors that
            do not form a CLIP ViT (the message names the missing, unexpected or mis-shaped keys).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise VidretError(f"no such checkpoint file or directory: {p}")
    try:
        return _load_checkpoint(p)
    except OSError as e:  # permissions, I/O errors: the user's to fix, not a traceback
        raise VidretError(f"cannot read {p}: {e}") from e


def _load_checkpoint(p: Path) -> Checkpoint:
    heads: tuple[int, int] | None = None
    stated: CLIPConfig | None = None
    fmt: FileFormat
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise VidretError(f"{p} is a directory without config.json: pass the checkpoint file itself")
        heads = _hf_heads(p / "config.json")
        fmt, raw = "hf-directory", _read_hf_dir(p)
    else:
        fmt, obj = _read_torch_file(p)
        if fmt == "safetensors":
            obj, meta = obj
            if "vidret_config" in meta:  # written by convert_checkpoint: the file states its architecture
                try:
                    stated = CLIPConfig.from_dict(json.loads(meta["vidret_config"]))
                except (ValueError, KeyError, TypeError) as e:
                    raise VidretError(f"{p}: bad vidret_config metadata ({e})") from e
        raw = unwrap(obj)
    layout = detect_layout(raw)
    if layout == "hf" and heads is None and p.is_file() and (p.parent / "config.json").is_file():
        heads = _hf_heads(p.parent / "config.json")  # an HF model file passed without its directory
    sd = from_hf(raw) if layout == "hf" else from_openai(raw) if layout == "openai" else raw
    if stated is not None:
        config = stated
    elif heads is not None:
        config = infer_config(sd, vision_heads=heads[0], text_heads=heads[1])
    else:
        config = infer_config(sd)
    check_state_dict(_expected(config), sd, f"the {config.name} architecture (inferred from {p.name})")
    return Checkpoint(path=p, format=fmt, layout=layout, config=config, state_dict=sd)


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------


def _resolve(
    name_or_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None, progress: bool
) -> tuple[Path, str | None]:
    """(local path, architecture the weights must have or None)."""
    text = os.fspath(name_or_path)
    p = Path(text).expanduser()
    if p.exists():
        return p, None
    if text in PRETRAINED:
        return download(text, cache_dir, progress=progress), PRETRAINED[text].config
    if text in list_configs():
        raise VidretError(
            f"{text!r} is an architecture without pretrained weights: use vidret.create_backbone({text!r}) "
            "for random init, or pass a checkpoint path"
        )
    if hub.is_hub_id(text):
        return hub.fetch(text), None
    if os.sep in text or "/" in text or text.endswith(_SUFFIXES):
        raise VidretError(f"no such checkpoint file or directory: {p}")
    raise VidretError(
        f"unknown backbone {text!r}: pretrained names are {', '.join(PRETRAINED)}; or pass the path of a "
        "checkpoint file (OpenAI .pt, open_clip, safetensors) or an HF CLIPModel directory, or a Hugging Face Hub "
        "repo id (openai/clip-vit-base-patch16)"
    )


def load_backbone(
    name_or_path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    *,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> CLIP:
    """A CLIP backbone with pretrained weights, in eval mode.

    Args:
        name_or_path: a name from ``PRETRAINED`` (downloaded once, sha256-checked), a checkpoint path
            (OpenAI TorchScript / state-dict ``.pt``, open_clip checkpoint, ``.safetensors``, HF directory) or a
            Hugging Face Hub repo id (``owner/name``, not a local path).
        cache_dir: download cache of ``PRETRAINED`` names; default ``$VIDRET_CACHE`` or ``~/.cache/vidret``. Hub
            repos use the Hugging Face cache (``HF_HUB_CACHE``).
        device: where the weights go.
        dtype: parameter dtype (OpenAI ships fp16; the default fp32 matches OpenAI's CPU loading).
        progress: show a download progress bar.
    """
    path, expected_arch = _resolve(name_or_path, cache_dir, progress)
    ckpt = load_checkpoint(path)
    if expected_arch is not None and not ckpt.config.same_architecture(get_config(expected_arch)):
        raise VidretError(f"{path} holds a {ckpt.config.name} architecture, not {expected_arch}")
    with torch.device("meta"):
        model = CLIP(ckpt.config)  # no random init: every tensor is overwritten below
    model = model.to_empty(device=device).to(dtype)
    load_state_dict_strict(model, ckpt.state_dict)
    return model.eval()


def _param_counts(shapes: Mapping[str, Tensor]) -> dict[str, int]:
    counts = {"visual": 0, "text": 0, "other": 0}
    for key, t in shapes.items():
        tower = key.split(".", 1)[0]
        counts[tower if tower in counts else "other"] += t.numel()
    counts["total"] = sum(counts.values())
    return counts


def backbone_info(
    name_or_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """Architecture, parameter counts per tower and source of a backbone name or checkpoint.

    Downloads nothing for a pretrained name; a Hub repo id is fetched (the weights give the counts).

    Returns:
        ``{"name", "source", "format", "architecture", "parameters": {"visual", "text", "other", "total"},
        "pretrained": {"url", "sha256", "cached"} | None, "fingerprint": str | None, "dtypes": [...]}``
    """
    text = os.fspath(name_or_path)
    p = Path(text).expanduser()
    if not p.exists() and (text in PRETRAINED or text in list_configs()):
        config = get_config(PRETRAINED[text].config if text in PRETRAINED else text)
        pretrained = None
        if text in PRETRAINED:
            src = PRETRAINED[text]
            target = packaged_path(src) if src.package_file else resolve_cache_dir(cache_dir) / src.filename
            pretrained = {"url": src.url, "sha256": src.sha256, "cached": str(target) if target.is_file() else None}
        return {
            "name": config.name,
            "source": (pretrained["url"] or f"shipped with vidret: {pretrained['cached']}")
            if pretrained
            else "architecture only (no pretrained weights)",
            "format": "named config",
            "architecture": config.to_dict(),
            "parameters": _param_counts(_expected(config)),
            "pretrained": pretrained,
            "fingerprint": None,
            "dtypes": [],
        }
    path, _ = _resolve(name_or_path, cache_dir, progress=False)
    ckpt = load_checkpoint(path)
    return {
        "name": ckpt.config.name,
        "source": str(ckpt.path),
        "format": f"{ckpt.format} ({ckpt.layout} layout)",
        "architecture": ckpt.config.to_dict(),
        "parameters": _param_counts(ckpt.state_dict),
        "pretrained": None,
        "fingerprint": fingerprint(ckpt.state_dict),
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in ckpt.state_dict.values()}),
    }


def convert_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Convert any supported checkpoint (or pretrained name) to vidret's layout as one ``.safetensors`` file.

    The architecture is stored in the file's metadata (``vidret_config``), so loading it needs no
    inference. Written to a temporary name and renamed, so ``dst`` is never half-written.

    Args:
        src: a checkpoint path, HF directory, pretrained name or Hub repo id.
        dst: output file; a directory gets ``<src stem>.safetensors`` inside it.
        dtype: cast floating tensors (e.g. ``torch.float16``); None keeps the stored dtypes.
        cache_dir: download cache for pretrained names.

    Returns:
        The written path.
    """
    path, _ = _resolve(src, cache_dir, progress=True)
    ckpt = load_checkpoint(path)
    out = Path(dst).expanduser()
    if out.is_dir():
        text = os.fspath(src)
        # a Hub snapshot folder is named by its commit hash: name the file after the repo instead
        stem = text.replace("/", "--") if hub.is_hub_id(text) else path.stem if path.is_file() else path.name
        out = out / f"{stem}.safetensors"
    if out.suffix != ".safetensors":
        raise VidretError(f"the output {out} must end in .safetensors")
    # Clone: q/k/v split from OpenAI's fused in_proj are views of one storage, which safetensors refuses.
    tensors = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().clone()
        for k, v in ckpt.state_dict.items()
    }
    meta = {
        "format": "pt",
        "vidret_config": json.dumps(ckpt.config.to_dict()),
        "source": str(ckpt.path),
        "source_format": f"{ckpt.format} ({ckpt.layout} layout)",
    }
    tmp = out.with_name(out.name + ".tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise VidretError(f"cannot write {out}: {e}") from e
    return out
