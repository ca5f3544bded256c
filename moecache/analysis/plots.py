"""The report's figures, drawn with matplotlib's Agg backend (no display) into PNG bytes.

Each function takes the ``data`` of ``run.analyze_trace`` (or of ``shift.compare``) and returns
``(png_bytes, title, caption)``. Nothing here computes a metric.
"""

from __future__ import annotations

import io
from typing import Any, Callable

import numpy as np

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless, file output only
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

Figure = tuple[bytes, str, str]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def popularity_heatmap(d: dict[str, Any]) -> Figure:
    p = d["popularity"]["share"] * d["num_experts"]  # 1 = uniform use
    fig, ax = plt.subplots(figsize=(9, 3.6))
    shown = np.where(p > 0, p, np.nan)
    finite = shown[np.isfinite(shown)]
    lo, hi = (max(finite.min(), 1e-3), finite.max()) if finite.size else (0.1, 10)
    im = ax.imshow(shown, aspect="auto", cmap="viridis", norm=LogNorm(vmin=lo, vmax=max(hi, lo * 1.01)),
                   interpolation="nearest")
    ax.set_xlabel("expert id")
    ax.set_ylabel("MoE layer (model index)")
    ticks = np.linspace(0, len(d["moe_layers"]) - 1, min(8, len(d["moe_layers"]))).astype(int)
    ax.set_yticks(ticks, [str(d["moe_layers"][t]) for t in ticks])
    fig.colorbar(im, ax=ax, label="share x experts (1 = uniform)")
    ax.set_title("Expert popularity per layer (unused experts blank)")
    return _png(fig), "Expert x layer popularity", "Share of each layer's accesses per expert, times the expert count."


def skew(d: dict[str, Any]) -> Figure:
    p = d["popularity"]
    x = np.array(d["moe_layers"])
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(x, p["entropy_norm"], "o-", label="entropy / log2(E)")
    ax.plot(x, p["gini"], "s-", label="Gini")
    ax.plot(x, p["top10_share"], "^-", label=f"share of top {p['top10_experts']} experts")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("MoE layer (model index)")
    ax.legend(fontsize=8)
    ax.set_title("Popularity skew per layer")
    return _png(fig), "Popularity skew", "Normalised entropy (1 = uniform), Gini (0 = uniform) and top-10% share."


def reuse_distance(d: dict[str, Any]) -> Figure:
    h = d["reuse_hist"]
    allc = h["all"]
    tot = allc.sum() + h["cold"]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(np.arange(len(allc)), allc / max(tot, 1), width=1.0, color="C0")
    ax.axvline(d["top_k"] - 0.5, color="C3", ls="--", lw=1, label=f"top_k = {d['top_k']}")
    ax.set_xlabel("LRU stack distance (distinct experts of the layer used since)")
    ax.set_ylabel("share of accesses")
    ax.set_title(f"Reuse distance, per-layer caches (first uses: {h['cold'] / max(tot, 1):.2%})")
    ax.legend(fontsize=8)
    return _png(fig), "Reuse-distance histogram", "An access hits an LRU cache of c experts per layer iff its distance is below c."


def _log_x(ax: Any, *ys: Any, base: float = 10) -> None:
    """A log x axis where something finite was drawn; else a note that there is nothing to show (a trace too
    short for the measure: a one-token trace has no segments, no reuse windows)."""
    if any(np.isfinite(np.asarray(y, dtype=float)).any() for y in ys if np.size(y)):
        ax.set_xscale("log", base=base)
    else:
        ax.text(0.5, 0.5, "no data: the trace is too short for this measure", ha="center", va="center",
                transform=ax.transAxes, color="0.4")


def temporal_locality(d: dict[str, Any]) -> Figure:
    t = d["locality"]
    w = np.array(t["windows"])
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for l in range(t["prob"].shape[1]):
        ax.plot(w, t["prob"][:, l], color="0.75", lw=0.7)
    ax.plot(w, t["mean"], "o-", color="C0", lw=2, label="all layers")
    _log_x(ax, t["mean"], base=2)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("window w (tokens)")
    ax.set_ylabel("P(reused within w)")
    ax.legend(fontsize=8)
    ax.set_title("Temporal locality (grey: one line per layer)")
    return _png(fig), "Temporal locality", "Chance that an expert used by a token is used again within w tokens of the same sequence."


def consistency(d: dict[str, Any]) -> Figure:
    c = d["consistency"]
    s = np.array(c["segments"])
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for j, m in enumerate(c["sizes"]):
        line, = ax.plot(s, c["mean"][:-1, j], "o-", label=f"m = {m}")
        ax.axhline(c["mean"][-1, j], color=line.get_color(), ls=":", lw=1)
    _log_x(ax, c["mean"][:-1], base=2)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("segment length s (tokens)")
    ax.set_ylabel("coverage of the best m experts")
    ax.legend(fontsize=8)
    ax.set_title("Local routing consistency (dotted: best static set)")
    return _png(fig), "Local routing consistency", "Share of a segment's accesses covered by its best fixed set of m experts."


