"""The report folder: ``report.html`` (self-contained), ``summary.json``, PNG figures and CSV data.

Layout of ``DIR``::

    report.html              one page; figures embedded as base64 data URIs (opens from disk, no
                             network, no script); the same PNGs are also beside it in figures/
    summary.json             every figure (number) the page prints, under the key the page shows it
    figures/<trace>-<name>.png
    data/<trace>-<name>.csv  the full arrays behind the plots (curves at every capacity, ...)

Every value printed from the summary is wrapped in an element carrying ``data-key="<dotted path>"``
(list indices are path parts), formatted by ``fmt``; a summary value the sections below do not
print is listed in a final "Other figures" table, so the page shows every figure of the summary
(``tests/test_report.py`` parses the page and checks it). Every file is written atomically.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
import re
import shutil
import tempfile
from typing import Any, Iterable

import numpy as np

from ..atomic import write_atomic, write_text_atomic
from . import plots

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1180px;padding:0 18px 40px;color:#1b1b1b}
h1{font-size:1.6em;margin:18px 0 4px}h2{border-bottom:2px solid #ddd;padding-bottom:3px;margin-top:34px}
h3{margin:22px 0 6px}table{border-collapse:collapse;margin:6px 0 12px;font-size:.88em}
td,th{border:1px solid #d4d4d4;padding:3px 7px;text-align:right}th{background:#f3f3f3}
td.l,th.l{text-align:left}figure{margin:8px 0 16px}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}.note{color:#555;font-size:.9em}details{margin:6px 0}
summary{cursor:pointer;color:#244a86}code{background:#f4f4f4;padding:0 3px}nav a{margin-right:12px}
.grid{display:flex;flex-wrap:wrap;gap:14px}.grid figure{flex:1 1 520px}
"""


