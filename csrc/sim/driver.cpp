// moecache._C.sim_replay's core loop: the trace-replay simulator in C++.
//
// The readable specification is moecache/sim/engine_python.py with the policies in policies/*.py, the
// prefetch rules in moecache/sim/prefetch.py, the admission rule in moecache/admission.py and the timing model in moecache/cost/timing.py; this
// file follows them step by step, doing every float operation in the same order and precision
// (IEEE double, no fast-math, no FMA contraction on the x86-64 baseline), so a run here reproduces
// the Python reference's result row exactly. The differential tests (tests/test_sim_cpp.py)
// compare both with ==.
//
// The policies with a C++ port (those whose Python class defines cpp_port: lru, fifo, lfu, lrfu,
// static, activation, predicted, belady, belady_bypass) run here; both scopes; miss rules copy,
// cpu, policy, min; step and decode schedules; the per-need record; prefetch (rules topk and fill,
// any depth and budget) driven by a predictor. The trace-only predictors prior, temporal and
// transition run here (predict.h); any other predictor runs in Python and streams its predictions
// in chunks of a few hundred steps.
//
// Inputs arrive already validated and laid out by moecache/sim/engine_cpp.py and bindings.h (ids in
// replay order, unit starts, per-token-count cost tables computed by the Python hardware profile,
// and for ``activation`` / ``predicted`` the powers g**n computed by the very Python and numpy
// calls the policy makes, so the costs and powers are the very same doubles). Nothing here touches
// Python: the bindings release the GIL for the whole replay.
#include "driver.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace moecache_sim {

namespace {

// The group of unit rows [a, b) at layer l: keys ascending with token counts (ids < 0 skipped).
// Buffers are sized once for the largest unit, so the hot path never allocates.
[[noreturn]] void bad_id(int64_t x, int64_t E) {
  throw std::runtime_error(std::string(CONFIG_TAG) + "expert id " + std::to_string(x) +
                           " out of range: the trace declares " + std::to_string(E) + " experts (valid ids 0.." +
                           std::to_string(E - 1) + ", -1 missing, -2 dropped)");
}

struct Group {
  std::vector<int64_t> tmp, keys, counts, hist;
  int64_t n = 0;
  Group(const Input& in, const Core& c) : hist(c.E, 0) {
    int64_t most = 1;
    for (int64_t u = 0; u < in.units; ++u) most = std::max(most, in.unit_start[u + 1] - in.unit_start[u]);
    tmp.resize(most * c.K);
    keys.resize(most * c.K);
    counts.resize(most * c.K);
  }
  void make(const Input& in, const Core& c, int64_t a, int64_t b, int64_t l) {
    const int64_t K = c.K, L = c.L, base = l * c.E;
    int64_t* t = tmp.data();
    int64_t m = 0;
    for (int64_t r = a; r < b; ++r) {
      const int64_t* row = in.ids + (r * L + l) * K;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t x = row[k];
        if (x >= 0) {
          if (x >= c.E) bad_id(x, c.E);
          t[m++] = x;
        } else if (x < -2) {
          bad_id(x, c.E);
        }
      }
    }
    n = 0;
    if (m > 64 && m * 4 > c.E) {  // a batched step: count per expert (keys come out ascending)
      int64_t* hc = hist.data();
      for (int64_t i = 0; i < m; ++i) ++hc[t[i]];
      for (int64_t e = 0; e < c.E; ++e) {
        if (hc[e]) {
          keys[n] = base + e;
          counts[n++] = hc[e];
          hc[e] = 0;
        }
      }
      return;
    }
    if (m <= 16) {  // insertion sort: the decode case (top_k ids)
      for (int64_t i = 1; i < m; ++i) {
        const int64_t x = t[i];
        int64_t j = i;
        while (j > 0 && t[j - 1] > x) {
          t[j] = t[j - 1];
          --j;
        }
        t[j] = x;
      }
    } else {
      std::sort(t, t + m);
    }
    for (int64_t i = 0; i < m;) {
      int64_t j = i + 1;
      while (j < m && t[j] == t[i]) ++j;
      keys[n] = base + t[i];
      counts[n++] = j - i;
      i = j;
    }
  }
};

