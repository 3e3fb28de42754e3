"""Run a per-clip function in spawned worker processes, in order, surviving workers that die.

Native decoders can segfault or abort on hostile files; in a worker that kills one process, which
`ProcessPoolExecutor` reports as `BrokenProcessPool` for every task in flight. The task at the head
is then retried alone in a fresh process: if that process dies too, the clip is the culprit and
gets `on_crash(item)`; otherwise it was a bystander and its result stands. The pool is rebuilt for
the rest, so one bad clip costs a restart, never the run.

Spawned workers start with Python's default logging (warnings only, unformatted); each is set up
like the parent's root logger, so what a worker logs (which decoder it uses) reads like the rest.
Workers die with their parent (a `kill -9` of `cogft prepare` leaves no decoder running): on Linux the kernel
kills them (PR_SET_PDEATHSIG), elsewhere, and as a second guard, a thread in each exits once the parent is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from typing import TypeVar

import psutil

T = TypeVar("T")
R = TypeVar("R")
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
ORPHAN_CHECK_S = 1.0  # how often a worker's thread looks for its parent


def _parent_logging() -> tuple[int, str | None, str | None] | None:
    """The root logger's level and first format (None where logging was never set up: keep the default)."""
    root = logging.getLogger()
    if not root.handlers:
        return None
    formatter = next((h.formatter for h in root.handlers if h.formatter is not None), None)
    return root.level, formatter and formatter._fmt, formatter and formatter.datefmt


def die_with(parent: int) -> None:
    """End this process when `parent` ends: the kernel's signal on Linux, and everywhere a thread that watches
    for the parent to go (this process is then handed to another parent)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # no prctl in this libc: the thread below still holds
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the signal was asked for
        os._exit(1)

    def watch() -> None:  # Windows hands no orphan to another parent: ask whether the parent still runs
        while os.getppid() == parent and psutil.pid_exists(parent):
            time.sleep(ORPHAN_CHECK_S)
        os._exit(1)

    threading.Thread(target=watch, name="cogft-orphan-watch", daemon=True).start()


def _start_worker(parent: int, setup: tuple[int, str | None, str | None] | None) -> None:
    die_with(parent)
    if setup is not None:
        level, fmt, datefmt = setup
        logging.basicConfig(level=level, format=fmt or logging.BASIC_FORMAT, datefmt=datefmt)


def _pool(workers: int) -> ProcessPoolExecutor:
    """Spawned processes (no fork of a process holding threads or CUDA), logging like this one, dying with it."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_start_worker,
                               initargs=(os.getpid(), _parent_logging()))


def isolated_map(
    fn: Callable[[T], R], items: list[T], on_crash: Callable[[T], R], workers: int = 2
) -> Iterator[tuple[int, R]]:
    """Yield (index, fn(item)) in order while later items run; at most `2 * workers` results wait.

    `fn` must be picklable by reference (a module-level function), as spawned workers import it.
    """
    workers = max(1, workers)
    ahead = 2 * workers
    position = 0
    while position < len(items):
        with _pool(workers) as pool:
            pending: deque = deque()
            submitted = position
            try:
                while position < len(items):
                    while submitted < len(items) and len(pending) < ahead:
                        pending.append(pool.submit(fn, items[submitted]))
                        submitted += 1
                    result = pending.popleft().result()
                    yield position, result
                    position += 1
            except BrokenProcessPool:
                yield position, _run_alone(fn, items[position], on_crash)
                position += 1


def _run_alone(fn: Callable[[T], R], item: T, on_crash: Callable[[T], R]) -> R:
    with _pool(1) as pool:
        try:
            return pool.submit(fn, item).result()
        except BrokenProcessPool:
            return on_crash(item)
