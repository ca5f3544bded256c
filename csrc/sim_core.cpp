// moecache._C.sim_replay: the trace-replay simulator's core loop in C++.
//
// The readable specification is moecache/sim/replay.py with the policies in policies/*.py and the
// timing model in moecache/sim/timing.py; this file follows them step by step, doing every float
// operation in the same order and precision (IEEE double, no fast-math, no FMA contraction on the
// x86-64 baseline), so a run here reproduces the Python reference's result row exactly. The
// differential tests (tests/test_sim_cpp.py) compare both with ==.
//
// Supported here: policies lru, fifo, lfu (decay), lrfu, static, belady, belady_bypass; both
// scopes; miss rules copy, cpu, policy, min; step and decode schedules; the per-need record.
// Not here (the Python engine runs them): predictors, prefetch, activation and predicted.
//
// Inputs arrive already validated and laid out by moecache/sim/engine_cpp.py (ids in replay order,
// unit starts, per-token-count cost tables computed by the Python hardware profile, so the costs
// are the very same doubles). The GIL is released for the whole replay.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace moecache_sim {

constexpr int64_t NEVER = int64_t(1) << 62;  // Future.NEVER

enum PolicyCode : int64_t { P_LRU = 0, P_FIFO = 1, P_LFU = 2, P_LRFU = 3, P_STATIC = 4, P_BELADY = 5, P_BYPASS = 6 };
enum MissCode : int64_t { M_COPY = 0, M_CPU = 1, M_POLICY = 2, M_MIN = 3 };
enum Outcome : int64_t { O_HIT = 0, O_COPY = 1, O_CPU = 2 };

// A ConfigError on the Python side: engine_cpp.py re-raises RuntimeErrors starting with this tag.
const char* const CONFIG_TAG = "ConfigError: ";
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
// knows the step of its key's next need and that need's index. The replay only ever asks for the
// next uses of keys of the step being served (accesses, demand inserts, bypass decisions over the
// wave), so ``begin_step`` maps those keys to their needs and a lookup reads the arrays in replay
// order (cache friendly) instead of searching per-key use lists; the answers are the same: the
// first steps after ``now`` that need the key.
struct Future {
  std::vector<int64_t> next_step;  // per need: the step of the key's next need (NEVER: none)
  std::vector<int64_t> next_need;  // per need: the index of that need (-1: none); belady_bypass only
  std::vector<int64_t> need_of;    // per key of the current step: its need index
  int64_t base = 0;                // index of the current step's first need
  int64_t last_n = 0;              // needs of the previous step with needs

  void begin_step(const int64_t* keys, int64_t n) {
    base += last_n;
    last_n = n;
    for (int64_t i = 0; i < n; ++i) need_of[keys[i]] = base + i;
  }
  int64_t next_use(int64_t key) const { return next_step[need_of[key]]; }
  // The first three uses after now, padded with NEVER.
  void next3(int64_t key, int64_t out[3]) const {
    const int64_t i = need_of[key];
    out[0] = next_step[i];
    const int64_t j = next_need[i];
    out[1] = j >= 0 ? next_step[j] : NEVER;
    const int64_t j2 = j >= 0 ? next_need[j] : -1;
    out[2] = j2 >= 0 ? next_step[j2] : NEVER;
  }
};

