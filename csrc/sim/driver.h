// The simulator core's driver: one policy (and the predictions) over a laid-out schedule, with
// timing, as moecache/sim/engine_python.py does it. Plain C++ (no torch, no Python): the bindings
// (bindings.h) check and unpack the arrays and call run_sim.
#pragma once

#include <cstdint>
#include <vector>

#include "codes.h"
#include "policies.h"
#include "predict.h"
#include "timeline.h"

namespace moecache_sim {

// ---- the replay driver (replay.simulate without predictor / prefetch) ------------------------
struct Input {
  const int64_t* ids;          // (tokens, L, K) in replay order
  const int64_t* unit_start;   // (units + 1)
  const uint8_t* new_request;  // (units): the unit starts a request (sequence)
  int64_t units;
  const double* ne_tab;        // non_expert(rows), indexed by rows
  const double* gpu_tab;       // gpu(c), indexed by token count
  const double* cpu_tab;       // cpu(c)
  int64_t tab_len;             // entries of gpu_tab and cpu_tab
  double copy_ms;
  int64_t miss_rule;
  bool record;
  int64_t depth = 0;           // prefetch depth D (MoE layers ahead); 0: no prefetch
  int64_t prefetch_rule = PF_TOPK;
  int64_t budget = 0;          // prefetches per target layer; 0: min(E, top_k * rows)
  int64_t admission = AD_COST; // prefetch admission rule (moecache/admission.py)
  // the predictor gate's parameters (admission AD_GATED; moecache/admission.py PredictorGate)
  int64_t gate_span = 16, gate_probe_every = 32, gate_min_calls = 8;
  // the calibrated host and interference terms of the hardware profile (moecache/cost/timing.py)
  double layer_host = 0.0, copy_host = 0.0, pred_host = 0.0, pf_host = 0.0, slow = 1.0, hybrid_ms = 0.0;
  // a scan policy's host time per eviction (already in copy_host and pf_host; the worker queue charges it
  // per eviction instead)
  double evict_host = 0.0;
  bool worker_queue = false;   // copy_queue "worker" (moecache/sim/copy_queue.py); false: FIFO
};

struct Output {
  int64_t accesses = 0, hits = 0, ready = 0, needs = 0, loads = 0, cpu_runs = 0;
  int64_t prefetches = 0, pf_used = 0, pf_wasted = 0, pf_skipped = 0, pf_refused = 0;
  bool gated = false;  // a predictor gate ran (its totals follow)
  int64_t gate_calls = 0, gate_probes = 0, gate_skipped = 0, gate_off = 0;
  int64_t cancelled = 0;  // the worker queue's cancelled copies
  Timeline tl;
  std::vector<int64_t> rec;  // (step, key, tokens, outcome) flattened
};

// The policy as the driver builds it: its code and parameters (engine_cpp.py's CppPort).
struct PolicyArgs {
  int64_t code = P_LRU;
  int64_t int_param = 0;             // lfu: halving period in accesses
  double float_param = 0.0;          // lrfu: lam
  std::vector<uint8_t> pinned;       // static: pinned mask (L * E)
  std::vector<int64_t> fit_counts;   // static: fitting counts (L * E)
  double alpha = 0.0, g = 1.0;       // activation / predicted
  const double* pow_acc = nullptr;   // their powers g**n (pow_len entries each)
  const double* pow_rank = nullptr;
  int64_t pow_len = 0;
};

// Replay ``in`` with the policy ``pol`` on L layers x E experts, top-K, ``capacity`` slots per pool
// (one pool for all layers with ``global_scope``); ``preds`` may be null (no predictor). Throws
// std::runtime_error with CONFIG_TAG / STREAM_TAG / TABLE_TAG for what the caller turns into
// Python errors.
void run_sim(const Input& in, int64_t L, int64_t E, int64_t K, int64_t capacity, bool global_scope,
             PolicyArgs& pol, const Tuning& tune, Predictions* preds, Output& out);

}  // namespace moecache_sim
