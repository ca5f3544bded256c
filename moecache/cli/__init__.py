"""The ``moecache`` command line. Each subcommand lives in its own module and registers itself.

A command module defines ``register(subparsers)`` which adds its parser and sets ``func`` (a
callable taking the parsed args and returning an exit code). ``main()`` gives every command one
error style:

* status 0: done; status 1: a check the command runs failed (``generate --check``), as it documents;
* status 2: bad input (arguments, files, folders): ONE line on stderr naming the problem and the fix;
* status 3: an internal error (a bug): a short report, no traceback;
* status 130: interrupted.

``--debug`` (before the command) adds the traceback to status 2 and 3. While a command runs, what it
prints goes through ``TerminalSafe``, which escapes control characters (text from files and models
cannot move the cursor, clear the screen or reorder a line).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import re
import sys
import traceback
from typing import Any, TextIO

from ..errors import MoecacheError

#: Modules under moecache.cli that contribute subcommands, in help order.
COMMAND_MODULES = ("doctor", "trace", "analyze", "bench", "generate", "serve", "record")


class UsageError(Exception):
    """argparse found bad arguments (status 2)."""

    def __init__(self, message: str, prog: str):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are raised (one line in ``main``), not printed with the usage."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise UsageError(message, self.prog)


#: C0/C1 controls, DEL and the bidirectional overrides, but not newline and tab.
_CONTROL = "\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069"
_UNSAFE_OUT = re.compile(f"[{_CONTROL}]")
#: On stderr, progress bars (tqdm) redraw with carriage returns and cursor-up / erase-line sequences.
_UNSAFE_ERR = re.compile(f"(\r|\x1b\\[[0-9]{{0,3}}[AK])|[{_CONTROL}]")


def _escape_char(ch: str) -> str:
    n = ord(ch)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}"


def escape_controls(text: str, keep_progress: bool = False) -> str:
    """``text`` with control characters written as ``\\xNN`` / ``\\uNNNN`` (newline and tab kept;
    ``keep_progress``: also carriage returns and the cursor sequences progress bars use)."""
    if keep_progress:
        return _UNSAFE_ERR.sub(lambda m: m.group(1) or _escape_char(m.group(0)), text)
    return _UNSAFE_OUT.sub(lambda m: _escape_char(m.group(0)), text)


def one_line(text: str) -> str:
    """An error message as one safe line: every control character, newlines included, escaped."""
    return escape_controls(text).replace("\n", "\\n").replace("\t", " ")


class TerminalSafe:
    """A text stream that escapes control characters before they reach ``stream`` (see the module docstring)."""

    def __init__(self, stream: TextIO, keep_progress: bool):
        self._stream = stream
        self._keep = keep_progress

    def write(self, text: str) -> int:
        self._stream.write(escape_controls(text, self._keep))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="moecache",
        description="Run and study Mixture-of-Experts models whose experts do not fit in GPU memory.",
        epilog="Exit status: 0 done, 1 a failed check (generate --check), 2 bad input (one line saying what to "
               "fix), 3 internal error (rerun with --debug for the traceback).",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


#: Errors that mean the input (arguments, files, folders, permissions) is wrong: status 2.
_INPUT_ERRORS = (MoecacheError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
                 PermissionError, UnicodeDecodeError)


def _os_message(e: OSError) -> str:
    """One line for an OSError from a file: what, where, and what to do."""
    where = f" {e.filename}" if getattr(e, "filename", None) else ""
    what = e.strerror or str(e)
    fix = {errno.ELOOP: "the path has a symlink loop; point at the real file",
           errno.ENOSPC: "free disk space or write elsewhere", errno.EROFS: "write to a writable file system",
           errno.EACCES: "check the permissions or choose another path",
           errno.EPERM: "check the permissions or choose another path",
           errno.ENAMETOOLONG: "use a shorter path", errno.EISDIR: "give a file, not a folder",
           errno.ENOTDIR: "a part of the path is a file, not a folder"}.get(e.errno or 0, "check the path")
    return f"{what}:{where}; {fix}"


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv[:1] or "--debug" in argv
    out, err = sys.stdout, sys.stderr
    name = "moecache"
    try:
        nul = next((a for a in argv if "\0" in a), None)
        if nul is not None:  # no path or name can hold one (a shell cannot even pass it)
            print(f"moecache: error: argument {one_line(repr(nul))} contains a NUL byte; remove it", file=err)
            return 2
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except UsageError as e:
            cmd = e.prog if e.prog != "moecache" else "moecache"
            print(f"{cmd}: error: {one_line(str(e))}; see `{cmd} --help`", file=err)
            return 2
        except SystemExit as e:  # --help, --version
            return int(e.code or 0) if not isinstance(e.code, str) else 2
        debug = bool(args.debug)
        name = " ".join(["moecache", args.command] + ([args.trace_command] if getattr(args, "trace_command", None)
                                                       else []))
        sys.stdout, sys.stderr = TerminalSafe(out, False), TerminalSafe(err, True)
        try:
            return int(args.func(args) or 0)
        finally:
            sys.stdout, sys.stderr = out, err
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=err)
        return 130
    except BrokenPipeError:
        return 0
    except ImportError as e:  # an optional package the command needs is not installed: fixable input
        if debug:
            traceback.print_exc(file=err)
        what = getattr(e, "name", None) or str(e)
        print(f"{name}: error: {one_line(str(what))} is not installed, and this command needs it; pip install "
              f"{one_line(str(what).split('.')[0])} (or reinstall moecache with its default dependencies)", file=err)
        return 2
    except _INPUT_ERRORS as e:
        if debug:
            traceback.print_exc(file=err)
        if isinstance(e, OSError) and not isinstance(e, (FileExistsError,)) and e.strerror and e.filename:
            msg = _os_message(e)
        else:
            msg = str(e) or type(e).__name__
        print(f"{name}: error: {one_line(msg)}", file=err)
        return 2
    except OSError as e:
        if debug:
            traceback.print_exc(file=err)
        print(f"{name}: error: {one_line(_os_message(e))}", file=err)
        return 2
    except Exception as e:  # a bug: a short report, the traceback only with --debug
        if debug:
            traceback.print_exc(file=err)
        from .. import __version__

        tb = traceback.extract_tb(e.__traceback__)
        at = f"{os.path.basename(tb[-1].filename)}:{tb[-1].lineno}" if tb else "?"
        print(f"{name}: internal error: {type(e).__name__}: {one_line(str(e))[:300]}", file=err)
        print(f"  at {at}; moecache {__version__}, Python {sys.version.split()[0]}. This is a bug: rerun with "
              "--debug for the traceback and report it.", file=err)
        return 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
