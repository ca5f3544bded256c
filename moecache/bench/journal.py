"""The suite's journal: finished rows appended one JSON line at a time, flushed and fsynced, so a killed
run resumes where it stopped; and the lock that keeps two runs out of one output folder."""

from __future__ import annotations

import json
import os
from typing import Any

from ..atomic import fsync_dir
from ..errors import MoecacheError

JOURNAL = "rows.jsonl"


class Journal:
    """Append-only JSON lines ``{"key", "row", "seconds"}``, each flushed and fsynced as it is written."""

    def __init__(self, path: str):
        self.path = path
        self.torn = 0
        self._dir_synced = False

    def load(self) -> dict[str, dict[str, Any]]:
        """Records by key (the first of a key wins). A torn last line is dropped and the file cut back to the
        last complete line, so appends continue cleanly; a bad complete line is an error."""
        if not os.path.exists(self.path):
            return {}
        with open(self.path, "rb") as f:
            data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a kill mid-write leaves a prefix without its newline
            self.torn += 1
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        out: dict[str, dict[str, Any]] = {}
        for n, line in enumerate(data[:end].splitlines(), 1):
            try:
                rec = json.loads(line)
                key, _row = rec["key"], rec["row"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise MoecacheError(f"{self.path}:{n}: not a suite row record; delete that line (or the file, to "
                                    "recompute everything) and run again") from None
            out.setdefault(key, rec)
        return out

    def append(self, key: str, row: dict[str, Any], seconds: float) -> None:
        line = json.dumps({"key": key, "row": row, "seconds": round(seconds, 4)}, sort_keys=True, allow_nan=False)
        with open(self.path, "ab") as f:
            f.write(line.encode("utf-8") + b"\n")
            f.flush()
            os.fsync(f.fileno())
        if not self._dir_synced:  # the file's own entry in its folder, once (it may have just been created)
            fsync_dir(os.path.dirname(os.path.abspath(self.path)))
            self._dir_synced = True


class DirLock:
    """One suite run per output folder at a time (an advisory lock on its journal)."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, JOURNAL)
        self.fd: int | None = None

    def __enter__(self) -> "DirLock":
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise MoecacheError(f"another suite run is writing {os.path.dirname(self.path)}; wait for it or use "
                                "another -o folder") from None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)
