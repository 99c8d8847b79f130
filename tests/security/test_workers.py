"""Worker processes die with their parent (issue 13, row 10).

``kill -9`` of ``vidret data preprocess --workers 2`` used to leave both pool workers alive and blocked forever
(hundreds of MB each). The kernel is now told to kill every worker when its parent dies.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vidret.data.manifest import ManifestEntry, read_manifest, write_manifest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; Linux only")


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):  # the task ended meanwhile
            out |= {int(x) for x in (task / "children").read_text().split()}
    return out


def _alive(pid: int) -> bool:
    """Running, sleeping or stopped; a zombie (dead, not yet reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_for(cond, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return bool(cond())


def _descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        kids = _children(todo.pop()) - out
        out |= kids
        todo.extend(kids)
    return out


LIBRARY_CALL = """
import sys
from vidret.data.cache import FrameCache, preprocess
from vidret.data.manifest import read_manifest
from vidret.data.sampling import SamplingConfig

cache = FrameCache(sys.argv[2], image_size=32, sampling=SamplingConfig(fps=1.0))
preprocess(read_manifest(sys.argv[1]), cache, num_workers=2, progress=False, mp_context=sys.argv[3])
"""


@pytest.mark.parametrize("how", ["cli", "forkserver", "spawn"])
def test_preprocess_workers_die_with_a_killed_parent(how: str, tiny_world: Path, tmp_path: Path) -> None:
    # Many distinct segments of one real video: enough work that the parent is still busy when it is killed.
    video = read_manifest(tiny_world / "train.jsonl")[0].path
    entries = [ManifestEntry(f"v{i}", video, ("a caption",), start=i * 1e-3) for i in range(2000)]
    manifest, cache = tmp_path / "many.jsonl", tmp_path / "cache"
    write_manifest(manifest, entries)
    if how == "cli":
        cmd = [sys.executable, "-m", "vidret", "data", "preprocess", str(manifest), "--cache", str(cache)]
        cmd += ["--workers", "2", "--image-size", "32"]
    else:  # a forkserver's workers are grandchildren of the process that asked for them
        cmd = [sys.executable, "-c", LIBRARY_CALL, str(manifest), str(cache), how]
    parent = subprocess.Popen(
        cmd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    procs: set[int] = set()
    try:
        # wait until the workers have finished a task (their initializer has run), then kill the parent uncleanly
        assert _wait_for(lambda: any(cache.rglob("*.npy")) or parent.poll() is not None, 120)
        procs = _descendants(parent.pid)
        assert parent.poll() is None, "preprocess finished before it could be killed: give it more work"
        assert len(procs) >= 2, procs
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        gone = _wait_for(lambda: not any(_alive(p) for p in procs), 5)
        assert gone, f"processes {sorted(p for p in procs if _alive(p))} outlived their killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        for pid in procs:  # only the processes this test started
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
