// The simulator core's predictions: the trace-only predictors prior, temporal and transition
// (predictors/prior.py, temporal.py, transition.py with Predictor.normalise of predictors/base.py)
// computed in C++, and the stream through which every other predictor's predictions arrive from
// Python in chunks of bounded size.
//
// Plain C++ (no torch, no Python): the bindings hand a streamed predictor's fill over as a
// std::function that takes the GIL itself. Exactness: the Python predictors use elementwise IEEE operations and numpy's
// reductions; this file does the same operations in the same order: numpy's pairwise summation
// for a sum along a row (np.add.reduce over a contiguous float64 axis), a plain sequential sum
// over rows (a reduction along axis 0), and no libm call at all (the Python side keeps exp/log and
// BLAS products out of these predictors, whose vectorised versions differ between machines).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "codes.h"

namespace moecache_sim {

// np.add.reduce of a contiguous float64 row: numpy's pairwise summation (blocks of up to 128
// summed with 8 accumulators, halves above that), started from the reduction's identity.
inline double pairwise_sum(const double* a, int64_t n) {
  if (n < 8) {
    double r = -0.0;
    for (int64_t i = 0; i < n; ++i) r += a[i];
    return r;
  }
  if (n <= 128) {
    double r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    int64_t i = 8;
    for (; i < n - (n % 8); i += 8)
      for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += a[i];
    return res;
  }
  int64_t n2 = n / 2;
  n2 -= n2 % 8;
  return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

// Predictor.normalise for one row: scores -> probabilities summing to top_k, each in [0, 1].
// The reference's rounds, per row: every expert with p >= 1 is capped at 1 (those capped before are
// exactly 1 again, so the capped set is {p >= 1}), the rest top_k - #capped is shared among the
// others in proportion to their scores (evenly where those sum to 0), until no p exceeds 1 + 1e-12.
struct Normaliser {
  std::vector<double> s, tmp;
  std::vector<int64_t> capped;

  void run(const double* __restrict in, int64_t n, double k, double* __restrict p) {
    s.resize(n);
    double* __restrict sv = s.data();
    for (int64_t i = 0; i < n; ++i) sv[i] = in[i] < 0.0 ? 0.0 : in[i];  // np.maximum(x, 0) (nan stays nan)
    const double total = pairwise_sum(sv, n);
    const double lim = 1.0 + 1e-12;
    bool any = false;  // some p > lim (no early exits: the loops vectorise, and rows rarely overflow)
    if (total <= 0.0) {
      const double even = k / static_cast<double>(n);
      for (int64_t i = 0; i < n; ++i) p[i] = even;
      any = even > lim;
    } else {
      const double f = k / total;
      for (int64_t i = 0; i < n; ++i) {
        p[i] = sv[i] * f;
        any |= p[i] > lim;
      }
    }
    if (!any) return;
    auto over = [&] {
      bool o = false;
      for (int64_t i = 0; i < n; ++i) o |= p[i] > lim;
      return o;
    };
    tmp.resize(n);
    double* __restrict tv = tmp.data();
    do {
      capped.clear();
      for (int64_t i = 0; i < n; ++i)
        if (p[i] >= 1.0) capped.push_back(i);
      const int64_t ncap = static_cast<int64_t>(capped.size());
      const double rest = k - static_cast<double>(ncap);
      std::copy(sv, sv + n, tv);
      for (int64_t i : capped) tv[i] = 0.0;
      const double base = pairwise_sum(tv, n);  // the free experts' scores
      if (!(rest > 0.0)) {
        for (int64_t i = 0; i < n; ++i) p[i] = 0.0;
      } else if (base > 0.0) {
        const double f = rest / base;
        for (int64_t i = 0; i < n; ++i) p[i] = sv[i] * f;
      } else {
        const double even = rest / static_cast<double>(std::max<int64_t>(n - ncap, 1));
        for (int64_t i = 0; i < n; ++i) p[i] = even;
      }
      for (int64_t i : capped) p[i] = 1.0;
    } while (over());
  }
};

// The ids of one row at one layer as the predictors read them (multi_hot): valid ids, ascending,
// each once. Returns how many.
inline int64_t observed_experts(const int64_t* row, int64_t K, int64_t* out) {
  int64_t m = 0;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t x = row[k];
    if (x < 0) continue;
    int64_t j = m;
    while (j > 0 && out[j - 1] > x) --j;
    if (j > 0 && out[j - 1] == x) continue;  // listed twice: counted once
    for (int64_t i = m; i > j; --i) out[i] = out[i - 1];
    out[j] = x;
    ++m;
  }
  return m;
}

// One trace-only predictor. ``ids`` point at the unit's first row, rows ``row_stride`` apart, the
// layer's K ids at ``ids + r * row_stride``. ``scores`` writes the predictor's ``_scores`` (before
// normalise) for ``rows`` rows, and sets ``same[r]`` when row r's state equals row r - 1's bit for
// bit, so its scores (written too) and probabilities are the previous row's (a batched prefill
// step has many such rows: no history at a layer yet, or the same experts).
struct RowPredictor {
  int64_t L, E, K;
  RowPredictor(int64_t L_, int64_t E_, int64_t K_) : L(L_), E(E_), K(K_) {}
  virtual ~RowPredictor() = default;
  virtual void reset(int64_t rows) {}
  virtual void observe(int64_t l, const int64_t* ids, int64_t row_stride, int64_t rows) {}
  virtual void scores(int64_t l, int64_t d, int64_t rows, double* out, uint8_t* same) = 0;
};

// prior.py: normalise(prior[t]) for every row.
struct PriorPredictor : RowPredictor {
  const double* prior;  // (L, E)
  PriorPredictor(int64_t L_, int64_t E_, int64_t K_, const double* prior_) : RowPredictor(L_, E_, K_), prior(prior_) {}
  void scores(int64_t l, int64_t d, int64_t rows, double* out, uint8_t* same) override {
    const double* pt = prior + ((l + d) % L) * E;
    for (int64_t r = 0; r < rows; ++r) {
      std::copy(pt, pt + E, out + r * E);
      same[r] = r > 0;
    }
  }
};

// temporal.py: decayed per-(row, layer) counts of the request, blended with the prior.
struct TemporalPredictor : RowPredictor {
  const double* prior;
  double decay, strength;
  std::vector<double> counts, seen;  // (L, rows, E), (L, rows): a layer's rows side by side
  int64_t R = 0;                     // rows of the request
  std::vector<int64_t> obs;
  TemporalPredictor(int64_t L_, int64_t E_, int64_t K_, const double* prior_, double decay_, double strength_)
      : RowPredictor(L_, E_, K_), prior(prior_), decay(decay_), strength(strength_), obs(K_) {}
  void reset(int64_t rows) override {
    R = rows;
    counts.assign(rows * L * E, 0.0);
    seen.assign(rows * L, 0.0);
  }
  void observe(int64_t l, const int64_t* ids, int64_t row_stride, int64_t rows) override {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t m = observed_experts(ids + r * row_stride, K, obs.data());
      if (m == 0) continue;  // no record at this layer: the row keeps its state
      // c = decay * c + hot, as two passes (the same two roundings; the first one vectorises):
      // decay * c + 0.0 is decay * c exactly (c >= 0)
      double* __restrict c = counts.data() + (l * R + r) * E;
      for (int64_t e = 0; e < E; ++e) c[e] = decay * c[e];
      for (int64_t i = 0; i < m; ++i) c[obs[i]] = c[obs[i]] + 1.0;
      double& h = seen[l * R + r];
      h = decay * h + 1.0;
    }
  }
  std::vector<double> pseudo;  // strength * top_k * prior[t], the same product for every row
  void scores(int64_t l, int64_t d, int64_t rows, double* out, uint8_t* same) override {
    const int64_t t = (l + d) % L;
    const double* pt = prior + t * E;
    const double mk = strength * static_cast<double>(K);
    const double kd = static_cast<double>(K);
    pseudo.resize(E);
    double* __restrict ps = pseudo.data();
    for (int64_t e = 0; e < E; ++e) ps[e] = mk * pt[e];
    for (int64_t r = 0; r < rows; ++r) {
      const double* __restrict c = counts.data() + (t * R + r) * E;
      const double den = seen[t * R + r] + strength;
      double* __restrict o = out + r * E;
      same[r] = r > 0 && std::memcmp(&seen[t * R + r - 1], &seen[t * R + r], sizeof(double)) == 0 &&
                std::memcmp(c - E, c, E * sizeof(double)) == 0;
      if (same[r]) {
        std::copy(o - E, o, o);
        continue;
      }
      if (den > 0.0) {
        for (int64_t e = 0; e < E; ++e) o[e] = (c[e] + ps[e]) / den;
      } else {
        for (int64_t e = 0; e < E; ++e) o[e] = kd * pt[e];
      }
    }
  }
};

