// moecache._C.sim_replay: the trace-replay simulator's core loop in C++.
//
// The readable specification is moecache/sim/engine_python.py with the policies in policies/*.py, the
// prefetch rules in moecache/sim/prefetch.py and the timing model in moecache/cost/timing.py; this
// file follows them step by step, doing every float operation in the same order and precision
// (IEEE double, no fast-math, no FMA contraction on the x86-64 baseline), so a run here reproduces
// the Python reference's result row exactly. The differential tests (tests/test_sim_cpp.py)
// compare both with ==.
//
// Supported here: every registered policy (lru, fifo, lfu, lrfu, static, activation, predicted,
// belady, belady_bypass); both scopes; miss rules copy, cpu, policy, min; step and decode
// schedules; the per-need record; prefetch (rules topk and fill, any depth and budget) driven by a
// predictor. The trace-only predictors prior, temporal and transition run here (sim_predict.h);
// any other predictor runs in Python and streams its predictions in chunks of a few hundred steps.
//
// Inputs arrive already validated and laid out by moecache/sim/engine_cpp.py (ids in replay order,
// unit starts, per-token-count cost tables computed by the Python hardware profile, and for
// ``activation`` / ``predicted`` the powers g**n computed by the very Python and numpy calls the
// policy makes, so the costs and powers are the very same doubles). The GIL is released for the
// whole replay (taken back only to fetch the next chunk of a Python predictor's stream).
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "sim_predict.h"

namespace moecache_sim {

constexpr int64_t NEVER = int64_t(1) << 62;  // Future.NEVER

enum PolicyCode : int64_t {
  P_LRU = 0, P_FIFO = 1, P_LFU = 2, P_LRFU = 3, P_STATIC = 4, P_BELADY = 5, P_BYPASS = 6, P_ACTIVATION = 7,
  P_PREDICTED = 8
};
enum PredictorCode : int64_t { PR_NONE = -1, PR_STREAM = 0, PR_PRIOR = 1, PR_TEMPORAL = 2, PR_TRANSITION = 3 };
enum PrefetchCode : int64_t { PF_TOPK = 0, PF_FILL = 1 };
enum MissCode : int64_t { M_COPY = 0, M_CPU = 1, M_POLICY = 2, M_MIN = 3 };
enum Outcome : int64_t { O_HIT = 0, O_COPY = 1, O_CPU = 2 };

// The cost tables are too short for a token count: engine_cpp.py retries with longer ones.
const char* const TABLE_TAG = "TableTooShort: ";

// ---- timing model (timing.Timeline) ----------------------------------------------------------
struct Job {
  double ready;
  int64_t key;
  double ms;
  bool operator<(const Job& o) const { return ready < o.ready || (ready == o.ready && key < o.key); }
};

struct Timeline {
  double gpu = 0.0, copy = 0.0, cpu = 0.0, gpu_busy = 0.0, copy_busy = 0.0, cpu_busy = 0.0;
  double non_expert(double ms) {
    gpu += ms;
    gpu_busy += ms;
    return gpu;
  }
  double issue_copy(double t, double ms) {
    const double start = t > copy ? t : copy;
    copy = start + ms;
    copy_busy += ms;
    return copy;
  }
  double issue_cpu(double t, double ms) {
    const double start = t > cpu ? t : cpu;
    cpu = start + ms;
    cpu_busy += ms;
    return cpu;
  }
  void compute(std::vector<Job>& jobs) {
    // keys are distinct within a wave, so (ready, key) is the full tuple order of the reference
    if (jobs.size() > 16) {
      std::sort(jobs.begin(), jobs.end());
    } else {
      for (size_t i = 1; i < jobs.size(); ++i) {
        const Job x = jobs[i];
        size_t j = i;
        while (j > 0 && x < jobs[j - 1]) {
          jobs[j] = jobs[j - 1];
          --j;
        }
        jobs[j] = x;
      }
    }
    double g = gpu, busy = gpu_busy;
    for (const Job& j : jobs) {
      if (j.ready > g) g = j.ready;
      g += j.ms;
      busy += j.ms;
    }
    gpu = g;
    gpu_busy = busy;
  }
  void join(double t) {
    if (t > gpu) gpu = t;
  }
};

// ---- residency shared by every policy (policies/base.py) -------------------------------------
struct Core {
  int64_t L, E, K, LE, cap, pools;
  bool global;
  std::vector<uint8_t> res;       // resident?
  std::vector<int64_t> members;   // residents per pool
  std::vector<std::vector<int64_t>> mem;  // the residents of each pool (unordered; for scans)
  std::vector<int64_t> pos;       // index of a resident key in mem[pool]
  std::vector<uint32_t> prot;     // prot[key] == stamp: protected right now
  std::vector<int64_t> prot_list; // the protected keys (for belady_bypass.admit)
  uint32_t stamp = 0;
  int64_t clock = 0;  // demand accesses so far
  int64_t now = 0;    // the replay step being served (Future.seek)

  Core(int64_t L_, int64_t E_, int64_t K_, int64_t cap_, bool global_)
      : L(L_), E(E_), K(K_), LE(L_ * E_), cap(cap_), pools(global_ ? 1 : L_), global(global_),
        res(L_ * E_, 0), members(global_ ? 1 : L_, 0), mem(global_ ? 1 : L_), pos(L_ * E_, 0), prot(L_ * E_, 0) {}

  void add(int64_t key) {
    auto& m = mem[pool(key)];
    pos[key] = static_cast<int64_t>(m.size());
    m.push_back(key);
    res[key] = 1;
    ++members[pool(key)];
  }
  void remove(int64_t key) {
    auto& m = mem[pool(key)];
    const int64_t i = pos[key], last = m.back();
    m[i] = last;
    pos[last] = i;
    m.pop_back();
    res[key] = 0;
    --members[pool(key)];
  }

