// The cache policies of policies/*.py as the simulator core runs them: the residency every policy
// shares (policies/base.py), the order structures, and one struct per policy. The driver
// (driver.cpp) is a template over them. Each follows its Python class step by step, ties included.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace moecache_sim {

constexpr int64_t NEVER = int64_t(1) << 62;  // Future.NEVER

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
// activation / predicted (ActivationPolicy): global pools of at most this many slots are scanned;
// layer-scope pools always are, unless wait_scan_max (>= 0) sets one threshold for both scopes
// (defaults from the layout sweep of eval/victim_speed.py).
constexpr int64_t WAIT_SCAN_MAX = 32;

struct Tuning {
  int64_t scan_max = SCAN_MAX, park_min = PARK_MIN;
  int64_t wait_scan_max = -1;  // -1: the default layouts above
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
// predictor through on_scores). Powers g**n come as tables made by the reference's own calls:
// ``pow_acc[n]`` = Python's ``g ** n`` (on_access), ``pow_rank[n]`` = numpy's ``g ** float(n)``
// (probability), which may differ in the last bit from libm's pow.
//
// A key's wait is T = d + X (policies/_expected.py): d, the distance of its layer from the layer being
// served, is the same for every key of a layer; X = L * (1 - p1) / p changes only with its layer's
// state (begin_layer, an access, scores, a new request: each bumps the layer's version). Two layouts
// with the same victims (both equal the reference's scan; policies/_wait_order.py is the Python twin
// of the second):
//
// * small pools and, by default, every layer-scope pool: a victim scans the pool's residents, each X
//   cached with the version of its layer's state it was computed from (a layer-scope pool is one layer:
//   its sorted list would trade a few scans per step for a sort per step, which is slower);
// * larger pools: per layer, its residents sorted by (X descending, last ascending, key ascending),
//   rebuilt at the first victim search after the layer's state changed (at most once per layer step)
//   and kept current by insertions (binary search) and evictions in between; the X and key of each
//   list's first entry sit in flat arrays. A victim takes d + X of each layer's first unprotected entry
//   (the first entry, unless it is protected), then walks the runs of the layers that tie for the
//   largest T and picks by (last, key) as the scan does: d + X never increases along a list, so every
//   key whose T equals the largest lies in one run from its layer's first unprotected entry. Per victim
//   O(layers of the pool + protected keys passed); per layer step one O(m log m) sort of the layer's m
//   residents.
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
  // X per key with the version of its layer's state it was computed from (ver[l], bumped on change).
  std::vector<double> x_cache;
  std::vector<uint64_t> x_ver, ver;
  std::vector<int32_t> layer_of;  // key / E, without a division per key in the victim search
  std::vector<double> dist;        // per layer: d = ((layer - current - 1) mod L) + 1 while serving dist_layer
  int64_t dist_layer = -1;
  bool scan;  // the scan layout (small pools)

  // ---- the sorted layout ----
  struct Entry {
    double x;
    int64_t last, key;
  };
  // Victim order: larger X first, then the least recent, then the lowest key; a NaN X (which the
  // reference never produces) sorts after every number, so that this stays a strict weak order.
  struct Before {
    bool operator()(const Entry& e, const Entry& o) const {
      if (e.x > o.x) return true;
      if (e.x < o.x) return false;
      const bool en = e.x != e.x, on = o.x != o.x;
      if (en != on) return on;
      if (e.last != o.last) return e.last < o.last;
      return e.key < o.key;
    }
  };
  std::vector<std::vector<Entry>> order;   // per layer: its residents in victim order
  std::vector<uint64_t> built;             // per layer: ver[l] its list was built at (current iff == ver[l])
  std::vector<double> top_x;               // per layer: X of its list's first entry (-inf: empty list)
  std::vector<int64_t> top_key;            // per layer: that entry's key (-1: empty list)
  std::vector<std::vector<int64_t>> lmem;  // per layer: its residents (unordered), for rebuilds
  std::vector<int64_t> lpos;               // index of a resident key in lmem[its layer]
  std::vector<uint8_t> dirty;              // per layer: its version moved since its list was built
  std::vector<int64_t> dirty_list;         // those layers (global scope: rebuilt before a victim search)
  std::vector<double> t_first;             // scratch of a victim search: per layer, T of its first free entry
  std::vector<int64_t> i_first;            // ... and that entry's index (-1: none)