// transition.py: the observed experts' conditionals, combined by product (naive Bayes) or mean.
struct TransitionPredictor : RowPredictor {
  const double* prior;  // (L, E), Laplace alpha = 1
  const double* cond;   // (max_depth, L, E, E)
  int64_t max_depth;
  bool product;
  std::vector<int64_t> obs, nobs;  // the observed experts of each row at the last observed layer
  std::vector<double> w;
  // product: the likelihood ratios cond[d, l, e, :] / prior[t, :], divided once per (d, l) block on
  // first use (the same IEEE quotients the reference computes at every prediction)
  std::vector<double> ratio;
  std::vector<uint8_t> ratio_ready;
  TransitionPredictor(int64_t L_, int64_t E_, int64_t K_, const double* prior_, const double* cond_, int64_t max_depth_,
                      bool product_)
      : RowPredictor(L_, E_, K_), prior(prior_), cond(cond_), max_depth(max_depth_), product(product_), w(E_),
        ratio_ready(max_depth_ * L_, 0) {}
  const double* ratios(int64_t l, int64_t d) {
    const int64_t block = (d - 1) * L + l;
    if (ratio.empty()) ratio.resize(max_depth * L * E * E);
    double* r = ratio.data() + block * E * E;
    if (!ratio_ready[block]) {
      const double* pt = prior + ((l + d) % L) * E;
      const double* cd = cond + block * E * E;
      for (int64_t e = 0; e < E; ++e)
        for (int64_t j = 0; j < E; ++j) r[e * E + j] = cd[e * E + j] / pt[j];
      ratio_ready[block] = 1;
    }
    return r;
  }
  void observe(int64_t l, const int64_t* ids, int64_t row_stride, int64_t rows) override {
    obs.resize(rows * K);
    nobs.resize(rows);
    for (int64_t r = 0; r < rows; ++r) nobs[r] = observed_experts(ids + r * row_stride, K, obs.data() + r * K);
  }
  void scores(int64_t l, int64_t d, int64_t rows, double* out, uint8_t* same) override {
    // (depth <= max_depth is checked by engine_cpp.py before the replay, with the Python message)
    const int64_t t = (l + d) % L;
    const double* pt = prior + t * E;
    const double* cd = cond + ((d - 1) * L + l) * E * E;
    const double* rt = product ? ratios(l, d) : nullptr;
    for (int64_t r = 0; r < rows; ++r) {
      double* o = out + r * E;
      const int64_t m = nobs[r];
      const int64_t* S = obs.data() + r * K;
      same[r] = r > 0 && nobs[r - 1] == m && std::equal(S, S + m, S - K);
      if (same[r]) {
        std::copy(o - E, o, o);
        continue;
      }
      if (m == 0) {  // a missing record at this layer: nothing to condition on
        std::copy(pt, pt + E, o);
        continue;
      }
      if (product) {
        std::copy(pt, pt + E, w.data());
        for (int64_t i = 0; i < m; ++i) {
          const double* re = rt + S[i] * E;
          for (int64_t e = 0; e < E; ++e) w[e] = w[e] * re[e];
        }
        const double total = pairwise_sum(w.data(), E);
        if (total > 0.0 && std::isfinite(total)) {
          for (int64_t e = 0; e < E; ++e) o[e] = w[e] / total;
        } else {
          std::copy(pt, pt + E, o);
        }
      } else {
        for (int64_t e = 0; e < E; ++e) o[e] = 0.0;
        for (int64_t i = 0; i < m; ++i) {
          const double* ce = cd + S[i] * E;
          for (int64_t e = 0; e < E; ++e) o[e] = o[e] + ce[e];
        }
        const double n = static_cast<double>(m);  // >= 1
        for (int64_t e = 0; e < E; ++e) o[e] = o[e] / n;
      }
    }
  }
};

