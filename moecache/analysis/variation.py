"""Prefill against decode, and how much single sequences differ from the whole trace.

Both compare expert-popularity distributions with the Jensen-Shannon divergence in bits::

    JSD(P, Q) = H((P + Q) / 2) - (H(P) + H(Q)) / 2        in [0, 1]

computed per layer and averaged over the layers where both sides have accesses.

* Phases: for each phase present (prefill, decode, unknown), its tokens, accesses, mean
  normalised entropy, and the chance that the next token of the same sequence *in the same phase*
  reuses an expert (``w = 1`` temporal locality restricted to that phase); plus the per-layer JSD
  between prefill and decode popularity when the trace has both.
* Sequences: per sequence, its tokens, its JSD to the whole trace (mean over layers) and its
  ``w = 1`` reuse probability; the report gives quantiles over sequences. A short sequence's JSD
  is inflated by sampling noise (few accesses per layer), so the figures are also given for the
  sequences of at least ``min_tokens`` tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..trace.schema import PHASE_DECODE, PHASE_NAMES, PHASE_PREFILL
from .access import Accesses
from .popularity import entropy_bits, shares


def jsd_bits(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence (bits) along the last axis; NaN where either side is NaN."""
    m = (p + q) / 2
    return entropy_bits(m) - (entropy_bits(p) + entropy_bits(q)) / 2


def _mean_over_layers(x: np.ndarray) -> np.ndarray:
    ok = ~np.isnan(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok.any(axis=-1), np.where(ok, x, 0).sum(axis=-1) / np.maximum(ok.sum(axis=-1), 1), np.nan)


def phases(acc: Accesses, gaps: np.ndarray) -> dict[str, Any]:
    """Per-phase figures (see module docstring); ``jsd_prefill_decode`` per layer or None."""

    L, E = acc.num_layers, acc.num_experts
    ph_tok = acc.phase
    ph_acc = ph_tok[acc.token]
    remaining = acc.seq_end()[acc.token]
    # next token of the sequence, and whether it is in the same phase
    n = acc.n_tokens
    order = np.lexsort((acc.pos_in_seq, acc.seq_index))
    nxt_same_phase = np.zeros(n, bool)
    if n > 1:
        a, b = order[:-1], order[1:]
        cont = acc.seq_index[a] == acc.seq_index[b]
        nxt_same_phase[a[cont]] = ph_tok[a[cont]] == ph_tok[b[cont]]
    out: dict[str, Any] = {"phases": {}}
    share_by: dict[int, np.ndarray] = {}
    for code in sorted(set(np.unique(ph_tok).tolist())):
        sel = ph_acc == code
        c = np.bincount(acc.layer[sel].astype(np.int64) * E + acc.expert[sel], minlength=L * E).reshape(L, E)
        p = shares(c)
        share_by[code] = p
        scored = sel & (remaining >= 1) & nxt_same_phase[acc.token]
        reuse1 = float((gaps[scored] <= 1).mean()) if scored.any() else float("nan")
        h = entropy_bits(p) / np.log2(E) if E > 1 else np.zeros(L)
        out["phases"][PHASE_NAMES[int(code)]] = {
            "tokens": int((ph_tok == code).sum()),
            "accesses": int(sel.sum()),
            "entropy_norm": float(np.nanmean(h)) if np.isfinite(h).any() else float("nan"),
            "reuse1": reuse1,
            "reuse1_scored": int(scored.sum()),
        }
    if PHASE_PREFILL in share_by and PHASE_DECODE in share_by:
        j = jsd_bits(share_by[PHASE_PREFILL], share_by[PHASE_DECODE])
        out["jsd_prefill_decode"] = j
        out["jsd_prefill_decode_mean"] = float(_mean_over_layers(j))
    else:
        out["jsd_prefill_decode"] = None
        out["jsd_prefill_decode_mean"] = None
    return out


def sequences(acc: Accesses, gaps: np.ndarray, overall_share: np.ndarray) -> dict[str, Any]:
    """Per-sequence arrays: ``tokens``, ``jsd`` (to the whole trace, mean over layers), ``reuse1``."""
    S, L, E = acc.n_sequences, acc.num_layers, acc.num_experts
    seq_acc = acc.seq_index[acc.token]
    c = np.bincount((seq_acc * L + acc.layer) * E + acc.expert, minlength=S * L * E).reshape(S, L, E)
    p = shares(c)
    j = jsd_bits(p, np.broadcast_to(overall_share, p.shape))
    jsd = _mean_over_layers(j)
    remaining = acc.seq_end()[acc.token]
    ok = remaining >= 1
    n = np.bincount(seq_acc[ok], minlength=S)
    hit = np.bincount(seq_acc[ok & (gaps <= 1)], minlength=S)
    with np.errstate(invalid="ignore", divide="ignore"):
        reuse1 = np.where(n > 0, hit / np.maximum(n, 1), np.nan)
    return {"tokens": acc.seq_len.copy(), "jsd": jsd, "reuse1": reuse1}
