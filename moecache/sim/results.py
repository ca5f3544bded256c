"""One result row per simulator run: its whole configuration, raw counts and derived figures.

Units of counting:

* an *access* is one selected expert of one token at one layer (token-weighted);
  ``demand_hit_rate = hits / accesses`` where a hit is an access whose expert was resident when its
  step was served (whatever brought it there), ``ready_rate = ready / accesses`` where ready means
  a hit whose copy had also finished when the layer's expert compute started;
* a *need* is one expert of one replay step (all its tokens at once); one load serves a need.
  Prefetch figures count needs and copies: ``prefetch_precision = used / prefetches`` (a prefetch is
  used when a demand access finds it before it is evicted), ``prefetch_recall = used / (used +
  demand loads)`` (the share of the needs that required a load which a prefetch had covered);
* ``bytes_per_token = (demand copies + prefetch copies) * bytes_per_expert / tokens``; with the per-miss
  precision rule (``moecache.miss_precision``) low copies count ``low_copy_bytes`` and upgrades a full copy;
  ``wasted_bytes_per_token`` counts prefetches evicted before any use;
* ``est_ms_per_token`` and ``stall_ms_per_token`` come from the timing model, ``bound_ms_per_token``
  from ``moecache.sim.bound`` and ``ratio = est / bound`` (>= 1).

Figures with no denominator (no prefetches) are None.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence



def describe_predictor(predictor: Any) -> str | None:
    """A result row's predictor column: its name with its parameters, or None without one."""
    if predictor is None:
        return None
    params = getattr(predictor, "params", {}) or {}
    if not params:
        return predictor.name
    return predictor.name + "(" + ",".join(f"{k}={v}" for k, v in sorted(params.items())) + ")"


@dataclass
class SimResult:
    # -- configuration ---------------------------------------------------------------------------
    trace: str
    policy: str
    scope: str
    capacity: int
    capacity_label: str
    predictor: str | None = None
    prefetch: str | None = None
    depth: int = 0
    budget: int | None = None
    miss_rule: str = "copy"
    mode: str = "step"
    bytes_per_expert: int = 0
    hardware: str = ""
    # -- counts ----------------------------------------------------------------------------------
    tokens: int = 0
    accesses: int = 0
    hits: int = 0
    ready: int = 0
    needs: int = 0
    loads: int = 0
    cpu_runs: int = 0
    prefetches: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
    time_ms: float = 0.0
    gpu_busy_ms: float = 0.0
    copy_busy_ms: float = 0.0
    cpu_busy_ms: float = 0.0
    bound_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # -- figures ---------------------------------------------------------------------------------
    @property
    def demand_hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def ready_rate(self) -> float:
        return self.ready / self.accesses if self.accesses else 0.0

    @property
    def prefetch_precision(self) -> float | None:
        return self.prefetch_used / self.prefetches if self.prefetches else None

    @property
    def prefetch_recall(self) -> float | None:
        covered = self.prefetch_used + self.loads
        return self.prefetch_used / covered if self.prefetches and covered else None

    @property
    def bytes_per_token(self) -> float:
        if not self.tokens:
            return 0.0
        low = self.extra.get("low_copies", 0)
        if low or self.extra.get("upgrades", 0):  # per-miss precision: low copies are smaller, upgrades full
            full = self.loads - low + self.prefetches + self.extra["upgrades"]
            return (full * self.bytes_per_expert + low * self.extra["low_copy_bytes"]) / self.tokens
        return (self.loads + self.prefetches) * self.bytes_per_expert / self.tokens

    @property
    def wasted_bytes_per_token(self) -> float:
        return self.prefetch_wasted * self.bytes_per_expert / self.tokens if self.tokens else 0.0

    @property
    def est_ms_per_token(self) -> float:
        return self.time_ms / self.tokens if self.tokens else 0.0

    @property
    def stall_ms_per_token(self) -> float:
        return (self.time_ms - self.gpu_busy_ms) / self.tokens if self.tokens else 0.0

    @property
    def bound_ms_per_token(self) -> float | None:
        return self.bound_ms / self.tokens if self.bound_ms is not None and self.tokens else None

    @property
    def ratio(self) -> float | None:
        return self.time_ms / self.bound_ms if self.bound_ms else None

    FIGURES = ("demand_hit_rate", "ready_rate", "prefetch_precision", "prefetch_recall", "bytes_per_token",
               "wasted_bytes_per_token", "est_ms_per_token", "stall_ms_per_token", "bound_ms_per_token", "ratio")

    def row(self) -> dict[str, Any]:
        """A flat, JSON-ready dict: configuration, figures, then raw counts."""
        d = dataclasses.asdict(self)
        extra = d.pop("extra")
        out: dict[str, Any] = {}
        for k in ("trace", "policy", "predictor", "prefetch", "depth", "budget", "capacity", "capacity_label",
                  "scope", "miss_rule", "mode", "bytes_per_expert", "hardware"):
            out[k] = d.pop(k)
        for k in self.FIGURES:
            out[k] = getattr(self, k)
        out.update(d)
        out.update(extra)
        return out


#: Columns of the default table: (header, row key, format).
TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("trace", "trace", "s"),
    ("policy", "policy", "s"),
    ("predictor", "predictor", "s"),
    ("D", "depth", "d"),
    ("capacity", "capacity_label", "s"),
    ("slots", "capacity", "d"),
    ("scope", "scope", "s"),
    ("hit", "demand_hit_rate", ".4f"),
    ("ready", "ready_rate", ".4f"),
    ("prec", "prefetch_precision", ".3f"),
    ("recall", "prefetch_recall", ".3f"),
    ("MB/tok", "bytes_per_token", "mb"),
    ("ms/tok", "est_ms_per_token", ".3f"),
    ("stall", "stall_ms_per_token", ".3f"),
    ("bound", "bound_ms_per_token", ".3f"),
    ("ratio", "ratio", ".2f"),
)


def _cell(v: Any, fmt: str) -> str:
    if v is None:
        return "-"
    if fmt == "s":
        return str(v)
    if fmt == "mb":
        return f"{v / 1e6:.1f}"
    return format(v, fmt)


def format_table(rows: Iterable[dict[str, Any]], columns: Sequence[tuple[str, str, str]] = TABLE_COLUMNS) -> str:
    """An aligned text table (text left, numbers right)."""
    rows = list(rows)
    cells = [[_cell(r.get(key), fmt) for _h, key, fmt in columns] for r in rows]
    heads = [h for h, _k, _f in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(heads)]
    left = [fmt == "s" for _h, _k, fmt in columns]

    def line(vals: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) if lft else v.rjust(w) for v, w, lft in zip(vals, widths, left)).rstrip()

    return "\n".join([line(heads), line(["-" * w for w in widths])] + [line(c) for c in cells])