  ActivationPolicy(Core& c_, bool predicted_, double g_, double alpha_, const double* pow_acc_,
                   const double* pow_rank_, int64_t pow_len_, const Tuning& t_)
      : c(c_), predicted(predicted_), g(g_), alpha(alpha_), kd(static_cast<double>(c_.K)), pow_acc(pow_acc_),
        pow_rank(pow_rank_), pow_len(pow_len_), a(c_.LE, 0.0), N(c_.L, 0.0),
        p1(c_.LE, static_cast<double>(c_.K) / static_cast<double>(c_.E)), a_step(c_.LE, 0), step(c_.L, 0),
        h(c_.LE, 0), H(c_.L, 0), last(c_.LE, 0), x_cache(c_.LE, 0.0), x_ver(c_.LE, 0), ver(c_.L, 1),
        layer_of(c_.LE), dist(c_.L),
        scan(t_.wait_scan_max >= 0 ? c_.cap <= t_.wait_scan_max : !c_.global || c_.cap <= WAIT_SCAN_MAX) {
    for (int64_t k = 0; k < c.LE; ++k) layer_of[k] = static_cast<int32_t>(k / c.E);
    if (!scan) {
      order.resize(c.L);
      built.assign(c.L, 0);
      top_x.assign(c.L, -std::numeric_limits<double>::infinity());
      top_key.assign(c.L, -1);
      lmem.resize(c.L);
      lpos.assign(c.LE, 0);
      dirty.assign(c.L, 0);
      t_first.assign(c.L, 0.0);
      i_first.assign(c.L, -1);
      for (int64_t l = 0; l < c.L; ++l) mark(l);
    }
  }