  int64_t pool(int64_t key) const { return global ? 0 : key / E; }
  bool is_prot(int64_t key) const { return prot[key] == stamp; }
  void protect(const int64_t* keys, int64_t n) {
    ++stamp;
    if (stamp == 0) {  // wrapped: clear the marks once every 4G waves
      std::fill(prot.begin(), prot.end(), 0);
      stamp = 1;
    }
    prot_list.assign(keys, keys + n);
    for (int64_t i = 0; i < n; ++i) prot[keys[i]] = stamp;
  }
  // One more protected key (prefetch: an expert wanted for the same upcoming step).
  void protect_add(int64_t key) { prot[key] = stamp; }
};

// ---- order structures ------------------------------------------------------------------------
// Intrusive doubly linked list per pool (OrderedDict of lru / fifo / static): node LE + p is
// pool p's sentinel; iteration runs from the oldest (sentinel's next) to the newest.
struct Lists {
  std::vector<int64_t> prev, next;
  int64_t LE;
  Lists(int64_t LE_, int64_t pools) : prev(LE_ + pools), next(LE_ + pools), LE(LE_) {
    for (int64_t p = 0; p < pools; ++p) prev[LE_ + p] = next[LE_ + p] = LE_ + p;
  }
  void append(int64_t pool, int64_t key) {
    const int64_t s = LE + pool, last = prev[s];
    next[last] = key;
    prev[key] = last;
    next[key] = s;
    prev[s] = key;
  }
  void unlink(int64_t key) {
    next[prev[key]] = next[key];
    prev[next[key]] = prev[key];
  }
  void to_end(int64_t pool, int64_t key) {
    unlink(key);
    append(pool, key);
  }
};

// Priority of the heap policies, compared lexicographically (f, a, b, c, key); the unused fields
// stay 0. lfu: (count, last); lrfu: f = K; belady: a = -next use; belady_bypass: a, b, c = the next
// three uses negated.
struct Prio {
  double f = 0.0;
  int64_t a = 0, b = 0, c = 0, key = 0;
  bool operator<(const Prio& o) const {
    if (f != o.f) return f < o.f;
    if (a != o.a) return a < o.a;
    if (b != o.b) return b < o.b;
    if (c != o.c) return c < o.c;
    return key < o.key;
  }
  bool operator==(const Prio& o) const { return f == o.f && a == o.a && b == o.b && c == o.c && key == o.key; }
};

// The order structure of the score policies (the role of policies/_heap.KeyedHeap): per pool, the
// residents by current priority; ``min`` is the unprotected resident with the smallest priority and
// ``smallest(n)`` the n smallest, in order. Priorities are distinct (they end in the key), so any
// structure that finds the minimum gives the reference's answer. Two layouts:
//
// * pools of at most SCAN_MAX slots keep no order at all: the victim is found by scanning the
//   pool's residents (cheaper than keeping an order current on every access);
// * larger pools keep an indexed binary min-heap (position of each key, sifted in place when its
//   priority changes, so no stale entries); the unprotected minimum is found by a best-first walk
//   from the root that only descends below protected keys (a wave protects few keys).
// Defaults of the two layout thresholds; sim_replay takes them as arguments so that the tests can
// force either layout on small traces (the answers never depend on them).
constexpr int64_t SCAN_MAX = 64;  // pools of at most this many slots are scanned
constexpr int64_t PARK_MIN = 17;  // waves of at least this many keys park their protected keys

struct Tuning {
  int64_t scan_max = SCAN_MAX, park_min = PARK_MIN;
};

struct Heaps {
  std::vector<std::vector<int64_t>> h;  // per pool: keys in heap order (heap layout only)
  std::vector<Prio> cur;                // current priority of each key
  std::vector<int64_t> hpos, kpool;     // heap index of a key (-1: none) and its pool
  std::vector<int64_t> frontier;        // scratch of the best-first walk: heap indices
  bool scan;
  // Parking: during a large wave its protected keys leave the heap (they cannot be victims), so
  // the walk does not wade through them; they return when the wave ends. Same answers.
  std::vector<int64_t> parked;
  std::vector<uint8_t> is_parked;
  bool parking = false;
  int64_t park_min;
  Heaps(int64_t LE, int64_t pools, int64_t cap, const Tuning& t)
      : h(pools), cur(LE), hpos(LE, -1), kpool(LE, 0), scan(cap <= t.scan_max), is_parked(LE, 0),
        park_min(t.park_min) {}

  bool lt(int64_t a, int64_t b) const { return cur[a] < cur[b]; }
  void sift_up(std::vector<int64_t>& v, int64_t i) {
    const int64_t k = v[i];
    while (i > 0) {
      const int64_t parent = (i - 1) / 2;
      if (!lt(k, v[parent])) break;
      v[i] = v[parent];
      hpos[v[i]] = i;
      i = parent;
    }
    v[i] = k;
    hpos[k] = i;
  }
  void sift_down(std::vector<int64_t>& v, int64_t i) {
    const int64_t n = static_cast<int64_t>(v.size()), k = v[i];
    while (true) {
      int64_t child = 2 * i + 1;
      if (child >= n) break;
      if (child + 1 < n && lt(v[child + 1], v[child])) ++child;
      if (!lt(v[child], k)) break;
      v[i] = v[child];
      hpos[v[i]] = i;
      i = child;
    }
    v[i] = k;
    hpos[k] = i;
  }
  void set(int64_t pool, const Prio& p) {
    const int64_t key = p.key;
    cur[key] = p;
    if (scan) return;
    kpool[key] = pool;
    if (is_parked[key]) return;
    if (parking && hpos[key] < 0) {  // a protected key arriving during the wave waits outside
      is_parked[key] = 1;
      parked.push_back(key);
      return;
    }
    auto& v = h[pool];
    if (hpos[key] < 0) {
      kpool[key] = pool;
      v.push_back(key);
      sift_up(v, static_cast<int64_t>(v.size()) - 1);
    } else {
      sift_up(v, hpos[key]);
      sift_down(v, hpos[key]);
    }
  }
  void remove_at(int64_t key) {
    auto& v = h[kpool[key]];
    const int64_t i = hpos[key], last = v.back();
    v.pop_back();
    hpos[key] = -1;
    if (last == key) return;
    v[i] = last;
    hpos[last] = i;
    sift_up(v, i);
    sift_down(v, hpos[last]);
  }
  // The wave's protected keys (all of them are in ``keys``) leave the heap until ``unpark``.
  void park(const int64_t* keys, int64_t n) {
    if (scan || n < park_min) return;  // small waves: the walk passes few protected keys anyway
    parking = true;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t k = keys[i];
      if (hpos[k] >= 0) {
        remove_at(k);
        is_parked[k] = 1;
        parked.push_back(k);
      }
    }
  }
  void unpark() {
    if (!parking) return;
    parking = false;
    for (int64_t k : parked) {
      if (!is_parked[k]) continue;
      is_parked[k] = 0;
      auto& v = h[kpool[k]];
      v.push_back(k);
      sift_up(v, static_cast<int64_t>(v.size()) - 1);
    }
    parked.clear();
  }
  void discard(int64_t key) {
    if (scan) return;
    if (is_parked[key]) {  // (protected keys are never evicted; kept for safety)
      is_parked[key] = 0;
      return;
    }
    if (hpos[key] < 0) return;
    remove_at(key);
  }
  void clear() {
    for (auto& v : h) {
      for (int64_t k : v) hpos[k] = -1;
      v.clear();
    }
  }

