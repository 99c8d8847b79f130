"""Inputs and perturbations shared by the per-method adapter tests (tiny "pocket-tiny" backbone)."""

from __future__ import annotations

import torch
from torch import Tensor

from vidret.model import VideoTextModel

EOT = 49407


def make_inputs(seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Two videos of 3 frames of 32 px (one padding frame) and two captions of 8 tokens."""
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(2, 3, 3, 32, 32, generator=g)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    tokens = torch.randint(1, 1000, (2, 8), generator=g)
    tokens[0, 5], tokens[0, 6:] = EOT, 0
    tokens[1, 7] = EOT
    return frames, mask, tokens


def encode(model: VideoTextModel, inputs: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    frames, mask, tokens = inputs
    return model.encode_video(frames, mask).frames, model.encode_text(tokens)


def perturb(model: VideoTextModel, std: float = 0.2, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.trainable_named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
