"""Importers for published routing traces: a format registry, format detection and the import driver.

Formats (one module each, registered in ``FORMATS``; every module of this folder is imported):

========================  ==============================================  ==================
name                      source                                          model
========================  ==============================================  ==================
``vllm-moe-logger``       vLLM MoE-logger JSONL, one layer per file       Qwen1.5-MoE-A2.7B
``hf-gate-csv``           HF gate-hook CSV, one prompt per file           DeepSeek-V2-Lite
``orders-in-chaos``       per-step JSON, one request per file             Llama-4-Maverick
``speculative-moe``       routing JSONL, processed and raw                Mixtral-8x7B
========================  ==============================================  ==================

Driver: ``collect_sources`` turns files and folders into an ordered file list (a folder = every
file under it, in natural order -- ``prompt_2`` before ``prompt_10`` -- whose content is a log of the
format; the others are listed as skipped). ``read_sources`` asks the format how the files split into
traces (usually one; one per layer for the vLLM logger), reads every file into sequences, drops
duplicate requests, numbers the sequences 0.. in file order and builds one ``ImportedTrace`` per
group. ``import_traces`` writes them: ``OUT`` for one trace, ``OUT/<name>`` for several.

Every trace records its source files (``meta.files``: files that contributed a sequence) and, in
``meta.extra``: ``format``, ``sequence_file`` (index into ``files`` per sequence id),
``sequence_label``, ``duplicates`` and ``skipped_files``. Drop counts per reason go to the trace.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from ...atomic import write_text_atomic
from ...errors import ConfigError, TraceFormatError
from ..schema import RoutingBlock, TraceMeta
from ..store import MANIFEST, Trace, check_trace_output, is_finished_trace, write_trace
from .base import FORMATS, Defects, SourceFormat, SourceSequence, display_path, natural_key, read_head

# Every module of this folder but ``base`` registers one format when imported: a new format is one
# new module (and its tests).
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_") and _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["FORMATS", "SourceFormat", "SourceSequence", "Defects", "ImportedTrace", "ImportReport", "Sources",
           "WrittenTrace", "collect_sources", "detect_format", "import_traces", "read_sources"]


@dataclass
class Sources:
    """The files to import, in order, their format, and folder files that were left out (and why)."""

    format: str
    files: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class ImportedTrace:
    """One imported trace in memory. ``name`` is None, or the sub-trace name (e.g. ``layer8``)."""

    name: str | None
    meta: TraceMeta
    block: RoutingBlock
    drops: dict[str, int]
    token_text: list[list[str | None] | None] | None = None
    skipped_files: list[tuple[str, str]] = field(default_factory=list)

    def trace(self) -> Trace:
        return Trace(self.meta, self.block, drops=self.drops)


@dataclass
class WrittenTrace:
    name: str | None
    path: str
    rows: int
    sequences: int
    files: list[str]
    drops: dict[str, int]
    duplicates: list[dict] = field(default_factory=list)


@dataclass
class ImportReport:
    """What ``import_traces`` did: the traces written, and everything left out."""

    format: str
    written: list[WrittenTrace]
    skipped_folder_files: list[tuple[str, str]]
    skipped_files: list[tuple[str, str]]
    #: defects not attributable to any written trace (files skipped before grouping)
    unassigned_drops: dict[str, int]
    token_text: str | None = None


def detect_format(path: str | os.PathLike) -> str | None:
    """The name of the format whose content signature ``path`` starts with, or None.

    Detection reads the first ``SNIFF_BYTES`` bytes only: a CSV header, the first JSON line's keys,
    or the opening of a JSON list of layer-keyed steps.
    """
    path = os.fspath(path)
    head = read_head(path)
    found = [name for name in FORMATS.names() if FORMATS.get(name).sniff(head, path)]
    if len(found) > 1:  # the signatures are disjoint; two matches means a format was registered badly
        raise TraceFormatError(f"content matches several formats {found}; pass --format", path)
    return found[0] if found else None


def _walk(folder: str, follow_symlinks: bool = False) -> tuple[list[str], list[tuple[str, str]]]:
    """Every regular file under ``folder``, folders and files in natural order, hidden ones left out; and
    the entries left out with why: non-regular files (pipes, sockets, devices), unreadable files, broken
    or looping symlinks, and (unless ``follow_symlinks``) symlinks that leave ``folder``. Symlinked
    folders are never descended into (no loops)."""
    out: list[str] = []
    skipped: list[tuple[str, str]] = []
    root_real = os.path.realpath(folder)
    for root, dirs, files in os.walk(folder, onerror=lambda e: skipped.append(
            (display_path(e.filename or folder), f"unreadable folder ({e.strerror})"))):
        dirs[:] = sorted((d for d in dirs if not d.startswith(".")), key=natural_key)
        for d in list(dirs):
            if os.path.islink(os.path.join(root, d)):
                dirs.remove(d)
                skipped.append((display_path(os.path.join(root, d)), "symlinked folder (not followed)"))
        for f in sorted(files, key=natural_key):
            if f.startswith("."):
                continue
            path = os.path.join(root, f)
            why = _unreadable(path)
            if why is None and os.path.islink(path) and not follow_symlinks:
                real = os.path.realpath(path)
                if real != root_real and not real.startswith(root_real + os.sep):
                    why = "symlink leaving the folder (not followed)"
            if why is None:
                out.append(path)
            else:
                skipped.append((display_path(path), why))
    return out, skipped


def _unreadable(path: str) -> str | None:
    """Why ``path`` cannot be read as a log file (None if it can): never opens a pipe or a device."""
    try:
        st = os.stat(path)  # follows symlinks: loops and dangling links fail here
    except OSError as e:
        return "broken or looping symlink" if os.path.islink(path) else f"cannot stat ({e.strerror})"
    import stat

    if not stat.S_ISREG(st.st_mode):
        kind = ("pipe" if stat.S_ISFIFO(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode)
                else "device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "special file")
        return f"not a regular file ({kind})"
    if not os.access(path, os.R_OK):
        return "unreadable (permission denied)"
    return None


def collect_sources(sources: Iterable[str | os.PathLike], fmt: str = "auto", *,
                    follow_symlinks: bool = False) -> Sources:
    """Resolve files and folders into the ordered list of files to import and their format.

    Files given explicitly are read in the order given (with ``auto`` their content must match a
    format); a folder contributes every file under it whose content matches (``fmt`` or, with
    ``auto``, any format), in natural order. All files must be in one format.
    """
    if fmt != "auto":
        FORMATS.get(fmt)  # unknown names list the valid ones
    chosen: list[tuple[str, str]] = []  # (path, format)
    skipped: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    for src in sources:
        src = os.fspath(src)
        if os.path.isdir(src):
            candidates, walk_skipped = _walk(src, follow_symlinks)
            explicit = False
            skipped.extend(walk_skipped)
        elif os.path.lexists(src):
            why = _unreadable(src)
            if why is not None:
                raise ConfigError(f"{src}: {why}; give a readable log file or a folder of them")
            candidates, explicit = [src], True
        else:
            raise FileNotFoundError(f"no such file or folder: {src}")
        for path in candidates:
            real = os.path.realpath(path)
            if real in seen:
                raise ConfigError(f"{path} is given twice (also as {seen[real]}); give each file once")
            try:
                found = detect_format(path)
            except OSError as e:  # vanished or became unreadable since the walk
                if explicit:
                    raise
                skipped.append((display_path(path), f"unreadable ({e.strerror})"))
                continue
            if explicit and fmt == "auto" and found is None:
                raise TraceFormatError(f"cannot tell the format from the content; pass --format (one of "
                                       f"{', '.join(FORMATS.names())})", path)
            use = fmt if fmt != "auto" and (explicit or found == fmt) else found if fmt == "auto" else None
            if use is None:
                why = ("not a log of a known format" if found is None
                       else f"a {found} log, not {fmt}")
                skipped.append((display_path(path), why))
                continue
            seen[real] = path
            chosen.append((display_path(path), use))
    if not chosen:
        what = "routing logs" if fmt == "auto" else f"{fmt} logs"
        raise ConfigError(f"no {what} found in {', '.join(os.fspath(s) for s in sources)}"
                          + (f" ({len(skipped)} other files skipped)" if skipped else ""))
    formats = Counter(f for _, f in chosen)
    if len(formats) > 1:
        example = {f: p for p, f in reversed(chosen)}
        listing = "; ".join(f"{n} {f} (e.g. {example[f]})" for f, n in formats.items())
        raise ConfigError(f"the sources mix formats: {listing}. Import one format per call")
    return Sources(format=next(iter(formats)), files=[p for p, _ in chosen], skipped=skipped)


def _dedupe(form: SourceFormat, seqs: list[SourceSequence], defects: Defects) -> tuple[list[SourceSequence], list[dict]]:
    """Drop repeated logs of one request (same ``key``), keeping ``form.prefer``'s choice."""
    out: list[SourceSequence] = []
    first: dict = {}
    dups: list[dict] = []
    for s in seqs:
        if s.key is None or s.key not in first:
            if s.key is not None:
                first[s.key] = s
            out.append(s)
            continue
        prev = first[s.key]
        if not form.same_request(prev, s):
            raise TraceFormatError(
                f"{s.label} is also in {prev.file} with different routing: two runs of one request cannot share "
                "a trace; import the files separately", s.file)
        keep = form.prefer(prev, s)
        drop = s if keep is prev else prev
        if keep is s:  # the kept copy takes the place of its own file in the order
            out = [x for x in out if x is not prev]
            out.append(s)
            first[s.key] = s
        defects.add("duplicate_request_records", drop.records)
        dups.append({"request": s.label, "kept": keep.file, "dropped": drop.file, "records": drop.records})
    return out, dups


