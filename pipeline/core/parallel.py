"""Helpers for work in threads and for progress: the worker count, an ordered bounded map, a bar."""

from __future__ import annotations

import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor


def default_workers() -> int:
    """Decoding workers: one per core, at most 16."""
    return max(1, min(16, os.cpu_count() or 1))


def ordered_map(fn, items, workers: int, prefetch: int | None = None):
    """``map(fn, items)`` in a thread pool with at most ``prefetch`` items in flight."""
    prefetch = prefetch or 4 * workers
    items = iter(items)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="layertap") as pool:
        window = deque(pool.submit(fn, item) for _, item in zip(range(prefetch), items))
        try:
            while window:
                result = window.popleft().result()
                for item in items:
                    window.append(pool.submit(fn, item))
                    break
                yield result
        finally:
            for future in window:
                future.cancel()


def on_terminal() -> bool:
    """Whether progress bars can be drawn: standard error is a terminal. Where it is a pipe or a log file, a bar
    would leave its carriage-return remnants glued to the lines around it."""
    return sys.stderr.isatty()


def progress_bar(iterable, total: int, desc: str, enabled: bool, unit: str = "img"):
    """``iterable`` wrapped in a tqdm bar when ``enabled``, there is something to count and a terminal to draw on."""
    if not (enabled and total and on_terminal()):
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)


def forkserver_deaf_to_ctrl_c() -> None:
    """Start multiprocessing's forkserver with SIGINT ignored, so that its workers ignore it too.

    Ctrl-C reaches the whole process group. The main process turns it into one line and stops the workers;
    a worker that got it as well would print its own KeyboardInterrupt traceback (while starting, 14 lines).
    Workers fork from the forkserver and take its SIGINT disposition, and a process started with a signal
    ignored keeps it ignored (Python installs its Ctrl-C handler only where SIGINT is at its default).
    """
    import signal
    import threading
    from multiprocessing import forkserver

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        forkserver.ensure_running()
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, previous)


def process_alive(pid: int) -> bool:
    """Whether a process runs (a zombie, killed but not yet reaped by its parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rpartition(b")")[2].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def follow_owner(owner: int) -> None:
    """In a pool worker: exit when the process that owns the pool is gone. A pool worker waits for tasks on a
    queue it also holds the writing end of, and the forkserver waits for its workers, so a killed owner would
    leave both behind."""
    import threading
    import time

    def follow():
        while process_alive(owner):
            time.sleep(0.25)
        os._exit(1)

    threading.Thread(target=follow, daemon=True, name="layertap-owner-watch").start()


def worker_context():
    """multiprocessing's context for worker processes: the forkserver (never fork a process that runs a
    framework's threads), started deaf to Ctrl-C; spawn where there is no fork."""
    import multiprocessing

    if os.name != "posix":
        return multiprocessing.get_context("spawn")
    forkserver_deaf_to_ctrl_c()
    return multiprocessing.get_context("forkserver")


def kill_pool(pool) -> None:
    """End a ``ProcessPoolExecutor``'s workers now, then reap them (it has no terminate() before Python 3.14)."""
    for process in list(getattr(pool, "_processes", {}).values()):
        if process.is_alive():
            process.kill()
    pool.shutdown(wait=True, cancel_futures=True)
