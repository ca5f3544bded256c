"""``moecache trace import``: convert published routing logs into moecache traces.

Prints what was written and everything left out: rows and sequences per trace, drops per reason,
files skipped as unreadable (``--lenient``) and folder files that are not logs of the format.
"""

from __future__ import annotations

import argparse
import sys

from ..trace.importers import FORMATS, ImportReport, import_traces

_SHOW = 5  # how many skipped folder files to name


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v:,}" for k, v in sorted(d.items())) or "none"


def format_report(rep: ImportReport) -> str:
    lines = []
    for w in rep.written:
        lines.append(f"wrote {w.path}: {w.rows:,} rows, {w.sequences:,} sequence(s) from {len(w.files):,} file(s) "
                     f"[{rep.format}]")
        lines.append(f"  drops: {_counts(w.drops)}")
        for d in w.duplicates:
            lines.append(f"  duplicate: {d['request']} is logged in {d['dropped']} and {d['kept']}; kept the latter, "
                         f"dropped {d['records']:,} records")
    if rep.unassigned_drops:
        lines.append(f"not imported (no trace): {_counts(rep.unassigned_drops)}")
    for path, why in rep.skipped_files:
        lines.append(f"skipped file {path}: {why}")
    if rep.skipped_folder_files:
        shown = ", ".join(f"{p} ({why})" for p, why in rep.skipped_folder_files[:_SHOW])
        more = len(rep.skipped_folder_files) - _SHOW
        lines.append(f"left out of the folders: {len(rep.skipped_folder_files)} file(s): {shown}"
                     + (f" and {more} more" if more > 0 else ""))
    if rep.token_text:
        lines.append(f"token strings: {rep.token_text}")
    return "\n".join(lines)


def cmd_import(args: argparse.Namespace) -> int:
    progress = not args.quiet and sys.stderr.isatty()
    rep = import_traces(args.sources, args.out, fmt=args.format, lenient=args.lenient, overwrite=args.force,
                        progress=progress, token_text=args.token_text,
                        follow_symlinks=args.follow_symlinks)
    print(format_report(rep))
    return 0


def register(tsub) -> None:
    names = ", ".join(FORMATS.names())
    p = tsub.add_parser(
        "import", help="convert published routing logs (JSONL, CSV, JSON) into traces",
        description="Convert published routing logs into a moecache trace. SRC may be files or folders (a "
                    "folder = every file under it that is a log of the format, in natural order). Sources "
                    "split over many files become one trace, one sequence per file / prompt / request. "
                    f"Formats: {names}.")
    p.add_argument("sources", nargs="+", metavar="SRC", help="log files or folders")
    p.add_argument("-o", "--out", required=True, metavar="OUT",
                   help="trace folder to write (a folder of traces OUT/<name> when the import yields several, "
                        "e.g. one per layer for vllm-moe-logger files)")
    p.add_argument("--format", default="auto", metavar="NAME",
                   help=f"source format: auto (detect from content) or one of {names}")
    p.add_argument("--lenient", action="store_true",
                   help="skip malformed records (and unreadable files) and count them per reason instead of "
                        "stopping at the first")
    p.add_argument("--force", action="store_true", help="overwrite existing traces")
    p.add_argument("--token-text", metavar="FILE",
                   help="also write the source's token strings as JSON lines (hf-gate-csv only)")
    p.add_argument("--follow-symlinks", action="store_true",
                   help="in folders, also read files through symlinks that point outside the folder (default: "
                        "skipped and listed)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_import)
