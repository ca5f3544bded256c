"""Crash-safe file writes: write beside the target, fsync, then rename over it."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable, IO


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(f)`` on a temporary file in ``path``'s folder, then rename it to ``path``.

    A reader sees either the old file or the complete new one, never a torn write.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        # mkstemp creates the file 0600; give it the mode a plain open() would (0666 less the umask).
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def write_text_atomic(path: str, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomic(path: str, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def fsync_dir(path: str) -> None:
    """Make a rename or file creation inside ``path`` durable."""
    _fsync_dir(path)


class FolderLock:
    """An exclusive advisory lock on ``FOLDER/.lock`` (``fcntl.flock``), held while a trace is written.

    The kernel drops it when the holder exits, however it exits, so a lock that cannot be taken means
    a live writer (in this process or another); a stale ``.lock`` file from a killed one is free.
    """

    NAME = ".lock"

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, self.NAME)
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock without waiting; False when another writer holds it."""
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def holder(self) -> str:
        """Who holds it, as far as the file says ("process N" or "another process")."""
        try:
            with open(self.path) as f:
                pid = f.read().strip()
        except OSError:
            pid = ""
        return f"process {pid}" if pid.isdigit() else "another process"

    @staticmethod
    def is_held(folder: str) -> bool:
        """Whether a live writer holds ``folder``'s lock (False when there is no lock file)."""
        path = os.path.join(folder, FolderLock.NAME)
        if not os.path.isfile(path):
            return False
        probe = FolderLock(folder)
        try:
            if probe.acquire():
                probe.release(unlink=False)
                return False
        except OSError:
            return False
        return True

    def release(self, unlink: bool = False) -> None:
        if self._fd is None:
            return
        if unlink:
            try:
                os.unlink(os.path.join(self.folder, self.NAME))
            except OSError:
                pass
        os.close(self._fd)
        self._fd = None

    def moved(self, folder: str) -> None:
        """The locked folder was renamed to ``folder`` (the open descriptor keeps the lock)."""
        self.folder = folder
        self.path = os.path.join(folder, self.NAME)
