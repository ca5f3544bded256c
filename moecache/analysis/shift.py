"""How far routing shifts between a base trace and another trace of the same model (``--against``).

* Popularity: per-layer Jensen-Shannon divergence (bits, in [0, 1]) between the two traces'
  expert shares; the mean over layers.
* Cross-layer affinity (depth 1): ``dMI_l = MI_other - MI_base`` and the weighted total variation
  between the conditionals, ``TV_l = sum_a w_a * 1/2 sum_b |P_base(b|a) - P_other(b|a)|`` over the
  experts ``a`` seen at ``l`` in both traces, ``w_a`` = ``a``'s share of those tokens in the base
  trace (0 = same conditionals, 1 = disjoint).
* Predictor recall drop: each predictor is fitted on one half of the base trace's sequences
  (``moecache.predict_eval.split``, every other sequence; a one-sequence trace is cut in two) and
  scored (recall@top_k at depth 1: the share of the next layer's chosen experts inside the
  predicted top-k set) on the other half and on the other trace; ``drop = recall_same -
  recall_other``. The ``prior`` and ``transition`` predictors of ``predictors/`` are used when
  registered; ``popularity-topk`` is this module's own baseline (predict each layer's ``top_k`` most
  used experts of the fitting half, ties to the lowest id), vectorised and always present.
  Replays score at most ``tokens`` tokens of each side (replay order), to bound the run time.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from ..predict_eval import measure_recall, split
from ..predictors import PREDICTORS
from . import affinity as aff
from .access import accesses
from .popularity import counts, shares
from .run import r
from .variation import jsd_bits

PREDICTOR_NAMES = ("prior", "transition")


def check_compatible(a, b) -> None:
    ma, mb = a.meta, b.meta
    if (ma.num_layers, ma.num_experts, ma.top_k) != (mb.num_layers, mb.num_experts, mb.top_k):
        raise ConfigError(
            f"--against needs traces of the same model shape: {ma.model} has {ma.num_layers} MoE layers x "
            f"{ma.num_experts} experts, top-{ma.top_k}; {mb.model} has {mb.num_layers} x {mb.num_experts}, "
            f"top-{mb.top_k}. Compare traces recorded from the same model")


def head(trace, tokens: int):
    """The first ``tokens`` tokens of ``trace`` in replay order (sequence by sequence), as a Trace."""
    acc = accesses(trace)
    if tokens >= acc.n_tokens:
        return trace
    return trace.select(np.sort(acc.trace_row[:tokens]))


def _split(trace):
    mode = "alternate" if len(trace.sequences()) >= 2 else "stream"
    return split(trace, mode, 0.5)


def popularity_recall(fit_trace, score_trace) -> float:
    """Recall@top_k at depth 1 of the fixed per-layer top-k set of ``fit_trace`` on ``score_trace``."""
    fa, sa = accesses(fit_trace), accesses(score_trace)
    c = counts(fa)
    k = fa.top_k
    top = np.argsort(-c, axis=1, kind="stable")[:, :k]  # ties: lowest id first
    member = np.zeros(c.shape, bool)
    member[np.arange(c.shape[0])[:, None], top] = True
    # depth 1 from layer l targets layer l + 1 of the same token, or layer 0 of the next token;
    # the prediction does not depend on the source, so score every access except the first layer
    # of each sequence's first token (no source observed before it)
    first = (sa.pos_in_seq[sa.token] == 0) & (sa.layer == 0)
    ok = ~first
    if not ok.any():
        return float("nan")
    return float(member[sa.layer[ok], sa.expert[ok]].mean())


def _predictor_recall(name: str, fit_trace, score_trace, tokens: int) -> float:
    m = fit_trace.meta
    pred = PREDICTORS.get(name)(m.num_layers, m.num_experts, m.top_k)
    pred.fit(fit_trace)
    row = measure_recall(pred, head(score_trace, tokens), depths=(1,), set_sizes=(m.top_k,))[0]
    return float(row.recall(m.top_k))


def available_predictors() -> list[str]:
    return [n for n in PREDICTOR_NAMES if n in PREDICTORS]


def compare(base, other, *, tokens: int = 1000, base_name: str = "base", other_name: str = "other") -> tuple[dict, dict]:
    """``(summary, data)`` of the shift from ``base`` to ``other`` (see the module docstring)."""
    check_compatible(base, other)
    L = base.meta.num_layers
    layers = list(base.meta.moe_layers)
    aa, ab = accesses(base), accesses(other)
    pa, pb = shares(counts(aa)), shares(counts(ab))
    jsd = jsd_bits(pa, pb)
    d_mi = np.full(L, np.nan)
    tv = np.full(L, np.nan)
    for l in range(L - 1):
        Ca, na = aff.affinity_matrix(aa, l, 1)
        Cb, nb = aff.affinity_matrix(ab, l, 1)
        d_mi[l] = aff.pair_stats(Cb)["mi"] - aff.pair_stats(Ca)["mi"]
        both = (na > 0) & (nb > 0)
        if both.any():
            Pa, Pb = aff.conditional(Ca, na)[both], aff.conditional(Cb, nb)[both]
            w = na[both] / na[both].sum()
            tv[l] = float((w * 0.5 * np.abs(Pa - Pb).sum(axis=1)).sum())
    fit, held = _split(base)
    recall = []
    for name in available_predictors():
        same = _predictor_recall(name, fit, held, tokens)
        oth = _predictor_recall(name, fit, other, tokens)
        recall.append({"predictor": name, "source": "predictors/", "recall_same": same, "recall_other": oth,
                       "drop": same - oth})
    same = popularity_recall(fit, held)
    oth = popularity_recall(fit, other)
    recall.append({"predictor": "popularity-topk", "source": "moecache.analysis.shift (own baseline)",
                   "recall_same": same, "recall_other": oth, "drop": same - oth})

    def mean(x):
        return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")

    summary = {
        "base": base_name, "other": other_name, "tokens_scored": tokens,
        "jsd_mean": mean(jsd), "d_mi_mean": mean(d_mi), "tv_mean": mean(tv),
        "layers": [{"layer": layers[l], "jsd": jsd[l], "d_mi": d_mi[l], "tv": tv[l]} for l in range(L)],
        "recall": recall,
        "missing_predictors": [n for n in PREDICTOR_NAMES if n not in available_predictors()],
    }
    data = {"moe_layers": layers, "jsd": jsd, "d_mi": d_mi, "tv": tv, "recall": recall}
    return r(summary), data