  int64_t power_index(int64_t n) const {
    if (n < 0 || n >= pow_len) throw std::runtime_error("sim_replay: activation power table too short");
    return n;
  }
  // Layer l's state changed: every X of its keys may have moved.
  void bump(int64_t l) {
    ++ver[l];
    if (!scan) mark(l);
  }
  void mark(int64_t l) {
    if (!dirty[l]) {
      dirty[l] = 1;
      dirty_list.push_back(l);
    }
  }
  void begin_request() {
    std::fill(a.begin(), a.end(), 0.0);
    std::fill(N.begin(), N.end(), 0.0);
    for (int64_t l = 0; l < c.L; ++l) bump(l);
  }
  void begin_layer(int64_t l) {
    layer = l;
    ++step[l];
    N[l] = N[l] * g;
    bump(l);
  }
  void on_scores(int64_t l, const double* probs) {
    if (!predicted) return;
    std::copy(probs, probs + c.E, p1.begin() + l * c.E);
    bump(l);
  }
  void on_access(int64_t key, int64_t cnt) {
    const int64_t l = key / c.E, s = step[l];
    bump(l);
    a[key] = a[key] * pow_acc[power_index(s - a_step[key])] + static_cast<double>(cnt);
    a_step[key] = s;
    N[l] = N[l] + static_cast<double>(cnt) / kd;
    h[key] += cnt;
    H[l] += cnt;
    last[key] = c.clock;
  }
  void on_insert(int64_t key) {
    if (last[key] < c.clock) last[key] = c.clock;  // arrival counts as recency (for ties), not as use
    if (scan) return;
    const int64_t l = layer_of[key];
    auto& m = lmem[l];
    lpos[key] = static_cast<int64_t>(m.size());
    m.push_back(key);
    if (built[l] == ver[l]) {  // a current list: the key goes to its place (else the rebuild takes it)
      const Entry e{x_of(key), last[key], key};
      auto& v = order[l];
      const auto it = v.insert(std::upper_bound(v.begin(), v.end(), e, Before()), e);
      if (it == v.begin()) refresh_top(l);
    }
  }
  void on_evict(int64_t key) {
    if (scan) return;
    const int64_t l = layer_of[key];
    auto& m = lmem[l];
    const int64_t i = lpos[key], moved = m.back();
    m[i] = moved;
    lpos[moved] = i;
    m.pop_back();
    if (built[l] == ver[l]) {
      auto& v = order[l];
      for (auto it = v.begin(); it != v.end(); ++it) {
        if (it->key == key) {
          const bool was_first = it == v.begin();
          v.erase(it);
          if (was_first) refresh_top(l);
          break;
        }
      }
    }
  }
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
  // _expected.wait_beyond: X of one key as the reference computes it (the wait is then d + X).
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
  void set_dist() {
    if (dist_layer == layer) return;
    for (int64_t l = 0; l < c.L; ++l) {
      int64_t m = (l - layer - 1) % c.L;
      if (m < 0) m += c.L;  // Python's modulo
      dist[l] = static_cast<double>(m + 1);
    }
    dist_layer = layer;
  }
  void refresh_top(int64_t l) {
    const auto& v = order[l];
    top_x[l] = v.empty() ? -std::numeric_limits<double>::infinity() : v[0].x;
    top_key[l] = v.empty() ? -1 : v[0].key;
  }
  // Make layer l's list current (an empty layer gets an empty current list, so later insertions are placed).
  void ensure(int64_t l) {
    if (built[l] == ver[l]) return;
    auto& v = order[l];
    v.clear();
    for (int64_t k : lmem[l]) v.push_back(Entry{x_of(k), last[k], k});
    std::sort(v.begin(), v.end(), Before());
    built[l] = ver[l];
    refresh_top(l);
  }
  // Index of the first unprotected entry of layer l's (current) list, -1 if none.
  int64_t first_free(int64_t l) const {
    const auto& v = order[l];
    for (int64_t i = 0, n = static_cast<int64_t>(v.size()); i < n; ++i)
      if (!c.is_prot(v[i].key)) return i;
    return -1;
  }
  // Among layer l's entries from index i on (i its first free one), the best (last, key) of the
  // unprotected ones whose T equals t_max; updates best / best_last.
  void walk_run(int64_t l, int64_t i, double t_max, int64_t& best, int64_t& best_last) const {
    const auto& v = order[l];
    const double d = dist[l];
    for (int64_t n = static_cast<int64_t>(v.size()); i < n; ++i) {
      const Entry& e = v[i];
      if (c.is_prot(e.key)) continue;
      if (!(d + e.x == t_max)) break;
      if (best < 0 || e.last < best_last || (e.last == best_last && e.key < best)) {
        best = e.key;
        best_last = e.last;
      }
    }
  }
  // _expected.pick_largest: the largest wait; ties to the smallest last use, then the lowest key.
  int64_t victim(int64_t pool) {
    set_dist();
    if (scan) return victim_scan(pool);
    int64_t best = -1, best_last = 0;
    if (!c.global) {  // one layer: its first free entry has the largest T; its run holds the ties
      ensure(pool);
      const int64_t i = first_free(pool);
      if (i >= 0) walk_run(pool, i, dist[pool] + order[pool][i].x, best, best_last);
      return best;
    }
    for (int64_t l : dirty_list) {
      ensure(l);
      dirty[l] = 0;
    }
    dirty_list.clear();
    double t_max = -std::numeric_limits<double>::infinity();
    int64_t arg = -1, ties = 0;
    for (int64_t l = 0; l < c.L; ++l) {
      const int64_t k = top_key[l];
      if (k < 0) continue;
      int64_t i = 0;
      double t = dist[l] + top_x[l];
      if (c.is_prot(k)) {
        i = first_free(l);
        if (i < 0) {
          i_first[l] = -1;
          continue;
        }
        t = dist[l] + order[l][i].x;
      }
      i_first[l] = i;
      t_first[l] = t;
      if (t > t_max) {
        t_max = t;
        arg = l;
        ties = 1;
      } else if (t == t_max) {
        ++ties;
      }
    }
    if (arg < 0) return -1;
    if (ties == 1) {
      walk_run(arg, i_first[arg], t_max, best, best_last);
      return best;
    }
    for (int64_t l = arg; l < c.L; ++l)  // (no layer before arg reached t_max)
      if (top_key[l] >= 0 && i_first[l] >= 0 && t_first[l] == t_max) walk_run(l, i_first[l], t_max, best, best_last);
    return best;
  }
  int64_t victim_scan(int64_t pool) {
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

}  // namespace moecache_sim
