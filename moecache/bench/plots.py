"""The policy suite's plots: one PNG per metric, a panel per trace, drawn with matplotlib's Agg backend.

``moecache.bench.report`` picks what to draw (``Panel``: x labels and named series of values, None where
a value is missing); this module only draws it. matplotlib is optional (the ``plot`` extra) and is
imported when a figure is drawn; ``require_matplotlib`` checks for it before a suite starts, so a
missing install fails before any work, not after it. The PNGs carry no timestamp or version, so the
same data gives the same bytes.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

#: Line colour per headline role; scopes differ by line style.
ROLE_COLORS = {"LRU": "C0", "best demand-only": "C1", "best with predictor": "C2", "bound": "k"}
SCOPE_STYLES = {"layer": ("-", "o"), "global": ("--", "s")}


@dataclass
class Panel:
    title: str
    x: list[str]
    series: dict[tuple[str, str], list[float | None]]   # (role, scope) -> one value per x


def require_matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("the suite's plots need matplotlib: pip install 'moecache-offload[plot]' "
                          "(or set plots = false in the suite config)") from None
    matplotlib.use("Agg")  # headless: files only
    return matplotlib


def metric_figure(panels: list[Panel], title: str, ylabel: str, *, scale: float = 1.0,
                  reference: float | None = None) -> bytes:
    """A grid of panels (three per row); ``scale`` multiplies every value; ``reference`` draws a dotted
    horizontal line (1.0 on ratio plots)."""
    require_matplotlib()
    import matplotlib.pyplot as plt

    cols = min(3, max(1, len(panels)))
    rows = math.ceil(len(panels) / cols)
    height = 3.2 * rows + 1.0  # inches: the panels, the title above and the legend below
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, height), squeeze=False)
    for ax, panel in zip(axes.ravel(), panels):
        xs = list(range(len(panel.x)))
        for (role, scope), values in panel.series.items():
            pts = [(x, v * scale) for x, v in zip(xs, values) if v is not None]
            if not pts:
                continue
            style, marker = SCOPE_STYLES.get(scope, (":", "^"))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle=style, marker=marker, markersize=4,
                    color=ROLE_COLORS.get(role, "C3"), label=f"{role} ({scope})", linewidth=1.3)
        if reference is not None:
            ax.axhline(reference, color="0.5", linestyle=":", linewidth=1)
        ax.set_xticks(xs, panel.x)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("capacity (share of experts or slots)", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    handles, labels = [], []
    for ax in axes.ravel():
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11, y=1 - 0.12 / height, va="top")
    # fixed margins (inches -> figure fractions): tight_layout measures every text and costs seconds
    fig.subplots_adjust(left=0.07, right=0.98, wspace=0.28, hspace=0.55, top=1 - 0.75 / height,
                        bottom=1.0 / height)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()
