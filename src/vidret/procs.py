"""Worker processes that die with their parent.

A pool worker blocks on its task queue forever when its parent is killed with SIGKILL (nothing closes the queue),
holding its memory. Every pool vidret starts therefore calls :func:`die_with_parent` first in each worker: the
pool initializer of ``ProcessPoolExecutor`` / ``multiprocessing.Pool``, or a DataLoader's ``worker_init_fn``
(:func:`dataloader_worker_init`).
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_POLL_SECONDS = 1.0


def _set_pdeathsig() -> bool:
    """Ask the kernel to SIGKILL this process when its parent exits (Linux); False where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _alive(pid: int) -> bool:
    if sys.platform == "win32":  # os.kill(pid, 0) would terminate the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _watch(parent_pid: int, ppid: int) -> None:
    while True:
        time.sleep(_POLL_SECONDS)
        if os.getppid() != ppid or not _alive(parent_pid):
            os._exit(1)


def die_with_parent(parent_pid: int) -> None:
    """End this worker process when ``parent_pid`` (the process that started its pool) dies, even by SIGKILL.

    On Linux the kernel sends SIGKILL when the parent exits (``prctl(PR_SET_PDEATHSIG)``); elsewhere, and for a
    worker that is not a direct child (a ``forkserver`` pool), a daemon thread checks the parent every second.

    Args:
        parent_pid: ``os.getpid()`` of the process that created the pool, taken there.
    """
    armed = _set_pdeathsig()
    ppid = os.getppid()
    if ppid != parent_pid and not _alive(parent_pid):
        os._exit(1)  # the parent died before the signal was armed: we were already re-parented
    if armed and ppid == parent_pid:
        return
    threading.Thread(target=_watch, args=(parent_pid, ppid), name="vidret-die-with-parent", daemon=True).start()


def _dataloader_init(parent_pid: int, worker_id: int) -> None:
    die_with_parent(parent_pid)


def dataloader_worker_init() -> Callable[[int], None]:
    """A DataLoader ``worker_init_fn`` that makes its workers die with the calling process (picklable)."""
    return functools.partial(_dataloader_init, os.getpid())


__all__ = ["dataloader_worker_init", "die_with_parent"]
