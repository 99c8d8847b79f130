"""Shared helpers of the retrieval tests: tiny coloured h264 clips, a tiny random backbone, saved adapters."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch

import vidret

# Distinct flat colours (RGB), one per generated clip; the names double as (meaningless) text queries.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 30),
    "magenta": (210, 40, 200),
    "cyan": (30, 210, 210),
    "white": (245, 245, 245),
    "black": (10, 10, 10),
}
BACKBONE = "random:pocket-tiny"  # image_size 32, embed_dim 32


def write_clip(path: Path, colour: tuple[int, int, int], seconds: float = 2.0, fps: int = 10, size: int = 48) -> Path:
    """A small h264 clip: a flat colour with a moving grey square (so frames differ a little)."""
    return write_parts(path, [colour], seconds, fps, size)


def write_parts(
    path: Path, colours: list[tuple[int, int, int]], seconds: float = 2.0, fps: int = 10, size: int = 48
) -> Path:
    """An h264 video of flat-colour parts of ``seconds`` each, in order, with a moving grey square on top."""
    path.parent.mkdir(parents=True, exist_ok=True)
    per = int(seconds * fps)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = size, size, "yuv420p"
        for i in range(per * len(colours)):
            img = np.empty((size, size, 3), np.uint8)
            img[:] = colours[i // per]
            x = (i * 3) % (size - 8)
            img[8:16, x : x + 8] = 128
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def make_collection(folder: Path, names: list[str] | None = None) -> dict[str, Path]:
    """One clip per colour name under ``folder`` (two in a sub-folder, to exercise recursion)."""
    names = names or list(COLOURS)
    out = {}
    for i, name in enumerate(names):
        sub = folder / "more" if i >= len(names) - 2 else folder
        out[name] = write_clip(sub / f"{name}.mp4", COLOURS[name])
    return out


def touch_later(path: Path) -> None:
    """Bump a file's mtime so its identity changes even within the same timestamp tick."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))


def testdata_dir() -> Path:
    env = os.environ.get("VIDRET_TESTDATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "testdata"


def save_adapter_for(
    out: Path, method: str = "lora", seed: int = 1, backbone_seed: int = 0, **overrides: object
) -> Path:
    """Save an adapter over the tiny random backbone; lora weights are perturbed so the adapter is not identity."""
    clip = vidret.create_backbone("pocket-tiny", seed=backbone_seed).eval()
    model = vidret.build_model(clip, method, **overrides).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.trainable_named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    vidret.save_adapter(model, out)
    return out


@contextmanager
def running_server(app: Any) -> Iterator[int]:
    """Serve ``app`` with a real uvicorn on a free loopback port in a thread; yields the port, stops it after."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 20
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        assert server.started, "uvicorn did not start within 20 s"
        yield port
    finally:
        server.should_exit = True
        thread.join(20)