// ---- policies (one struct each; the driver is a template over them) --------------------------
struct LRUPolicy {  // lru.py; with fifo = true, fifo.py (accesses change nothing)
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

struct StaticPolicy {  // static.py
  Core& c;
  Lists lists;
  std::vector<uint8_t> pinned;
  std::vector<int64_t> count;
  StaticPolicy(Core& c_, std::vector<uint8_t> pinned_, std::vector<int64_t> count_)
      : c(c_), lists(c_.LE, c_.pools), pinned(std::move(pinned_)), count(std::move(count_)) {}
  void on_access(int64_t key, int64_t) {
    if (c.res[key]) lists.to_end(c.pool(key), key);
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
      if (!pinned[k] && !c.is_prot(k)) return k;
    int64_t best = -1;
    for (int64_t k = lists.next[s]; k != s; k = lists.next[k]) {
      if (c.is_prot(k)) continue;
      if (best < 0 || count[k] < count[best] || (count[k] == count[best] && k < best)) best = k;
    }
    return best;
  }
};

struct LFUPolicy {  // lfu.py
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

struct LRFUPolicy {  // lrfu.py
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

struct BeladyPolicy {  // belady.py; with bypass = true, belady_bypass.py
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
      fut.next3(key, u);
      p.a = -u[0];
      p.b = -u[1];
      p.c = -u[2];
    } else {
      p.a = -fut.next_use(key);
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
  void begin_step(const int64_t* keys, int64_t n) { fut.begin_step(keys, n); }
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
    fut.next3(key, mine);
    int64_t nbetter = 0;
    // protected = the wave's keys; the asked key is in it (the reference adds it anyway)
    for (int64_t k : c.prot_list) {
      if (k == key || c.res[k] || c.pool(k) != p) continue;
      int64_t r[3];
      fut.next3(k, r);
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

// ---- the replay driver (replay.simulate without predictor / prefetch) ------------------------
struct Input {
  const int64_t* ids;          // (tokens, L, K) in replay order
  const int64_t* unit_start;   // (units + 1)
  int64_t units;
  const double* ne_tab;        // non_expert(rows), indexed by rows
  const double* gpu_tab;       // gpu(c), indexed by token count
  const double* cpu_tab;       // cpu(c)
  int64_t tab_len;             // entries of gpu_tab and cpu_tab
  double copy_ms;
  int64_t miss_rule;
  bool record;
};

struct Output {
  int64_t accesses = 0, hits = 0, ready = 0, needs = 0, loads = 0, cpu_runs = 0;
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
Future build_future(const Input& in, const Core& c, bool links) {
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
  return f;
}

template <class P>
void insert(Core& c, P& pol, int64_t key) {
  if (c.res[key]) return;
  const int64_t p = c.pool(key);
  while (c.members[p] >= c.cap) {
    const int64_t v = pol.victim(p);
    if (v < 0)
      throw std::runtime_error(std::string(CONFIG_TAG) + "cannot insert expert (" + std::to_string(key / c.E) + ", " +
                               std::to_string(key % c.E) + "): all " + std::to_string(c.cap) + " slots of pool " +
                               std::to_string(p) + " hold protected experts; use a larger capacity");
    c.remove(v);
    pol.on_evict(v);
  }
  c.add(key);
  pol.on_insert(key);
}

template <class P>
void replay(const Input& in, Core& c, P& pol, Output& out) {
  Timeline& tl = out.tl;
  std::vector<double> ready_at(c.LE, 0.0);
  Group grp(in, c);
  const int64_t* keys = grp.keys.data();
  const int64_t* counts = grp.counts.data();
  std::vector<int64_t> wave_k, wave_c, miss_k, miss_c;
  std::vector<Job> jobs;
  const bool asks = in.miss_rule == M_POLICY || in.miss_rule == M_MIN;
  for (int64_t u = 0; u < in.units; ++u) {
    const int64_t a = in.unit_start[u], b = in.unit_start[u + 1];
    const double ne_ms = in.ne_tab[b - a];
    for (int64_t l = 0; l < c.L; ++l) {
      const int64_t g = u * c.L + l;
      c.now = g;
      grp.make(in, c, a, b, l);
      const double t_route = tl.non_expert(ne_ms);
      const int64_t n = grp.n;
      if (n == 0) continue;
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
        continue;
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
            insert(c, pol, key);
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
  }
}

torch::Tensor check_1d(const torch::Tensor& t, torch::ScalarType type, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.scalar_type() == type && t.is_contiguous() && t.device().is_cpu(), "sim_replay: ",
              name, " must be a contiguous 1-d CPU tensor of ", type);
  return t;
}

// Returns (counts int64[6]: accesses hits ready needs loads cpu_runs, times float64[4]: time gpu_busy
// copy_busy cpu_busy, record int64 (m, 4)).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> sim_replay(
    const torch::Tensor& ids, const torch::Tensor& unit_start, const torch::Tensor& ne_tab,
    const torch::Tensor& gpu_tab, const torch::Tensor& cpu_tab, double copy_ms, int64_t num_experts,
    int64_t capacity, bool global_scope, int64_t policy, int64_t int_param, double float_param,
    const torch::Tensor& pinned, const torch::Tensor& fit_counts, int64_t miss_rule, bool record,
    int64_t scan_max, int64_t park_min) {
  TORCH_CHECK(ids.dim() == 3 && ids.scalar_type() == torch::kInt64 && ids.is_contiguous() && ids.device().is_cpu(),
              "sim_replay: ids must be a contiguous (tokens, layers, top_k) int64 CPU tensor");
  check_1d(unit_start, torch::kInt64, "unit_start");
  check_1d(ne_tab, torch::kFloat64, "ne_tab");
  check_1d(gpu_tab, torch::kFloat64, "gpu_tab");
  check_1d(cpu_tab, torch::kFloat64, "cpu_tab");
  const int64_t L = ids.size(1), K = ids.size(2);
  TORCH_CHECK(L >= 1 && K >= 1 && num_experts >= 1 && capacity >= 1, "sim_replay: bad dimensions");
  TORCH_CHECK(policy >= P_LRU && policy <= P_BYPASS, "sim_replay: unknown policy code ", policy);
  TORCH_CHECK(miss_rule >= M_COPY && miss_rule <= M_MIN, "sim_replay: unknown miss rule code ", miss_rule);
  Input in;
  in.ids = ids.data_ptr<int64_t>();
  in.unit_start = unit_start.data_ptr<int64_t>();
  in.units = unit_start.numel() - 1;
  in.ne_tab = ne_tab.data_ptr<double>();
  in.gpu_tab = gpu_tab.data_ptr<double>();
  in.cpu_tab = cpu_tab.data_ptr<double>();
  TORCH_CHECK(gpu_tab.numel() == cpu_tab.numel() && gpu_tab.numel() >= 1, "sim_replay: gpu_tab and cpu_tab differ");
  in.tab_len = gpu_tab.numel();
  in.copy_ms = copy_ms;
  in.miss_rule = miss_rule;
  in.record = record;
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
  Tuning tune;
  if (scan_max >= 0) tune.scan_max = scan_max;
  if (park_min >= 0) tune.park_min = park_min;
  Output out;
  {
    pybind11::gil_scoped_release nogil;
    Core c(L, num_experts, K, capacity, global_scope);
    switch (policy) {
      case P_LRU:
      case P_FIFO: {
        LRUPolicy p(c, policy == P_FIFO);
        replay(in, c, p, out);
        break;
      }
      case P_STATIC: {
        StaticPolicy p(c, std::move(pin), std::move(fc));
        replay(in, c, p, out);
        break;
      }
      case P_LFU: {
        LFUPolicy p(c, tune, int_param);
        replay(in, c, p, out);
        break;
      }
      case P_LRFU: {
        LRFUPolicy p(c, tune, float_param);
        replay(in, c, p, out);
        break;
      }
      default: {
        Future f = build_future(in, c, policy == P_BYPASS);
        BeladyPolicy p(c, tune, f, policy == P_BYPASS);
        replay(in, c, p, out);
      }
    }
  }
  auto counts = torch::tensor({out.accesses, out.hits, out.ready, out.needs, out.loads, out.cpu_runs}, torch::kInt64);
  auto times = torch::tensor({out.tl.gpu, out.tl.gpu_busy, out.tl.copy_busy, out.tl.cpu_busy}, torch::kFloat64);
  const int64_t m = static_cast<int64_t>(out.rec.size() / 4);
  auto rec = torch::empty({m, 4}, torch::kInt64);
  if (m) std::copy(out.rec.begin(), out.rec.end(), rec.data_ptr<int64_t>());
  return {counts, times, rec};
}

}  // namespace moecache_sim

// Called from PYBIND11_MODULE in moecache_ext.cpp.
void register_sim_core(pybind11::module& m) {
  m.def("sim_replay", &moecache_sim::sim_replay,
        "replay a laid-out trace through one cache policy with the timing model (see moecache/sim/engine_cpp.py)",
        pybind11::arg("ids"), pybind11::arg("unit_start"), pybind11::arg("ne_tab"), pybind11::arg("gpu_tab"),
        pybind11::arg("cpu_tab"), pybind11::arg("copy_ms"), pybind11::arg("num_experts"), pybind11::arg("capacity"),
        pybind11::arg("global_scope"), pybind11::arg("policy"), pybind11::arg("int_param"),
        pybind11::arg("float_param"), pybind11::arg("pinned"), pybind11::arg("fit_counts"),
        pybind11::arg("miss_rule"), pybind11::arg("record"), pybind11::arg("scan_max") = -1,
        pybind11::arg("park_min") = -1);
}