  // Visit the pool's unprotected residents in ascending priority until fn returns true.
  template <class Fn>
  void walk(int64_t pool, const Core& c, Fn fn) {
    const auto& v = h[pool];
    if (v.empty()) return;
    auto greater = [&](int64_t i, int64_t j) { return lt(v[j], v[i]); };
    frontier.clear();
    frontier.push_back(0);
    while (!frontier.empty()) {
      std::pop_heap(frontier.begin(), frontier.end(), greater);
      const int64_t i = frontier.back();
      frontier.pop_back();
      if (!c.is_prot(v[i]) && fn(v[i])) return;
      const int64_t n = static_cast<int64_t>(v.size());
      for (int64_t ch = 2 * i + 1; ch <= 2 * i + 2 && ch < n; ++ch) {
        frontier.push_back(ch);
        std::push_heap(frontier.begin(), frontier.end(), greater);
      }
    }
  }
  int64_t min(int64_t pool, const Core& c) {
    if (scan) {
      const Prio* best = nullptr;
      for (int64_t k : c.mem[pool]) {
        if (c.is_prot(k)) continue;
        if (best == nullptr || cur[k] < *best) best = &cur[k];
      }
      return best ? best->key : -1;
    }
    int64_t found = -1;
    walk(pool, c, [&](int64_t k) {
      found = k;
      return true;
    });
    return found;
  }
  void smallest(int64_t pool, int64_t n, const Core& c, std::vector<Prio>& out) {
    out.clear();
    if (n <= 0) return;
    if (scan) {
      for (int64_t k : c.mem[pool])
        if (!c.is_prot(k)) out.push_back(cur[k]);
      const size_t m = std::min<size_t>(out.size(), static_cast<size_t>(n));
      std::partial_sort(out.begin(), out.begin() + m, out.end());
      out.resize(m);
      return;
    }
    walk(pool, c, [&](int64_t k) {
      out.push_back(cur[k]);
      return static_cast<int64_t>(out.size()) >= n;
    });
  }
};

// schedule.Future, laid out along the replay: every need (one key of one step, in replay order)
// knows the step of its key's next need and that need's index. Without prefetch the replay only
// ever asks for the next uses of keys of the step being served (accesses, demand inserts, bypass
// decisions over the wave), so ``begin_step`` maps those keys to their needs and a lookup reads the
// arrays in replay order (cache friendly) instead of searching per-key use lists; the answers are
// the same: the first steps after ``now`` that need the key. With prefetch, an expert of a later
// layer arrives too: for such keys (``by_key``) each key's steps are also listed in order, with a
// cursor per key that only moves forward (``now`` never decreases), amortised O(1) per lookup.
struct Future {
  std::vector<int64_t> next_step;  // per need: the step of the key's next need (NEVER: none)
  std::vector<int64_t> next_need;  // per need: the index of that need (-1: none); belady_bypass only
  std::vector<int64_t> need_of;    // per key of the current step: its need index
  int64_t base = 0;                // index of the current step's first need
  int64_t last_n = 0;              // needs of the previous step with needs
  bool by_key = false;             // the per-key lists below exist
  std::vector<int64_t> use_off, use_step, cursor, step_of;  // CSR of each key's steps; cursor; step of need_of

  void begin_step(const int64_t* keys, int64_t n, int64_t g) {
    base += last_n;
    last_n = n;
    for (int64_t i = 0; i < n; ++i) need_of[keys[i]] = base + i;
    if (by_key)
      for (int64_t i = 0; i < n; ++i) step_of[keys[i]] = g;
  }
  bool current(int64_t key, int64_t now) const { return !by_key || step_of[key] == now; }
  // Index into use_step of the key's first use after now (its end when none).
  int64_t first_after(int64_t key, int64_t now) {
    int64_t& i = cursor[key];
    const int64_t end = use_off[key + 1];
    while (i < end && use_step[i] <= now) ++i;
    return i;
  }
  int64_t next_use(int64_t key, int64_t now) {
    if (current(key, now)) return next_step[need_of[key]];
    const int64_t i = first_after(key, now);
    return i < use_off[key + 1] ? use_step[i] : NEVER;
  }
  // The first three uses after now, padded with NEVER.
  void next3(int64_t key, int64_t now, int64_t out[3]) {
    if (current(key, now)) {
      const int64_t i = need_of[key];
      out[0] = next_step[i];
      const int64_t j = next_need[i];
      out[1] = j >= 0 ? next_step[j] : NEVER;
      const int64_t j2 = j >= 0 ? next_need[j] : -1;
      out[2] = j2 >= 0 ? next_step[j2] : NEVER;
      return;
    }
    const int64_t i = first_after(key, now), end = use_off[key + 1];
    for (int64_t j = 0; j < 3; ++j) out[j] = i + j < end ? use_step[i + j] : NEVER;
  }
};

// ---- policies (one struct each; the driver is a template over them) --------------------------
// The request, layer and score hooks of policies/base.py; only activation and predicted use them.
struct NoRequestHooks {
  void begin_request() {}
  void begin_layer(int64_t) {}
  void on_scores(int64_t, const double*) {}
};

struct LRUPolicy : NoRequestHooks {  // lru.py; with fifo = true, fifo.py (accesses change nothing)
  Core& c;
  Lists lists;
  bool fifo;
  LRUPolicy(Core& c_, bool fifo_) : c(c_), lists(c_.LE, c_.pools), fifo(fifo_) {}
  void on_access(int64_t key, int64_t) {
    if (!fifo && c.res[key]) lists.to_end(c.pool(key), key);
  }
  void on_insert(int64_t key) { lists.append(c.pool(key), key); }
  void on_evict(int64_t key) { lists.unlink(key); }
  bool admit(int64_t) { return true; }
  void begin_step(const int64_t*, int64_t) {}
  void park(const int64_t*, int64_t) {}
  void unpark() {}
  int64_t victim(int64_t pool) {
    const int64_t s = c.LE + pool;
    for (int64_t k = lists.next[s]; k != s; k = lists.next[k])
      if (!c.is_prot(k)) return k;
    return -1;
  }
};