// The next-use arrays: one pass forward to list the needs, one backward to link them.
Future build_future(const Input& in, const Core& c, bool links, bool by_key) {
  Future f;
  Group grp(in, c);
  std::vector<int32_t> need_key, step_needs;  // keys of all needs; needs per step
  step_needs.reserve(in.units * c.L);
  for (int64_t u = 0; u < in.units; ++u) {
    for (int64_t l = 0; l < c.L; ++l) {
      grp.make(in, c, in.unit_start[u], in.unit_start[u + 1], l);
      step_needs.push_back(static_cast<int32_t>(grp.n));
      for (int64_t i = 0; i < grp.n; ++i) need_key.push_back(static_cast<int32_t>(grp.keys[i]));
    }
  }
  const int64_t N = static_cast<int64_t>(need_key.size());
  f.next_step.resize(N);
  if (links) f.next_need.resize(N);
  std::vector<int64_t> last_step(c.LE, NEVER), last_need(c.LE, -1);
  int64_t i = N;
  for (int64_t g = static_cast<int64_t>(step_needs.size()) - 1; g >= 0; --g) {
    for (int32_t j = 0; j < step_needs[g]; ++j) {
      --i;
      const int32_t k = need_key[i];
      f.next_step[i] = last_step[k];
      if (links) f.next_need[i] = last_need[k];
      last_step[k] = g;
      last_need[k] = i;
    }
  }
  f.need_of.assign(c.LE, 0);
  if (by_key) {  // each key's steps in order (a counting sort of the needs by key)
    f.by_key = true;
    f.use_off.assign(c.LE + 1, 0);
    for (int32_t k : need_key) ++f.use_off[k + 1];
    for (int64_t k = 0; k < c.LE; ++k) f.use_off[k + 1] += f.use_off[k];
    f.use_step.resize(N);
    f.cursor.assign(f.use_off.begin(), f.use_off.end() - 1);
    std::vector<int64_t> fill(f.cursor);
    int64_t n = 0;
    for (int64_t g = 0; g < static_cast<int64_t>(step_needs.size()); ++g)
      for (int32_t j = 0; j < step_needs[g]; ++j) f.use_step[fill[need_key[n++]]++] = g;
    f.step_of.assign(c.LE, -1);
  }
  return f;
}

// admission.VictimReuse: the re-demand rate the admission rule prices a prefetch's victim at (the share of
// evictions a demand access wanted back before any copy put them back and before any other eviction from
// their pool), counted at the same points.
struct Reuse {
  std::vector<int64_t> out;            // evicted, not put back, not yet wanted: its pool's eviction count then; 0: none
  std::vector<int64_t> pool_evictions;
  int64_t evicted_n = 0, wanted_back = 0;
  Reuse(int64_t LE, int64_t pools) : out(LE, 0), pool_evictions(pools, 0) {}
  void evicted(int64_t k, int64_t p) {
    out[k] = ++pool_evictions[p];
    ++evicted_n;
  }
  void inserted(int64_t k) { out[k] = 0; }
  void demanded(int64_t k, int64_t p) {
    const int64_t at = out[k];
    out[k] = 0;
    if (at != 0 && at == pool_evictions[p]) ++wanted_back;
  }
  double rate() const { return static_cast<double>(wanted_back) / static_cast<double>(evicted_n + 1); }
};

// Remove a resident (a victim); a prefetched expert leaving unused counts as wasted.
template <class P>
void evict(Core& c, P& pol, int64_t v, Output& out, std::vector<uint8_t>& pf_unused, Reuse* reuse) {
  c.remove(v);
  pol.on_evict(v);
  if (reuse) reuse->evicted(v, c.pool(v));
  if (pf_unused[v]) {
    pf_unused[v] = 0;
    ++out.pf_wasted;
  }
}

