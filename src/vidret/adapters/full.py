"""Full fine-tuning (CLIP4Clip): every backbone parameter trains; a whole model copy per task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from vidret.adapters.base import AdapterConfig, MethodSpec, backbone_named_parameters
from vidret.backbone.clip import CLIP


@dataclass(frozen=True)
class FullConfig(AdapterConfig):
    """CLIP4Clip-style full fine-tuning; ``head`` may be meanP or seq_transformer."""

    method: ClassVar[str] = "full"


def inject(clip: CLIP, config: FullConfig, adapter: str) -> list[str]:
    return []


def extra_trainables(clip: CLIP, config: FullConfig) -> list[tuple[str, nn.Parameter]]:
    # The logit scale stays frozen at CLIP's value, as in both papers.
    return [(n, p) for n, p in backbone_named_parameters(clip) if n != "logit_scale"]


SPEC = MethodSpec(
    name="full",
    config_cls=FullConfig,
    inject=inject,
    description="full fine-tuning of both towers (CLIP4Clip meanP); stores a whole model per task",
    presets={"default": {}, "seq_transformer": {"head": "seq_transformer"}},
    extra_trainables=extra_trainables,
    reference="CLIP4Clip (Luo et al. 2021)",
    shareable=False,
)
