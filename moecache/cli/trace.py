"""``moecache trace ...``: inspect, import and repair routing traces."""

from __future__ import annotations

import argparse
import json

from ..trace import finalise_partial, open_trace
from .trace_import import register as register_import


def _fmt_info(s: dict) -> str:
    lines = []
    state = "finalised" if s["finalised"] else "UNFINISHED (a recording that did not close; `moecache trace finalise` fixes it)"
    lines.append(f"trace      {s['path']}  [{state}]")
    lines.append(f"model      {s['model']} (family {s['family']})")
    if s["source"]:
        lines.append(f"source     {s['source']}")
    lines.append(f"tokens     {s['tokens']:,} in {s['sequences']:,} sequence(s), {s['steps']:,} step(s)")
    phases = ", ".join(f"{k} {v:,}" for k, v in s["phases"].items()) or "none"
    lines.append(f"phases     {phases}")
    lines.append(f"layers     {s['layers']} MoE layers (model layers {_ranges(s['moe_layers'])})")
    lines.append(f"experts    {s['experts']} per layer, top-{s['top_k']}, ids ordered {s['id_order']}")
    bpe = s["bytes_per_expert"]
    lines.append(f"weights    {s['weights']}" + (f"; {bpe / 2**20:.2f} MiB per expert" if bpe else ""))
    known = ", ".join(f"{k} {'-' if v is None else format(v, '.0%')}" for k, v in s["known"].items())
    lines.append(f"known      {known}")
    cov = "- (no tokens)" if s["coverage"] is None else f"{s['coverage']:.4%} of (token, layer) records present"
    lines.append(f"coverage   {cov}; {s['missing_records']:,} missing; {s['dropped_slots']:,} dropped slots")
    lines.append(f"accesses   {s['accesses']:,}")
    if s["drops"]:
        lines.append("drops      " + ", ".join(f"{k}: {v:,}" for k, v in s["drops"].items()))
    else:
        lines.append("drops      none")
    if s["files"]:
        shown = s["files"][:5]
        more = f" (+{len(s['files']) - 5} more)" if len(s["files"]) > 5 else ""
        lines.append(f"files      {', '.join(shown)}{more}")
    return "\n".join(lines)


def _ranges(xs: list[int]) -> str:
    if not xs:
        return "-"
    out, start, prev = [], xs[0], xs[0]
    for x in xs[1:] + [None]:  # type: ignore[list-item]
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ",".join(out)


def cmd_info(args: argparse.Namespace) -> int:
    for i, path in enumerate(args.paths):
        s = open_trace(path).summary()
        if args.json:
            print(json.dumps(s))
        else:
            if i:
                print()
            print(_fmt_info(s))
    return 0


def cmd_finalise(args: argparse.Namespace) -> int:
    out = finalise_partial(args.path)
    print(f"finalised: {out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("trace", help="inspect, import and repair routing traces",
                       description="Inspect, import and repair routing traces.")
    tsub = p.add_subparsers(dest="trace_command", metavar="SUBCOMMAND")
    tsub.required = True

    info = tsub.add_parser("info", help="summarise a trace",
                           description="Tokens, sequences, MoE layers, experts, top-k, phases, coverage and drops.")
    info.add_argument("paths", nargs="+", metavar="PATH", help="trace folder (or its unfinished PATH.partial)")
    info.add_argument("--json", action="store_true", help="print one JSON object per trace")
    info.set_defaults(func=cmd_info)

    fin = tsub.add_parser("finalise", help="finish a trace whose recording was killed",
                          description="Write the manifest of PATH.partial and rename it to PATH.")
    fin.add_argument("path", metavar="PATH")
    fin.set_defaults(func=cmd_finalise)
    register_import(tsub)
