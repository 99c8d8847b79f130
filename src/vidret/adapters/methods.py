"""The built-in methods, registered once by name (each method file defines its ``SPEC``)."""

from __future__ import annotations

import importlib

from vidret.adapters.base import register

# One module per method (DESIGN.md rule 5); each defines SPEC: MethodSpec.
_METHOD_MODULES = (
    "vidret.adapters.frozen",
    "vidret.adapters.full",
    "vidret.adapters.mv_adapter",
    "vidret.adapters.cross_modal",
    "vidret.adapters.bottleneck",
    "vidret.adapters.lora",
    "vidret.adapters.st_adapter",
    "vidret.adapters.convpass",
    "vidret.adapters.prompt",
)

for _name in _METHOD_MODULES:
    register(importlib.import_module(_name).SPEC)
