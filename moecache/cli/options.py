"""Command-line options shared by several subcommands."""

from __future__ import annotations

import argparse
import warnings
from typing import Any, Sequence


class DeprecatedFlag(argparse.Action):
    """An old spelling of a renamed flag, kept working for one release: it stores into the new flag's
    ``dest`` and warns (``FutureWarning``, shown by default) naming the new flag. Hidden from ``--help``."""

    def __init__(self, option_strings: Sequence[str], dest: str, new_flag: str, **kwargs: Any):
        self.new_flag = new_flag
        kwargs.setdefault("help", argparse.SUPPRESS)
        kwargs["default"] = argparse.SUPPRESS  # the new flag's default stands when the old one is not given
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        warnings.warn(f"{parser.prog}: {option_string} is deprecated and goes in the next release; "
                      f"use {self.new_flag} {values}", FutureWarning, stacklevel=2)
        setattr(namespace, self.dest, values)
