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
  // Queue one task of compressed experts (moecache.quant's rows, read in place): experts[j] is the address
  // of expert j's row, offsets the 8 part offsets in it (gate_up q, scale, zero, bias; down q, scale,
  // zero, bias; -1 where absent). fmt: 0 int8, 1 int4, 2 mxfp4; group: its group size; compute_bf16:
  // dequantized weights round to bf16 (else fp32), and the biases are bf16 (else fp32). act 0:
  // silu(gate) * up with gate rows 0..I-1 and up rows I..2I-1 of gate_up; act 1 (GPT-OSS): gate row
  // 2i, up row 2i + 1, gate = min(gate, limit), up = clamp(up, -limit, limit),
  // (up + 1) * gate * sigmoid(alpha * gate). Biases are added to gate_up's and down's outputs.
  // fast: the fast mode (integer dot products on int16-quantized activations, cpu_expert_quant.h),
  // else the exact one (every weight dequantized and rounded to the compute dtype).
  int64_t submit_quant(int64_t hidden, int64_t inter, int64_t fmt, int64_t group, bool compute_bf16, int64_t act,
                       double alpha, double limit, const std::vector<int64_t>& offsets, const std::vector<int64_t>& x,
                       const std::vector<int64_t>& tokens, const std::vector<int64_t>& experts,
                       const std::vector<int64_t>& out, bool fast);
  // The instruction set the compressed kernels run: exact mode "avx512+bf16", "avx512", "avx2",
  // "portable"; fast mode "avx512-vnni-int16", "avx512-int16", "avx2-int16", "portable-int16".
  std::string quant_kernel(bool fast) const;
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