// static.py: LRU order (the same list hooks) for the scratch slots; the victim skips pinned experts.
struct StaticPolicy : LRUPolicy {
  std::vector<uint8_t> pinned;
  std::vector<int64_t> count;
  StaticPolicy(Core& c_, std::vector<uint8_t> pinned_, std::vector<int64_t> count_)
      : LRUPolicy(c_, false), pinned(std::move(pinned_)), count(std::move(count_)) {}
  int64_t victim(int64_t pool) {
    const int64_t s = c.LE + pool;
    for (int64_t k = lists.next[s]; k != s; k = lists.next[k])
      if (!pinned[k] && !c.is_prot(k)) return k;
    int64_t best = -1;
    for (int64_t k = lists.next[s]; k != s; k = lists.next[k]) {
      if (c.is_prot(k)) continue;
      if (best < 0 || count[k] < count[best] || (count[k] == count[best] && k < best)) best = k;
    }
    return best;
  }
};

struct LFUPolicy : NoRequestHooks {  // lfu.py
  Core& c;
  Heaps heaps;
  int64_t period, next_halving;
  std::vector<int64_t> count, last;
  LFUPolicy(Core& c_, const Tuning& t_, int64_t period_)
      : c(c_), heaps(c_.LE, c_.pools, c_.cap, t_), period(period_), next_halving(period_), count(c_.LE, 0), last(c_.LE, 0) {}
  Prio prio(int64_t key) const {
    Prio p;
    p.a = count[key];
    p.b = last[key];
    p.key = key;
    return p;
  }
  void halve() {
    next_halving += period;
    for (auto& x : count) x >>= 1;  // keys never used stay 0, as in the reference's dict
    heaps.clear();
    for (int64_t p = 0; p < c.pools; ++p)
      for (int64_t k : c.mem[p]) heaps.set(p, prio(k));
  }
  void on_access(int64_t key, int64_t cnt) {
    if (period && c.clock >= next_halving) halve();
    count[key] += cnt;
    last[key] = c.clock;
    if (c.res[key]) {
      const int64_t p = c.pool(key);
      heaps.set(p, prio(key));
    }
  }
  void on_insert(int64_t key) {
    if (last[key] < c.clock) last[key] = c.clock;
    const int64_t p = c.pool(key);
    heaps.set(p, prio(key));
  }
  void on_evict(int64_t key) { heaps.discard(key); }
  bool admit(int64_t) { return true; }
  void begin_step(const int64_t*, int64_t) {}
  void park(const int64_t* keys, int64_t n) { heaps.park(keys, n); }
  void unpark() { heaps.unpark(); }
  int64_t victim(int64_t pool) { return heaps.min(pool, c); }
};

struct LRFUPolicy : NoRequestHooks {  // lrfu.py
  Core& c;
  Heaps heaps;
  double lam;
  std::vector<double> kval;
  std::vector<uint8_t> has;
  LRFUPolicy(Core& c_, const Tuning& t_, double lam_) : c(c_), heaps(c_.LE, c_.pools, c_.cap, t_), lam(lam_), kval(c_.LE, 0.0), has(c_.LE, 0) {}
  void on_access(int64_t key, int64_t cnt) {
    const double now = lam * static_cast<double>(c.clock);
    if (!has[key]) {
      kval[key] = now + std::log2(static_cast<double>(cnt));
      has[key] = 1;
    } else {
      kval[key] = now + std::log2(static_cast<double>(cnt) + std::exp2(kval[key] - now));
    }
    if (c.res[key]) {
      Prio p;
      p.f = kval[key];
      p.key = key;
      const int64_t pl = c.pool(key);
      heaps.set(pl, p);
    }
  }
  void on_insert(int64_t key) {
    Prio p;
    p.f = has[key] ? kval[key] : -std::numeric_limits<double>::infinity();
    p.key = key;
    const int64_t pl = c.pool(key);
    heaps.set(pl, p);
  }
  void on_evict(int64_t key) { heaps.discard(key); }
  bool admit(int64_t) { return true; }
  void begin_step(const int64_t*, int64_t) {}
  void park(const int64_t* keys, int64_t n) { heaps.park(keys, n); }
  void unpark() { heaps.unpark(); }
  int64_t victim(int64_t pool) { return heaps.min(pool, c); }
};

struct BeladyPolicy : NoRequestHooks {  // belady.py; with bypass = true, belady_bypass.py
  Core& c;
  Heaps heaps;
  Future& fut;
  bool bypass;
  std::vector<Prio> worst;
  BeladyPolicy(Core& c_, const Tuning& t_, Future& f_, bool bypass_) : c(c_), heaps(c_.LE, c_.pools, c_.cap, t_), fut(f_), bypass(bypass_) {}
  Prio prio(int64_t key) {
    Prio p;
    p.key = key;
    if (bypass) {
      int64_t u[3];
      fut.next3(key, c.now, u);
      p.a = -u[0];
      p.b = -u[1];
      p.c = -u[2];
    } else {
      p.a = -fut.next_use(key, c.now);
    }
    return p;
  }
  void touch(int64_t key) {
    const int64_t pl = c.pool(key);
    heaps.set(pl, prio(key));
  }
  void on_access(int64_t key, int64_t) {
    if (c.res[key]) touch(key);
  }
  void on_insert(int64_t key) { touch(key); }
  void on_evict(int64_t key) { heaps.discard(key); }
  int64_t victim(int64_t pool) { return heaps.min(pool, c); }
  void begin_step(const int64_t* keys, int64_t n) { fut.begin_step(keys, n, c.now); }
  void park(const int64_t* keys, int64_t n) { heaps.park(keys, n); }
  void unpark() { heaps.unpark(); }

  // rank(k) < rank(o) (sooner is better), ties broken by -key: (rank, -key) tuple order.
  static bool better(const int64_t* r, int64_t k, const int64_t* mine, int64_t key) {
    for (int j = 0; j < 3; ++j)
      if (r[j] != mine[j]) return r[j] < mine[j];
    return -k < -key;
  }
  bool admit(int64_t key) {
    if (!bypass || c.res[key]) return true;
    const int64_t p = c.pool(key);
    const int64_t free = c.cap - c.members[p];
    int64_t mine[3];
    fut.next3(key, c.now, mine);
    int64_t nbetter = 0;
    // protected = the wave's keys; the asked key is in it (the reference adds it anyway)
    for (int64_t k : c.prot_list) {
      if (k == key || c.res[k] || c.pool(k) != p) continue;
      int64_t r[3];
      fut.next3(k, c.now, r);
      if (better(r, k, mine, key)) ++nbetter;
    }
    const int64_t need = nbetter - free + 1;
    if (need <= 0) return true;
    // (the asked key is not resident, so it is not in the heap: no need to protect it there)
    heaps.smallest(p, need, c, worst);
    if (static_cast<int64_t>(worst.size()) < need) return false;
    const Prio& w = worst.back();
    const int64_t rv[3] = {-w.a, -w.b, -w.c};
    for (int j = 0; j < 3; ++j)
      if (rv[j] != mine[j]) return rv[j] > mine[j];
    return false;
  }
};

