"""Frame -> video pooling and text-video similarity heads.

Every head maps text embeddings ``[N, E]`` and per-frame video embeddings ``[B, T, E]`` with a frame mask
``[B, T]`` to logits ``[N, B]`` (logit scale included). Padding frames (mask False) never contribute.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vidret.backbone.clip import ForwardContext, ResidualBlock


class VideoFeatures(NamedTuple):
    """Per-frame embeddings of a batch of videos and which frames are real."""

    frames: Tensor  # [B, T, E], not normalised
    mask: Tensor  # [B, T] bool, True = real frame


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over T of [B, T, E] where mask [B, T] is True (a video with no real frame gives zeros)."""
    m = mask.to(x.dtype).unsqueeze(-1)  # [B, T, 1]
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class MeanPHead(nn.Module):
    """CLIP4Clip meanP: normalise frames, masked mean, normalise; cosine with the text, times the scale."""

    def pool(self, video: VideoFeatures) -> Tensor:
        """[B, T, E] -> normalised video embedding [B, E] (text-independent, so it can be indexed)."""
        return F.normalize(masked_mean(F.normalize(video.frames, dim=-1), video.mask), dim=-1)

    def forward(self, text: Tensor, video: VideoFeatures, logit_scale: Tensor) -> Tensor:
        return logit_scale * F.normalize(text, dim=-1) @ self.pool(video).t()


class TextConditionedHead(nn.Module):
    """Cross-Modal Adapter's parameter-free pooling: frame weights softmax_j(<t, f_j> / tau) on raw embeddings.

    The pooled video ``v = sum_j w_j f_j`` differs per text, so instead of materialising ``[N, B, E]`` we use
    ``<t, v> = sum_j w_j <t, f_j>`` and ``|v|^2 = w^T G w`` with the per-video Gram matrix ``G = F F^T``.
    """

    def __init__(self, tau: float = 5.0, chunk: int = 1024) -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError("tau must be positive")
        self.tau = tau
        self.chunk = chunk  # texts per chunk: bounds the [N, B, T] intermediate

    def pool(self, video: VideoFeatures) -> None:
        return None  # text-dependent: an index stores per-frame features instead

    def forward(self, text: Tensor, video: VideoFeatures, logit_scale: Tensor) -> Tensor:
        f, mask = video.frames, video.mask
        gram = torch.einsum("bte,bse->bts", f, f)  # [B, T, T]
        out = []
        for t in text.split(self.chunk):
            s = torch.einsum("ne,bte->nbt", t, f)  # [N, B, T] raw dot products
            logits = (s / self.tau).masked_fill(~mask.unsqueeze(0), float("-inf"))
            w = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a video with no real frame -> zero weights
            dot = (w * s).sum(-1)  # [N, B] = <t, v>
            sq = torch.einsum("nbt,bts,nbs->nb", w, gram, w).clamp_min(1e-12)  # |v|^2
            out.append(dot / (t.norm(dim=-1, keepdim=True).clamp_min(1e-12) * sq.sqrt()))
        return logit_scale * torch.cat(out, dim=0)


class SeqTransformerHead(nn.Module):
    """CLIP4Clip seqTransf: a small transformer over frame embeddings (+ frame positions), residual, then meanP."""

    def __init__(self, embed_dim: int, layers: int = 4, max_frames: int = 64) -> None:
        super().__init__()
        heads = max(1, embed_dim // 64)
        self.frame_position = nn.Embedding(max_frames, embed_dim)
        self.blocks = nn.ModuleList([ResidualBlock(embed_dim, heads, 4.0) for _ in range(layers)])
        self.meanp = MeanPHead()
        nn.init.normal_(self.frame_position.weight, std=0.01)

    def contextualise(self, video: VideoFeatures) -> VideoFeatures:
        f, mask = video.frames, video.mask
        T = f.shape[1]
        if self.frame_position.num_embeddings < T:
            raise ValueError(f"seq_transformer head supports at most {self.frame_position.num_embeddings} frames")
        x = f + self.frame_position.weight[:T].to(f.dtype)
        # Padding frames are never attended to: bool SDPA mask [B, 1, 1, T], True = attend.
        ctx = ForwardContext("image", attn_mask=mask[:, None, None, :])
        for block in self.blocks:
            x = block(x, ctx)
        return VideoFeatures(f + x, mask)

    def pool(self, video: VideoFeatures) -> Tensor:
        return self.meanp.pool(self.contextualise(video))

    def forward(self, text: Tensor, video: VideoFeatures, logit_scale: Tensor) -> Tensor:
        return logit_scale * F.normalize(text, dim=-1) @ self.pool(video).t()


def make_head(name: str, embed_dim: int) -> nn.Module:
    """Build a head by its config name."""
    if name == "meanP":
        return MeanPHead()
    if name == "text_conditioned":
        return TextConditionedHead()
    if name == "seq_transformer":
        return SeqTransformerHead(embed_dim)
    raise ValueError(f"unknown head {name!r}; known: meanP, text_conditioned, seq_transformer")
