"""The ``moecache`` command line. Each subcommand lives in its own module and registers itself.

A command module defines ``register(subparsers)`` which adds its parser and sets ``func`` (a
callable taking the parsed args and returning an exit code). Errors of the project's own type are
printed as one line, without a traceback, and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import MoecacheError

#: Modules under moecache.cli that contribute subcommands, in help order.
COMMAND_MODULES = ("doctor", "trace", "analyze", "bench", "generate", "serve", "record")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moecache",
        description="Run and study Mixture-of-Experts models whose experts do not fit in GPU memory.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (MoecacheError, FileNotFoundError, FileExistsError) as e:
        print(f"moecache {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moecache {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