template <class P>
void insert(Core& c, P& pol, int64_t key, Output& out, std::vector<uint8_t>& pf_unused, Reuse* reuse) {
  if (c.res[key]) return;
  const int64_t p = c.pool(key);
  while (c.members[p] >= c.cap) {
    const int64_t v = pol.victim(p);
    if (v < 0)
      throw std::runtime_error(std::string(CONFIG_TAG) + "cannot insert expert (" + std::to_string(key / c.E) + ", " +
                               std::to_string(key % c.E) + "): all " + std::to_string(c.cap) + " slots of pool " +
                               std::to_string(p) + " hold protected experts; use a larger capacity");
    evict(c, pol, v, out, pf_unused, reuse);
  }
  c.add(key);
  pol.on_insert(key);
  if (reuse) reuse->inserted(key);
}

// prefetch.py's rules over one target layer's scores: the experts wanted, best first.
struct PrefetchChooser {
  std::vector<int64_t> ranked, chosen;
  // _ranked: score > 0, by score descending, ties to the lowest id
  void rank(const double* sc, int64_t E) {
    ranked.clear();
    for (int64_t e = 0; e < E; ++e)
      if (sc[e] > 0.0) ranked.push_back(e);
    std::sort(ranked.begin(), ranked.end(),
              [sc](int64_t x, int64_t y) { return sc[x] > sc[y] || (sc[x] == sc[y] && x < y); });
  }
  template <class Resident>
  const std::vector<int64_t>& choose(int64_t rule, const double* sc, int64_t E, int64_t budget, Resident resident) {
    chosen.clear();
    if (rule == PF_TOPK && budget * 4 <= E) {
      // only the first ``budget`` of the ranking are needed: keep them sorted while scanning the
      // experts in ascending id (a later id never beats an equal score, as in the ranking's tie-break)
      for (int64_t e = 0; e < E; ++e) {
        const double x = sc[e];
        if (!(x > 0.0)) continue;
        const int64_t n = static_cast<int64_t>(chosen.size());
        if (n == budget && !(x > sc[chosen[n - 1]])) continue;
        if (n < budget) chosen.push_back(e);
        int64_t j = n < budget ? n : n - 1;
        while (j > 0 && x > sc[chosen[j - 1]]) {
          chosen[j] = chosen[j - 1];
          --j;
        }
        chosen[j] = e;
      }
    } else if (rule == PF_TOPK) {
      rank(sc, E);
      const size_t m = std::min<size_t>(ranked.size(), static_cast<size_t>(budget));
      chosen.assign(ranked.begin(), ranked.begin() + m);
    } else {  // fill: down to the budget-th expert that is not resident
      rank(sc, E);
      int64_t fetches = 0;
      for (int64_t e : ranked) {
        if (fetches >= budget) break;
        chosen.push_back(e);
        if (!resident(e)) ++fetches;
      }
    }
    return chosen;
  }
};

// moecache/admission.py PredictorGate: per source layer, call the predictor or not, from the ledger of
// what its prefetches were worth (the same arithmetic in the same order).
struct Gate {
  int64_t span, probe_every, min_calls;
  double pred_ms;
  std::vector<uint8_t> on;
  std::vector<double> est, ledger;
  std::vector<int64_t> calls, idle;
  int64_t made = 0, probes = 0, skipped = 0;
  Gate(int64_t L, double pred_ms_, int64_t span_, int64_t probe_every_, int64_t min_calls_)
      : span(span_), probe_every(probe_every_), min_calls(min_calls_), pred_ms(pred_ms_), on(L, 1), est(L, 0.0),
        ledger(L, 0.0), calls(L, 0), idle(L, 0) {}
  void fold(int64_t l) {
    const int64_t n = calls[l];
    if (!n) return;
    const double w = n < span ? 1.0 / static_cast<double>(n) : 1.0 / static_cast<double>(span);
    est[l] += w * (ledger[l] - est[l]);
    ledger[l] = 0.0;
  }
  bool open(int64_t l) {
    if (on[l]) {
      fold(l);
      if (est[l] < 0.0 && calls[l] >= min_calls) {
        on[l] = 0;
        idle[l] = 0;
        ++skipped;
        return false;
      }
    } else {
      ++idle[l];
      if (idle[l] < probe_every) {
        ++skipped;
        return false;
      }
      idle[l] = 0;
      fold(l);
      if (est[l] >= 0.0)
        on[l] = 1;
      else
        ++probes;
    }
    ++calls[l];
    ++made;
    ledger[l] -= pred_ms;
    return true;
  }
  void used(int64_t l, double bonus) { ledger[l] += bonus; }
  int64_t off() const {
    int64_t n = 0;
    for (uint8_t x : on) n += x ? 0 : 1;
    return n;
  }
};

