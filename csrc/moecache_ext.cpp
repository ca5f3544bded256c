// moecache._C: the project's compiled extension, and its one translation unit that includes pybind11.
//
// The other translation units have no Python in them: the simulator core (sim/driver.cpp with its
// headers, plain C++), the CPU expert kernel (cpu_expert.cpp, plain C++ behind cpu_expert.h) and the
// copy worker (copy_worker.cpp, registered through torch's class registry). Their Python faces are
// bound here (sim/bindings.h, register_cpu_expert). Every function has a pure-Python twin that is
// the specification; the differential tests compare both (MOECACHE_DISABLE_EXT=1 forces the Python
// paths).
#include <torch/extension.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>

#ifndef MOECACHE_BUILD_FLAGS
#define MOECACHE_BUILD_FLAGS "unknown"
#endif

#ifdef MOECACHE_WITH_CUDA
torch::Tensor count_experts_cuda(const torch::Tensor& ids, int64_t num_experts);
#endif

// csrc/sim/: the simulator core (moecache._C.sim_replay).
#include "sim/bindings.h"

// csrc/cpu_expert.cpp: the CPU expert kernel's thread pool (moecache._C.CpuExpertPool).
#include "cpu_expert.h"

namespace {

template <typename T>
void count_experts_impl(const T* ids, int64_t tokens, int64_t layers, int64_t top_k,
                        int64_t num_experts, int64_t* out) {
  for (int64_t t = 0; t < tokens; ++t) {
    const T* row = ids + t * layers * top_k;
    for (int64_t l = 0; l < layers; ++l) {
      int64_t* counts = out + l * num_experts;
      for (int64_t k = 0; k < top_k; ++k) {
        const int64_t e = static_cast<int64_t>(row[l * top_k + k]);
        // Negative ids mark missing or dropped slots; anything >= num_experts is rejected up front.
        if (e >= 0) ++counts[e];
      }
    }
  }
}

// Accesses per (layer, expert) of a (tokens, layers, top_k) id array. Negative ids are skipped.
torch::Tensor count_experts(const torch::Tensor& ids, int64_t num_experts) {
  TORCH_CHECK(ids.dim() == 3, "ids must have shape (tokens, layers, top_k), got ", ids.sizes());
  TORCH_CHECK(num_experts >= 1, "num_experts must be >= 1");
#ifdef MOECACHE_WITH_CUDA
  if (ids.is_cuda()) return count_experts_cuda(ids, num_experts);
#endif
  TORCH_CHECK(ids.device().is_cpu(), "count_experts: ids must be on the CPU (or CUDA where built)");
  auto c = ids.contiguous();
  if (c.numel() > 0) {
    const int64_t hi = c.max().item<int64_t>();
    TORCH_CHECK(hi < num_experts, "expert id ", hi, " out of range: ", num_experts, " experts declared");
  }
  auto out = torch::zeros({c.size(0) ? c.size(1) : ids.size(1), num_experts}, torch::kInt64);
  {
    pybind11::gil_scoped_release nogil;
    if (c.scalar_type() == torch::kInt16) {
      count_experts_impl(c.data_ptr<int16_t>(), c.size(0), c.size(1), c.size(2), num_experts, out.data_ptr<int64_t>());
    } else if (c.scalar_type() == torch::kInt32) {
      count_experts_impl(c.data_ptr<int32_t>(), c.size(0), c.size(1), c.size(2), num_experts, out.data_ptr<int64_t>());
    } else if (c.scalar_type() == torch::kInt64) {
      count_experts_impl(c.data_ptr<int64_t>(), c.size(0), c.size(1), c.size(2), num_experts, out.data_ptr<int64_t>());
    } else {
      TORCH_CHECK(false, "count_experts: ids must be int16, int32 or int64, got ", c.scalar_type());
    }
  }
  return out;
}

std::string build_flags() { return MOECACHE_BUILD_FLAGS; }

bool with_cuda() {
#ifdef MOECACHE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

// The CPU expert pool's bindings (csrc/cpu_expert.h); the GIL is released while it computes or waits.
void register_cpu_expert(pybind11::module& m) {
  namespace py = pybind11;
  using moecache_cpu::CpuExpertPool;
  py::class_<CpuExpertPool>(m, "CpuExpertPool",
                            "thread pool computing SwiGLU experts on the host (see csrc/cpu_expert.cpp)")
      .def(py::init<int64_t, const std::string&>(), py::arg("threads"), py::arg("kernel") = "auto")
      .def("submit", &CpuExpertPool::submit, py::call_guard<py::gil_scoped_release>(), py::arg("hidden"),
           py::arg("inter"), py::arg("wtype"), py::arg("x"), py::arg("tokens"), py::arg("gate_up"), py::arg("down"),
           py::arg("out"))
      .def("submit_quant", &CpuExpertPool::submit_quant, py::call_guard<py::gil_scoped_release>(), py::arg("hidden"),
           py::arg("inter"), py::arg("fmt"), py::arg("group"), py::arg("compute_bf16"), py::arg("act"),
           py::arg("alpha"), py::arg("limit"), py::arg("offsets"), py::arg("x"), py::arg("tokens"), py::arg("experts"),
           py::arg("out"), py::arg("fast") = false)
      .def("quant_kernel", &CpuExpertPool::quant_kernel, py::arg("fast") = false)
      .def("wait", &CpuExpertPool::wait, py::call_guard<py::gil_scoped_release>(), py::arg("ticket"))
      .def("ready", &CpuExpertPool::ready, py::arg("ticket"))
      .def("prewake", &CpuExpertPool::prewake, py::call_guard<py::gil_scoped_release>())
      .def("read", &CpuExpertPool::read, py::call_guard<py::gil_scoped_release>(), py::arg("addr"),
           py::arg("nbytes"))
      .def("counters", &CpuExpertPool::counters)
      .def("kernel", &CpuExpertPool::kernel)
      .def("threads", &CpuExpertPool::threads)
      .def("inject_fault", &CpuExpertPool::inject_fault, py::arg("nth") = 1)
      .def("close", &CpuExpertPool::close, py::call_guard<py::gil_scoped_release>());
  m.def("cpu_features", [] {
    const auto f = moecache_cpu::detect_cpu_features();
    py::dict d;
    d["avx2"] = f.avx2;
    d["fma"] = f.fma;
    d["avx512f"] = f.avx512f;
    return d;
  }, "the vector instructions this CPU (and OS) supports, as the CPU expert kernel sees them");
  m.def("choose_cpu_kernel", &moecache_cpu::choose_cpu_kernel,
        "the kernel CpuExpertPool(kernel=requested) runs on a CPU with these features (its selection rule)",
        py::arg("requested"), py::arg("avx2"), py::arg("fma"), py::arg("avx512f"));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moecache compiled extension";
  m.def("count_experts", &count_experts, "accesses per (layer, expert) of a (tokens, layers, top_k) id array",
        pybind11::arg("ids"), pybind11::arg("num_experts"));
  m.def("build_flags", &build_flags, "compiler flags the extension was built with");
  m.def("with_cuda", &with_cuda, "whether the CUDA sources were compiled in");
  register_sim_core(m);
  register_cpu_expert(m);
}
