"""The user guide stays true to the code: its links resolve, the commands it shows parse with the real
command line, every flag it names exists, and it stays a guide (short; results live in docs/results.md)."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from moecache.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOC_FILES = [README, *sorted((ROOT / "docs").glob("**/*.md")), ROOT / "eval" / "results" / "README.md"]
#: The README is a user guide of about 12 KB; detail goes to docs/.
README_MAX_BYTES = 13_000
#: Pages that a parallel change adds; a link to one of them may dangle until it lands.
PENDING_PAGES = {"docs/extending.md"}

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def _subparsers(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every (sub)command of the parser by its words, e.g. ("trace", "import")."""
    out = {prefix: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.update(_subparsers(sub, prefix + (name,)))
    return out


COMMANDS = _subparsers(build_parser())
ALL_FLAGS = {s for p in COMMANDS.values() for a in p._actions for s in a.option_strings}


def _heading_anchor(title: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_heading_anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", path.read_text(), re.M)}


def _code_lines(text: str) -> list[str]:
    """Lines inside fenced code blocks."""
    lines, inside = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = not inside
        elif inside:
            lines.append(line)
    return lines


def _command_of(words: list[str]) -> tuple[str, ...]:
    """The longest known (sub)command at the start of ``words`` (after ``moecache``)."""
    best: tuple[str, ...] = ()
    for n in range(1, len(words) + 1):
        if tuple(words[:n]) in COMMANDS:
            best = tuple(words[:n])
    return best


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(path: Path) -> None:
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # external
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        rel = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else str(dest)
        if rel in PENDING_PAGES and not dest.exists():
            continue
        assert dest.exists(), f"{path.name}: link to {target!r}, but {rel} does not exist"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{path.name}: link to {target!r}, but {rel} has no heading #{anchor}"


def test_readme_is_a_short_guide() -> None:
    text = README.read_text()
    size = len(text.encode())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes (limit {README_MAX_BYTES}): move detail to docs/"
    first = [line for line in text.splitlines()[:6] if line.startswith("make ")]
    assert [line.split()[1] for line in first] == ["demo", "test"], "the README must open with `make demo` and `make test`"
    # Dated figures belong in docs/results.md.
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text), "README.md has a date: results go to docs/results.md"


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shown_commands_parse(path: Path) -> None:
    """A ``$ moecache ...`` line in a code block is a real command: the real parser accepts it whole."""
    parser = build_parser()
    for line in _code_lines(path.read_text()):
        if not line.startswith("$ moecache "):
            continue
        argv = shlex.split(line[len("$ moecache "):])
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{path.name}: the command line rejects {line!r}")


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_commands_and_flags_exist(path: Path) -> None:
    """Every ``moecache X`` the docs name is a subcommand, and every flag in such a span, in a shown command
    or in the README's options table is an option of the command line."""
    text = path.read_text()
    spans = [s for s in CODE_SPAN.findall(text) if s.startswith("moecache ")]
    spans += [line[2:] for line in _code_lines(text) if line.startswith("$ moecache ")]
    for span in spans:
        words = span.split()[1:]
        cmd = _command_of(words)
        assert cmd, f"{path.name}: {span!r} names no moecache command"
        known = {s for a in COMMANDS[cmd]._actions for s in a.option_strings}
        for flag in FLAG.findall(span):
            assert flag in known, f"{path.name}: {span!r}: moecache {' '.join(cmd)} has no option {flag}"
    if path == README:
        table = text.split("## Options that matter", 1)[1].split("\n## ", 1)[0]
        for row in table.splitlines()[2:]:
            first_cell = row.split("|")[1] if row.startswith("|") else ""
            for flag in FLAG.findall(first_cell):
                assert flag in ALL_FLAGS, f"README options table: no command has {flag}"
