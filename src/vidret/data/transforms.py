"""CLIP image preprocessing split in two: resize + centre crop (uint8, once, cacheable) and normalise
(float, at batch time).

Matches CLIP's ``Resize(S, bicubic) -> CenterCrop(S) -> Normalize(mean, std)`` without torchvision:
the short side goes to S (long side ``int(S * long / short)``, torchvision's rounding), bicubic with
antialiasing, then the centre S x S crop.

The resize runs ``F.interpolate(bicubic, antialias=True)`` directly on uint8 channels-last frames:
PyTorch's fixed-point kernel for that case is ~10x faster on CPU than the float one (3.8 ms vs 33 ms
for three 320x240 frames on one core here) and saturates to 0..255 by itself; on real video frames it
differs from float-interpolate-clamp-round by at most 2 grey levels (mean 0.14). Where a PyTorch
build lacks the uint8 kernel the float path (clamped to 0..255, rounded) is used.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _resized_hw(h: int, w: int, size: int) -> tuple[int, int]:
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def _interpolate_uint8(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """uint8 [T, 3, H, W] (any strides) -> uint8 [T, 3, h, w], bicubic with antialiasing."""
    try:
        # channels-last uint8 input selects PyTorch's fast fixed-point antialiasing kernel
        y = x.contiguous(memory_format=torch.channels_last)
        return F.interpolate(y, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    except RuntimeError:  # no uint8 kernel in this PyTorch build
        f = x.contiguous().float()
        f = F.interpolate(f, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        # bicubic overshoots at edges: clamp before rounding back to uint8
        return f.clamp_(0, 255).round_().to(torch.uint8)


def resize_crop(frames: np.ndarray | torch.Tensor, size: int = 224) -> np.ndarray:
    """Resize the short side to ``size`` (bicubic, antialiased) and centre-crop to ``size`` x ``size``.

    Args:
        frames: uint8 [T, H, W, 3] or one frame [H, W, 3] (RGB).
        size: Output side S.

    Returns:
        uint8 array [T, S, S, 3] (or [S, S, 3] for one frame).
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    x = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames)
    if x.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8, got {x.dtype}")
    single = x.ndim == 3
    if single:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got {tuple(x.shape)}")
    _, h, w, _ = x.shape
    nh, nw = _resized_hw(h, w, size)
    if (nh, nw) != (h, w):
        x = _interpolate_uint8(x.permute(0, 3, 1, 2), nh, nw).permute(0, 2, 3, 1)  # [T, nh, nw, 3]
    top = int(round((nh - size) / 2.0))
    left = int(round((nw - size) / 2.0))
    out = x[:, top : top + size, left : left + size, :].contiguous().numpy()  # [T, S, S, 3]
    return out[0] if single else out


def normalize(frames: np.ndarray | torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [..., S, S, 3] -> float32 [..., 3, S, S] with CLIP mean/std.

    Args:
        frames: uint8 frames, channels last.
        out: Optional float32 [..., 3, S, S] tensor to write into (saves an allocation and a copy).
    """
    x = frames if isinstance(frames, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(frames))
    if x.dtype != torch.uint8 or x.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [..., H, W, 3], got {x.dtype} {tuple(x.shape)}")
    chw = x.movedim(-1, -3).contiguous()  # [..., H, W, 3] -> [..., 3, H, W], still uint8 (cheap)
    if out is None:
        out = torch.empty(chw.shape, dtype=torch.float32)
    elif out.shape != chw.shape or out.dtype != torch.float32:
        raise ValueError(f"out must be float32 {tuple(chw.shape)}, got {out.dtype} {tuple(out.shape)}")
    # One fused pass per channel, (x - mean) / std as x * (1/std) - mean/std: ~25% faster than
    # converting to float first and normalising in place, and 2-5x faster than (x.float() - m) / s.
    for c, (m, sd) in enumerate(zip(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)):
        scale = 1.0 / (sd * 255.0)
        torch.add(torch.tensor(-m / sd), chw[..., c, :, :], alpha=scale, out=out[..., c, :, :])
    return out


def preprocess_frames(frames: np.ndarray | torch.Tensor, size: int = 224) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> normalised float32 [T, 3, S, S] (resize + crop + normalise)."""
    return normalize(resize_crop(frames, size))


__all__ = ["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "normalize", "preprocess_frames", "resize_crop"]