def _build(form: SourceFormat, name: str | None, seqs: list[SourceSequence], dups: list[dict],
           defects: Defects) -> ImportedTrace:
    files: list[str] = []
    index: dict[str, int] = {}
    seq_file: list[int] = []
    for i, s in enumerate(seqs):
        s.block.seq[:] = i
        if s.file not in index:
            index[s.file] = len(files)
            files.append(s.file)
        seq_file.append(index[s.file])
    meta = form.meta(name, seqs, files)
    meta.extra.update({
        "format": form.name,
        "sequence_file": seq_file,
        "sequence_label": [s.label for s in seqs],
        "duplicates": dups,
        "skipped_files": [list(x) for x in defects.skipped_files],
    })
    drops = Counter(defects.counts)
    for s in seqs:
        drops.update(s.counts)
    block = RoutingBlock.concat([s.block for s in seqs])
    return ImportedTrace(name=name, meta=meta, block=block, drops={k: v for k, v in sorted(drops.items()) if v},
                         token_text=[s.token_text for s in seqs] if form.has_token_text else None,
                         skipped_files=list(defects.skipped_files))


def read_sources(sources: Iterable[str | os.PathLike], fmt: str = "auto", *, lenient: bool = False,
                 progress: bool = False, follow_symlinks: bool = False) -> tuple[Sources, list[ImportedTrace], Defects]:
    """Read sources into traces in memory. Returns the resolved sources, the traces, and the defects
    of files that belong to no trace (skipped before or while grouping)."""
    src = collect_sources(sources, fmt, follow_symlinks=follow_symlinks)
    form = FORMATS.get(src.format)
    top = Defects(lenient)
    out: list[ImportedTrace] = []
    for name, files in form.groups(src.files, top):
        defects = Defects(lenient)
        seqs: list[SourceSequence] = []
        bar = _progress(files, progress, name or src.format)
        for path in files:
            for s in form.read(path, defects):
                if len(s.block):
                    seqs.append(s)
                    if bar is not None and len(seqs) % 64 == 0:
                        bar.set_postfix(sequences=len(seqs), refresh=False)
                else:  # every record was left out: its counts still say why
                    defects.counts.update(s.counts)
            if bar is not None:
                bar.update(_size(path))
        if bar is not None:
            bar.close()
        if not seqs:  # nothing readable: the counts belong to no trace
            top.merge(defects)
            continue
        seqs, dups = _dedupe(form, seqs, defects)
        out.append(_build(form, name, seqs, dups, defects))
    if not out:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(top.counts.items())) or "no records"
        raise TraceFormatError(f"no routing records could be read from the {len(src.files)} {src.format} file(s) "
                               f"({detail})")
    return src, out, top


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _progress(files: Sequence[str], enabled: bool, desc: str) -> Any:
    """A progress bar over the bytes of ``files`` (on stderr, so large files weigh what they hold) when
    ``enabled``, else None; the CLI enables it on a terminal."""
    if not enabled:
        return None
    import sys

    from tqdm import tqdm

    return tqdm(total=sum(_size(f) for f in files), desc=f"import {desc}", unit="B", unit_scale=True,
                unit_divisor=1024, leave=False, file=sys.stderr)