// What the replay reads at each step: per slot one row of E doubles. Slots 0..D-1 hold the
// prefetch scores of depths 1..D (the predictions summed over the unit's rows); slot D, when the
// policy wants scores, the prediction at ``score_depth`` averaged over the rows.
struct Predictions {
  int64_t E, depth, score_depth, slots;
  Predictions(int64_t E_, int64_t depth_, int64_t score_depth_)
      : E(E_), depth(depth_), score_depth(score_depth_), slots(depth_ + (score_depth_ > 0 ? 1 : 0)) {}
  virtual ~Predictions() = default;
  virtual void reset(int64_t rows) = 0;
  // Step (unit at ``ids``, layer l): returns the slots' rows.
  virtual const double* step(int64_t l, const int64_t* ids, int64_t row_stride, int64_t rows) = 0;
};

// A C++ predictor, run in place of the Python one.
struct NativePredictions : Predictions {
  std::unique_ptr<RowPredictor> pred;
  Normaliser norm;
  std::vector<double> raw, prob, out;
  std::vector<uint8_t> same;
  std::vector<int64_t> wanted;  // depths to predict, ascending (the reference's order)
  double k;
  NativePredictions(std::unique_ptr<RowPredictor> p, int64_t depth_, int64_t score_depth_)
      : Predictions(p->E, depth_, score_depth_), pred(std::move(p)), k(static_cast<double>(pred->K)) {
    for (int64_t d = 1; d <= depth; ++d) wanted.push_back(d);
    if (score_depth > depth) wanted.push_back(score_depth);
    out.resize(slots * E);
  }
  void reset(int64_t rows) override { pred->reset(rows); }
  const double* step(int64_t l, const int64_t* ids, int64_t row_stride, int64_t rows) override {
    pred->observe(l, ids, row_stride, rows);
    raw.resize(rows * E);
    prob.resize(rows * E);
    same.resize(rows);
    for (int64_t d : wanted) {
      pred->scores(l, d, rows, raw.data(), same.data());
      for (int64_t r = 0; r < rows; ++r) {
        double* pr = prob.data() + r * E;
        if (same[r]) {
          std::copy(pr - E, pr, pr);  // the same scores normalise to the same probabilities
        } else {
          norm.run(raw.data() + r * E, E, k, pr);
        }
      }
      // preds[d].sum(axis=0) / .mean(axis=0): rows added one after another, then divided
      double* __restrict sum = d <= depth ? out.data() + (d - 1) * E : out.data() + depth * E;
      const double* __restrict pr = prob.data();
      std::copy(pr, pr + E, sum);
      for (int64_t r = 1; r < rows; ++r)
        for (int64_t e = 0; e < E; ++e) sum[e] += pr[r * E + e];
      if (d == score_depth) {
        double* mean = out.data() + depth * E;
        const double n = static_cast<double>(rows);
        for (int64_t e = 0; e < E; ++e) mean[e] = sum[e] / n;
      }
    }
    return out.data();
  }
};

