"""Folders replaced as a whole: a reader sees the old folder or the new one, never neither, never half.

A model folder is written under a hidden temporary name beside its place (``.<name>.tmp-<pid>-<random>``),
then swapped in. On Linux the swap is one ``renameat2(RENAME_EXCHANGE)``: the new folder takes the name and
the old one takes the temporary name, atomically, and is then removed. Where the kernel or filesystem
cannot exchange, the old folder is renamed aside (``.<name>.old-<pid>-<random>``) and the new one renamed
in; a process killed between the two leaves the old folder aside, and the next reader or writer puts it
back. Writers of one folder take turns through a lock beside it; temporary and aside folders of dead
processes are removed by the next writer, and never listed as models (their names start with a dot).
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

from pipeline.core.errors import LayertapError
from pipeline.data.images import file_kind

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_LIBC = ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None
_RENAMEAT2 = getattr(_LIBC, "renameat2", None)


def write_text(path, text: str) -> None:
    """``path`` replaced whole by ``text`` (:func:`write_bytes`). A file name that is not UTF-8 in ``text`` is
    written as its own bytes (surrogateescape)."""
    write_bytes(path, text.encode("utf-8", "surrogateescape"))


def write_bytes(path, data: bytes) -> None:
    """``path`` replaced whole by ``data``: written beside it under a hidden temporary name, then renamed over
    it, so a reader (a browser, a run writing the same page) sees the old file or the new one, never half."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_replaceable(target: Path, flag: str) -> None:
    """Refuse an output a person named (``--out``) that is a named pipe, device or socket: a file renamed over it
    would take its place, not be written into it."""
    if target.exists() and not (target.is_file() or target.is_dir()):
        raise LayertapError(f"{flag} {target} is {file_kind(target.stat().st_mode)}; name a regular file: the "
                            "output is written beside it and renamed into place when whole")


def temporary_name(target: Path) -> Path:
    """A hidden name beside ``target`` (not created) to write its replacement under."""
    return target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def temporary_beside(target: Path) -> Path:
    """A new empty hidden folder beside ``target`` to write its replacement into."""
    tmp = temporary_name(target)
    tmp.mkdir(parents=True)
    return tmp


@contextmanager
def folder_lock(target: Path, timeout: float = 600):
    """Writers of ``target`` take turns (the lock file stays: see :func:`pipeline.store.writing.store_lock`)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.with_name(f".{target.name}.lock")), timeout=timeout):
        yield


def replace_folder(tmp: Path, target: Path) -> None:
    """Put the finished folder ``tmp`` in ``target``'s place, whole; the old folder, if any, is removed.

    Call holding :func:`folder_lock`.
    """
    restore_aside(target)
    if not target.exists():
        os.rename(tmp, target)
    elif _exchange(tmp, target):
        shutil.rmtree(tmp)  # now the old folder
    else:
        aside = target.with_name(f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(target, aside)
        os.rename(tmp, target)  # a kill before this line leaves the old folder aside: restore_aside finds it
        shutil.rmtree(aside)
    sweep(target)


def restore_aside(target: Path) -> None:
    """If a writer was killed between moving ``target``'s old folder aside and renaming the new one in, put
    the old one back (the newest aside folder of a dead process)."""
    if target.exists():
        return
    aside = sorted((p for p in _leftovers(target, "old") if not _alive(p)), key=lambda p: p.stat().st_mtime)
    if aside:
        try:
            os.rename(aside[-1], target)
        except OSError:  # another reader put it back first
            pass


def sweep(target: Path) -> None:
    """Remove the temporary and aside folders that dead processes left beside ``target``."""
    for leftover in [*_leftovers(target, "tmp"), *(_leftovers(target, "old") if target.exists() else [])]:
        if not _alive(leftover):
            shutil.rmtree(leftover, ignore_errors=True)


def _leftovers(target: Path, kind: str) -> list[Path]:
    return [p for p in target.parent.glob(f".{target.name}.{kind}-*") if p.is_dir()]


def _alive(leftover: Path) -> bool:
    """Whether the process named in ``.<name>.<kind>-<pid>-<random>`` is running (then it is still writing)."""
    try:
        pid = int(leftover.name.rsplit("-", 2)[-2])
    except ValueError:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where the system cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # no exchange on this kernel or filesystem
        return False
    raise OSError(error, os.strerror(error), str(b))