def import_traces(sources: Iterable[str | os.PathLike], out: str | os.PathLike, *, fmt: str = "auto",
                  lenient: bool = False, overwrite: bool = False, progress: bool = False,
                  token_text: str | os.PathLike | None = None, follow_symlinks: bool = False) -> ImportReport:
    """Import published routing logs and write them as moecache traces.

    One trace is written at ``out``; when the format splits the files into several traces (vLLM
    logger files of different layers), ``out`` is a folder and trace ``name`` goes to ``out/name``.
    ``token_text`` (formats with token strings only) writes a JSON-lines file beside the trace, one
    ``{"trace", "seq", "file", "label", "tokens"}`` object per sequence.
    """
    sources = list(sources)
    src, traces, top = read_sources(sources, fmt, lenient=lenient, progress=progress,
                                    follow_symlinks=follow_symlinks)
    form = FORMATS.get(src.format)
    if token_text is not None and not form.has_token_text:
        raise ConfigError(f"--token-text: {src.format} logs carry no token strings")
    out = os.fspath(out)
    if len(traces) == 1 and traces[0].name is None:
        paths = [out]
        check_trace_output(out, overwrite=overwrite)
    else:
        if os.path.lexists(out) and not os.path.isdir(out) or os.path.islink(out):
            raise FileExistsError(f"{out} exists and is not a folder; the {len(traces)} traces of this import need a "
                                  f"folder (written as {out}/<name>): choose another -o")
        if os.path.exists(os.path.join(out, MANIFEST)):
            raise FileExistsError(f"{out} is a trace; the {len(traces)} traces of this import need a folder "
                                  f"(they are written as {out}/<name>)")
        paths = [os.path.join(out, t.name or f"trace{i}") for i, t in enumerate(traces)]
        if os.path.isdir(out):
            for path in paths:
                check_trace_output(path, overwrite=overwrite)
        else:
            check_trace_output(out, overwrite=False)  # its parent exists and is writable
    if token_text is not None:
        _check_token_text_output(os.fspath(token_text), src.files, paths, overwrite)
    if paths != [out] and not os.path.isdir(out):
        os.makedirs(out)  # the output folder (and the missing folders named in its path)
    written = []
    for t, path in zip(traces, paths):
        write_trace(path, t.meta, [t.block], drops=t.drops, overwrite=overwrite)
        written.append(WrittenTrace(name=t.name, path=path, rows=len(t.block),
                                    sequences=len(t.meta.extra["sequence_label"]), files=list(t.meta.files),
                                    drops=dict(t.drops), duplicates=list(t.meta.extra["duplicates"])))
    if token_text is not None:
        lines = []
        for t, path in zip(traces, paths):
            for i, toks in enumerate(t.token_text or []):
                lines.append(json.dumps({"trace": path, "seq": i,
                                         "file": t.meta.files[t.meta.extra["sequence_file"][i]],
                                         "label": t.meta.extra["sequence_label"][i], "tokens": toks},
                                        ensure_ascii=False))
        write_text_atomic(os.fspath(token_text), "".join(line + "\n" for line in lines))
    return ImportReport(format=src.format, written=written, skipped_folder_files=src.skipped,
                        skipped_files=[x for t in traces for x in t.skipped_files] + top.skipped_files,
                        unassigned_drops=dict(sorted(top.counts.items())),
                        token_text=os.fspath(token_text) if token_text is not None else None)


