"""The policy suite's result files, written from a plan and its rows (grid order, so the same rows give
the same bytes): ``results.md`` (settings, traces and their fitting split, a summary, the headline rows
per trace, every row, the skipped combinations by reason), ``results.csv`` (every row with its ratios),
``skipped.csv`` and the plots (``moecache.bench.plots``). Nothing here runs a replay.
"""

from __future__ import annotations

import csv
import io
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable

from ..atomic import write_atomic, write_text_atomic
from .config import NONE, Spec, Suite, format_label
from .plan import Config, Plan, Run, policy_class, predictor_offline
from .plots import Panel, metric_figure


#: (metric, ratio column, title, unit) of the four headline metrics.
METRICS: tuple[tuple[str, str, str, str], ...] = (
    ("demand_hit_rate", "hit_ratio", "demand hit rate", ""),
    ("ready_rate", "ready_ratio", "ready rate", ""),
    ("bytes_per_token", "bytes_ratio", "bytes per token", "MB"),
    ("est_ms_per_token", "ms_ratio", "estimated ms per token", "ms"),
)

#: CSV columns, in order.
CSV_COLUMNS = ("trace", "mode", "scope", "capacity_label", "capacity", "policy", "predictor", "depth", "miss_rule",
               "prefetch", "engine", "demand_hit_rate", "hit_ratio", "ready_rate", "ready_ratio", "bytes_per_token",
               "bytes_ratio", "est_ms_per_token", "bound_ms_per_token", "ms_ratio", "stall_ms_per_token",
               "prefetch_precision", "prefetch_recall", "wasted_bytes_per_token", "tokens", "accesses", "hits",
               "ready", "needs", "loads", "prefetches", "prefetch_used", "prefetch_wasted", "cpu_runs",
               "bytes_per_expert", "policy_detail", "predictor_detail", "hardware", "fit", "key")


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def with_ratios(plan: Plan, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows (in plan order) with ``hit_ratio``, ``ready_ratio``, ``bytes_ratio`` (to the bound row) and
    ``ms_ratio`` (to the lower bound)."""
    by_config = {r.config: row for r, row in zip(plan.runs, rows)}
    out = []
    for r, row in zip(plan.runs, rows):
        b = by_config[plan.bound_config(r.config)]
        out.append({**row,
                    "hit_ratio": _div(row["demand_hit_rate"], b["demand_hit_rate"]),
                    "ready_ratio": _div(row["ready_rate"], b["ready_rate"]),
                    "bytes_ratio": _div(row["bytes_per_token"], b["bytes_per_token"]),
                    "ms_ratio": row["ratio"]})
    return out


@dataclass
class Headline:
    """The four rows shown per (trace, scope, capacity)."""

    role: str
    config: Config
    row: dict[str, Any]


def headlines(plan: Plan, rows: list[dict[str, Any]]) -> dict[tuple[str, str, str, Spec], list[Headline]]:
    """Per (trace, scope, capacity, format): LRU, the best online demand-only policy, the best online configuration
    with a predictor (best = least estimated ms per token, ties to config order) and the bound."""
    cells: dict[tuple[str, str, str, Spec], list[tuple[Run, dict[str, Any]]]] = {}
    for r, row in zip(plan.runs, rows):
        cells.setdefault((r.config.trace, r.config.scope, r.config.capacity, r.config.fmt), []).append((r, row))
    out = {}
    for cell, items in cells.items():
        def online(r: Run) -> bool:
            return not policy_class(r.config.policy).offline and not predictor_offline(r.config.predictor)

        picks = []
        lru = [(r, row) for r, row in items if r.config.policy == Spec("lru") and r.config.predictor is None
               and r.config.depth == 0]
        if lru:
            picks.append(("LRU", lru[0]))
        demand = [(r, row) for r, row in items if online(r) and r.config.predictor is None]
        if demand:
            picks.append(("best demand-only", min(demand, key=lambda x: (x[1]["est_ms_per_token"], x[0].order))))
        predicted = [(r, row) for r, row in items if online(r) and r.config.predictor is not None]
        if predicted:
            picks.append(("best with predictor", min(predicted, key=lambda x: (x[1]["est_ms_per_token"], x[0].order))))
        bound = [(r, row) for r, row in items if r.config == plan.bound_config(r.config)]
        picks.append(("bound", bound[0]))
        out[cell] = [Headline(role, r.config, row) for role, (r, row) in picks]
    return out


def _f(v: Any, fmt: str) -> str:
    if v is None:
        return "-"
    if fmt == "mb":
        mb = v / 1e6
        return f"{mb:.1f}" if mb >= 100 else f"{mb:.2f}" if mb >= 1 else f"{mb:.3f}"
    return format(v, fmt)


def _metric_cells(row: dict[str, Any]) -> list[str]:
    return [_f(row["demand_hit_rate"], ".4f"), _f(row["hit_ratio"], ".3f"), _f(row["ready_rate"], ".4f"),
            _f(row["ready_ratio"], ".3f"), _f(row["bytes_per_token"], "mb"), _f(row["bytes_ratio"], ".2f"),
            _f(row["est_ms_per_token"], ".3f"), _f(row["ms_ratio"], ".2f")]


_METRIC_HEADS = ["hit", "hit/B", "ready", "ready/B", "MB/token", "MB/B", "ms/token", "ms/B"]


def _table(heads: list[str], lines: Iterable[list[str]]) -> list[str]:
    return (["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
            + ["| " + " | ".join(c) + " |" for c in lines])


def _cells(suite: Suite) -> list[tuple[str, str, Spec]]:
    """(scope, capacity, format) in grid order."""
    return [(scope, cap, fmt) for scope in suite.scopes for cap in suite.capacities for fmt in suite.formats]


def _fmt_col(suite: Suite, fmt: Spec) -> list[str]:
    """The format cell of a table row, where the grid has formats other than bf16 (else none)."""
    return [format_label(fmt)] if suite.multi_format else []


def _summary(suite: Suite, heads: dict[tuple[str, str, str, Spec], list[Headline]]) -> list[list[str]]:
    lines = []
    for t in suite.traces:
        for scope, cap, fmt in _cells(suite):
                got = {h.role: h for h in heads.get((t.name, scope, cap, fmt), [])}
                if not got:
                    continue
                bound = got["bound"]
                online = [got[r] for r in ("best demand-only", "best with predictor") if r in got]
                best = min(online, key=lambda h: h.row["est_ms_per_token"]) if online else None
                lru = got.get("LRU")
                gap = None
                if lru is not None and best is not None:
                    span = lru.row["est_ms_per_token"] - bound.row["est_ms_per_token"]
                    gap = (lru.row["est_ms_per_token"] - best.row["est_ms_per_token"]) / span if span > 1e-9 else None
                lines.append([t.name, scope, f"{cap} ({bound.row['capacity']})"] + _fmt_col(suite, fmt) + [
                              _f(lru.row["est_ms_per_token"] if lru else None, ".3f"),
                              f"`{best.config.label}`" if best else "-",
                              _f(best.row["est_ms_per_token"] if best else None, ".3f"),
                              _f(best.row["demand_hit_rate"] if best else None, ".4f"),
                              "n/a" if gap is None else f"{gap:.1%}",
                              _f(bound.row["est_ms_per_token"], ".3f"), _f(bound.row["bound_ms_per_token"], ".3f")])
    return lines


def render_markdown(plan: Plan, rows: list[dict[str, Any]]) -> str:
    """``results.md``: settings, the headline per trace, every row, and the skipped combinations."""
    suite = plan.suite
    st = suite.settings
    heads = headlines(plan, rows)
    w: list[str] = [f"# Policy suite: {suite.name}", ""]
    w += [f"- config: `{os.path.basename(suite.source)}` (sha256 {suite.digest}); machine, date, command and "
          "commit: `meta.json` beside this file",
          f"- {len(plan.runs)} configurations run, {len(plan.skipped)} combinations skipped (reasons below); "
          "engines: " + ", ".join(f"{e} {n}" for e, n in sorted(Counter(r["engine"] for r in rows).items())),
          f"- miss rule `{st.miss_rule}`, prefetch rule `{st.prefetch_rule}`, prefetch budget "
          f"{st.prefetch_budget or 'top_k x tokens of the step'}; copy model `{st.copy_queue}` ("
          + ("the runtime's copy worker" if st.copy_queue == "worker" else "every copy in issue order")
          + "); timing model hardware: "
          + "; ".join(sorted({plan.infos[t.name].hardware_text for t in suite.traces})),
          f"- bound: `{suite.bound.label}` (no predictor, no prefetch) at the same trace, scope and capacity"
          + (" (added to the grid: the config does not list it)" if suite.bound_added else "")
          + "; `X/B` = the figure divided by the bound row's; `ms/B` = estimated ms/token divided by the lower "
          "bound of `moecache.sim.bound` (GPU time, or the copy time of the bound policy's misses)",
          "- estimated times come from the simulator's timing model, not from a GPU run",
          "- predictors and static placement are fitted on separate sequences, never scored (per trace below)", ""]
    w += ["## Traces", ""]
    w += _table(["trace", "replay", "scored tokens", "layers x experts, top-k", "fitting and scoring"],
                [[t.name, "decode stream (every token its own step)" if t.decode_stream
                  else "batched steps as recorded",
                  f"{plan.infos[t.name].tokens:,}",
                  "{} x {}, top-{}".format(*plan.infos[t.name].dims), plan.infos[t.name].fit_note]
                 for t in suite.traces])
    w += ["", "## Summary", "",
          "Estimated ms/token of LRU, of the best online configuration (any online policy, with or without a "
          "predictor) and of the bound policy's own replay; *gap closed* = (LRU - best) / (LRU - bound row) "
          "(n/a where LRU already matches the bound row; above 100% a prefetching configuration beat the "
          "demand-only bound policy's replay, never the lower bound); *lower bound* from `moecache.sim.bound`.", ""]
    fcol = ["format"] if suite.multi_format else []
    w += _table(["trace", "scope", "capacity (slots)"] + fcol + ["LRU ms/token", "best online", "ms/token", "hit",
                 "gap closed", f"{suite.bound.label} ms/token", "lower bound ms/token"], _summary(suite, heads))
    if suite.multi_format:
        w += ["", "Formats: a capacity is a share of the bf16 expert memory (slots: experts that memory holds in the "
              "format); copies move the compressed bytes; every expert keeps the bf16 compute time plus the "
              "expansion (`moecache.cost.hardware.with_format`; its device throughput is an assumption)."]
    w += ["", "## Headline", "",
          "Per trace, scope and capacity: LRU, the best online demand-only policy, the best online configuration "
          "with a predictor (best = least estimated ms/token) and the bound.", ""]
    for t in suite.traces:
        w += [f"### {t.name}", ""]
        lines = []
        for scope, cap, fmt in _cells(suite):
            for h in heads.get((t.name, scope, cap, fmt), []):
                lines.append([scope, f"{cap} ({h.row['capacity']})"] + _fmt_col(suite, fmt)
                             + [h.role, f"`{h.config.label}`"] + _metric_cells(h.row))
        w += _table(["scope", "capacity (slots)"] + fcol + ["row", "configuration"] + _METRIC_HEADS, lines) + [""]
    w += ["## Every row", ""]
    for t in suite.traces:
        sub = [(r, row) for r, row in zip(plan.runs, rows) if r.config.trace == t.name]
        w += [f"<details><summary>{t.name}: {len(sub)} rows</summary>", ""]
        w += _table(["scope", "capacity (slots)"] + fcol + ["policy", "predictor", "D"] + _METRIC_HEADS
                    + ["stall ms", "prefetch precision", "recall", "engine"],
                    [[row["scope"], f"{row['capacity_label']} ({row['capacity']})"] + _fmt_col(suite, r.config.fmt)
                     + [row["policy"], row["predictor"], str(row["depth"])] + _metric_cells(row)
                     + [_f(row["stall_ms_per_token"], ".3f"), _f(row["prefetch_precision"], ".3f"),
                        _f(row["prefetch_recall"], ".3f"), row["engine"]] for r, row in sub])
        w += ["", "</details>", ""]
    w += ["## Skipped combinations", "",
          "Every combination of the grid that was not run, by reason (all of them are listed in `skipped.csv`).", ""]
    reasons = Counter(s.reason for s in plan.skipped)
    first = {}
    for s in plan.skipped:
        first.setdefault(s.reason, s)
    w += _table(["reason", "combinations", "e.g."],
                [[reason, str(n), f"{first[reason].config.trace} {first[reason].config.scope} "
                  f"{first[reason].config.capacity} `{first[reason].config.label}`"]
                 for reason, n in sorted(reasons.items(), key=lambda x: (-x[1], x[0]))])
    return "\n".join(w) + "\n"


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return v


def render_csv(rows: list[dict[str, Any]], multi_format: bool = False) -> str:
    """Every row; with formats in the grid, an ``expert_format`` column follows ``capacity``."""
    cols = CSV_COLUMNS if not multi_format else CSV_COLUMNS[:5] + ("expert_format",) + CSV_COLUMNS[5:]
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(cols)
    for row in rows:
        wr.writerow([_csv_value(row.get(c, "bf16" if c == "expert_format" else None)) for c in cols])
    return buf.getvalue()


def render_skipped(plan: Plan) -> str:
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    multi = plan.suite.multi_format
    wr.writerow(("trace", "scope", "capacity") + (("expert_format",) if multi else ())
                + ("policy", "predictor", "depth", "reason"))
    for s in plan.skipped:
        c = s.config
        wr.writerow((c.trace, c.scope, c.capacity) + ((format_label(c.fmt),) if multi else ())
                    + (c.policy.label, NONE if c.predictor is None else c.predictor.label, c.depth, s.reason))
    return buf.getvalue()


def plot_panels(plan: Plan, rows: list[dict[str, Any]], column: str) -> list[Any]:
    """Per trace: x = capacities, one line per (headline role, scope) with ``column``'s values."""
    heads = headlines(plan, rows)
    suite = plan.suite
    panels = []
    for t in suite.traces:
        series: dict[tuple[str, str], list[float | None]] = {}
        for scope in suite.scopes:
            for ci, cap in enumerate(suite.capacities):
                for fmt in suite.formats:
                    where = f"{scope}, {format_label(fmt)}" if suite.multi_format else scope
                    for h in heads.get((t.name, scope, cap, fmt), []):
                        vals = series.setdefault((h.role, where), [None] * len(suite.capacities))
                        vals[ci] = h.row[column]
        panels.append(Panel(title=t.name, x=list(suite.capacities), series=series))
    return panels


def write_outputs(out: str, plan: Plan, rows: list[dict[str, Any]]) -> list[str]:
    """Write the deterministic result files (everything but meta.json); returns their paths."""
    full = with_ratios(plan, rows)
    files = {"results.md": render_markdown(plan, full), "results.csv": render_csv(full, plan.suite.multi_format),
             "skipped.csv": render_skipped(plan)}
    written = []
    for name, text in files.items():
        path = os.path.join(out, name)
        write_text_atomic(path, text)
        written.append(path)
    if plan.suite.plots:
        for metric, ratio, title, unit in METRICS:
            scale = 1e-6 if unit == "MB" else 1.0
            for column, suffix, ylabel in ((metric, "", f"{title}" + (f" ({unit})" if unit else "")),
                                           (ratio, "_ratio", f"{title} / bound")):
                panels = plot_panels(plan, full, column)
                png = metric_figure(panels, f"{plan.suite.name}: {ylabel}", ylabel,
                                    scale=1.0 if suffix else scale, reference=1.0 if suffix else None)
                name = metric.replace("est_", "") + suffix + ".png"
                path = os.path.join(out, name)
                write_atomic(path, lambda f, png=png: f.write(png))
                written.append(path)
    return written
