"""The targets of the end-to-end comparison (``eval/e2e_compare.py``): per model and batch size, what
(e) must reach against the other configurations or the lower bound, and the check of a batch's rows
against them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from e2e_harness import best_rows

@dataclass(frozen=True)
class Target:
    """``(e) >= factor x reference`` in tokens/s (reference: a config, or the better of several), or
    ``(e) within factor of the lower bound`` (``ms/step <= factor x bound``)."""

    model: str
    batch: int
    text: str
    factor: float
    against: tuple[str, ...]  # config keys; ("bound",) for the lower bound


TARGETS = (
    Target("deepseek", 1, "(e) >= 0.8x (a)", 0.8, ("a",)),
    Target("deepseek", 1, "(e) >= 1.2x (c)", 1.2, ("c",)),
    Target("deepseek", 1, "(e) >= 50x (b)", 50.0, ("b",)),
    Target("deepseek", 8, "(e) >= 1.5x the better of (c), (d)", 1.5, ("c", "d")),
    Target("deepseek", 8, "(e) within 2x of the lower bound", 2.0, ("bound",)),
    Target("mixtral", 1, "(e) >= 1.5x the better of (c), (d)", 1.5, ("c", "d")),
    Target("mixtral", 1, "(e) within 2x of the lower bound", 2.0, ("bound",)),
)


def check_targets(model: str, batch: int, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    best = best_rows(rows)
    out = []
    for t in TARGETS:
        if (t.model, t.batch) != (model, batch):
            continue
        e = best.get("e")
        res: dict[str, Any] = {"target": t.text}
        if e is None:
            res.update(value=None, met=None, why="(e) not measured")
        elif t.against == ("bound",):
            bound = (e.get("bound") or {}).get("bound_ms_per_step")
            if bound is None:
                res.update(value=None, met=None, why="no lower bound")
            else:
                res.update(value=e["ms_per_step"] / bound, met=e["ms_per_step"] <= t.factor * bound,
                           what="(e) ms/step / bound")
        else:
            refs = [best[c]["tokens_per_s"] for c in t.against if c in best]
            if not refs:
                res.update(value=None, met=None, why=f"{', '.join(t.against)} not measured")
            else:
                res.update(value=e["tokens_per_s"] / max(refs), met=e["tokens_per_s"] >= t.factor * max(refs),
                           what="(e) tokens/s / reference tokens/s")
        out.append(res)
    return out
