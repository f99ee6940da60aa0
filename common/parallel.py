"""Worker processes for the parallel loops (caching, cropping, synthetic data).

Workers are started with ``spawn``, not ``fork``: a forked copy of a process that
already runs torch or OpenMP threads can deadlock on a lock one of those threads
held (seen with two crop workers that never started). Each worker dies with its
parent (Linux ``PR_SET_PDEATHSIG``), so a killed run leaves no worker writing on,
and uses one thread for torch, OpenCV and decoding: the pool itself is the
parallelism, and more threads per worker would oversubscribe the cores.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Callable

from common.dicom import DECODE_WORKERS_ENV

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to kill this process when its parent dies (Linux; a no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() == 1:  # the parent died before the call: do not outlive it
            os._exit(1)


def _init_worker(initializer: Callable[[], None] | None) -> None:
    die_with_parent()
    os.environ["OMP_NUM_THREADS"] = "1"  # read by BLAS started from here on
    os.environ[DECODE_WORKERS_ENV] = "1"  # and by common.dicom.default_workers: one decoding thread
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover
        pass
    if initializer is not None:
        initializer()


def worker_pool(workers: int, initializer: Callable[[], None] | None = None) -> ProcessPoolExecutor:
    """A process pool of ``workers`` spawned, single-threaded workers that die with this process."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(initializer,))
