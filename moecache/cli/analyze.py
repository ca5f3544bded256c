"""``moecache analyze TRACE... -o DIR [--against OTHER]``: offline routing analysis with an HTML report."""

from __future__ import annotations

import argparse
import os
import sys
import time

from ..errors import ConfigError


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give integers >= 1, e.g. 1,4,16")
    return vals


def _shares(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x.strip().rstrip("%")) / (100.0 if x.strip().endswith("%") else 1.0)
                     for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give shares like 12.5%,25%,50% or 0.25,0.5") from None
    if not vals or not all(0 < v <= 1 for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: every share must be in (0, 1] (or (0%, 100%])")
    return vals


class _Progress:
    """One tqdm bar per long step; silent when stderr is not a terminal or with --quiet."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bars: dict[str, object] = {}

    def say(self, msg: str) -> None:
        if self.enabled:
            self.close()
            print(f"  {msg}", file=sys.stderr, flush=True)

    def bar(self, name: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        b = self.bars.get(name)
        if b is None:
            b = self.bars[name] = tqdm(total=total, desc=f"  {name}", leave=False, file=sys.stderr)
        b.n = done  # type: ignore[attr-defined]
        b.refresh()  # type: ignore[attr-defined]

    def close(self) -> None:
        for b in self.bars.values():
            b.close()  # type: ignore[attr-defined]
        self.bars.clear()


def cmd_analyze(args: argparse.Namespace) -> int:
    try:
        import matplotlib  # noqa: F401  (a default dependency; a broken environment may still lack it)
    except ImportError:
        raise ConfigError("moecache analyze draws its plots with matplotlib, which is missing from this environment: "
                          "pip install matplotlib (a dependency of moecache-offload)") from None
    from ..analysis.report import write_report
    from ..analysis.run import Options, analyze_trace
    from ..trace import open_trace

    from ..analysis.report import check_report_output

    check_report_output(args.out)  # before any work: only a new/empty folder or a report of ours is replaced
    opts = Options(opt_tokens=args.belady_tokens, sim_tokens=args.sim_tokens, simulate=not args.no_simulate)
    if args.windows:
        opts.windows = args.windows
    if args.segments:
        opts.segments = args.segments
    if args.depths:
        opts.depths = args.depths
    if args.capacities:
        opts.shares = args.capacities
    prog = _Progress(enabled=not args.quiet and sys.stderr.isatty())
    t0 = time.perf_counter()
    results = []
    traces = []
    for path in args.traces:
        trace = open_trace(path)
        traces.append(trace)
        if not args.quiet:
            print(f"analysing {path} ({len(trace):,} tokens)", file=sys.stderr)
        results.append(analyze_trace(trace, opts, progress=prog.say, bar=prog.bar))
        prog.close()
    against = None
    if args.against:
        from ..analysis.shift import compare

        other = open_trace(args.against)
        if not args.quiet:
            print(f"comparing with {args.against}", file=sys.stderr)
        against = compare(traces[0], other, tokens=args.predictor_tokens, base_name=results[0][0]["name"],
                          other_name=os.path.basename(os.path.abspath(args.against)))
    options = opts.to_json()
    options["predictor_tokens"] = args.predictor_tokens
    write_report(args.out, results, options, against)
    if not args.quiet:
        print(f"wrote {os.path.join(args.out, 'report.html')} and summary.json "
              f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "analyze", help="offline routing analysis of traces, with plots and an HTML report",
        description="Expert popularity and skew, reuse distance, temporal locality, local routing consistency, "
                    "cross-layer affinity, prefill/decode and per-sequence variation, and hit rate against "
                    "capacity (LRU, Belady, LFU, best online policy). Writes DIR/report.html (self-contained), "
                    "DIR/summary.json, DIR/figures/*.png and DIR/data/*.csv.")
    p.add_argument("traces", nargs="+", metavar="TRACE", help="moecache trace folder(s); each gets its own section")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="report folder: new, empty, or an earlier report (replaced as a whole)")
    p.add_argument("--against", metavar="OTHER", help="a trace of the same model: how far routing shifts from "
                                                      "the first TRACE to it")
    p.add_argument("--belady-tokens", type=_positive, default=1000, metavar="N",
                   help="global-scope Belady curve on the first N tokens (its cost grows with tokens x layers x "
                        "top_k; default 1000); per-layer curves always cover the whole trace")
    p.add_argument("--sim-tokens", type=_positive, default=250, metavar="N",
                   help="simulator runs (LFU, best online policy) on the first N tokens (default 250)")
    p.add_argument("--no-simulate", action="store_true", help="skip the simulator runs")
    p.add_argument("--capacities", type=_shares, metavar="S,...",
                   help="capacities tabulated and simulated, as shares of a pool (default 12.5%%,25%%,50%%)")
    p.add_argument("--windows", type=_ints, metavar="W,...", help="temporal-locality windows in tokens "
                                                                  "(default 1,2,4,8,16,32,64)")
    p.add_argument("--segments", type=_ints, metavar="S,...", help="segment lengths for routing consistency "
                                                                   "(default 4,8,16,32,64,128)")
    p.add_argument("--depths", type=_ints, metavar="D,...", help="cross-layer distances (default 1,2,3)")
    p.add_argument("--predictor-tokens", type=_positive, default=1000, metavar="N",
                   help="with --against: tokens each predictor replay scores per side (default 1000)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_analyze)
