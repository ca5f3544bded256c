// moecache._C.sim_replay and sim_normalise: the Python face of the simulator core (driver.h).
//
// Included once, by moecache_ext.cpp: the extension's one translation unit that includes pybind11
// (and torch's Python bindings); the core itself (driver.cpp, policies.h, predict.h, timeline.h) is
// plain C++. Here the arrays from moecache/sim/engine_cpp.py are checked and unpacked, the GIL is
// released for the replay, and a streamed predictor's fill gets the GIL back for each call.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <memory>
#include <string>
#include <tuple>

#include "driver.h"

namespace moecache_sim {

inline torch::Tensor check_1d(const torch::Tensor& t, torch::ScalarType type, const char* name) {
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
//   depth, score_depth, prefetch_rule, budget, admission   int
//   gate_span, gate_probe_every, gate_min_calls   int   the predictor gate's (admission gated)
//   layer_host_ms, copy_host_ms, predictor_host_ms, prefetch_host_ms, hybrid_layer_ms, slowdown   float
//                                          the hardware profile's calibrated terms (slowdown: 1 + copy_slowdown)
//   wait_scan_max int                      activation / predicted: pools of at most this many slots scan
//                                          (default: see Tuning; the tests force either layout)
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

// Returns (counts int64[15]: accesses hits ready needs loads cpu_runs prefetches prefetch_used
// prefetch_wasted prefetch_skipped prefetch_refused gated(0/1) predictor_calls predictor_probes predictor_skipped
// layers_off, times float64[4]: time gpu_busy copy_busy cpu_busy, record
// int64 (m, 4)).
inline std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> sim_replay(
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
  in.admission = opt.i("admission", AD_COST);
  TORCH_CHECK(in.admission == AD_NONE || in.admission == AD_COST || in.admission == AD_GATED,
              "sim_replay: unknown admission code");
  in.gate_span = opt.i("gate_span", 16);
  in.gate_probe_every = opt.i("gate_probe_every", 32);
  in.gate_min_calls = opt.i("gate_min_calls", 8);
  TORCH_CHECK(in.gate_span >= 1 && in.gate_probe_every >= 1 && in.gate_min_calls >= 0,
              "sim_replay: gate_span and gate_probe_every must be >= 1, gate_min_calls >= 0");
  in.layer_host = opt.f("layer_host_ms", 0.0);
  in.copy_host = opt.f("copy_host_ms", 0.0);
  in.pred_host = opt.f("predictor_host_ms", 0.0);
  in.pf_host = opt.f("prefetch_host_ms", 0.0);
  in.slow = opt.f("slowdown", 1.0);
  in.hybrid_ms = opt.f("hybrid_layer_ms", 0.0);
  in.evict_host = opt.f("evict_host_ms", 0.0);
  in.worker_queue = opt.i("worker_queue", 0) != 0;
  const int64_t score_depth = opt.i("score_depth", 0);
  const int64_t pred_code = opt.i("predictor", PR_NONE);
  TORCH_CHECK(in.depth >= 0 && in.budget >= 0 && score_depth >= 0, "sim_replay: negative depth, budget or score depth");
  TORCH_CHECK(in.prefetch_rule == PF_TOPK || in.prefetch_rule == PF_FILL, "sim_replay: unknown prefetch rule code");
  TORCH_CHECK(pred_code >= PR_NONE && pred_code <= PR_TRANSITION, "sim_replay: unknown predictor code ", pred_code);
  TORCH_CHECK(pred_code != PR_NONE || (in.depth == 0 && score_depth == 0),
              "sim_replay: prefetch and scores need a predictor");
  TORCH_CHECK((policy == P_PREDICTED) == (score_depth > 0), "sim_replay: score_depth is for the predicted policy");

  PolicyArgs pol;
  pol.code = policy;
  pol.int_param = int_param;
  pol.float_param = float_param;
  if (policy == P_STATIC) {
    check_1d(pinned, torch::kUInt8, "pinned");
    check_1d(fit_counts, torch::kInt64, "fit_counts");
    TORCH_CHECK(pinned.numel() == L * num_experts && fit_counts.numel() == L * num_experts,
                "sim_replay: pinned and fit_counts need layers x experts entries");
    pol.pinned.assign(pinned.data_ptr<uint8_t>(), pinned.data_ptr<uint8_t>() + pinned.numel());
    pol.fit_counts.assign(fit_counts.data_ptr<int64_t>(), fit_counts.data_ptr<int64_t>() + fit_counts.numel());
  }
  torch::Tensor pow_acc, pow_rank;
  if (policy == P_ACTIVATION || policy == P_PREDICTED) {
    pow_acc = opt.t("pow_acc", torch::kFloat64, in.units + 1);
    pow_rank = opt.t("pow_rank", torch::kFloat64, in.units + 1);
    pol.alpha = opt.f("alpha", 0.0);
    pol.g = opt.f("g", 1.0);
    pol.pow_acc = pow_acc.data_ptr<double>();
    pol.pow_rank = pow_rank.data_ptr<double>();
    pol.pow_len = pow_acc.numel();
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
    // Called from the replay (GIL released): takes the GIL for the Python call only.
    auto call = [&fill](std::string& err) -> int64_t {
      pybind11::gil_scoped_acquire gil;
      try {
        return fill().cast<int64_t>();
      } catch (pybind11::error_already_set& e) {
        err = e.what();
        return -1;
      }
    };
    preds = std::make_unique<StreamedPredictions>(call, buf.data_ptr<double>(), buf.size(0), E, in.depth, score_depth);
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
  tune.wait_scan_max = opt.i("wait_scan_max", -1);
  Output out;
  {
    pybind11::gil_scoped_release nogil;
    run_sim(in, L, num_experts, K, capacity, global_scope, pol, tune, preds.get(), out);
  }
  auto counts = torch::tensor({out.accesses, out.hits, out.ready, out.needs, out.loads, out.cpu_runs, out.prefetches,
                               out.pf_used, out.pf_wasted, out.pf_skipped, out.pf_refused,
                               static_cast<int64_t>(out.gated), out.gate_calls, out.gate_probes, out.gate_skipped,
                               out.gate_off, out.cancelled},
                              torch::kInt64);
  auto times = torch::tensor({out.tl.gpu, out.tl.gpu_busy, out.tl.copy_busy, out.tl.cpu_busy}, torch::kFloat64);
  const int64_t m = static_cast<int64_t>(out.rec.size() / 4);
  auto rec = torch::empty({m, 4}, torch::kInt64);
  if (m) std::copy(out.rec.begin(), out.rec.end(), rec.data_ptr<int64_t>());
  return {counts, times, rec};
}

// Predictor.normalise of each row of ``scores`` (rows, experts) float64: the core's version, for
// the differential tests.
inline torch::Tensor sim_normalise(const torch::Tensor& scores, int64_t top_k) {
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
inline void register_sim_core(pybind11::module& m) {
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
  // 2: every policy, predictions (C++ and streamed) and prefetch; 4: the worker copy queue; engine_cpp.py checks it
  m.attr("sim_core_version") = 6;
}