// replay.simulate: one policy (and the predictions) over the laid-out schedule, with timing.
template <class P>
struct Replay {
  const Input& in;
  Core& c;
  P& pol;
  Output& out;
  Predictions* preds;  // null: no predictor
  Timeline& tl;
  std::vector<double> ready_at;
  std::vector<uint8_t> pf_unused;
  std::vector<std::vector<int64_t>> pf_for;  // ring: the experts wanted for step tg at tg % (D + 1)
  Group grp;
  std::vector<int64_t> wave_k, wave_c, miss_k, miss_c;
  std::vector<Job> jobs;
  PrefetchChooser chooser;
  double hx = 0.0;  // host time of the current step so far, beyond t_route (engine_python's hx)
  // the predictor gate (admission gated, prefetching, a policy that reads no scores); null: none
  std::unique_ptr<Gate> gate;
  std::vector<int64_t> pf_src;    // under the gate: a prefetched key's source layer
  std::vector<double> pf_bonus;   // and what its use adds to the gate's ledger
  // the worker queue (copy_queue "worker"); null: the FIFO model
  std::unique_ptr<WorkerQueue> wq;
  struct Target {
    int64_t key, tg, stamp;
  };
  std::vector<Target> pf_log;      // prefetches by target step, in engine_python's pf_target order
  std::vector<int64_t> pf_stamp;   // a key's live entry of pf_log (0: none)
  int64_t stamps = 0;
  std::vector<std::pair<int64_t, double>> pf_batch;  // this step's prefetches (key, priority)
  std::unique_ptr<Reuse> reuse;   // the rule's re-demand rate (admission cost or gated, prefetching); null: none

  Replay(const Input& in_, Core& c_, P& pol_, Output& out_, Predictions* preds_)
      : in(in_), c(c_), pol(pol_), out(out_), preds(preds_), tl(out_.tl), ready_at(c_.LE, 0.0),
        pf_unused(c_.LE, 0), pf_for(in_.depth + 1), grp(in_, c_) {
    if (in.admission == AD_GATED && in.depth > 0 && preds && !preds->score_depth) {
      gate = std::make_unique<Gate>(c.L, in.pred_host, in.gate_span, in.gate_probe_every, in.gate_min_calls);
      pf_src.assign(c.LE, -1);
      pf_bonus.assign(c.LE, 0.0);
    }
    if (in.worker_queue) {
      wq = std::make_unique<WorkerQueue>(tl, in.copy_ms, c.LE);
      pf_stamp.assign(c.LE, 0);
    }
    if (in.admission != AD_NONE && in.depth > 0) reuse = std::make_unique<Reuse>(c.LE, c.pools);
  }