// Any other predictor: the Python side runs it over the schedule (the same observe / predict /
// reset calls as the reference) and writes the slots of up to ``chunk_steps`` steps into ``buf``
// whenever ``fill`` is called; fill returns the steps written, -1 after the predictor raised
// (the replay then stops with STREAM_TAG and Python re-raises the predictor's exception at the
// step where the reference raised it), and sets ``err`` when the call itself failed. The bindings'
// fill takes the GIL only for the call.
struct StreamedPredictions : Predictions {
  using Fill = std::function<int64_t(std::string& err)>;
  Fill fill;
  const double* buf;
  int64_t chunk_steps, avail = 0, pos = 0;
  StreamedPredictions(Fill fill_, const double* buf_, int64_t chunk_steps_, int64_t E_, int64_t depth_,
                      int64_t score_depth_)
      : Predictions(E_, depth_, score_depth_), fill(std::move(fill_)), buf(buf_), chunk_steps(chunk_steps_) {}
  void reset(int64_t) override {}
  const double* step(int64_t, const int64_t*, int64_t, int64_t) override {
    if (pos == avail) {
      std::string err;
      const int64_t n = fill(err);
      if (!err.empty()) throw std::runtime_error(std::string(STREAM_TAG) + err);
      if (n < 0) throw std::runtime_error(STREAM_TAG);
      if (n == 0 || n > chunk_steps) throw std::runtime_error("sim_replay: the prediction stream ended early");
      avail = n;
      pos = 0;
    }
    return buf + (pos++) * slots * E;
  }
};

}  // namespace moecache_sim
