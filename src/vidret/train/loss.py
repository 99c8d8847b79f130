"""Symmetric InfoNCE over the global batch (both papers' objective)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def symmetric_infonce(logits: Tensor) -> Tensor:
    """Mean of text->video and video->text cross-entropy over a square logits matrix [N, N] (pairs on the diagonal).

    ``logits`` already includes the logit scale.
    """
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"expected square logits, got {tuple(logits.shape)}")
    target = torch.arange(logits.shape[0], device=logits.device)
    logits = logits.float()
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