  void run() {
    const int64_t L = c.L, K = c.K;
    const int64_t D = in.depth;
    int64_t rows_seen = -1;
    for (int64_t u = 0; u < in.units; ++u) {
      const int64_t a = in.unit_start[u], b = in.unit_start[u + 1], rows = b - a;
      if (in.new_request[u]) {
        pol.begin_request();
        if (preds) preds->reset(rows);
        rows_seen = rows;
      } else if (preds && rows != rows_seen) {  // the predictor protocol: a new row count is a new request
        preds->reset(rows);
        rows_seen = rows;
      }
      const double ne_ms = in.ne_tab[rows];
      const int64_t pf_budget = in.budget ? in.budget : std::min(c.E, K * rows);
      for (int64_t l = 0; l < L; ++l) {
        const int64_t g = u * L + l;
        c.now = g;
        if (D) pf_for[g % (D + 1)].clear();
        pol.begin_layer(l);
        grp.make(in, c, a, b, l);
        const double t_route = tl.non_expert(ne_ms, in.slow);
        hx = in.layer_host;
        if (wq) {
          wq->advance(t_route + in.layer_host, ready_at);
          if (!pf_log.empty()) settle(g);
        }
        const double* slots = nullptr;
        if (preds) {
          slots = preds->step(l, in.ids + (a * L + l) * K, L * K, rows);
          if (preds->score_depth) pol.on_scores((l + preds->score_depth) % L, slots + D * c.E);
        }
        if (grp.n) demand(g, t_route);
        // the predictor is asked (its predictions were made above, but read and paid for only where asked)
        const bool asked = preds && (!gate || gate->open(l));
        double hp = (asked || (preds && preds->score_depth)) ? t_route + (hx + in.pred_host)
                                                              : t_route + hx;  // the host after launching the experts
        if (D && asked) prefetch(g, l, hp, slots, pf_budget, ne_ms);
        if (!pf_batch.empty()) {  // the runtime submits a step's prefetches in one call
          for (const auto& kp : pf_batch) {
            wq->submit(hp, kp.first, kp.second);
            wq->note_issued(hp);
          }
          pf_batch.clear();
        }
        tl.join(hp);  // the next layer is launched once the host is done
      }
    }
    if (gate) {
      out.gated = true;
      out.gate_calls = gate->made;
      out.gate_probes = gate->probes;
      out.gate_skipped = gate->skipped;
      out.gate_off = gate->off();
    }
    if (wq) out.cancelled = wq->cancelled;
  }

  // The worker queue: step g's prefetches; the queued ones its routing did not pick are cancelled.
  void settle(int64_t g) {
    const int64_t* keys = grp.keys.data();
    const int64_t n = grp.n;
    size_t w = 0;
    for (size_t i = 0; i < pf_log.size(); ++i) {
      const Target t = pf_log[i];
      if (pf_stamp[t.key] != t.stamp) continue;  // left the table (evicted)
      if (t.tg != g) {
        pf_log[w++] = t;
        continue;
      }
      pf_stamp[t.key] = 0;
      if (!std::binary_search(keys, keys + n, t.key) && wq->cancel(t.key)) {
        c.remove(t.key);
        pol.on_evict(t.key);
        pf_unused[t.key] = 0;
      }
    }
    pf_log.resize(w);
  }

  // insert() under the worker queue: each victim's queued copy is cancelled; returns the victims.
  int64_t insert_worker(int64_t key) {
    if (c.res[key]) return 0;
    const int64_t p = c.pool(key);
    int64_t n = 0;
    while (c.members[p] >= c.cap) {
      const int64_t v = pol.victim(p);
      if (v < 0)
        throw std::runtime_error(std::string(CONFIG_TAG) + "cannot insert expert (" + std::to_string(key / c.E) +
                                 ", " + std::to_string(key % c.E) + "): all " + std::to_string(c.cap) +
                                 " slots of pool " + std::to_string(p) + " hold protected experts; use a larger capacity");
      evict(c, pol, v, out, pf_unused, reuse.get());
      pf_stamp[v] = 0;
      wq->cancel(v);
      ++n;
    }
    c.add(key);
    pol.on_insert(key);
    if (reuse) reuse->inserted(key);
    return n;
  }