// activation.py; with predicted = true, predicted.py (the next-token probability p1 comes from the
// predictor through on_scores). No order structure: a victim scans the pool's residents, as the
// reference does (vectorised there). Powers g**n come as tables made by the reference's own calls:
// ``pow_acc[n]`` = Python's ``g ** n`` (on_access), ``pow_rank[n]`` = numpy's ``g ** float(n)``
// (probability), which may differ in the last bit from libm's pow.
struct ActivationPolicy {
  Core& c;
  bool predicted;
  double g, alpha, kd;
  const double* pow_acc;
  const double* pow_rank;
  int64_t pow_len;
  std::vector<double> a, N, p1;
  std::vector<int64_t> a_step, step, h, H, last;
  int64_t layer = 0;
  // A key's wait is d + X, d the layer distance (changes every step), X = L * (1 - p1) / p (changes
  // only with its layer's state). X is cached per key with the version of its layer's state it was
  // computed from; every change of a layer's state (begin_layer, an access, scores) bumps the version.
  std::vector<double> x_cache;
  std::vector<uint64_t> x_ver, ver;
  std::vector<int32_t> layer_of;  // key / E, without a division per key in the victim scan
  std::vector<double> dist;        // per layer: d = ((layer - current - 1) mod L) + 1 of this scan
  ActivationPolicy(Core& c_, bool predicted_, double g_, double alpha_, const double* pow_acc_,
                   const double* pow_rank_, int64_t pow_len_)
      : c(c_), predicted(predicted_), g(g_), alpha(alpha_), kd(static_cast<double>(c_.K)), pow_acc(pow_acc_),
        pow_rank(pow_rank_), pow_len(pow_len_), a(c_.LE, 0.0), N(c_.L, 0.0),
        p1(c_.LE, static_cast<double>(c_.K) / static_cast<double>(c_.E)), a_step(c_.LE, 0), step(c_.L, 0),
        h(c_.LE, 0), H(c_.L, 0), last(c_.LE, 0), x_cache(c_.LE, 0.0), x_ver(c_.LE, 0), ver(c_.L, 1),
        layer_of(c_.LE), dist(c_.L) {
    for (int64_t k = 0; k < c.LE; ++k) layer_of[k] = static_cast<int32_t>(k / c.E);
  }

  int64_t power_index(int64_t n) const {
    if (n < 0 || n >= pow_len) throw std::runtime_error("sim_replay: activation power table too short");
    return n;
  }
  void begin_request() {
    std::fill(a.begin(), a.end(), 0.0);
    std::fill(N.begin(), N.end(), 0.0);
    for (auto& v : ver) ++v;
  }
  void begin_layer(int64_t l) {
    layer = l;
    ++step[l];
    N[l] = N[l] * g;
    ++ver[l];
  }
  void on_scores(int64_t l, const double* probs) {
    if (!predicted) return;
    std::copy(probs, probs + c.E, p1.begin() + l * c.E);
    ++ver[l];
  }
  void on_access(int64_t key, int64_t cnt) {
    const int64_t l = key / c.E, s = step[l];
    ++ver[l];
    a[key] = a[key] * pow_acc[power_index(s - a_step[key])] + static_cast<double>(cnt);
    a_step[key] = s;
    N[l] = N[l] + static_cast<double>(cnt) / kd;
    h[key] += cnt;
    H[l] += cnt;
    last[key] = c.clock;
  }
  void on_insert(int64_t key) {
    if (last[key] < c.clock) last[key] = c.clock;  // arrival counts as recency (for ties), not as use
  }
  void on_evict(int64_t) {}
  bool admit(int64_t) { return true; }
  void begin_step(const int64_t*, int64_t) {}
  void park(const int64_t*, int64_t) {}
  void unpark() {}

  // Activation.probability: the request's decayed ratio pulled towards the long-run one.
  double probability(int64_t key) const {
    const int64_t l = key / c.E;
    const double ak = a[key] * pow_rank[power_index(step[l] - a_step[key])];
    const double q = kd * (static_cast<double>(h[key]) + 1.0) / static_cast<double>(H[l] + c.E);
    return (ak + alpha * q) / (N[l] + alpha);
  }
  static double clip(double x, double lo, double hi) { return x < lo ? lo : (x > hi ? hi : x); }
  // _expected.expected_wait = d + X for one key; X as the reference computes it (then d + X).
  double x_of(int64_t key) {
    const int64_t l = layer_of[key];
    if (x_ver[key] != ver[l]) {
      const double p_later = probability(key);
      const double p = clip(predicted ? p1[key] : p_later, 0.0, 1.0), q = clip(p_later, 1e-9, 1.0);
      x_cache[key] = static_cast<double>(c.L) * (1.0 - p) / q;
      x_ver[key] = ver[l];
    }
    return x_cache[key];
  }
  // _expected.pick_largest: the largest wait; ties to the smallest last use, then the lowest key.
  int64_t victim(int64_t pool) {
    for (int64_t l = 0; l < c.L; ++l) {
      int64_t m = (l - layer - 1) % c.L;
      if (m < 0) m += c.L;  // Python's modulo
      dist[l] = static_cast<double>(m + 1);
    }
    int64_t best = -1;
    double best_w = 0.0;
    for (int64_t k : c.mem[pool]) {
      if (c.is_prot(k)) continue;
      const double w = dist[layer_of[k]] + x_of(k);
      if (best < 0 || w > best_w || (w == best_w && (last[k] < last[best] || (last[k] == last[best] && k < best)))) {
        best = k;
        best_w = w;
      }
    }
    return best;
  }
};

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
};

struct Output {
  int64_t accesses = 0, hits = 0, ready = 0, needs = 0, loads = 0, cpu_runs = 0;
  int64_t prefetches = 0, pf_used = 0, pf_wasted = 0, pf_skipped = 0;
  Timeline tl;
  std::vector<int64_t> rec;  // (step, key, tokens, outcome) flattened
};

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

