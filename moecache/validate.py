"""Argument checks shared by every public entry point: validate everything, then touch anything.

The pattern every entry point follows (``offload``, ``from_pretrained``, ``record``, ``replay``, the CLI):

1. **Check first.** One function at the top of the entry point (``offload``'s is
   ``moecache.runtime.offload.check_offload_args``) runs one check of this module per argument and
   returns the cleaned values. A failing check raises ``ConfigError`` with ONE line naming the
   argument, the value it got and what to pass instead. Nothing has been changed at that point.
2. **Then change, with an undo.** Every change made after the checks registers how to take it back on
   an ``Undo`` (``undo.push(fn)``); if anything raises before ``undo.commit()``, the undos run newest
   first and the original error propagates. Undos restore from what the change already keeps (the
   offloaded experts come back from the host store), never from a second copy kept for the purpose.

Adding an argument: write (or reuse) one check here, call it in the entry point's check function,
and if applying the argument changes anything, push its undo. The checks are plain functions so
the CLI's argparse ``type=`` callables and the Python API share them.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from typing import Any, Callable, Iterable

from .errors import ConfigError

#: Largest memory size accepted anywhere (1 PiB): a bigger one is a typo (units, an extra digit).
MAX_BYTES = 2**50

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def count(name: str, value: Any, *, minimum: int = 0, maximum: int | None = None, none: bool = False,
          fix: str = "") -> int | None:
    """A whole number in ``[minimum, maximum]`` (bools, fractions, NaN and strings are refused)."""
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value)) \
                and float(value).is_integer():
            value = int(value)
        else:
            raise ConfigError(f"{name}={_show(value)} is not a whole number; pass an integer"
                              + (f" >= {minimum}" if minimum is not None else "") + (f" ({fix})" if fix else ""))
    v = int(value)
    if v < minimum or (maximum is not None and v > maximum):
        rng = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise ConfigError(f"{name}={v} is out of range; pass an integer {rng}" + (f" ({fix})" if fix else ""))
    return v


def real(name: str, value: Any, *, minimum: float | None = None, maximum: float | None = None,
         above: bool = False, none: bool = False, fix: str = "") -> float | None:
    """A finite real number in ``[minimum, maximum]`` (``above``: strictly greater than ``minimum``)."""
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name}={_show(value)} is not a number; pass a finite number" + (f" ({fix})" if fix else ""))
    v = float(value)
    if not math.isfinite(v):
        raise ConfigError(f"{name}={v} is not finite; pass a finite number" + (f" ({fix})" if fix else ""))
    low_bad = minimum is not None and (v <= minimum if above else v < minimum)
    if low_bad or (maximum is not None and v > maximum):
        lo = "" if minimum is None else (f"> {minimum}" if above else f">= {minimum}")
        hi = "" if maximum is None else f"<= {maximum}"
        raise ConfigError(f"{name}={v} is out of range; pass a number {' and '.join(x for x in (lo, hi) if x)}"
                          + (f" ({fix})" if fix else ""))
    return v


def flag(name: str, value: Any, *, none: bool = False) -> bool | None:
    """``True``/``False`` (and ``None`` where allowed)."""
    if value is None and none:
        return None
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={_show(value)} is not True or False; pass a bool")
    return value


def text(name: str, value: Any, *, none: bool = False) -> str | None:
    """A non-empty string without NUL."""
    if value is None and none:
        return None
    if not isinstance(value, str) or not value or "\0" in value:
        raise ConfigError(f"{name}={_show(value)} is not a non-empty name; pass a string")
    return value


def choice(name: str, value: Any, names: Iterable[str], *, none: bool = False) -> str | None:
    """One of ``names``."""
    if value is None and none:
        return None
    valid = list(names)
    if not isinstance(value, str) or value not in valid:
        raise ConfigError(f"{name}={_show(value)} is unknown; valid: {', '.join(valid)}")
    return value


def mapping(name: str, value: Any) -> dict:
    """A dict of keyword arguments (None: empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{name}={_show(value)} is not a dict of keyword arguments; pass e.g. {{'decay': 0.5}}")
    return dict(value)


def memory_size(name: str, value: Any) -> int:
    """``"6GiB"``, ``"512MB"``, ``"1.5 GiB"``, ``10**9`` -> bytes (GiB = 2**30, GB = 10**9), at most ``MAX_BYTES``."""
    fix = "write e.g. '6GiB', '512MiB', '8GB' or a byte count"
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"{name}={_show(value)} is not a memory size; {fix}")
    if isinstance(value, numbers.Real):
        v = float(value)
        if not math.isfinite(v) or v < 0:
            raise ConfigError(f"{name}={value} is not a memory size >= 0; {fix}")
        n = int(v)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"cannot read {name}={_show(value)}; {fix}")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n > MAX_BYTES:
        raise ConfigError(f"{name}={_show(value)} is {n:.3g} bytes, beyond any machine (at most 1 PiB); check the "
                          "unit (GiB, not bytes, e.g. '6GiB')")
    return n