  void demand(int64_t g, double t_route) {
    const int64_t* keys = grp.keys.data();
    const int64_t* counts = grp.counts.data();
    const int64_t n = grp.n;
    const bool asks = in.miss_rule == M_POLICY || in.miss_rule == M_MIN;
    pol.begin_step(keys, n);
    out.needs += n;
    // hits first, then misses, each in ascending key order
    wave_k.clear();
    wave_c.clear();
    miss_k.clear();
    miss_c.clear();
    jobs.clear();
    size_t nhits = 0;
    const double h0 = t_route + in.layer_host;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t key = keys[i], cnt = counts[i];
      // (only ids listed twice in a row make counts above the unit's rows: Python then widens)
      if (cnt >= in.tab_len) throw std::runtime_error(std::string(TABLE_TAG) + std::to_string(cnt));
      ++c.clock;
      pol.on_access(key, cnt);
      out.accesses += cnt;
      if (c.res[key]) {
        out.hits += cnt;
        if (wq && wq->queued(key)) {  // its prefetch still queued: issued now (counted when it was queued)
          ready_at[key] = wq->promote(key, h0);
        }
        if (ready_at[key] <= t_route) out.ready += cnt;
        if (pf_unused[key]) {
          pf_unused[key] = 0;
          ++out.pf_used;
          if (gate) gate->used(pf_src[key], pf_bonus[key]);
        }
        wave_k.push_back(key);
        wave_c.push_back(cnt);
        ++nhits;
        if (in.record) out.rec.insert(out.rec.end(), {g, key, cnt, O_HIT});
      } else {
        miss_k.push_back(key);
        miss_c.push_back(cnt);
        if (reuse) reuse->demanded(key, c.pool(key));
      }
    }
    double h = t_route + in.layer_host;  // the host's clock: routing sync and policy done
    if (miss_k.empty()) {
      for (size_t i = 0; i < nhits; ++i) jobs.push_back({ready_at[wave_k[i]], wave_k[i], in.gpu_tab[wave_c[i]]});
      tl.join(h);
      tl.compute(jobs, in.slow);
      return;
    }
    wave_k.insert(wave_k.end(), miss_k.begin(), miss_k.end());
    wave_c.insert(wave_c.end(), miss_c.begin(), miss_c.end());
    for (int64_t w0 = 0; w0 < n; w0 += c.cap) {
      const int64_t w1 = std::min(n, w0 + c.cap);
      if (w0 && tl.gpu > h) h = tl.gpu;  // the previous wave's compute has ended: its slots are free
      if (wq) wq->advance(h, ready_at);
      c.protect(wave_k.data() + w0, w1 - w0);
      pol.park(wave_k.data() + w0, w1 - w0);
      jobs.clear();
      double cpu_end = -1.0;
      for (int64_t i = w0; i < w1; ++i) {
        const int64_t key = wave_k[i], cnt = wave_c[i];
        const double g_ms = in.gpu_tab[cnt];
        if (c.res[key]) {
          jobs.push_back({ready_at[key], key, g_ms});
          continue;
        }
        const bool admitted = asks ? pol.admit(key) : true;
        bool copied;
        switch (in.miss_rule) {
          case M_COPY: copied = true; break;
          case M_CPU: copied = false; break;
          case M_POLICY: copied = admitted; break;
          default: {  // min: ties go to the copy
            if (!admitted) {
              copied = false;
            } else {
              const double cq = wq ? wq->issued_free : tl.copy;  // worker: the runtime's own estimate
              const double copy_done = (h > cq ? h : cq) + in.copy_ms + g_ms;
              const double cpu_done = (h > tl.cpu ? h : tl.cpu) + in.cpu_tab[cnt];
              copied = !(cpu_done < copy_done);
            }
          }
        }
        if (in.record) out.rec.insert(out.rec.end(), {g, key, cnt, copied ? O_COPY : O_CPU});
        if (copied) {
          if (wq) {  // the pool scan only where the insert evicted
            const double ev = static_cast<double>(insert_worker(key));
            h = h + (in.copy_host - in.evict_host) + in.evict_host * ev;
            hx = hx + (in.copy_host - in.evict_host) + in.evict_host * ev;
          } else {
            insert(c, pol, key, out, pf_unused, reuse.get());
            h = h + in.copy_host;
            hx = hx + in.copy_host;
          }
          const double end = tl.issue_copy(h, in.copy_ms);
          if (wq) wq->note_issued(h);
          ready_at[key] = end;
          ++out.loads;
          jobs.push_back({end, key, g_ms});
        } else {
          const double end = tl.issue_cpu(h, in.cpu_tab[cnt]);
          ++out.cpu_runs;
          if (end > cpu_end) cpu_end = end;
        }
      }
      pol.unpark();
      tl.join(h);
      tl.compute(jobs, in.slow);
      if (cpu_end >= 0.0) tl.join(cpu_end + in.hybrid_ms);
    }
  }

  // For d = 1..D: the rule picks the experts wanted for step g + d from the depth's scores; those
  // not resident are inserted, never evicting one the current step needs nor one wanted for the
  // same upcoming step (resident or fetched); a fetch that finds no other victim is skipped.
  void prefetch(int64_t g, int64_t l, double& hp, const double* slots, int64_t budget, double ne_ms) {
    const int64_t D = in.depth, E = c.E, L = c.L;
    const int64_t* now_keys = grp.keys.data();
    const int64_t n_now = grp.n;
    const bool gated = in.admission != AD_NONE;  // weighed by the rule (cost, gated)
    double step_ms = 0.0;  // the step's expert compute, summed in key order (admission.lead_ms)
    for (int64_t i = 0; i < n_now; ++i) step_ms += in.gpu_tab[grp.counts[i]];
    for (int64_t d = 1; d <= D; ++d) {
      const int64_t base = ((l + d) % L) * E;
      const double* scores = slots + (d - 1) * E;
      const auto& chosen = chooser.choose(in.prefetch_rule, scores, E, budget,
                                          [&](int64_t e) { return c.res[base + e] != 0; });
      if (chosen.empty()) continue;
      auto& wanted = pf_for[(g + d) % (D + 1)];
      for (int64_t e : chosen)
        if (c.res[base + e]) wanted.push_back(base + e);
      const double layer_ms = ne_ms + in.layer_host + step_ms;
      bool protected_now = false;
      for (int64_t e : chosen) {
        const int64_t key = base + e;
        if (c.res[key]) continue;
        if (!protected_now) {  // protected: the current step's experts and those wanted for g + d
          c.protect(now_keys, n_now);
          for (int64_t k : wanted) c.protect_add(k);
          protected_now = true;
        }
        const int64_t p = c.pool(key);
        int64_t v = -1;
        if (c.members[p] >= c.cap) {
          v = pol.victim(p);
          if (v < 0) {  // every resident of the pool is protected
            ++out.pf_skipped;
            continue;
          }
        }
        if (gated) {
          double victim_pred = 0.0, victim_prob = 0.0;  // the predictor's score; its worth (admission.victim_worth)
          if (v >= 0) {
            const int64_t vl = v / E;
            for (int64_t dd = 1; dd <= D; ++dd) {
              if ((l + dd) % L == vl) {
                victim_pred = probability(slots[(dd - 1) * E + (v - vl * E)]);
                break;
              }
            }
            const double rate = reuse->rate();
            victim_prob = victim_pred > rate ? victim_pred : rate;
          }
          const double now = hp + in.pf_host;  // when this copy would be issued
          const double first = (tl.gpu > now ? tl.gpu - now : 0.0) + ne_ms + in.layer_host;
          const double lead = first + static_cast<double>(d - 1) * layer_ms;
          double backlog = (wq ? wq->issued_free : tl.copy) - now;  // worker: the runtime's own estimate
          if (backlog < 0.0) backlog = 0.0;
          // worker: plus this layer's prefetches already admitted (submitted together after the loop)
          if (wq) backlog += static_cast<double>(pf_batch.size()) * in.copy_ms;
          double host = now - tl.gpu;  // the host time it adds to the step, where the host is behind the GPU
          if (host < 0.0) host = 0.0;
          if (host > in.pf_host) host = in.pf_host;
          if (!admit(probability(scores[e]), victim_prob, backlog, first, lead, in.copy_ms, host)) {
            ++out.pf_refused;
            continue;
          }
          if (gate) {  // admission.outcome_values
            const double early = lead - backlog;
            const double saved = in.copy_ms < early ? in.copy_ms : early;
            double block = backlog + in.copy_ms - first;
            if (block < 0.0) block = 0.0;
            gate->ledger[l] += -block - victim_pred * in.copy_ms - host;  // the gate: the predictor's score alone
            pf_src[key] = l;
            pf_bonus[key] = lead <= first ? saved + block : saved;
          }
        }
        double ev = 0.0;
        if (v >= 0) {
          evict(c, pol, v, out, pf_unused, reuse.get());
          if (wq) {
            pf_stamp[v] = 0;
            wq->cancel(v);
            ev = 1.0;
          }
        }
        c.add(key);
        pol.on_insert(key);
        if (reuse) reuse->inserted(key);
        if (!wq) {
          hp = hp + in.pf_host;
          ready_at[key] = tl.issue_copy(hp, in.copy_ms);
        } else {  // queued with the step's others; priority = layers ahead + 1 - probability
          hp = hp + (in.pf_host - in.evict_host) + in.evict_host * ev;
          pf_batch.push_back({key, static_cast<double>(d) + (1.0 - probability(scores[e]))});
          ready_at[key] = std::numeric_limits<double>::infinity();
          pf_stamp[key] = ++stamps;
          pf_log.push_back({key, g + d, stamps});
        }
        pf_unused[key] = 1;
        wanted.push_back(key);
        c.protect_add(key);
        ++out.prefetches;
      }
    }
  }

  // moecache/admission.py candidate_probability and admit_prefetch, in the same order of operations.
  static double probability(double score) { return score < 1.0 ? score : 1.0; }
  static bool admit(double prob, double victim_prob, double backlog, double first, double lead, double copy_ms,
                    double host) {
    if (backlog >= lead) return false;  // late: it could not start before the target layer
    const double early = lead - backlog;
    const double saved = copy_ms < early ? copy_ms : early;
    double block = backlog + copy_ms - first;
    if (block < 0.0) block = 0.0;
    const double weight = lead <= first ? 1.0 - prob : 1.0;
    return prob * saved - weight * block - victim_prob * copy_ms - host > 0.0;
  }
};