// Remove a resident (a victim); a prefetched expert leaving unused counts as wasted.
template <class P>
void evict(Core& c, P& pol, int64_t v, Output& out, std::vector<uint8_t>& pf_unused) {
  c.remove(v);
  pol.on_evict(v);
  if (pf_unused[v]) {
    pf_unused[v] = 0;
    ++out.pf_wasted;
  }
}

template <class P>
void insert(Core& c, P& pol, int64_t key, Output& out, std::vector<uint8_t>& pf_unused) {
  if (c.res[key]) return;
  const int64_t p = c.pool(key);
  while (c.members[p] >= c.cap) {
    const int64_t v = pol.victim(p);
    if (v < 0)
      throw std::runtime_error(std::string(CONFIG_TAG) + "cannot insert expert (" + std::to_string(key / c.E) + ", " +
                               std::to_string(key % c.E) + "): all " + std::to_string(c.cap) + " slots of pool " +
                               std::to_string(p) + " hold protected experts; use a larger capacity");
    evict(c, pol, v, out, pf_unused);
  }
  c.add(key);
  pol.on_insert(key);
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

  Replay(const Input& in_, Core& c_, P& pol_, Output& out_, Predictions* preds_)
      : in(in_), c(c_), pol(pol_), out(out_), preds(preds_), tl(out_.tl), ready_at(c_.LE, 0.0),
        pf_unused(c_.LE, 0), pf_for(in_.depth + 1), grp(in_, c_) {}

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
        const double t_route = tl.non_expert(ne_ms);
        const double* slots = nullptr;
        if (preds) {
          slots = preds->step(l, in.ids + (a * L + l) * K, L * K, rows);
          if (preds->score_depth) pol.on_scores((l + preds->score_depth) % L, slots + D * c.E);
        }
        if (grp.n) demand(g, t_route);
        if (D) prefetch(g, l, t_route, slots, pf_budget);
      }
    }
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
    for (int64_t i = 0; i < n; ++i) {
      const int64_t key = keys[i], cnt = counts[i];
      // (only ids listed twice in a row make counts above the unit's rows: Python then widens)
      if (cnt >= in.tab_len) throw std::runtime_error(std::string(TABLE_TAG) + std::to_string(cnt));
      ++c.clock;
      pol.on_access(key, cnt);
      out.accesses += cnt;
      if (c.res[key]) {
        out.hits += cnt;
        if (ready_at[key] <= t_route) out.ready += cnt;
        if (pf_unused[key]) {
          pf_unused[key] = 0;
          ++out.pf_used;
        }
        wave_k.push_back(key);
        wave_c.push_back(cnt);
        ++nhits;
        if (in.record) out.rec.insert(out.rec.end(), {g, key, cnt, O_HIT});
      } else {
        miss_k.push_back(key);
        miss_c.push_back(cnt);
      }
    }
    if (miss_k.empty()) {
      for (size_t i = 0; i < nhits; ++i) jobs.push_back({ready_at[wave_k[i]], wave_k[i], in.gpu_tab[wave_c[i]]});
      tl.compute(jobs);
      return;
    }
    wave_k.insert(wave_k.end(), miss_k.begin(), miss_k.end());
    wave_c.insert(wave_c.end(), miss_c.begin(), miss_c.end());
    double issue_t = t_route;
    for (int64_t w0 = 0; w0 < n; w0 += c.cap) {
      const int64_t w1 = std::min(n, w0 + c.cap);
      if (w0) issue_t = tl.gpu;  // the previous wave's compute has ended: its slots are free
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
              const double copy_done = (issue_t > tl.copy ? issue_t : tl.copy) + in.copy_ms + g_ms;
              const double cpu_done = (issue_t > tl.cpu ? issue_t : tl.cpu) + in.cpu_tab[cnt];
              copied = !(cpu_done < copy_done);
            }
          }
        }
        if (in.record) out.rec.insert(out.rec.end(), {g, key, cnt, copied ? O_COPY : O_CPU});
        if (copied) {
          insert(c, pol, key, out, pf_unused);
          const double end = tl.issue_copy(issue_t, in.copy_ms);
          ready_at[key] = end;
          ++out.loads;
          jobs.push_back({end, key, g_ms});
        } else {
          const double end = tl.issue_cpu(issue_t, in.cpu_tab[cnt]);
          ++out.cpu_runs;
          if (end > cpu_end) cpu_end = end;
        }
      }
      pol.unpark();
      tl.compute(jobs);
      if (cpu_end >= 0.0) tl.join(cpu_end);
    }
  }

  // For d = 1..D: the rule picks the experts wanted for step g + d from the depth's scores; those
  // not resident are inserted, never evicting one the current step needs nor one wanted for the
  // same upcoming step (resident or fetched); a fetch that finds no other victim is skipped.
  void prefetch(int64_t g, int64_t l, double t_route, const double* slots, int64_t budget) {
    const int64_t D = in.depth, E = c.E, L = c.L;
    const int64_t* now_keys = grp.keys.data();
    const int64_t n_now = grp.n;
    for (int64_t d = 1; d <= D; ++d) {
      const int64_t base = ((l + d) % L) * E;
      const auto& chosen = chooser.choose(in.prefetch_rule, slots + (d - 1) * E, E, budget,
                                          [&](int64_t e) { return c.res[base + e] != 0; });
      if (chosen.empty()) continue;
      auto& wanted = pf_for[(g + d) % (D + 1)];
      for (int64_t e : chosen)
        if (c.res[base + e]) wanted.push_back(base + e);
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
        if (c.members[p] >= c.cap) {
          const int64_t v = pol.victim(p);
          if (v < 0) {  // every resident of the pool is protected
            ++out.pf_skipped;
            continue;
          }
          evict(c, pol, v, out, pf_unused);
        }
        c.add(key);
        pol.on_insert(key);
        ready_at[key] = tl.issue_copy(t_route, in.copy_ms);
        pf_unused[key] = 1;
        wanted.push_back(key);
        c.protect_add(key);
        ++out.prefetches;
      }
    }
  }
};

torch::Tensor check_1d(const torch::Tensor& t, torch::ScalarType type, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.scalar_type() == type && t.is_contiguous() && t.device().is_cpu(), "sim_replay: ",
              name, " must be a contiguous 1-d CPU tensor of ", type);
  return t;
}