def fmt(v: Any) -> str:
    """How the page prints a summary value: ints with thousands separators, floats with 4 decimals."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.4f}"
    return str(v)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted path -> scalar leaf (lists indexed by position); empty containers have no leaves."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}.{i}" if prefix else str(i)))
    else:
        out[prefix] = obj
    return out


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60] or "trace"


class Page:
    """Builds the HTML, wrapping every summary value it prints in ``data-key``."""

    def __init__(self, summary: dict[str, Any]):
        self.summary = summary
        self.leaves = flatten(summary)
        self.shown: set[str] = set()
        self.parts: list[str] = []

    def get(self, key: str) -> Any:
        node: Any = self.summary
        for part in key.split("."):
            node = node[int(part)] if isinstance(node, list) else node[part]
        return node

    def v(self, key: str) -> str:
        """One leaf, wrapped."""
        val = self.get(key)
        if isinstance(val, (dict, list)):
            return self.vlist(key)
        self.shown.add(key)
        return f'<span data-key="{html.escape(key)}">{html.escape(fmt(val))}</span>'

    def vlist(self, key: str) -> str:
        """Every leaf under ``key``, comma separated (an empty list prints "none")."""
        sub = {k: x for k, x in self.leaves.items() if k == key or k.startswith(key + ".")}
        if not sub:
            return "none"
        return ", ".join(self.v(k) for k in sub)

    def add(self, text: str) -> None:
        self.parts.append(text)

    def table(self, head: Iterable[str], rows: Iterable[Iterable[str]], left: int = 1) -> None:
        # header cells are HTML like body cells (some hold printed summary values)
        h = "".join(f'<th class="{"l" if i < left else ""}">{c}</th>' for i, c in enumerate(head))
        body = "".join("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{c}</td>' for i, c in enumerate(r))
                       + "</tr>" for r in rows)
        self.add(f"<table><tr>{h}</tr>{body}</table>")

    def kv(self, pairs: Iterable[tuple[str, str]]) -> None:
        self.table(("figure", "value"), ([a if a.startswith("<") or "<span" in a else html.escape(a), b]
                                         for a, b in pairs))

    def figure(self, uri: str, title: str, caption: str, file: str) -> str:
        return (f'<figure><img alt="{html.escape(title)}" src="{uri}"><figcaption><b>{html.escape(title)}.</b> '
                f'{html.escape(caption)} (<code>{html.escape(file)}</code>)</figcaption></figure>')

    def rest(self) -> None:
        """Every summary value not printed above, so that nothing in summary.json is missing here."""
        left = [k for k in self.leaves if k not in self.shown]
        if not left:
            return
        self.add('<h2 id="other">Other figures</h2><details><summary>%d more values from summary.json</summary>'
                 % len(left))
        self.table(("key", "value"), ([f"<code>{html.escape(k)}</code>", self.v(k)] for k in left))
        self.add("</details>")


def _write_png(path: str, png: bytes) -> None:
    write_atomic(path, lambda f: f.write(png))


def _write_csv(path: str, header: list[str], rows: Iterable[Iterable[Any]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow(["" if (isinstance(x, float) and not np.isfinite(x)) else x for x in row])
    write_text_atomic(path, buf.getvalue())


def _trace_files(out: str, stem: str, data: dict[str, Any]) -> list[str]:
    """Write the CSV files of one trace; returns their paths relative to ``out``."""
    files = []

    def put(name: str, header: list[str], rows: Iterable[Iterable[Any]]) -> None:
        rel = f"data/{stem}-{name}.csv"
        _write_csv(os.path.join(out, rel), header, rows)
        files.append(rel)

    layers = data["moe_layers"]
    p = data["popularity"]
    put("popularity", ["layer", "expert", "accesses", "share"],
        ([layers[l], e, int(p["counts"][l, e]), float(p["share"][l, e])]
         for l in range(len(layers)) for e in range(p["counts"].shape[1])))
    c = data["curves"]
    lay, glo = c["layer"], c["global"]
    put("hit_rate_layer", ["capacity_per_layer", "lru", "belady"],
        ([int(x), float(a), float(b)] for x, a, b in zip(lay["capacities"], lay["lru"], lay["belady"])
         if x >= lay["min_capacity"]))
    put("hit_rate_layer_by_layer", ["layer", "capacity_per_layer", "lru", "belady"],
        ([layers[l], int(x), float(lay["lru_per_layer"][l, x]), float(lay["belady_per_layer"][l, x])]
         for l in range(len(layers)) for x in lay["capacities"] if x >= lay["min_capacity"]))
    put("hit_rate_global", ["capacity", "lru", f"lru_first_{glo['prefix_tokens']}_tokens",
                            f"belady_first_{glo['prefix_tokens']}_tokens"],
        ([int(x), float(a), float(b), float(d)] for x, a, b, d in
         zip(glo["capacities"], glo["lru"], glo["lru_prefix"], glo["belady_prefix"]) if x >= glo["min_capacity"]))
    h = data["reuse_hist"]
    put("reuse_distance", ["lru_stack_distance", "accesses"],
        [[i, int(n)] for i, n in enumerate(h["all"])] + [["first_use", h["cold"]]])
    t = data["locality"]
    put("temporal_locality", ["layer"] + [f"w{w}" for w in t["windows"]],
        ([layers[l]] + [float(x) for x in t["prob"][:, l]] for l in range(len(layers))))
    cv = data["consistency"]
    put("consistency", ["segment", "m", "layer", "coverage"],
        ([s if s is not None else "static", m, layers[l], float(cv["cov"][i, j, l])]
         for i, s in enumerate(list(cv["segments"]) + [None]) for j, m in enumerate(cv["sizes"])
         for l in range(len(layers))))
    a = data["affinity"]
    put("affinity", ["depth", "layer", "mi_bits", "mi_shuffled_bits", "nmi", "top1_cond", "top1_prior"],
        ([d, layers[l]] + [float(a[k][i, l]) for k in ("mi", "mi_shuffled", "nmi", "top1_cond", "top1_prior")]
         for i, d in enumerate(a["depths"]) for l in range(len(layers))))
    sq = data["sequences"]
    put("sequences", ["sequence_index", "tokens", "jsd_to_trace", "reuse1"],
        ([i, int(n), float(j), float(r1)] for i, (n, j, r1) in enumerate(zip(sq["tokens"], sq["jsd"], sq["reuse1"]))))
    return files


def _section_trace(pg: Page, ti: int, figs: dict[str, tuple[str, str, str, str]]) -> None:
    T = f"traces.{ti}"
    s = pg.get(T)
    pg.add(f'<h2 id="t{ti}">Trace {pg.v(T + ".name")}</h2>')
    pg.kv([("model", pg.v(T + ".model")), ("path", pg.v(T + ".path")), ("tokens", pg.v(T + ".tokens")),
           ("sequences", pg.v(T + ".sequences")), ("MoE layers", pg.v(T + ".layers")),
           ("experts per layer", pg.v(T + ".experts")), ("top-k", pg.v(T + ".top_k")),
           ("accesses (token, layer, expert)", pg.v(T + ".accesses")),
           ("repeated ids in a row (counted once)", pg.v(T + ".duplicate_slots")),
           ("missing slots", pg.v(T + ".missing_slots")), ("dropped slots", pg.v(T + ".dropped_slots"))])

    def fig(name: str) -> str:
        uri, title, cap, file = figs[name]
        return pg.figure(uri, title, cap, file)

    # popularity
    P = T + ".popularity"
    pg.add("<h3>Expert popularity and skew</h3>")
    pg.kv([("mean normalised entropy (1 = uniform)", pg.v(P + ".mean.entropy_norm")),
           ("mean entropy (bits)", pg.v(P + ".mean.entropy_bits")), ("mean Gini", pg.v(P + ".mean.gini")),
           (f"mean share of the top 10% ({fmt(s['popularity']['top10_experts'])} experts)",
            pg.v(P + ".mean.top10_share")),
           ("experts in the top 10%", pg.v(P + ".top10_experts")),
           ("unused (layer, expert) pairs", pg.v(P + ".mean.unused"))])
    pg.add('<div class="grid">' + fig("popularity_heatmap") + fig("skew") + "</div>")
    pg.add("<details><summary>Per-layer popularity table</summary>")
    pg.table(("layer", "entropy (bits)", "entropy / log2 E", "Gini", "top-10% share", "unused", "unused ids"),
             ([pg.v(f"{P}.layers.{i}.layer"), pg.v(f"{P}.layers.{i}.entropy_bits"),
               pg.v(f"{P}.layers.{i}.entropy_norm"), pg.v(f"{P}.layers.{i}.gini"),
               pg.v(f"{P}.layers.{i}.top10_share"), pg.v(f"{P}.layers.{i}.unused_count"),
               pg.vlist(f"{P}.layers.{i}.unused")] for i in range(len(s["popularity"]["layers"]))))
    pg.add("</details>")

    # cache curves
    C = T + ".cache"
    cache = s["cache"]
    pg.add("<h3>Hit rate against capacity</h3>")
    sim = cache["simulator"]
    if sim["available"]:
        pg.add(f'<p class="note">LRU and Belady: exact one-pass stack algorithms at every capacity. LFU, LRU (sim) and '
               f'the best online policy: simulator runs on the first {pg.v(C + ".simulator.prefix_tokens")} tokens; '
               f'online policies compared: {pg.vlist(C + ".simulator.policies")}.</p>')
    else:
        pg.add(f'<p class="note">Simulator curves (LFU, best online) absent: {pg.v(C + ".simulator.reason")}.</p>')
    for scope, title in (("layer", "One cache per MoE layer (capacity = experts per layer)"),
                         ("global", "One cache for all layers (capacity = experts in all)")):
        rows = cache[scope]["rows"]
        cols = [k for k in rows[0] if k not in ("capacity", "share")] if rows else []
        names = {"lru": "LRU", "belady": "Belady", "lru_prefix": "LRU (prefix)", "belady_prefix": "Belady (prefix)",
                 "lfu_sim": "LFU (sim)", "lru_sim": "LRU (sim)", "best_online_sim": "best online (sim)",
                 "best_online_policy": "best online policy"}
        pg.add(f"<p><b>{html.escape(title)}</b>, pool of {pg.v(f'{C}.{scope}.pool')} experts"
               + (f"; prefix = first {pg.v(C + '.global.prefix_tokens')} tokens" if scope == "global" else "")
               + "</p>")
        pg.table(["capacity", "share of pool"] + [names.get(c, c) for c in cols],
                 ([pg.v(f"{C}.{scope}.rows.{i}.capacity"), pg.v(f"{C}.{scope}.rows.{i}.share")]
                  + [pg.v(f"{C}.{scope}.rows.{i}.{c}") for c in cols] for i in range(len(rows))), left=0)
    pg.add(fig("hit_rate"))
    pg.add(f"<details><summary>Per-layer hit rate at {pg.v(C + '.layer.per_layer_capacity')} experts per layer"
           "</summary>")
    pg.table(("layer", "LRU", "Belady"),
             ([pg.v(f"{C}.layer.per_layer.{i}.layer"), pg.v(f"{C}.layer.per_layer.{i}.lru"),
               pg.v(f"{C}.layer.per_layer.{i}.belady")] for i in range(len(cache["layer"]["per_layer"]))))
    pg.add(fig("hit_rate_per_layer") + "</details>")

    # reuse
    R = T + ".reuse"
    pg.add("<h3>Reuse distance</h3>")
    pg.kv([("median LRU stack distance (per-layer caches)", pg.v(R + ".median")), ("mean", pg.v(R + ".mean")),
           ("first uses (no previous use)", pg.v(R + ".first_use"))])
    pg.table(["distance"] + [pg.v(f"{R}.bins.{i}") for i in range(len(s["reuse"]["bins"]))],
             [["accesses"] + [pg.v(f"{R}.counts.{i}") for i in range(len(s["reuse"]["counts"]))]])
    pg.add(fig("reuse_distance"))

    # temporal locality
    L_ = T + ".temporal_locality"
    tl = s["temporal_locality"]
    pg.add("<h3>Temporal locality</h3>")
    pg.table(["window w (tokens)"] + [pg.v(f"{L_}.windows.{i}") for i in range(len(tl["windows"]))],
             [["P(reused within w), all layers"] + [pg.v(f"{L_}.mean.{i}") for i in range(len(tl["windows"]))],
              ["accesses scored"] + [pg.v(f"{L_}.scored.{i}") for i in range(len(tl["windows"]))]])
    pg.add(fig("temporal_locality"))
    pg.add("<details><summary>Per-layer table</summary>")
    pg.table(["layer"] + [f"w={w}" for w in tl["windows"]],
             ([pg.v(f"{L_}.layers.{i}.layer")] + [pg.v(f"{L_}.layers.{i}.prob.{j}") for j in range(len(tl["windows"]))]
              for i in range(len(tl["layers"]))))
    pg.add("</details>")

    # consistency
    K = T + ".consistency"
    cs = s["consistency"]
    pg.add("<h3>Local routing consistency</h3>")
    pg.add('<p class="note">Share of a segment\'s accesses that its best fixed set of m experts covers '
           '(after arXiv 2505.16056); the last row is the best static set over the whole trace.</p>')
    pg.table(["segment s (tokens)", "segments", "tail tokens left out"]
             + ["m = " + pg.v(f"{K}.sizes.{j}") for j in range(len(cs["sizes"]))],
             [[pg.v(f"{K}.rows.{i}.segment"), pg.v(f"{K}.n_segments.{i}"), pg.v(f"{K}.tail_tokens.{i}")]
              + [pg.v(f"{K}.rows.{i}.coverage.{j}") for j in range(len(cs["sizes"]))] for i in range(len(cs["rows"]))]
             + [["whole trace (static)", "", ""] + [pg.v(f"{K}.static.{j}") for j in range(len(cs["sizes"]))]])
    pg.add(fig("consistency"))

    # affinity
    A = T + ".affinity"
    af = s["affinity"]
    pg.add("<h3>Cross-layer affinity</h3>")
    pg.table(("depth d", "MI (bits)", "MI, shuffled tokens", "normalised MI", "top-1 P(b|a)", "top-1 P(b)"),
             ([pg.v(f"{A}.per_depth.{i}.depth"), pg.v(f"{A}.per_depth.{i}.mi"), pg.v(f"{A}.per_depth.{i}.mi_shuffled"),
               pg.v(f"{A}.per_depth.{i}.nmi"), pg.v(f"{A}.per_depth.{i}.top1_cond"),
               pg.v(f"{A}.per_depth.{i}.top1_prior")] for i in range(len(af["per_depth"]))), left=0)
    if af.get("heatmap_pair"):
        pg.add(f'<p class="note">Heatmap: layer {pg.v(A + ".heatmap_pair.0")} to layer '
               f'{pg.v(A + ".heatmap_pair.1")}; every depth in {pg.vlist(A + ".depths")} is in the CSV.</p>')
    pg.add('<div class="grid">' + fig("affinity_heatmap") + fig("affinity_mi") + "</div>")

    # phases and sequences
    H = T + ".phases"
    ph = s["phases"]
    pg.add("<h3>Prefill, decode and per-sequence variation</h3>")
    pg.table(("phase", "tokens", "accesses", "mean normalised entropy", "P(next token reuses)", "scored"),
             ([pg.v(f"{H}.phases.{i}.phase"), pg.v(f"{H}.phases.{i}.tokens"), pg.v(f"{H}.phases.{i}.accesses"),
               pg.v(f"{H}.phases.{i}.entropy_norm"), pg.v(f"{H}.phases.{i}.reuse1"),
               pg.v(f"{H}.phases.{i}.reuse1_scored")] for i in range(len(ph["phases"]))))
    if ph["jsd_prefill_decode"] is None:
        pg.add(f'<p class="note">Prefill against decode: the trace does not have both phases '
               f'(JSD {pg.v(H + ".jsd_prefill_decode_mean")}).</p>')
    else:
        pg.add(f'<p>JSD between prefill and decode popularity, mean over layers: '
               f'{pg.v(H + ".jsd_prefill_decode_mean")} bits; per layer: {pg.vlist(H + ".jsd_prefill_decode")}.</p>')
    S = T + ".per_sequence"
    pg.add(f'<p>{pg.v(S + ".count")} sequences; {pg.v(S + ".long_count")} of at least {pg.v(S + ".min_tokens")} '
           "tokens.</p>")
    qs = ("count", "p10", "median", "p90", "mean")
    pg.table(["per sequence"] + list(qs),
             ([label] + [pg.v(f"{S}.{key}.{q}") for q in qs] for key, label in
              (("tokens", "tokens"), ("jsd", "JSD to whole trace (bits)"), ("reuse1", "P(next token reuses)"),
               ("jsd_long", "JSD, long sequences"), ("reuse1_long", "P(next token reuses), long sequences"))))
    pg.add(fig("sequences"))


def _section_against(pg: Page, figs: dict[str, tuple[str, str, str, str]]) -> None:
    G = "against"
    a = pg.get(G)
    pg.add(f'<h2 id="against">Routing shift: {pg.v(G + ".base")} against {pg.v(G + ".other")}</h2>')
    pg.kv([("mean JSD of popularity (bits)", pg.v(G + ".jsd_mean")),
           ("mean change of depth-1 MI (bits)", pg.v(G + ".d_mi_mean")),
           ("mean total variation of P(b at l+1 | a at l)", pg.v(G + ".tv_mean")),
           ("tokens scored per side (predictor replays)", pg.v(G + ".tokens_scored"))])
    pg.table(("predictor", "source", "recall, held-out base", "recall, other trace", "drop"),
             ([pg.v(f"{G}.recall.{i}.predictor"), pg.v(f"{G}.recall.{i}.source"), pg.v(f"{G}.recall.{i}.recall_same"),
               pg.v(f"{G}.recall.{i}.recall_other"), pg.v(f"{G}.recall.{i}.drop")] for i in range(len(a["recall"]))))
    if a["missing_predictors"]:
        pg.add(f'<p class="note">Not registered, so not scored: {pg.vlist(G + ".missing_predictors")}.</p>')
    uri, title, cap, file = figs["shift"]
    pg.add(pg.figure(uri, title, cap, file))
    pg.add("<details><summary>Per-layer shift</summary>")
    pg.table(("layer", "JSD", "change of MI", "TV of conditionals"),
             ([pg.v(f"{G}.layers.{i}.layer"), pg.v(f"{G}.layers.{i}.jsd"), pg.v(f"{G}.layers.{i}.d_mi"),
               pg.v(f"{G}.layers.{i}.tv")] for i in range(len(a["layers"]))))
    pg.add("</details>")


#: What a report folder holds; a folder with anything else is not replaced.
REPORT_ENTRIES = ("report.html", "summary.json", "figures", "data")


def is_report(path: str) -> bool:
    """Whether ``path`` is a folder written by ``write_report`` (summary.json says so; nothing else in it)."""
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    try:
        with open(os.path.join(path, "summary.json")) as f:
            fmt = json.load(f).get("format")
    except (OSError, ValueError, AttributeError):
        return False
    return fmt == "moecache-analysis" and set(os.listdir(path)) <= set(REPORT_ENTRIES)


def check_report_output(out: str) -> None:
    """Raise unless a report may be written at ``out``: nothing there, an empty folder, or a report of ours
    (replaced as a whole). The parent folder must exist and be writable."""
    path = os.path.abspath(out)
    if os.path.lexists(path) and not (os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)) \
            and not is_report(path):
        what = "a file" if not os.path.isdir(path) else "a symlink" if os.path.islink(path) else "a folder of other files"
        raise FileExistsError(f"-o {out} exists and is {what}, not a moecache report; refusing to replace it: choose "
                              "a new or empty folder")
    from ..validate import output_parent

    output_parent("-o", path)


def write_report(out: str, results: list[tuple[dict[str, Any], dict[str, Any]]], options: dict[str, Any],
                 against: tuple[dict[str, Any], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write the report folder ``out``; returns the summary written to summary.json.

    The report is built in a hidden folder beside ``out`` and renamed into place once complete, so a
    failure leaves ``out`` as it was; an existing report there is replaced as a whole."""
    check_report_output(out)
    final = os.path.abspath(out)
    os.makedirs(os.path.dirname(final), exist_ok=True)  # the folders named in the path
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(final) + ".tmp-", dir=os.path.dirname(final))
    try:
        summary = _write_report_files(tmp, results, options, against)
        os.chmod(tmp, 0o777 & ~_umask())
        if os.path.lexists(final):
            old = tempfile.mkdtemp(prefix="." + os.path.basename(final) + ".old-", dir=os.path.dirname(final))
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_report_files(out: str, results: list[tuple[dict[str, Any], dict[str, Any]]], options: dict[str, Any],
                        against: tuple[dict[str, Any], dict[str, Any]] | None) -> dict[str, Any]:
    os.makedirs(os.path.join(out, "figures"), exist_ok=True)
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    summary: dict[str, Any] = {"format": "moecache-analysis", "version": 1, "options": options, "traces": []}
    figs_all: list[dict[str, tuple[str, str, str, str]]] = []
    used: set[str] = set()
    for s, data in results:
        stem = slug(s["name"])
        while stem in used:
            stem += "_"
        used.add(stem)
        figs: dict[str, tuple[str, str, str, str]] = {}
        files = []
        draw = dict(plots.TRACE_FIGURES)
        cap = s["cache"]["layer"]["per_layer_capacity"]
        draw["hit_rate_per_layer"] = lambda d, c=cap: plots.hit_rate_per_layer(d, c)
        for name, fn in draw.items():
            png, title, caption = fn(data)
            rel = f"figures/{stem}-{name}.png"
            _write_png(os.path.join(out, rel), png)
            figs[name] = ("data:image/png;base64," + base64.b64encode(png).decode("ascii"), title, caption, rel)
            files.append(rel)
        files += _trace_files(out, stem, data)
        s = dict(s)
        s["files"] = files
        summary["traces"].append(s)
        figs_all.append(figs)
    against_figs: dict[str, tuple[str, str, str, str]] = {}
    if against is not None:
        a_s, a_d = against
        png, title, caption = plots.shift(a_d)
        rel = "figures/shift.png"
        _write_png(os.path.join(out, rel), png)
        against_figs["shift"] = ("data:image/png;base64," + base64.b64encode(png).decode("ascii"), title, caption, rel)
        a_s = dict(a_s)
        a_s["files"] = [rel]
        summary["against"] = a_s

    pg = Page(summary)
    names = ", ".join(html.escape(t["name"]) for t in summary["traces"])
    pg.add("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
           f"<title>moecache analyze: {names}</title><style>{CSS}</style></head><body>")
    pg.add(f"<h1>Routing analysis: {names}</h1>")
    nav = "".join(f'<a href="#t{i}">{html.escape(t["name"])}</a>' for i, t in enumerate(summary["traces"]))
    if against is not None:
        nav += '<a href="#against">routing shift</a>'
    pg.add(f"<nav>{nav}<a href=\"#settings\">settings</a></nav>")
    pg.add('<p class="note">Made by <code>moecache analyze</code>. Every number on this page is in '
           '<code>summary.json</code> under the key in its <code>data-key</code> attribute; the arrays behind the '
           'plots are in <code>data/</code>, the plots in <code>figures/</code>.</p>')
    for i in range(len(summary["traces"])):
        _section_trace(pg, i, figs_all[i])
        pg.add(f"<p class=\"note\">Files: {pg.vlist(f'traces.{i}.files')}</p>")
    if against is not None:
        _section_against(pg, against_figs)
        pg.add(f"<p class=\"note\">Files: {pg.vlist('against.files')}</p>")
    pg.add('<h2 id="settings">Settings</h2>')
    pg.table(("option", "value"), ([html.escape(k), pg.vlist(f"options.{k}")] for k in options))
    pg.add(f'<p class="note">Format {pg.v("format")} version {pg.v("version")}.</p>')
    pg.rest()
    pg.add("</body></html>")
    # allow_nan=False: a NaN that escaped rounding is a bug, not a JSON extension to write;
    # serialised before anything is written so a failure leaves no half-updated folder
    text = json.dumps(summary, indent=1, sort_keys=False, allow_nan=False) + "\n"
    write_text_atomic(os.path.join(out, "report.html"), "\n".join(pg.parts))
    write_text_atomic(os.path.join(out, "summary.json"), text)
    return summary