template <class P>
void run_replay(const Input& in, Core& c, P& pol, Output& out, Predictions* preds) {
  Replay<P> r(in, c, pol, out, preds);
  r.run();
}

}  // namespace

void run_sim(const Input& in, int64_t L, int64_t E, int64_t K, int64_t capacity, bool global_scope,
             PolicyArgs& pol_args, const Tuning& tune, Predictions* pr, Output& out) {
  const int64_t policy = pol_args.code;
  Core c(L, E, K, capacity, global_scope);
  switch (policy) {
    case P_LRU:
    case P_FIFO: {
      LRUPolicy p(c, policy == P_FIFO);
      run_replay(in, c, p, out, pr);
      break;
    }
    case P_STATIC: {
      StaticPolicy p(c, std::move(pol_args.pinned), std::move(pol_args.fit_counts));
      run_replay(in, c, p, out, pr);
      break;
    }
    case P_LFU: {
      LFUPolicy p(c, tune, pol_args.int_param);
      run_replay(in, c, p, out, pr);
      break;
    }
    case P_LRFU: {
      LRFUPolicy p(c, tune, pol_args.float_param);
      run_replay(in, c, p, out, pr);
      break;
    }
    case P_ACTIVATION:
    case P_PREDICTED: {
      ActivationPolicy p(c, policy == P_PREDICTED, pol_args.g, pol_args.alpha, pol_args.pow_acc, pol_args.pow_rank,
                         pol_args.pow_len, tune);
      run_replay(in, c, p, out, pr);
      break;
    }
    default: {
      Future f = build_future(in, c, policy == P_BYPASS, in.depth > 0);
      BeladyPolicy p(c, tune, f, policy == P_BYPASS);
      run_replay(in, c, p, out, pr);
    }
  }
}

}  // namespace moecache_sim