// Options of sim_replay beyond the policy (engine_cpp.py sets them; see its _extra):
//   new_request   uint8 (units)            1 where a unit starts a request (default: unit 0 only)
//   alpha, g      float                    activation / predicted parameters
//   pow_acc, pow_rank  float64 (units + 1) their powers g**n (see ActivationPolicy)
//   predictor     int (PredictorCode)      PR_NONE by default
//   prior         float64 (L * E)          prior / temporal / transition
//   cond          float64 (max_depth * L * E * E), max_depth int, product bool   transition
//   decay, strength  float                 temporal
//   fill          callable () -> int; buf float64 (chunk, slots, E)            a streamed predictor
//   depth, score_depth, prefetch_rule, budget   int
struct __attribute__((visibility("hidden"))) Options {  // (hidden, as the dict it holds)
  pybind11::dict d;
  bool has(const char* k) const { return d.contains(k); }
  int64_t i(const char* k, int64_t dflt) const { return has(k) ? d[k].cast<int64_t>() : dflt; }
  double f(const char* k, double dflt) const { return has(k) ? d[k].cast<double>() : dflt; }
  torch::Tensor t(const char* k, torch::ScalarType type, int64_t numel) const {
    TORCH_CHECK(has(k), "sim_replay: option ", k, " is required here");
    auto x = d[k].cast<torch::Tensor>();
    TORCH_CHECK(x.scalar_type() == type && x.is_contiguous() && x.device().is_cpu() && (numel < 0 || x.numel() == numel),
                "sim_replay: option ", k, " must be a contiguous CPU tensor of ", type,
                numel >= 0 ? " with " + std::to_string(numel) + " entries" : std::string());
    return x;
  }
};

template <class P>
void run_replay(const Input& in, Core& c, P& pol, Output& out, Predictions* preds) {
  Replay<P> r(in, c, pol, out, preds);
  r.run();
}

