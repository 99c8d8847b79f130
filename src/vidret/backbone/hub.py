"""Hugging Face Hub repo ids as backbones: ``openai/clip-vit-base-patch16`` -> a local HF ``CLIPModel`` folder.

A backbone spec that looks like ``owner/name`` and is not an existing local path is a Hub repo id. Its files come
through the ``huggingface_hub`` library, so they land in (and are reused from) its cache (``HF_HUB_CACHE`` /
``HF_HOME``, shared with ``transformers``), with its login token, and obey its offline mode (``HF_HUB_OFFLINE=1``)
as well as vidret's own (``VIDRET_OFFLINE=1``).

Only what a CLIP backbone needs is fetched: ``config.json`` (checked to be a CLIP model before any weights are
fetched), then ``model.safetensors`` (or its shards), else ``pytorch_model.bin`` (or its shards), which is read with
``torch.load(weights_only=True)`` like every other checkpoint. Never a tokenizer, other frameworks' weights or code.
The folder returned is the cache snapshot, loaded by the same code as a local HF folder.
"""

from __future__ import annotations

import json
import os
import re
import socket
import urllib.parse
from pathlib import Path
from typing import Any

from vidret.errors import VidretError

__all__ = ["fetch", "is_hub_id"]

# Hugging Face's own rule (huggingface_hub.utils.validate_repo_id): [\w.-] names, at most 96 characters, no "--"
# or "..", no ".git" ending. Only the owner/name form: a bare name is a vidret pretrained name or a typo.
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
# A spec ending in a checkpoint suffix is a missing file (``runs/model.pt``), not a repo.
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
# Weight files in the order tried: safetensors first (no pickle at all), each whole or sharded.
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_PASS_FOLDER = "vidret.load_backbone('/path/to/folder') or --backbone /path/to/folder"


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` names a Hugging Face Hub repo (``owner/name``) rather than a local path."""
    return (
        len(spec) <= 96
        and _REPO_ID.fullmatch(spec) is not None
        and ".." not in spec
        and "--" not in spec
        and not spec.endswith(".git")
        and not spec.lower().endswith(_CHECKPOINT_SUFFIXES)
        and not os.path.lexists(os.path.expanduser(spec))
    )


def env_flag(name: str) -> bool:
    """Whether an on/off environment setting is on (unset, "", 0, false, no, off: off). VIDRET_OFFLINE reads it too."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _offline_reason(hf: Any) -> str | None:
    """Which setting forbids network access, or None. huggingface_hub reads HF_HUB_OFFLINE once at import."""
    for name in ("VIDRET_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if env_flag(name):
            return name
    return "HF_HUB_OFFLINE" if getattr(hf.constants, "HF_HUB_OFFLINE", False) else None


def _unresolvable(endpoint: str) -> str | None:
    """Why the Hub's host name does not resolve (an offline machine), or None.

    huggingface_hub retries a failed look-up for about 25 s before it falls back to its cache; a name that does not
    resolve will not resolve on retry, so the cache is read at once instead. Behind a proxy the proxy resolves it.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    host = urllib.parse.urlsplit(endpoint).hostname
    if not host:
        return None
    try:
        socket.getaddrinfo(host, 443)
    except socket.gaierror as e:
        return f"no network (cannot resolve {host}: {e.strerror or e})"
    except OSError:
        return None
    return None


def _hint(repo_id: str, reason: str) -> str:
    return (
        f"cannot load backbone {repo_id!r} from the Hugging Face Hub (no local file or folder has that name): "
        f"{reason}. Fetch it where there is network (hf download {repo_id} config.json model.safetensors "
        f"--local-dir /path/to/folder) and pass the folder: {_PASS_FOLDER}"
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def fetch(repo_id: str) -> Path:
    """Download (or find in the cache) the files of a CLIP backbone on the Hub; returns the folder holding them.

    Raises:
        VidretError: ``huggingface_hub`` missing; offline or no network with the files not cached (one line naming
            the repo and how to pass a local folder instead); no such repo, a gated one, not a CLIP model, or no
            weights file vidret reads.
    """
    try:
        import huggingface_hub as hf
        import huggingface_hub.constants  # noqa: F401  (a lazy package: submodules are attributes once imported)
        from huggingface_hub.utils import (
            EntryNotFoundError,
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )
    except ImportError as e:
        raise VidretError(
            f"{repo_id!r} is not a local path, so it names a Hugging Face Hub repo, which needs the huggingface_hub "
            f"package: pip install 'vidret[hf]'; or pass a local folder holding its config.json and weights: "
            f"{_PASS_FOLDER}"
        ) from e
    cache = getattr(hf.constants, "HF_HUB_CACHE", "the Hugging Face cache")
    offline = _offline_reason(hf)
    why_local = f"{offline} is set" if offline else _unresolvable(getattr(hf.constants, "ENDPOINT", ""))
    local_only = why_local is not None

    def get(filename: str, revision: str | None) -> Path:
        return Path(hf.hf_hub_download(repo_id, filename, revision=revision, local_files_only=local_only))

    def missing(what: str = "it") -> str:
        return f"{why_local or 'the Hub cannot be reached'} and {what} not in the Hugging Face cache ({cache})"

    try:
        config = get("config.json", None)
    except GatedRepoError as e:
        raise VidretError(
            _hint(repo_id, "the repo is gated: accept its terms on huggingface.co and log in (hf auth login)")
        ) from e
    except RepositoryNotFoundError as e:
        raise VidretError(
            _hint(repo_id, "no such repo on the Hub (or it is private: log in with hf auth login)")
        ) from e
    except LocalEntryNotFoundError as e:
        raise VidretError(_hint(repo_id, missing("it is"))) from e
    except EntryNotFoundError as e:
        raise VidretError(
            f"Hugging Face Hub repo {repo_id!r} has no config.json: it is not a transformers model"
        ) from e
    except (HfHubHTTPError, OSError) as e:
        raise VidretError(_hint(repo_id, _first_line(e))) from e
    _check_clip(repo_id, config)
    folder = config.parent
    # Pin every later file to the snapshot config.json came from, so all files are of one commit.
    revision = folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else None
    for name in _WEIGHTS:
        try:
            path = get(name, revision)
        except LocalEntryNotFoundError as e:
            if local_only:
                continue  # not cached: try the next form
            raise VidretError(_hint(repo_id, missing(f"{name} is"))) from e  # the Hub went away
        except EntryNotFoundError:
            continue  # not published: try the next form
        except (HfHubHTTPError, OSError) as e:
            raise VidretError(_hint(repo_id, f"fetching {name}: {_first_line(e)}")) from e
        if name.endswith(".index.json"):
            for shard in _shards(repo_id, path):
                try:
                    get(shard, revision)
                except (HfHubHTTPError, OSError, EntryNotFoundError) as e:
                    reason = missing("it is") if isinstance(e, LocalEntryNotFoundError) else _first_line(e)
                    raise VidretError(_hint(repo_id, f"shard {shard}: {reason}")) from e
        return folder
    if local_only:
        raise VidretError(_hint(repo_id, missing("its weights are")))
    raise VidretError(
        f"Hugging Face Hub repo {repo_id!r} has none of {', '.join(_WEIGHTS)}: vidret loads transformers CLIPModel "
        "weights only"
    )


def _check_clip(repo_id: str, config: Path) -> None:
    """Refuse a repo that is not a CLIP model before fetching its (possibly large) weights."""
    try:
        model_type = json.loads(config.read_text()).get("model_type", "clip")
    except (OSError, ValueError, AttributeError) as e:
        raise VidretError(f"cannot read the config.json of {repo_id!r} ({config}): {e}") from e
    if model_type != "clip":
        raise VidretError(
            f"Hugging Face Hub repo {repo_id!r} holds a {model_type!r} model; vidret loads CLIP models "
            "(transformers CLIPModel, model_type 'clip') only"
        )


def _shards(repo_id: str, index: Path) -> list[str]:
    """The shard file names an index lists; plain file names only (they are joined to the snapshot folder)."""
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise VidretError(f"cannot read the shard index {index} of {repo_id!r}: {e}") from e
    bad = [n for n in names if not isinstance(n, str) or "/" in n or "\\" in n or n.startswith(".")]
    if bad:
        raise VidretError(f"the shard index {index} of {repo_id!r} names files outside its folder: {bad[:3]}")
    return names