def _check_token_text_output(path: str, sources: list[str], outputs: list[str], overwrite: bool) -> None:
    """``--token-text FILE`` may be written: not a source, not inside an output trace, and if it exists, a
    token-text file of ours (its first line a JSON object with ``trace`` and ``seq``) replaced only with
    ``overwrite``."""
    real = os.path.realpath(path)
    for src in sources:
        if os.path.realpath(src) == real:
            raise FileExistsError(f"--token-text {path} is one of the sources being imported; write it elsewhere")
    for out in outputs:
        o = os.path.realpath(out)
        if real == o or real.startswith(o + os.sep) or real == o + ".partial" or real.startswith(o + ".partial" + os.sep):
            raise FileExistsError(f"--token-text {path} is inside the output trace {out}; write it beside the trace")
    if os.path.lexists(path):
        if os.path.islink(path) or not os.path.isfile(path):
            raise FileExistsError(f"--token-text {path} exists and is not a regular file; choose another path")
        try:
            with open(path, "rb") as f:
                first = json.loads(f.readline().decode("utf-8") or "null")
        except (OSError, ValueError):
            first = None
        ours = isinstance(first, dict) and {"trace", "seq", "tokens"} <= set(first)
        if not ours:
            raise FileExistsError(f"--token-text {path} exists and is not a token-text file of moecache; refusing to "
                                  "replace it: choose another path")
        if not overwrite:
            raise FileExistsError(f"--token-text {path} already exists; pass --force to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError(f"--token-text: the folder {parent} does not exist; create it first")
    if is_finished_trace(parent) or os.path.isfile(os.path.join(parent, "meta.json")) and parent.endswith(".partial"):
        raise FileExistsError(f"--token-text {path} is inside the trace {parent}; write it beside the trace")
