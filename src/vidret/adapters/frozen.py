"""Frozen zero-shot CLIP: no new modules, nothing trained (the papers' lower baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vidret.adapters.base import AdapterConfig, MethodSpec
from vidret.backbone.clip import CLIP


@dataclass(frozen=True)
class FrozenConfig(AdapterConfig):
    """Zero-shot CLIP with a parameter-free similarity head."""

    method: ClassVar[str] = "frozen"


def inject(clip: CLIP, config: FrozenConfig, adapter: str) -> list[str]:
    return []


SPEC = MethodSpec(
    name="frozen",
    config_cls=FrozenConfig,
    inject=inject,
    description="frozen zero-shot CLIP with meanP pooling; nothing trained",
    presets={"default": {}},
    reference="CLIP4Clip zero-shot baseline",
)