// Returns (counts int64[10]: accesses hits ready needs loads cpu_runs prefetches prefetch_used
// prefetch_wasted prefetch_skipped, times float64[4]: time gpu_busy copy_busy cpu_busy, record
// int64 (m, 4)).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> sim_replay(
    const torch::Tensor& ids, const torch::Tensor& unit_start, const torch::Tensor& ne_tab,
    const torch::Tensor& gpu_tab, const torch::Tensor& cpu_tab, double copy_ms, int64_t num_experts,
    int64_t capacity, bool global_scope, int64_t policy, int64_t int_param, double float_param,
    const torch::Tensor& pinned, const torch::Tensor& fit_counts, int64_t miss_rule, bool record,
    int64_t scan_max, int64_t park_min, const pybind11::dict& extra) {
  TORCH_CHECK(ids.dim() == 3 && ids.scalar_type() == torch::kInt64 && ids.is_contiguous() && ids.device().is_cpu(),
              "sim_replay: ids must be a contiguous (tokens, layers, top_k) int64 CPU tensor");
  check_1d(unit_start, torch::kInt64, "unit_start");
  check_1d(ne_tab, torch::kFloat64, "ne_tab");
  check_1d(gpu_tab, torch::kFloat64, "gpu_tab");
  check_1d(cpu_tab, torch::kFloat64, "cpu_tab");
  const int64_t L = ids.size(1), K = ids.size(2), E = num_experts;
  TORCH_CHECK(L >= 1 && K >= 1 && num_experts >= 1 && capacity >= 1, "sim_replay: bad dimensions");
  TORCH_CHECK(policy >= P_LRU && policy <= P_PREDICTED, "sim_replay: unknown policy code ", policy);
  TORCH_CHECK(miss_rule >= M_COPY && miss_rule <= M_MIN, "sim_replay: unknown miss rule code ", miss_rule);
  const Options opt{extra};
  Input in;
  in.ids = ids.data_ptr<int64_t>();
  in.unit_start = unit_start.data_ptr<int64_t>();
  in.units = unit_start.numel() - 1;
  TORCH_CHECK(in.units >= 1, "sim_replay: no units to replay");
  in.ne_tab = ne_tab.data_ptr<double>();
  in.gpu_tab = gpu_tab.data_ptr<double>();
  in.cpu_tab = cpu_tab.data_ptr<double>();
  TORCH_CHECK(gpu_tab.numel() == cpu_tab.numel() && gpu_tab.numel() >= 1, "sim_replay: gpu_tab and cpu_tab differ");
  in.tab_len = gpu_tab.numel();
  in.copy_ms = copy_ms;
  in.miss_rule = miss_rule;
  in.record = record;
  torch::Tensor new_request;
  if (opt.has("new_request")) {
    new_request = opt.t("new_request", torch::kUInt8, in.units);
  } else {
    new_request = torch::zeros({in.units}, torch::kUInt8);
    new_request.data_ptr<uint8_t>()[0] = 1;
  }
  in.new_request = new_request.data_ptr<uint8_t>();
  in.depth = opt.i("depth", 0);
  in.prefetch_rule = opt.i("prefetch_rule", PF_TOPK);
  in.budget = opt.i("budget", 0);
  const int64_t score_depth = opt.i("score_depth", 0);
  const int64_t pred_code = opt.i("predictor", PR_NONE);
  TORCH_CHECK(in.depth >= 0 && in.budget >= 0 && score_depth >= 0, "sim_replay: negative depth, budget or score depth");
  TORCH_CHECK(in.prefetch_rule == PF_TOPK || in.prefetch_rule == PF_FILL, "sim_replay: unknown prefetch rule code");
  TORCH_CHECK(pred_code >= PR_NONE && pred_code <= PR_TRANSITION, "sim_replay: unknown predictor code ", pred_code);
  TORCH_CHECK(pred_code != PR_NONE || (in.depth == 0 && score_depth == 0),
              "sim_replay: prefetch and scores need a predictor");
  TORCH_CHECK((policy == P_PREDICTED) == (score_depth > 0), "sim_replay: score_depth is for the predicted policy");

  std::vector<uint8_t> pin;
  std::vector<int64_t> fc;
  if (policy == P_STATIC) {
    check_1d(pinned, torch::kUInt8, "pinned");
    check_1d(fit_counts, torch::kInt64, "fit_counts");
    TORCH_CHECK(pinned.numel() == L * num_experts && fit_counts.numel() == L * num_experts,
                "sim_replay: pinned and fit_counts need layers x experts entries");
    pin.assign(pinned.data_ptr<uint8_t>(), pinned.data_ptr<uint8_t>() + pinned.numel());
    fc.assign(fit_counts.data_ptr<int64_t>(), fit_counts.data_ptr<int64_t>() + fit_counts.numel());
  }
  torch::Tensor pow_acc, pow_rank;
  double alpha = 0.0, g = 1.0;
  if (policy == P_ACTIVATION || policy == P_PREDICTED) {
    pow_acc = opt.t("pow_acc", torch::kFloat64, in.units + 1);
    pow_rank = opt.t("pow_rank", torch::kFloat64, in.units + 1);
    alpha = opt.f("alpha", 0.0);
    g = opt.f("g", 1.0);
  }
  // The predictor: its tables (held here, with the GIL) and the Predictions object
  torch::Tensor prior, cond, buf;
  pybind11::object fill;
  std::unique_ptr<Predictions> preds;
  if (pred_code == PR_STREAM) {
    TORCH_CHECK(opt.has("fill"), "sim_replay: a streamed predictor needs fill");
    fill = opt.d["fill"];
    const int64_t slots = in.depth + (score_depth > 0 ? 1 : 0);
    buf = opt.t("buf", torch::kFloat64, -1);
    TORCH_CHECK(buf.dim() == 3 && buf.size(1) == slots && buf.size(2) == E && buf.size(0) >= 1,
                "sim_replay: buf must be (chunk steps, slots, experts)");
    preds = std::make_unique<StreamedPredictions>(fill, buf.data_ptr<double>(), buf.size(0), E, in.depth, score_depth);
  } else if (pred_code != PR_NONE) {
    prior = opt.t("prior", torch::kFloat64, L * E);
    std::unique_ptr<RowPredictor> rp;
    if (pred_code == PR_PRIOR) {
      rp = std::make_unique<PriorPredictor>(L, E, K, prior.data_ptr<double>());
    } else if (pred_code == PR_TEMPORAL) {
      rp = std::make_unique<TemporalPredictor>(L, E, K, prior.data_ptr<double>(), opt.f("decay", 0.0),
                                               opt.f("strength", 0.0));
    } else {
      const int64_t max_depth = opt.i("max_depth", 0);
      TORCH_CHECK(max_depth >= std::max(in.depth, score_depth), "sim_replay: transition max_depth below the depths asked");
      cond = opt.t("cond", torch::kFloat64, max_depth * L * E * E);
      rp = std::make_unique<TransitionPredictor>(L, E, K, prior.data_ptr<double>(), cond.data_ptr<double>(), max_depth,
                                                 opt.i("product", 1) != 0);
    }
    preds = std::make_unique<NativePredictions>(std::move(rp), in.depth, score_depth);
  }
  Tuning tune;
  if (scan_max >= 0) tune.scan_max = scan_max;
  if (park_min >= 0) tune.park_min = park_min;
  Output out;
  {
    pybind11::gil_scoped_release nogil;
    Core c(L, num_experts, K, capacity, global_scope);
    Predictions* pr = preds.get();
    switch (policy) {
      case P_LRU:
      case P_FIFO: {
        LRUPolicy p(c, policy == P_FIFO);
        run_replay(in, c, p, out, pr);
        break;
      }
      case P_STATIC: {
        StaticPolicy p(c, std::move(pin), std::move(fc));
        run_replay(in, c, p, out, pr);
        break;
      }
      case P_LFU: {
        LFUPolicy p(c, tune, int_param);
        run_replay(in, c, p, out, pr);
        break;
      }
      case P_LRFU: {
        LRFUPolicy p(c, tune, float_param);
        run_replay(in, c, p, out, pr);
        break;
      }
      case P_ACTIVATION:
      case P_PREDICTED: {
        ActivationPolicy p(c, policy == P_PREDICTED, g, alpha, pow_acc.data_ptr<double>(), pow_rank.data_ptr<double>(),
                           pow_acc.numel());
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
  auto counts = torch::tensor({out.accesses, out.hits, out.ready, out.needs, out.loads, out.cpu_runs, out.prefetches,
                               out.pf_used, out.pf_wasted, out.pf_skipped},
                              torch::kInt64);
  auto times = torch::tensor({out.tl.gpu, out.tl.gpu_busy, out.tl.copy_busy, out.tl.cpu_busy}, torch::kFloat64);
  const int64_t m = static_cast<int64_t>(out.rec.size() / 4);
  auto rec = torch::empty({m, 4}, torch::kInt64);
  if (m) std::copy(out.rec.begin(), out.rec.end(), rec.data_ptr<int64_t>());
  return {counts, times, rec};
}

// Predictor.normalise of each row of ``scores`` (rows, experts) float64: the core's version, for
// the differential tests.
torch::Tensor sim_normalise(const torch::Tensor& scores, int64_t top_k) {
  TORCH_CHECK(scores.dim() == 2 && scores.scalar_type() == torch::kFloat64 && scores.is_contiguous() &&
                  scores.device().is_cpu() && scores.size(1) >= 1,
              "sim_normalise: scores must be a contiguous (rows, experts) float64 CPU tensor");
  auto out = torch::empty_like(scores);
  Normaliser norm;
  const int64_t n = scores.size(1);
  for (int64_t r = 0; r < scores.size(0); ++r)
    norm.run(scores.data_ptr<double>() + r * n, n, static_cast<double>(top_k), out.data_ptr<double>() + r * n);
  return out;
}

}  // namespace moecache_sim

// Called from PYBIND11_MODULE in moecache_ext.cpp.
void register_sim_core(pybind11::module& m) {
  m.def("sim_replay", &moecache_sim::sim_replay,
        "replay a laid-out trace through one cache policy (and predictions, prefetch) with the timing model "
        "(see moecache/sim/engine_cpp.py)",
        pybind11::arg("ids"), pybind11::arg("unit_start"), pybind11::arg("ne_tab"), pybind11::arg("gpu_tab"),
        pybind11::arg("cpu_tab"), pybind11::arg("copy_ms"), pybind11::arg("num_experts"), pybind11::arg("capacity"),
        pybind11::arg("global_scope"), pybind11::arg("policy"), pybind11::arg("int_param"),
        pybind11::arg("float_param"), pybind11::arg("pinned"), pybind11::arg("fit_counts"),
        pybind11::arg("miss_rule"), pybind11::arg("record"), pybind11::arg("scan_max") = -1,
        pybind11::arg("park_min") = -1, pybind11::arg("extra") = pybind11::dict());
  m.def("sim_normalise", &moecache_sim::sim_normalise, "Predictor.normalise as the simulator core computes it",
        pybind11::arg("scores"), pybind11::arg("top_k"));
  // 2: every policy, predictions (C++ and streamed) and prefetch; engine_cpp.py checks it
  m.attr("sim_core_version") = 2;
}
