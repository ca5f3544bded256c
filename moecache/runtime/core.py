"""The per-layer path of the offloading runtime: routing in, experts resident, kernel, prefetch out.

For each MoE layer call ``run_layer`` does, top to bottom:

1. copy the routing ids to the host: the ONE host synchronisation of the layer (slots and victims
   are chosen on the host, so the decision has to cross);
2. settle the prefetches aimed at this layer: queued copies of experts the routing did not pick
   are cancelled (their slots go back to the pool);
3. make every needed expert resident: a hit touches the policy; a miss asks the policy to
   ``insert`` it (evicting unprotected victims) and queues a demand copy (priority 0 = now);
4. make the compute stream wait for exactly those copies, run transformers' own experts kernel on
   the pool (``experts.py``), and fence the slots it read;
5. feed the routing to the predictor and queue prefetch copies for the next ``prefetch_depth``
   MoE layers, priority = predicted need time (layers ahead, then probability). The candidates are
   the simulator's ``topk`` rule over the summed prediction rows (``prefetch_width`` of them, default
   ``top_k x rows``), each issued only if the shared admission rule (``moecache.admission``) takes it.
   Under ``admission = "gated"`` (the default) the predictor gate (``moecache.admission.PredictorGate``,
   the simulator's) is asked first: where it says no, the predictor only observes the routing (it is
   not asked, nothing is prefetched). The rule's times come from the ``admission_clock``:

   * ``model`` (the default; deterministic): the cost model's times (the profile the runtime was given,
     else the default profile): a layer lasts ``non_expert(tokens)`` and ``layer_host_ms`` plus the
     ``gpu(count)`` of its experts; the copy engine's backlog is a modelled queue (each copy, demand or prefetch, adds
     ``copy_ms`` from the later of the modelled clock and the queue's end; the clock advances one
     modelled layer per MoE layer); the next layer is one modelled layer ahead, the target ``depth``
     of them; each prefetch's host time is the profile's ``prefetch_host_ms``. Given the routing and
     the profile, the same prefetches are issued on any machine (tests and research runs).
   * ``measured``: the wall clock: the backlog is a host-clock model of the copies queued (each adds the
     profile's ``copy_ms``), the time to the target layer is ``depth`` times the measured interval
     between MoE layers (host time 0: the measured interval holds it).

   The victim is the policy's, worth the larger of the predictor's score for it (where its layer is one of
   the predicted ones) and the re-demand rate of the residents evicted so far (``moecache.admission.VictimReuse``:
   policy evictions, inserts and demand misses, GPU or CPU, booked with their pools as the simulator books
   them); the gate
   books the victim at the predictor's score alone. ``admission = "none"`` issues every candidate (the rule
   before); ``cost`` is the rule without the gate.

When a layer needs more experts than the pool holds (long prefills, big batches), step 3-4 run
in *rounds* of at most ``capacity`` experts: every (token, k) pair is computed as a one-expert
call into a contribution buffer, and the top-k contributions are summed once at the end, in
(token, k) order as the kernels themselves sum them, so the result does not depend on the rounds.

Streaming prefill (``stream_prefill``: a call of at least that many tokens): a long prompt needs nearly
every expert of every layer, and no predictor is needed to know it. When such a call starts, every
expert of MoE layer 0 that is not resident is queued for copy; at each MoE layer ``i``, once its own
experts are placed (their demand copies go first, priority 0), every expert of layer ``i + 1`` is queued
(priority ``1 + e / E``, in expert order) before layer ``i``'s kernel is launched, so the copies of the
next layer run while this one computes. They are prefetches aimed at layer ``i + 1``: protected from
eviction until it runs, counted in ``prefill_streamed``, and the ones its routing does not pick are
cancelled there if their copy has not started. Streaming stops where the policy has no room left.

Hybrid execution (``hybrid``, ``moecache.runtime.hybrid``): after step 2 the hybrid rule decides
each missed expert (copy, or run on the CPU). When none goes to the CPU the layer takes the path
above unchanged. Otherwise (``_hybrid``) the CPU experts are launched first on the host thread pool
(their rows copied to the host), every need is shown to the policy in key order (the CPU experts
are not inserted), the GPU experts run pair by pair into the contribution buffer as in rounds, and
the CPU results are waited for, copied back, weighted and put in their (token, k) places before the
one sum over k.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import miss_precision
from ..admission import (DEFAULT_ADMISSION, PredictorGate, VictimReuse, admit_prefetch, candidate_probability,
                         check_admission, lead_ms, outcome_values, victim_worth)
from ..cost.hardware import default_profile
from ..errors import ConfigError
from ..miss_precision import LOW, UPGRADE, gate_shares
from ..prefetch_rules import PREFETCH_RULES
from .engine import CopyEngine
from .experts import SlotIndexer, call_mode, make_shell
from .hoststore import HostStore
from .pool import SlotPool
from .stats import RuntimeCounters

#: Prefetch candidates below this probability of being needed are not fetched (a floor before the
#: admission rule, which decides the rest).
DEFAULT_MIN_PROB = 0.0
#: Clocks the runtime's admission rule may read its times from (module docstring).
ADMISSION_CLOCKS = ("model", "measured")
#: The simulator's ``topk`` prefetch rule: the runtime's candidates, looked up once.
_TOPK = PREFETCH_RULES.get("topk")
#: Up to this many routing ids, the needed experts are counted in Python (faster than np.unique).
_SMALL = 64


def _unique(ids: np.ndarray) -> tuple[list[int], list[int]]:
    """Sorted distinct expert ids and how many (token, k) pairs chose each."""
    if ids.size <= _SMALL:
        counts: dict[int, int] = {}
        for e in ids.ravel().tolist():
            counts[e] = counts.get(e, 0) + 1
        experts = sorted(counts)
        return experts, [counts[e] for e in experts]
    u, n = np.unique(ids, return_counts=True)
    return u.tolist(), n.tolist()


@dataclass
class LayerInfo:
    """One MoE layer under the runtime."""

    index: int                # MoE layer index (trace layer)
    model_layer: int          # model layer index
    name: str                 # qualified name of the MoE block
    block: nn.Module          # the MoE block (its ``experts`` child is replaced)
    original: nn.Module       # the original experts module (expert parameters released)
    remap_shell: nn.Module | None    # shell on the pool views, slot ids (None under a family kernel)
    indexer_shell: nn.Module | None  # shell with SlotIndexer weights, expert ids (None under a family kernel)


class Runtime:
    """The offloading runtime's state and per-layer logic (built by ``moecache.offload``)."""

    def __init__(self, *, layers: list[LayerInfo], num_layers: int, store: HostStore, pool: SlotPool,
                 engine: CopyEngine, policy: Any, predictor: Any, config: Any, num_experts: int, top_k: int,
                 prefetch_depth: int, prefetch_width: int | None, min_prob: float = DEFAULT_MIN_PROB,
                 stream_prefill: int = 0):
        self.layers = layers
        self.store = store
        self.pool = pool
        self.engine = engine
        self.policy = policy
        self.predictor = predictor
        self.config = config
        self.E = int(num_experts)
        self.top_k = int(top_k)
        self.L = int(num_layers)
        self.prefetch_depth = int(prefetch_depth) if predictor is not None else 0
        #: The predictor depth whose row-mean probabilities the policy's ``on_scores`` wants (None: none).
        self.score_depth: int | None = policy.score_depth() if (
            predictor is not None and getattr(policy, "uses_scores", False)) else None
        self.prefetch_width = prefetch_width
        self.min_prob = float(min_prob)
        self.device = pool.device
        #: Live expert-key -> slot table (-1 = not in the pool); the remap lookup and the indexers read it.
        self.slot_of = np.full(self.L * self.E, -1, dtype=np.int64)
        #: Prefetched keys not yet used by a demand access (for precision), and queued-or-running
        #: prefetches by key -> target MoE layer (protected from eviction until their layer runs).
        self.unused_prefetch: set[int] = set()
        self.pending: dict[int, int] = {}
        #: Slots whose last copy is known to be complete (no wait, no query needed).
        self.ready_slots: set[int] = set()
        self.counters = RuntimeCounters()
        self._impl: str | None = "?"
        self._mode = "remap"
        self.rows = 1  # batch rows of the current model call (set by the call hook)
        self.tokens_per_row = 1
        #: ``HybridExecutor`` when misses may run on the CPU (set by ``offload``), else None.
        self.hybrid: Any = None
        #: Calls of at least this many tokens stream each next layer's experts (0: never; module docstring).
        self.stream_prefill = int(stream_prefill)
        self._streaming = False
        #: Keys streamed for a prefill and not used yet (``prefill_stream_useful`` when they are).
        self.streamed: set[int] = set()
        #: Compressed experts (``moecache.runtime.compressed.Expander``): the kernels read its dense
        #: ``compute`` pool through its ``lut``; None where the pool holds the experts as the kernels read them.
        self.expander: Any = None
        #: Bytes one copy moves (the host store's row).
        self.copy_bytes = store.layout.slot_bytes
        #: Per-miss precision (``LowPrecisionCopies``, set by ``offload``), else None; ``_shares``: this layer
        #: call's gate shares (expert -> share); ``low_keys``: keys resident as their low copy.
        self.low: Any = None
        self._shares: dict[int, float] = {}
        self.low_keys: set[int] = set()
        #: The prefetch admission rule (``moecache.admission.ADMISSIONS``) and the clock it reads
        #: (``ADMISSION_CLOCKS``); the predictor gate is built at the first prefetch (``_gate_for``).
        self.admission = DEFAULT_ADMISSION
        self.admission_clock = "model"
        self.gate: PredictorGate | None = None
        self._gate_key: tuple | None = None
        #: Under the gate: prefetched key -> (source MoE layer, what its use adds to the gate's ledger).
        self._pf_src: dict[int, tuple[int, float]] = {}
        #: The re-demand rate of evicted residents, the admission rule's floor on a victim's worth (kept only
        #: where the runtime prefetches: nothing else reads it).
        self.reuse = VictimReuse(policy.num_pools) if self.prefetch_depth else None
        #: The ``model`` clock (ms): now, the modelled copy queue's end, and this layer's modelled length.
        self._m_now = 0.0
        self._m_copy = 0.0
        self._m_layer = 0.0
        #: Host-clock model of the copy engine: when the copies queued so far end (perf_counter seconds).
        self._copy_free_s = 0.0
        #: Measured interval between consecutive MoE layers of one forward (ms; None until seen), and
        #: the previous layer's start.
        self.layer_ms: float | None = None
        self._last_layer: tuple[int, float] | None = None

    @property
    def profile(self) -> Any:
        """The cost model the ``model`` admission clock and the predictor gate read: the profile set on the
        runtime (``_profile``), else the default profile at this store's expert size."""
        prof = self.__dict__.get("_profile")
        if prof is None:
            prof = self._profile = default_profile(self.copy_bytes)
        return prof

    @property
    def copy_ms(self) -> float:
        """One expert copy (ms): the hybrid executor's measured costs where it has them, else ``profile``'s."""
        costs = getattr(self.hybrid, "costs", None)
        return float((self.profile if costs is None else costs).copy_ms)

    @property
    def admission(self) -> str:
        """The prefetch admission rule (``moecache.admission.ADMISSIONS``), checked when set."""
        return self._admission

    @admission.setter
    def admission(self, name: str) -> None:
        self._admission = check_admission(name)

    @property
    def admission_clock(self) -> str:
        """The clock the admission rule reads (``ADMISSION_CLOCKS``), checked when set."""
        return self._admission_clock

    @admission_clock.setter
    def admission_clock(self, name: str) -> None:
        if name not in ADMISSION_CLOCKS:
            raise ConfigError(f"unknown admission clock {name!r}; choose one of: {', '.join(ADMISSION_CLOCKS)}")
        self._admission_clock = name

    def set_expander(self, expander: Any) -> None:
        self.expander = expander

    @property
    def compute_pool(self) -> SlotPool:
        """The pool whose views the kernels read (the dense scratch or pool where experts are compressed)."""
        return self.pool if self.expander is None else self.expander.compute

    @property
    def chunk_capacity(self) -> int:
        """The most experts one kernel call may read: the policy's capacity, or the scratch's."""
        cap = self.policy.capacity
        return cap if self.expander is None else min(cap, self.expander.capacity)

    # -- shells -------------------------------------------------------------------------------
    @staticmethod
    def build_shells(original: nn.Module, pool: SlotPool, lut: np.ndarray, num_experts: int
                     ) -> tuple[nn.Module, nn.Module]:
        remap = make_shell(original, dict(pool.views), pool.num_slots)
        indexers = {name: SlotIndexer(view, lut, num_experts) for name, view in pool.views.items()}
        return remap, make_shell(original, indexers, num_experts)

    # -- request boundaries (called by the model-call hook) -----------------------------------------
    def begin_call(self, rows: int, tokens_per_row: int, new_request: bool = False) -> None:
        """A model forward starts. A new request (or a change of batch size) resets the policy's and
        the predictor's per-request state."""
        if new_request or rows != self.rows:
            self.policy.begin_request()
            if self.predictor is not None:
                self.predictor.reset()
        self.rows, self.tokens_per_row = int(rows), int(tokens_per_row)
        self._streaming = bool(self.stream_prefill) and tokens_per_row > 1 and \
            rows * tokens_per_row >= self.stream_prefill
        if self._streaming:
            self._stream_layer(0, set())

    # -- the per-layer path -------------------------------------------------------------------------
    def run_layer(self, li: int, hidden: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                  call: Any = None) -> torch.Tensor:
        """One MoE layer. ``call``: a family kernel's ``experts.LayerCall`` (Llama 4, DBRX, Switch), which
        computes the layer expert by expert in its module's own order; ``hidden`` is then what predictors read."""
        t0 = time.perf_counter()
        last = self._last_layer
        if last is not None and last[0] + 1 == li:  # consecutive MoE layers of one forward
            dt = (t0 - last[1]) * 1e3
            self.layer_ms = dt if self.layer_ms is None else 0.8 * self.layer_ms + 0.2 * dt
        self._last_layer = (li, t0)
        # THE host sync of this MoE layer: choosing slots and victims needs the routing on the host.
        ids = idx.detach().cpu().numpy()
        t1 = time.perf_counter()
        c = self.counters
        c.sync_s += t1 - t0
        c.layer_calls += 1
        experts, counts = _unique(ids)
        if call is not None:  # tokens its routing marks as taking no expert (Switch's capacity drops)
            experts, counts = call.routed(experts, counts)
        if self.prefetch_depth and self.admission_clock == "model":  # the modelled clock: one layer on
            prof = self.profile
            self._m_now += self._m_layer
            m = prof.non_expert(int(ids.shape[0])) + prof.layer_host_ms
            for n in counts:
                m += prof.gpu(int(n))
            self._m_layer = m
        if experts and (experts[0] < 0 or experts[-1] >= self.E):
            raise ConfigError(f"MoE layer {li}: routing ids out of range 0..{self.E - 1} "
                              f"(min {experts[0]}, max {experts[-1]})")
        base = li * self.E
        keys = [base + e for e in experts]
        self.policy.begin_layer(li)
        if self.pending:
            self._settle_prefetches(li, keys)
        on_cpu = self._misses_on_cpu(keys, counts) if self.hybrid is not None and call is None else None
        if self.low is not None:  # the rule reads the gate weights: a second small copy to the host
            self._shares = gate_shares(ids, weights.detach().float().cpu().numpy())
        if call is not None:
            t2 = time.perf_counter()
            out = self._family_call(li, call, ids, experts, counts)
            t3 = time.perf_counter()
        elif on_cpu:
            t2 = time.perf_counter()
            out = self._hybrid(li, hidden, weights, ids, keys, counts, on_cpu)
            t3 = time.perf_counter()
        elif len(keys) <= self.chunk_capacity:
            slots = self._acquire(keys, counts)
            if self._streaming and li + 1 < self.L:
                self._stream_layer(li + 1, set(keys))
            if self.expander is not None:
                self.expander.prepare(li, experts, slots)
            t2 = time.perf_counter()
            out = self._kernel(li, hidden, idx, weights, ids)
            self.engine.mark_used(slots)
            t3 = time.perf_counter()
        else:
            t2 = time.perf_counter()
            out = self._rounds(li, hidden, weights, ids, np.asarray(experts), counts)
            t3 = time.perf_counter()
        if self.prefetch_depth or self.score_depth:
            self._prefetch(li, ids, hidden)
            t4 = time.perf_counter()
            c.prefetch_s += t4 - t3
        else:
            t4 = time.perf_counter()
        c.host_s += (t2 - t1) + (t4 - t3)
        return out

    def _acquire(self, keys: list[int], counts: list[int], accessed: bool = False) -> list[int]:
        """Make ``keys`` resident (demand) and have the compute stream wait for them; returns their
        slots. Counts hits, misses and ready accesses. ``accessed``: the policy was already told."""
        c = self.counters
        protected = set(keys)
        slots: list[int] = []
        unsure: list[int] = []       # hits whose copy was not known to be complete
        copy_slots: list[int] = []
        copy_keys: list[int] = []
        ready = 0
        low_slots: list[int] = []
        low_keys: list[int] = []
        rule = self.low
        if not accessed:  # every need first, then the misses placed: the simulator's order (engine_python)
            for key, n in zip(keys, counts):
                self.policy.access(key, n)
        for key, n in zip(keys, counts):
            s = int(self.slot_of[key])
            if s >= 0:
                c.hits += 1
                if rule is not None and miss_precision.copy_precision(
                        key in self.low_keys, self._shares.get(key % self.E, 1.0), rule.below) == UPGRADE:
                    # Reused while low: the full copy replaces it before the kernel reads the slot.
                    self.low_keys.discard(key)
                    self.ready_slots.discard(s)
                    copy_slots.append(s)
                    copy_keys.append(key)
                    c.upgrades += 1
                elif s in self.ready_slots:
                    ready += 1
                else:
                    unsure.append(s)
                if key in self.unused_prefetch:
                    self.unused_prefetch.discard(key)
                    self.pending.pop(key, None)
                    c.prefetch_useful += 1
                    src = self._pf_src.pop(key, None)
                    if src is not None and self.gate is not None:
                        self.gate.used(*src)
                elif key in self.streamed:
                    self.streamed.discard(key)
                    self.pending.pop(key, None)
                    c.prefill_stream_useful += 1
            else:
                c.misses += 1
                if self.reuse is not None:
                    self.reuse.demanded(key, self.policy.pool(key))
                s = self._place(key, protected)
                if rule is not None and miss_precision.copy_precision(
                        None, self._shares.get(key % self.E, 1.0), rule.below) == LOW:
                    low_slots.append(s)
                    low_keys.append(key)
                else:
                    copy_slots.append(s)
                    copy_keys.append(key)
            slots.append(s)
        if unsure:
            done = self.engine.ready(unsure)
            for s, d in zip(unsure, done):
                if d:
                    ready += 1
                    self.ready_slots.add(s)
            unsure = [s for s, d in zip(unsure, done) if not d]
        c.accesses += len(slots)
        c.ready += ready
        if copy_slots or unsure:
            self.engine.demand(copy_slots, copy_keys, unsure + copy_slots)
            self._copied(copy_slots)
        if low_slots:
            self._copy_low(low_slots, low_keys)
        return slots

    def _copy_low(self, slots: list[int], keys: list[int]) -> None:
        """Misses served low: their low rows copied into the landing (``top_k`` rows; more misses go through it
        that many at a time), each batch expanded into its pool slots before the kernel reads them."""
        low = self.low
        cap = low.landing.num_slots
        self.engine.wait(slots)  # any earlier copy into these pool slots is complete before they are rewritten
        for start in range(0, len(slots), cap):
            part, part_keys = slots[start:start + cap], keys[start:start + cap]
            n = len(part)
            land = list(range(n))
            low.engine.demand(land, part_keys, land)
            dense = torch.empty((n, self.pool.layout.slot_numel), dtype=self.pool.data.dtype, device=self.pool.device)
            low.codec.expand_rows(low.landing.data[:n], dense)
            self.pool.data[torch.as_tensor(part, device=self.pool.device)] = dense
            low.engine.mark_used(land)  # the next low copies into the landing wait for this expansion
        self.ready_slots.update(slots)
        self.low_keys.update(keys)
        c = self.counters
        c.copies += len(slots)
        c.low_copies += len(slots)
        c.bytes_copied += len(slots) * low.codec.slot_bytes

    def preload(self, keys: list[int]) -> list[int]:
        """Copy the experts ``keys`` (global: ``layer * E + expert``) into the pool now, a placement chosen
        before the run (Fiddler's popular experts, a warm start), and wait for the copies. Each goes through
        the policy's ``insert`` as a miss would, so the policy knows it; keys already resident are skipped.
        Counted in ``copies`` and ``bytes_copied`` (reset the stats afterwards to leave them out). Returns the
        slots copied into."""
        keys = sorted({int(k) for k in keys})
        bad = [k for k in keys if not 0 <= k < self.L * self.E]
        if bad:
            raise ConfigError(f"cannot preload expert key {bad[0]}: keys are layer * {self.E} + expert, "
                              f"below {self.L * self.E}")
        pool, n = max(Counter(self.policy.pool(k) for k in keys).items(), key=lambda kv: kv[1], default=(0, 0))
        if n > self.policy.capacity:
            where = f"MoE layer {pool}'s pool" if self.policy.num_pools > 1 else "the pool"
            raise ConfigError(f"cannot preload {n} experts into {where} of {self.policy.capacity} slots: "
                              "preload at most that many (or offload with more GPU memory)")
        new = [k for k in keys if self.slot_of[k] < 0]
        protected = set(keys)
        slots = [self._place(k, protected) for k in new]
        if slots:
            self.engine.demand(slots, new, slots)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # load time: wait for the copies
            self.ready_slots.update(slots)
            self.counters.copies += len(slots)
            self.counters.bytes_copied += len(slots) * self.copy_bytes
        return slots

    def _place(self, key: int, protected: set[int]) -> int:
        """Ask the policy for a slot for ``key`` (evicting as it decides); the caller queues the copy."""
        for victim in self.policy.insert(key, protected):
            self._evicted(victim)
        if self.reuse is not None:
            self.reuse.inserted(key)
        s = int(self.policy.slot(key))
        self.slot_of[key] = s
        self.ready_slots.discard(s)
        return s

    def _copied(self, slots: list[int]) -> None:
        if self.prefetch_depth:  # the admission rule's view of the copy queue, on the clock it reads
            if self.admission_clock == "model":
                self._m_copy = max(self._m_now, self._m_copy) + len(slots) * self.profile.copy_ms
            else:
                self._copy_free_s = max(time.perf_counter(), self._copy_free_s) + len(slots) * self.copy_ms / 1e3
        c = self.counters
        c.copies += len(slots)
        c.bytes_copied += len(slots) * self.copy_bytes
        if self.engine.sync_copies:
            self.ready_slots.update(slots)
        if self.hybrid is not None:
            self.hybrid.copies_issued(len(slots))

    def _evicted(self, key: int) -> None:
        s = int(self.slot_of[key])
        self.slot_of[key] = -1
        self.counters.evictions += 1
        if self.reuse is not None:
            self.reuse.evicted(key, self.policy.pool(key))
        self.unused_prefetch.discard(key)
        self._pf_src.pop(key, None)
        self.streamed.discard(key)
        self.low_keys.discard(key)
        if self.pending.pop(key, None) is not None:
            self.engine.cancel(s)  # its copy may still be queued: the slot is about to be refilled

    def _settle_prefetches(self, li: int, keys: list[int]) -> None:
        """Cancel queued prefetches aimed at layer ``li`` that its routing did not pick."""
        needed = set(keys)
        for key, target in list(self.pending.items()):
            if target != li or key in needed:
                continue
            del self.pending[key]
            s = int(self.slot_of[key])
            if self.engine.cancel(s):
                self.policy.evict(key)
                self.slot_of[key] = -1
                self.unused_prefetch.discard(key)
                self._pf_src.pop(key, None)
                self.streamed.discard(key)
                self.counters.prefetch_cancelled += 1
            # else: already copied or copying; it stays resident and may still be used later

    def _stream_layer(self, target: int, protected: set[int]) -> None:
        """Queue every non-resident expert of MoE layer ``target`` (streaming prefill), while the policy has room;
        ``protected``: the keys the running layer holds."""
        base = target * self.E
        protected = protected | set(self.pending)
        slots: list[int] = []
        keys: list[int] = []
        prios: list[float] = []
        for e in range(self.E):
            key = base + e
            if self.slot_of[key] >= 0:
                continue
            if not self.policy.can_insert(key, protected):
                break
            slots.append(self._place(key, protected))
            keys.append(key)
            prios.append(1.0 + e / self.E)
            self.pending[key] = target
            self.streamed.add(key)
            protected.add(key)
        if slots:
            self.engine.submit_many(slots, keys, prios)
            self._copied(slots)
            self.counters.prefill_streamed += len(slots)

    # -- kernels ----------------------------------------------------------------------------------
    def _kernel(self, li: int, hidden: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                ids: np.ndarray, sid: torch.Tensor | None = None) -> torch.Tensor:
        """The experts call on the pool; ``sid``: ``ids``' slots already on the device (else uploaded here)."""
        layer = self.layers[li]
        impl = getattr(self.config, "_experts_implementation", None)
        if impl != self._impl:  # the model's setting may change between calls
            self._impl, self._mode = impl, call_mode(impl)
        if self._mode == "indexer":
            return layer.indexer_shell(hidden, idx, weights)
        if sid is None:
            slot_ids = self.slot_of[ids + li * self.E] if self.expander is None else self.expander.lut[ids]
            # Pageable host -> device copy of a few ints: staged at once by the driver, no sync.
            sid = torch.from_numpy(slot_ids).to(device=idx.device, dtype=idx.dtype, non_blocking=True)
        return layer.remap_shell(hidden, sid, weights)

    def _rounds(self, li: int, hidden: torch.Tensor, weights: torch.Tensor, ids: np.ndarray,
                experts: np.ndarray, counts: np.ndarray) -> torch.Tensor:
        """More experts than slots: stream them through the pool, ``capacity`` at a time."""
        self.counters.round_calls += 1
        tokens, k = ids.shape
        contrib = torch.empty((tokens * k, hidden.shape[-1]), dtype=hidden.dtype, device=hidden.device)
        self._pairs_into(contrib, li, hidden, weights, ids, experts, counts)
        # Summed once, over k in (token, k) order, as the backends sum weighted_out.view(T, k, H).
        return contrib.view(tokens, k, -1).sum(dim=1).to(hidden.dtype)

    def _pairs_into(self, contrib: torch.Tensor, li: int, hidden: torch.Tensor, weights: torch.Tensor,
                    ids: np.ndarray, experts: np.ndarray, counts: Any, accessed: bool = False,
                    extra: np.ndarray | None = None) -> torch.Tensor | None:
        """Every (token, k) pair routed to ``experts`` (on the pool, ``capacity`` at a time) as a
        one-expert call; its weighted output goes to ``contrib[pair]``. Each chunk's indices (pairs,
        their ids, their slots) go to the device in one copy (every upload costs host time, so
        they are batched); ``extra`` (int64, the CPU experts' pairs) rides with the first, and comes back
        on the device."""
        k = ids.shape[1]
        flat = ids.reshape(-1)
        dev = hidden.device
        w_flat = weights.reshape(-1)
        cap = self.chunk_capacity
        extra_t = None
        for start in range(0, len(experts), cap):
            chunk = experts[start:start + cap]
            slots = self._acquire((chunk + li * self.E).tolist(), counts[start:start + cap], accessed)
            pairs = np.nonzero(np.isin(flat, chunk))[0]
            pair_ids = flat[pairs]
            n = pairs.size
            if self.expander is not None:
                self.expander.prepare(li, chunk.tolist(), slots)
                compute_ids = self.expander.lut[pair_ids]
            else:
                compute_ids = self.slot_of[pair_ids + li * self.E]
            parts = [pairs, pair_ids, compute_ids]
            if extra is not None and start == 0:
                parts.append(extra)
            up = torch.from_numpy(np.concatenate(parts).astype(np.int64, copy=False)).to(dev, non_blocking=True)
            pairs_t, ids_t, sid_t = up[:n], up[n:2 * n].view(-1, 1), up[2 * n:3 * n].view(-1, 1)
            if len(parts) == 4:
                extra_t = up[3 * n:]
            # Each (token, k) pair as its own one-expert "token": the kernel returns its weighted output.
            out = self._kernel(li, hidden[pairs_t // k], ids_t, w_flat[pairs_t].reshape(-1, 1),
                               pair_ids.reshape(-1, 1), sid=sid_t)
            contrib[pairs_t] = out.to(contrib.dtype)
            self.engine.mark_used(slots)
        return extra_t

    def _family_call(self, li: int, call: Any, ids: np.ndarray, experts: list[int], counts: list[int]
                     ) -> torch.Tensor:
        """A family kernel adds expert by expert in ascending ids, so when the experts do not all fit the
        rounds are chunks of that order and the output is the same either way."""
        cap = self.policy.capacity
        if len(experts) > cap:
            self.counters.round_calls += 1
        for start in range(0, len(experts), cap):
            chunk = experts[start:start + cap]
            slots = self._acquire([li * self.E + e for e in chunk], counts[start:start + cap])
            call.run(ids, chunk, slots)
            self.engine.mark_used(slots)
        return call.finish()

    # -- hybrid CPU-GPU execution -------------------------------------------------------------------
    def _misses_on_cpu(self, keys: list[int], counts: list[int]) -> set[int]:
        """The hybrid rule's verdict on this layer's misses (ascending keys): the keys to run on the CPU.
        Every layer's hits are counted too (the rule's reuse estimate)."""
        slot_of = self.slot_of
        misses = [(key, n) for key, n in zip(keys, counts) if slot_of[key] < 0]
        copy = self.hybrid.decide(misses, len(keys) - len(misses))
        return {key for (key, _n), cp in zip(misses, copy) if not cp}

    def _hybrid(self, li: int, hidden: torch.Tensor, weights: torch.Tensor, ids: np.ndarray, keys: list[int],
                counts: list[int], on_cpu: set[int]) -> torch.Tensor:
        """A layer with CPU experts: CPU launched first, GPU experts meanwhile, merged in (token, k) order.

        Exactness as designed: the unpatched kernels sum each token's k weighted expert outputs in k order,
        so the CPU rows go to their (token, k) places of the contribution buffer and the one sum over k
        follows; GPU experts run pair by pair (as in rounds) for the same reason: folding them into the
        normal call with the CPU experts' weights zeroed would add the CPU terms after the others, in
        another order. The host work here runs while the CPU computes; after the wait: the copy back,
        the weighting, the scatter and the sum."""
        c = self.counters
        tokens, k = ids.shape
        base = li * self.E
        work = self.hybrid.launch(li, hidden, weights, ids, [key - base for key in keys if key in on_cpu])
        t0 = time.perf_counter()
        try:
            for key, n in zip(keys, counts):  # every need in key order, as in the simulator
                self.policy.access(key, n)
            c.accesses += len(on_cpu)
            c.misses += len(on_cpu)
            if self.reuse is not None:
                for key in sorted(on_cpu):
                    self.reuse.demanded(key, self.policy.pool(key))
            contrib = torch.empty((tokens * k, hidden.shape[-1]), dtype=hidden.dtype, device=hidden.device)
            gpu = [(key - base, n) for key, n in zip(keys, counts) if key not in on_cpu]
            if gpu:  # the CPU experts' pairs go up with the GPU experts' indices
                cpu_pairs = self._pairs_into(contrib, li, hidden, weights, ids,
                                             np.asarray([e for e, _ in gpu], dtype=np.int64), [n for _, n in gpu],
                                             accessed=True, extra=work.host_pairs)
            else:
                cpu_pairs = torch.from_numpy(work.host_pairs).to(hidden.device, non_blocking=True)
            self.hybrid.bind(work, cpu_pairs, weights)
            t1 = time.perf_counter()
        finally:  # the pool reads buffers the work holds: never leave it running
            pairs_t, rows = self.hybrid.finish(work, hidden.dtype)
        t2 = time.perf_counter()
        contrib[pairs_t] = rows.to(contrib.dtype)  # no-op where the routing weights have the model's dtype
        out = contrib.view(tokens, k, -1).sum(dim=1).to(hidden.dtype)
        self.hybrid.layer_done(t1 - t0, time.perf_counter() - t2)
        return out

    # -- prefetch ---------------------------------------------------------------------------------
    def _step_rows(self, ids: np.ndarray) -> np.ndarray:
        """The routing of the current step's rows: the last position of each batch row."""
        if self.tokens_per_row > 1 and ids.shape[0] == self.rows * self.tokens_per_row:
            return ids.reshape(self.rows, self.tokens_per_row, -1)[:, -1]
        return ids

    def _prefetch(self, li: int, ids: np.ndarray, hidden: torch.Tensor) -> None:
        """Feed the routing to the predictor; pass the policy its scores (as the simulator does: the
        row mean of ``predict(li, score_depth)``, whatever the prefetch depth); queue prefetches."""
        pred = self.predictor
        if pred is None:
            return
        rows = self._step_rows(ids)
        h = None
        if getattr(pred, "needs_model", False):
            h = hidden
            if self.tokens_per_row > 1 and hidden.shape[0] == self.rows * self.tokens_per_row:
                h = hidden.view(self.rows, self.tokens_per_row, -1)[:, -1]
        pred.observe(li, rows, h)
        if self.score_depth:
            score = np.asarray(pred.predict(li, self.score_depth), dtype=np.float64)
            self.policy.on_scores(pred.target(li, self.score_depth)[0], score.mean(axis=0))
        if not self.prefetch_depth:
            return
        admission = self.admission
        gate = self._gate_for(admission)
        if gate is not None and not gate.open(li):
            self.counters.predictor_skipped += 1
            return
        width = self.prefetch_width or min(self.E, self.top_k * rows.shape[0])
        protected = set(self.pending)
        slots: list[int] = []
        keys: list[int] = []
        prios: list[float] = []
        depths = range(1, self.prefetch_depth + 1)
        targets = {d: pred.target(li, d)[0] for d in depths}
        scores_at = {d: (score if d == self.score_depth else np.asarray(pred.predict(li, d), dtype=np.float64)
                         ).sum(axis=0) for d in depths}
        weighed = admission != "none"
        model = self.admission_clock == "model"
        if model:
            prof = self.profile
            copy_ms, host_ms = float(prof.copy_ms), float(prof.prefetch_host_ms)
            layer_ms = self._m_layer
            backlog0 = self._m_copy - self._m_now
            if backlog0 < 0.0:
                backlog0 = 0.0
        else:
            copy_ms, host_ms = self.copy_ms, 0.0
            layer_ms = self.layer_ms if self.layer_ms is not None else copy_ms  # until measured: one copy
        policy = self.policy
        for depth in depths:
            target = targets[depth]
            scores = scores_at[depth]
            base = target * self.E
            lead = lead_ms(depth, layer_ms, layer_ms)
            for e in _TOPK(scores, width, lambda x: self.slot_of[base + x] >= 0):
                prob = candidate_probability(float(scores[e]))
                if prob < self.min_prob:
                    break
                key = base + e
                if self.slot_of[key] >= 0:
                    continue
                if not policy.can_insert(key, protected):
                    break
                if weighed:
                    victim_pred = victim_prob = 0.0
                    pool = policy.pool(key)
                    if policy.occupancy(pool) >= policy.capacity:
                        v = policy.victim(pool, protected)
                        vl = v // self.E
                        for dd in depths:
                            if targets[dd] == vl:
                                victim_pred = candidate_probability(float(scores_at[dd][v - vl * self.E]))
                                break
                        victim_prob = victim_worth(victim_pred, self.reuse.rate())
                    if model:
                        backlog = backlog0 + len(slots) * copy_ms
                    else:
                        backlog = max(0.0, (self._copy_free_s - time.perf_counter()) * 1e3) + len(slots) * copy_ms
                    if not admit_prefetch(prob, victim_prob, backlog, layer_ms, lead, copy_ms, host_ms):
                        self.counters.prefetch_refused += 1
                        continue
                    if gate is not None:
                        if_unused, bonus = outcome_values(victim_pred, backlog, layer_ms, lead, copy_ms, host_ms)
                        gate.issued(li, if_unused)
                        self._pf_src[key] = (li, bonus)
                slots.append(self._place(key, protected))
                keys.append(key)
                prios.append(depth + (1.0 - prob))
                self.pending[key] = target
                self.unused_prefetch.add(key)
                protected.add(key)
        if slots:
            self.engine.submit_many(slots, keys, prios)
            self._copied(slots)
            self.counters.prefetch_issued += len(slots)

    def _gate_for(self, admission: str) -> PredictorGate | None:
        """The predictor gate for ``admission`` (None: none), rebuilt when the rule or the profile changes."""
        if admission != "gated" or self.score_depth:
            return None
        key = (admission, id(self.profile), getattr(self.predictor, "name", None))
        if self.gate is None or self._gate_key != key:
            self.gate = PredictorGate(self.L, self.profile.predictor_host(getattr(self.predictor, "name", None)))
            self._gate_key = key
            self._pf_src.clear()
        return self.gate

    # -- teardown ---------------------------------------------------------------------------------
    def close(self) -> None:
        self.engine.close()
        if self.hybrid is not None:
            self.hybrid.close()
