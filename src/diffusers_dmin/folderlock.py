"""One writer per index folder: an operating-system lock (`fcntl.flock`) on `<folder>/.dmin.lock`.

A build holds it from start to finish (in the main process of a multi-process build), and `save_pretrained` while it
writes. A second writer in another process is refused at once with [`IndexLockedError`], which names the folder and
the holder (pid, host, what it does, since when; read from the lock file). The operating system releases the lock
when its process ends in any way (also SIGKILL), so the file a killed build leaves behind never blocks anybody: only
a live holder does. The holder removes the file when it is done. Within one process the lock is re-entrant (a build
saves into its own folder). Where the file system has no `flock` (some network file systems, Windows) nothing is
locked and a warning says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from .constants import LOCK_NAME
from .errors import DMinError
from .logging import get_logger


logger = get_logger(__name__)

__all__ = ["LOCK_NAME", "IndexLockedError", "folder_lock"]


_held: dict[str, int] = {}  # resolved folder -> nesting depth, for this process
_held_lock = threading.Lock()


class IndexLockedError(DMinError, RuntimeError):
    """Another live process is writing to this index folder (a build, or a save)."""


def _describe(path: Path) -> str:
    try:
        holder = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        holder = {}
    if not isinstance(holder, dict) or "pid" not in holder:
        return "another process (it has not written its name yet)"
    since = holder.get("since")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S UTC", time.gmtime(since)) if isinstance(since, (int, float)) else ""
    return f"a {holder.get('what', 'write')} by process {holder['pid']} on host {holder.get('host', '?')}{when}"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str) -> Iterator[None]:
    r"""
    Hold the write lock of an index folder for the block (creating the folder if needed).

    Args:
        folder (`str` or `os.PathLike`): The index folder.
        what (`str`): What the holder does (`"build"`, `"save"`), shown to a refused writer.

    Raises:
        [`IndexLockedError`]: Another live process holds the lock.
    """
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    with _held_lock:
        if key in _held:
            _held[key] += 1
            reentrant = True
        else:
            reentrant = False
    if reentrant:
        try:
            yield
        finally:
            with _held_lock:
                _held[key] -= 1
        return

    try:
        import fcntl
    except ImportError:  # Windows
        fcntl = None
    path = folder / LOCK_NAME
    fd = None
    if fcntl is None:
        logger.warning(f"Cannot lock {folder} on this platform; two writers at once would not be detected.")
    while fcntl is not None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise IndexLockedError(
                f"The index folder {folder} is in use: {_describe(path)} holds its lock ({path}). Wait until it "
                "finishes or stop it (the lock of a stopped or killed process is released at once), or write to "
                "another folder. Two writers in one folder would corrupt each other's files."
            ) from None
        except OSError as err:  # no flock on this file system
            os.close(fd)
            fd = None
            logger.warning(f"Cannot lock {path} ({err}); two writers at once in {folder} would not be detected.")
            break
        # the previous holder removes the file when done: make sure ours is still the file at `path`
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    if fd is not None:
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "what": what, "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode("utf-8"), 0)
    with _held_lock:
        _held[key] = 1
    try:
        yield
    finally:
        with _held_lock:
            del _held[key]
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)  # while still holding it: a waiter that opened the old file notices (inode check)
            os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when the failed writer left it empty
