"""Fixtures for the decoding / cache / dataset tests: small h264 videos whose frames say their index.

Frame i shows the bits of i as NBITS vertical black/white stripes (a square frame), which survive
h264 compression, resizing and the centre crop, so a test can tell exactly which frame came back.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from vidret.data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

NBITS = 10  # up to 1024 distinct frames
STRIPE = 8  # pixels per bit stripe in the written video


def index_frame(i: int, size: int = NBITS * STRIPE) -> np.ndarray:
    """uint8 [size, size, 3]: stripe b is white iff bit b of i is set."""
    img = np.zeros((size, size, 3), np.uint8)
    w = size // NBITS
    for b in range(NBITS):
        if (i >> b) & 1:
            img[:, b * w : (b + 1) * w] = 255
    return img


def read_index(frame: np.ndarray | torch.Tensor) -> int:
    """The index shown by a frame: uint8 [H, W, 3] or CLIP-normalised float [3, H, W]."""
    if isinstance(frame, torch.Tensor) and frame.is_floating_point():
        mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
        std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
        gray = (frame * std + mean).mean(0).numpy()  # [H, W] in 0..1
    else:
        gray = np.asarray(frame, dtype=np.float32).mean(-1) / 255.0  # [H, W]
    w = gray.shape[1] / NBITS
    v = 0
    for b in range(NBITS):
        lo, hi = int(b * w + w / 4), int((b + 1) * w - w / 4)
        if gray[:, lo:hi].mean() > 0.5:
            v |= 1 << b
    return v


def write_index_video(
    path: Path,
    num_frames: int = 30,
    fps: int = 30,
    gop: int | None = None,
    pts_ms: Sequence[int] | None = None,
    codec: str = "libx264",
    fmt: str | None = None,
    size: int = NBITS * STRIPE,
    b_frames: bool = True,
    scenecut: bool = True,
) -> Path:
    """Write a video whose frame i shows i; ``pts_ms`` gives variable-frame-rate timestamps (ms).

    x264 adds keyframes at scene cuts (every stripe change is one) unless ``scenecut=False``.
    """
    tb = Fraction(1, 1000)
    with av.open(str(path), "w", format=fmt) as c:
        options = {} if scenecut or codec != "libx264" else {"x264-params": "scenecut=0"}
        s = c.add_stream(codec, rate=fps, options=options)
        s.width, s.height, s.pix_fmt = size, size, "yuv420p"
        if gop is not None:
            s.codec_context.gop_size = gop
        if not b_frames:
            s.codec_context.max_b_frames = 0
        if pts_ms is not None:
            s.time_base = tb
            s.codec_context.time_base = tb
        for i in range(num_frames):
            f = av.VideoFrame.from_ndarray(index_frame(i, size), format="rgb24")
            if pts_ms is not None:
                f.pts, f.time_base = int(pts_ms[i]), tb
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


@pytest.fixture()
def make_video(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_video(name="v.mp4", num_frames=30, fps=30, gop=None, pts_ms=None, ...)`` -> path."""
    (tmp_path / "videos").mkdir(exist_ok=True)

    def make(name: str = "v.mp4", **kwargs: object) -> Path:
        return write_index_video(tmp_path / "videos" / name, **kwargs)  # type: ignore[arg-type]

    return make


@pytest.fixture()
def frame_index() -> Callable[[np.ndarray | torch.Tensor], int]:
    """``frame_index(frame) -> int``: the index a frame of a ``make_video`` video shows."""
    return read_index


@pytest.fixture()
def msrvtt_samples() -> Path:
    """The real MSR-VTT clips folder (``../shared/testdata`` or $VIDRET_TESTDATA); skips when absent."""
    root = os.environ.get("VIDRET_TESTDATA")
    base = Path(root) if root else Path(__file__).resolve().parents[2].parent / "shared" / "testdata"
    folder = base / "msrvtt-samples"
    if not folder.is_dir() or not any(folder.glob("*/*.mp4")):
        pytest.skip(f"real test clips not found at {folder}")
    return folder