def device(name: str, value: Any) -> Any:
    """A ``torch.device`` that exists here (None: cuda where available, else cpu)."""
    import torch

    if value is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        if not isinstance(value, (str, torch.device)):
            raise ConfigError(f"{name}={_show(value)} is not a device; pass 'cuda', 'cuda:1' or 'cpu'")
        try:
            dev = torch.device(value)
        except (RuntimeError, ValueError):
            raise ConfigError(f"{name}={_show(value)} is not a device; pass 'cuda', 'cuda:1' or 'cpu'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{name}={_show(str(dev))}: this torch build sees no CUDA device; pass device='cpu'")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        elif dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{name}={_show(str(dev))}: there are {torch.cuda.device_count()} CUDA devices; "
                              f"pass cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif dev.type not in ("cpu",):
        raise ConfigError(f"{name}={_show(str(dev))}: moecache runs on 'cuda' or 'cpu'")
    return dev


def folder(name: str, value: Any) -> str:
    """An existing folder (given as str or os.PathLike)."""
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"{name}={_show(value)} is not a path; pass a folder path")
    path = os.fspath(value)
    if not os.path.isdir(path):
        why = "does not exist" if not os.path.lexists(path) else "is not a folder"
        raise ConfigError(f"{name}: {path} {why}; pass a local checkpoint folder")
    return path


def input_file(name: str, value: Any) -> str:
    """An existing, readable regular file; checked without opening it (a pipe or a device would block)."""
    import stat

    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"{name}={_show(value)} is not a path; pass a file path")
    path = os.fspath(value)
    try:
        st = os.stat(path)
    except OSError as e:
        raise ConfigError(f"{name} {path}: {e.strerror}; pass an existing file") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{name} {path} is not a regular file (a folder, pipe or device); pass a file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{name} {path}: permission denied; pass a readable file")
    return path


def output_parent(name: str, path: str) -> str:
    """The folder ``path`` goes in may be made: its nearest existing ancestor is a writable folder (missing
    folders named in the path are created by the writer; nothing that exists is replaced). Returns the parent."""
    parent = os.path.dirname(os.path.abspath(path))
    probe = parent
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConfigError(f"{name} {path}: {probe} is a file, not a folder; choose another output path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{name} {path}: cannot write in {probe} (permission denied); choose a writable folder")
    return parent


class Undo:
    """A stack of undo steps for a change made of several steps (see the module docstring).

    Used as a context manager: an exception inside the block runs every pushed step, newest first
    (an undo step that fails itself is skipped so the others still run; the first such failure is
    attached to the original error as a note), then re-raises. ``commit()`` drops the steps.
    """

    def __init__(self) -> None:
        self._steps: list[Callable[[], None]] = []

    def push(self, step: Callable[[], None]) -> None:
        self._steps.append(step)

    def commit(self) -> None:
        self._steps.clear()

    def rollback(self) -> list[BaseException]:
        failures: list[BaseException] = []
        while self._steps:
            step = self._steps.pop()
            try:
                step()
            except BaseException as e:  # keep undoing the rest
                failures.append(e)
        return failures

    def __enter__(self) -> "Undo":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
            return
        failures = self.rollback()
        if failures and exc is not None and hasattr(exc, "add_note"):
            exc.add_note(f"moecache: undoing the change failed too: {failures[0]!r}")


__all__ = ["count", "real", "flag", "text", "choice", "mapping", "memory_size", "device", "folder", "input_file", "output_parent", "Undo",
           "MAX_BYTES"]
