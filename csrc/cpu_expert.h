// moecache._C.CpuExpertPool's C++ face (csrc/cpu_expert.cpp): plain C++, no torch, no Python. The
// bindings in moecache_ext.cpp (the extension's translation unit that includes pybind11) expose it;
// the implementation, its kernels and threads stay in cpu_expert.cpp.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

namespace moecache_cpu {

class CpuExpertPool {
 public:
  // ``threads`` workers (< 1: the hardware's threads - 1) running the kernel ``kernel`` ("auto",
  // "portable", "avx2", "avx512"; the best the CPU has at or below it).
  CpuExpertPool(int64_t threads, const std::string& kernel);
  ~CpuExpertPool();
  CpuExpertPool(const CpuExpertPool&) = delete;
  CpuExpertPool& operator=(const CpuExpertPool&) = delete;

  // Queue one task of experts sharing (hidden, inter, weight dtype); returns its ticket. The buffers
  // are addresses: x[j] (tokens[j], H) fp32, gate_up[j] (2I, H), down[j] (H, I), out[j] (tokens[j], H)
  // fp32. wtype: 0 = fp32, 1 = bf16.
  int64_t submit(int64_t hidden, int64_t inter, int64_t wtype, const std::vector<int64_t>& x,
                 const std::vector<int64_t>& tokens, const std::vector<int64_t>& gate_up,
                 const std::vector<int64_t>& down, const std::vector<int64_t>& out);
  // Block until task ``ticket`` finished; its wall time in ms.
  double wait(int64_t ticket);
  // Wake the workers for a task about to be submitted.
  void prewake();
  bool ready(int64_t ticket);
  std::tuple<double, double> read(int64_t addr, int64_t nbytes);
  std::tuple<int64_t, int64_t, int64_t, double> counters();
  std::string kernel() const;
  int64_t threads() const;
  // Finish queued tasks, stop the workers. Idempotent.
  void close();
  // Test hook: the nth task submitted from now on fails (its wait raises); later tasks run.
  void inject_fault(int64_t nth);

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

struct CpuFeatures {
  bool avx2 = false, fma = false, avx512f = false;
};

// The vector instructions this CPU (and OS) supports, as the kernel sees them.
CpuFeatures detect_cpu_features();
// The kernel CpuExpertPool(kernel=requested) runs on a CPU with these features (its selection rule).
std::string choose_cpu_kernel(const std::string& requested, bool avx2, bool fma, bool avx512f);

}  // namespace moecache_cpu
