"""vidret: parameter-efficient text-video retrieval over one frozen CLIP backbone.

The public names (``../shared/API.md``) are resolved lazily, so ``import vidret`` stays cheap and importing a
submodule (``vidret.data.decode``) does not pull in the model code.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "AdapterBank": "vidret.model",
    "VideoTextModel": "vidret.model",
    "build_model": "vidret.model",
    "parameter_report": "vidret.model",
    "create_backbone": "vidret.backbone.clip",
    "list_backbones": "vidret.backbone.pretrained",
    "load_backbone": "vidret.backbone.pretrained",
    "tokenize": "vidret.backbone.tokenizer",
    "list_methods": "vidret.adapters.base",
    "save_adapter": "vidret.adapters.io",
    "load_adapter": "vidret.adapters.io",
}

__all__ = sorted([*_EXPORTS, "backbone", "eval"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in ("backbone", "eval", "adapters", "data", "train", "retrieval"):
        return importlib.import_module(f"vidret.{name}")
    raise AttributeError(f"module 'vidret' has no attribute {name!r}")