def affinity_heatmap(d: dict[str, Any]) -> Figure:
    src, depth = d["affinity_pair"]
    mats = d["affinity"]["cond"]
    m = mats.get(f"{src}:{depth}")
    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    if m is None:
        ax.text(0.5, 0.5, "one MoE layer: no layer pair", ha="center")
        ax.set_axis_off()
    else:
        im = ax.imshow(m, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        fig.colorbar(im, ax=ax, label="P(b at next layer | a)")
        ax.set_xlabel(f"expert b at layer {d['moe_layers'][src + depth]}")
        ax.set_ylabel(f"expert a at layer {d['moe_layers'][src]}")
    ax.set_title("Cross-layer affinity")
    return _png(fig), "Cross-layer affinity heatmap", "Conditional probability that expert b is chosen at the next MoE layer given a."


def affinity_mi(d: dict[str, Any]) -> Figure:
    a = d["affinity"]
    x = np.array(d["moe_layers"])
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for i, dep in enumerate(a["depths"]):
        line, = ax.plot(x, a["mi"][i], "o-", label=f"d = {dep}")
        ax.plot(x, a["mi_shuffled"][i], ":", color=line.get_color(), lw=1)
    ax.set_xlabel("source MoE layer l (model index)")
    ax.set_ylabel("MI(l ; l + d) bits")
    ax.legend(fontsize=8)
    ax.set_title("Cross-layer mutual information (dotted: shuffled tokens)")
    return _png(fig), "Cross-layer mutual information", "Mutual information between the experts of layer l and l + d."


def hit_rate(d: dict[str, Any]) -> Figure:
    c = d["curves"]
    sim = d["sim"]
    k = d["top_k"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, scope in zip(axes, ("layer", "global")):
        cc = c[scope]
        caps = cc["capacities"]
        ok = caps >= k
        pool = caps[-1]
        x = caps[ok] / pool
        if scope == "layer":
            ax.plot(x, cc["lru"][ok], label="LRU")
            ax.plot(x, cc["belady"][ok], label="Belady")
        else:
            ax.plot(x, cc["lru"][ok], label="LRU (whole trace)")
            if cc["prefix_accesses"] < int(np.asarray(d["popularity"]["counts"]).sum()):
                ax.plot(x, cc["lru_prefix"][ok], ls="--", label=f"LRU (first {cc['prefix_tokens']} tokens)")
            ax.plot(x, cc["belady_prefix"][ok], label=f"Belady (first {cc['prefix_tokens']} tokens)")
        if sim.get("available"):
            sc = sim["scopes"][scope]
            xs = np.array(sc["capacities"]) / pool
            if sc["lfu"] is not None:
                ax.plot(xs, sc["lfu"], "s", label=f"LFU (sim, first {sim['prefix_tokens']} tokens)")
            ax.plot(xs, sc["best_online"], "*", ms=9, label="best online (sim)")
        ax.set_xlabel("capacity (share of the pool's experts)")
        ax.set_ylabel("demand hit rate")
        ax.set_ylim(0, 1.02)
        ax.set_xlim(0, 1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title("one cache per layer" if scope == "layer" else "one cache for all layers")
    return _png(fig), "Hit rate against capacity", "Demand hit rate of LRU and Belady at every capacity; LFU and best online policy from the simulator."


def hit_rate_per_layer(d: dict[str, Any], capacity: int) -> Figure:
    c = d["curves"]["layer"]
    x = np.arange(len(d["moe_layers"]))
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.bar(x - 0.2, c["lru_per_layer"][:, capacity], width=0.4, label="LRU")
    ax.bar(x + 0.2, c["belady_per_layer"][:, capacity], width=0.4, label="Belady")
    ax.set_xticks(x[:: max(1, len(x) // 13)], [str(d["moe_layers"][i]) for i in x[:: max(1, len(x) // 13)]])
    ax.set_xlabel("MoE layer (model index)")
    ax.set_ylabel("demand hit rate")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    ax.set_title(f"Per-layer hit rate at {capacity} experts per layer")
    return _png(fig), "Per-layer hit rate", f"Each layer's own cache of {capacity} experts."


def sequences(d: dict[str, Any]) -> Figure:
    s = d["sequences"]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ok = np.isfinite(s["jsd"])
    ax.scatter(s["tokens"][ok], s["jsd"][ok], s=8, alpha=0.6)
    _log_x(ax, np.asarray(s["jsd"])[ok])
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("JSD to whole trace (bits)")
    ax.set_title("Per-sequence popularity against the whole trace")
    return _png(fig), "Per-sequence variation", "Jensen-Shannon divergence of each sequence's expert popularity (mean over layers)."


def shift(d: dict[str, Any]) -> Figure:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    x = np.array(d["moe_layers"])
    axes[0].bar(x, d["jsd"], color="C1")
    axes[0].set_xlabel("MoE layer (model index)")
    axes[0].set_ylabel("JSD (bits)")
    axes[0].set_title("Popularity shift per layer")
    names = [row["predictor"] for row in d["recall"]]
    own = [row["recall_same"] for row in d["recall"]]
    other = [row["recall_other"] for row in d["recall"]]
    xi = np.arange(len(names))
    axes[1].bar(xi - 0.2, [np.nan if v is None else v for v in own], width=0.4, label="scored on held-out base")
    axes[1].bar(xi + 0.2, [np.nan if v is None else v for v in other], width=0.4, label="scored on other trace")
    axes[1].set_xticks(xi, names, fontsize=7, rotation=15)
    axes[1].set_ylim(0, 1.02)
    axes[1].set_ylabel("recall@top_k")
    axes[1].legend(fontsize=7)
    axes[1].set_title("Predictor recall, fitted on the base trace")
    return _png(fig), "Routing shift", "Per-layer JSD of popularity and predictor recall drop between the traces."


#: The per-trace figures in report order: file stem -> drawing function.
TRACE_FIGURES: dict[str, Callable[[dict[str, Any]], Figure]] = {
    "popularity_heatmap": popularity_heatmap,
    "skew": skew,
    "hit_rate": hit_rate,
    "reuse_distance": reuse_distance,
    "temporal_locality": temporal_locality,
    "consistency": consistency,
    "affinity_heatmap": affinity_heatmap,
    "affinity_mi": affinity_mi,
    "sequences": sequences,
}
