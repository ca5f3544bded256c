"""What the runtime counts, and the figures ``handle.stats()`` derives from the counts.

Definitions (one *access* = one expert needed by one MoE layer forward, however many tokens use it):

* ``hits``: accesses whose expert was in the pool (resident, or its copy already queued or running);
  ``misses``: the others (a demand copy was issued); ``hit_rate = hits / accesses``.
* ``ready``: accesses whose expert's copy had *completed* when the layer needed it (queried on the
  copy's CUDA event on the GPU, without a sync); ``ready_rate = ready / accesses``. A hit whose
  prefetch is still in flight is a hit but not ready.
* ``evictions``: experts the policy removed to make room (demand or prefetch).
* ``prefetch_issued``: prefetch copies queued; ``prefetch_useful``: prefetched experts used by a
  demand access before they left the pool; ``prefetch_precision = useful / issued``;
  ``prefetch_cancelled``: queued prefetches cancelled before they started (the prediction was wrong);
  ``prefetch_refused``: candidates the admission rule (``moecache.admission``) did not issue;
  ``predictor_skipped``: MoE layer calls where the predictor gate (admission ``gated``) did not ask the
  predictor (it only observed the routing).
* ``prefill_streamed``: experts queued by streaming prefill (``offload(..., stream_prefill=...)``: each
  next layer's experts during a long prompt, ``moecache.runtime.core``); ``prefill_stream_useful``:
  those its layer used; queued ones its layer did not pick are counted in ``prefetch_cancelled``.
* ``bytes_copied``: host-to-pool bytes of every copy issued (one expert each).
* per-miss precision (``offload(..., low_precision_misses=...)``, ``moecache.miss_precision``): ``low_copies``
  counts misses copied as the low-precision copy, ``upgrades`` low copies replaced by the full one on reuse
  (each also in ``copies``); ``config["low_copy_host_bytes"]`` is the host memory of the second copy.
* ``stall_s``: time the computation waited for copies (CUDA events around the waits on the GPU;
  host time blocked on the CPU).
* ``host_s``: host time spent in the runtime's per-layer code, excluding the routing sync, the
  waits and the expert kernels; ``host_ms_per_layer`` divides it by the MoE layer calls, and
  ``prefetch_host_ms_per_layer`` is its share spent after the kernel was enqueued: feeding the
  predictor, its predictions and queueing the prefetches (and the policy's scores).
* prefill/decode: a model call with more than one token per row is prefill, one token per row is
  decode; ``ttft_s`` is the duration of the latest request's prefill call (time to first token).
* hybrid execution (``offload(..., hybrid=...)``, ``moecache.runtime.hybrid``): ``decisions`` counts
  the misses the hybrid rule sent to the copy engine (``copy``) and to the CPU (``cpu``);
  ``cpu_experts`` the expert runs on the CPU (= ``decisions["cpu"]``; each is also a miss),
  ``cpu_tokens`` the (token, k) rows they computed, ``cpu_ms`` the CPU kernel's own time and
  ``cpu_wait_ms`` the host time blocked waiting for it after the GPU work was enqueued;
  ``cpu_kernel`` is ``avx512``, ``avx2``, ``portable`` (the C++ pool) or ``torch``, and
  ``cpu_kernel_experts`` the experts that kernel reports having run.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class RuntimeCounters:
    accesses: int = 0
    hits: int = 0
    misses: int = 0
    ready: int = 0
    evictions: int = 0
    prefetch_issued: int = 0
    prefetch_useful: int = 0
    prefetch_cancelled: int = 0
    prefetch_refused: int = 0
    predictor_skipped: int = 0  # MoE layer calls where the predictor gate did not ask the predictor
    prefill_streamed: int = 0  # experts queued by streaming prefill (next layer's, during a long prompt)
    prefill_stream_useful: int = 0  # ... and used by their layer
    copies: int = 0
    bytes_copied: int = 0
    layer_calls: int = 0
    round_calls: int = 0  # layer calls that needed more experts than the pool holds
    host_s: float = 0.0
    sync_s: float = 0.0
    prefetch_s: float = 0.0
    prefill_calls: int = 0
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_calls: int = 0
    decode_tokens: int = 0
    decode_s: float = 0.0
    ttft_s: float | None = None
    decide_copy: int = 0
    decide_cpu: int = 0
    cpu_experts: int = 0
    cpu_tokens: int = 0
    cpu_ms: float = 0.0
    cpu_wait_s: float = 0.0
    low_copies: int = 0  # misses copied as the low-precision copy (moecache.miss_precision)
    upgrades: int = 0    # low copies replaced by the full one when reused
    extra: dict[str, Any] = field(default_factory=dict)

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, f.default_factory() if f.name == "extra" else f.default)  # type: ignore[misc]


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def summarise(c: RuntimeCounters, stall_s: float, config: dict[str, Any]) -> dict[str, Any]:
    """The stats dict: raw counts, derived rates and the configuration that produced them."""
    out: dict[str, Any] = {
        "hits": c.hits, "misses": c.misses, "evictions": c.evictions, "accesses": c.accesses,
        "hit_rate": _ratio(c.hits, c.accesses), "ready": c.ready, "ready_rate": _ratio(c.ready, c.accesses),
        "prefetch_issued": c.prefetch_issued, "prefetch_useful": c.prefetch_useful,
        "prefetch_cancelled": c.prefetch_cancelled, "prefetch_refused": c.prefetch_refused,
        "predictor_skipped": c.predictor_skipped,
        "prefill_streamed": c.prefill_streamed,
        "prefill_stream_useful": c.prefill_stream_useful,
        "prefetch_precision": _ratio(c.prefetch_useful, c.prefetch_issued),
        "copies": c.copies, "bytes_copied": c.bytes_copied, "stall_s": stall_s,
        "layer_calls": c.layer_calls, "round_calls": c.round_calls,
        "host_ms_per_layer": _ratio(c.host_s * 1e3, c.layer_calls),
        "sync_ms_per_layer": _ratio(c.sync_s * 1e3, c.layer_calls),
        "prefetch_host_ms_per_layer": _ratio(c.prefetch_s * 1e3, c.layer_calls),
        "ttft_s": c.ttft_s,
        "prefill_tokens": c.prefill_tokens, "prefill_s": c.prefill_s,
        "prefill_tokens_per_s": _ratio(c.prefill_tokens, c.prefill_s),
        "decode_tokens": c.decode_tokens, "decode_s": c.decode_s,
        "decode_tokens_per_s": _ratio(c.decode_tokens, c.decode_s),
        "decisions": {"copy": c.decide_copy, "cpu": c.decide_cpu}, "cpu_experts": c.cpu_experts,
        "cpu_tokens": c.cpu_tokens, "cpu_ms": c.cpu_ms, "cpu_wait_ms": c.cpu_wait_s * 1e3,
        "low_copies": c.low_copies, "upgrades": c.upgrades,
    }
    out.update(c.extra)
    out["config"] = dict(config)
    return out


def format_summary(s: dict[str, Any]) -> str:
    """A few human-readable lines for the CLI."""
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    def num(x: float | None, fmt: str = ".1f") -> str:
        return "n/a" if x is None else format(x, fmt)

    cfg = s.get("config", {})
    lines = [
        f"cache: {cfg.get('slots')} slots of {cfg.get('total_experts')} experts "
        f"({pct(_ratio(cfg.get('slots', 0), cfg.get('total_experts', 0)))}), policy {cfg.get('policy')}, "
        f"predictor {cfg.get('predictor')}, engine {cfg.get('engine')} on {cfg.get('device')}",
        f"experts {cfg.get('expert_format', 'n/a')}"
        + (f" ({cfg.get('pool_mode')} pool, {cfg.get('copy_bytes_per_expert', 0) / 2**20:.2f} MiB per copy)"
           if cfg.get("pool_mode") else ""),
        f"hits {s['hits']}  misses {s['misses']}  hit rate {pct(s['hit_rate'])}  ready rate {pct(s['ready_rate'])}  "
        f"evictions {s['evictions']}",
        f"prefetch issued {s['prefetch_issued']}  useful {s['prefetch_useful']}  precision "
        f"{pct(s['prefetch_precision'])}  cancelled {s['prefetch_cancelled']}",
        f"copied {s['bytes_copied'] / 2**20:.1f} MiB in {s['copies']} copies, stall {s['stall_s'] * 1e3:.1f} ms, "
        f"runtime host overhead {num(s['host_ms_per_layer'], '.3f')} ms per MoE layer",
    ]
    if s.get("cpu_kernel") is not None:
        d = s.get("decisions", {})
        lines.append(f"hybrid {s.get('hybrid_rule')}: misses copied {d.get('copy', 0)}, on the CPU {d.get('cpu', 0)} "
                     f"({s['cpu_kernel']} kernel, {s['cpu_ms']:.1f} ms, waited {s['cpu_wait_ms']:.1f} ms)")
    comp = s.get("compile")
    if comp:
        lines.append(f"compiled ({cfg.get('compile')}): {comp['pieces']} pieces around {comp['experts_ops']} experts "
                     f"calls, {comp['captures'] + comp['recaptures']} CUDA graphs captured, {comp['replays']} replays, "
                     f"{comp['compiled_calls']} compiled decode calls, static KV cache "
                     f"{cfg.get('kv_cache_bytes', 0) / 2**20:.1f} MiB")
    if cfg.get("low_precision_misses"):
        lines.append(f"low-precision misses ({cfg['low_precision_misses']}): {s['low_copies']} misses copied low, "
                     f"{s['upgrades']} upgraded on reuse; the second (low) host copy costs "
                     f"{cfg['low_copy_host_bytes'] / 2**20:.1f} MiB of host memory")
    if s.get("prefill_streamed"):
        lines.append(f"streaming prefill: {s['prefill_streamed']} experts queued ahead, "
                     f"{s['prefill_stream_useful']} used")
    lines += [
        f"time to first token {num(s['ttft_s'] * 1e3 if s['ttft_s'] is not None else None)} ms, "
        f"prefill {num(s['prefill_tokens_per_s'])} tokens/s, decode {num(s['decode_tokens_per_s'])} tokens/s",
    ]
    return "\n".join(lines)
