// moecache._C.CpuExpertPool: a missed expert's gated FFN computed on the host, from its host weights.
//
//   out[p] = down · ( silu(gate · x[p]) * (up · x[p]) )       for every token row p of the job
//
// The weights are read in place from the host store (moecache/runtime/hoststore.py): gate_up is the
// (2I, H) row-major block [gate rows; up rows] and down the (H, I) one, the layout transformers'
// concatenated, non-transposed SwiGLU experts use (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek, PhiMoE,
// Granite). Weights are bf16 or fp32, inputs and outputs fp32, every sum accumulates in fp32. The
// Python side (moecache/runtime/hybrid.py) checks the layout and keeps every buffer alive until
// wait() returns; its torch formula is the specification the tests compare against.
//
// Threads: a persistent pool of N workers (the caller picks N = cores - 1, keeping a core for the
// thread that launches GPU work). A submitted task runs on all N workers: phase 1 splits the rows of
// I (each worker streams its own items of gate and up rows), a barrier, phase 2 splits the rows of
// H (down). At batch 1 this is memory bound, so spreading one expert over every core is what makes
// it fast. Items are taken from an atomic counter, so a worker slowed by copies running at the same
// time takes fewer. Thread hand-offs cost a wake-up each (not small next to a whole small expert's
// run), so the caller announces a task with
// prewake() before it prepares the inputs (the workers wake meanwhile and spin, yielding, for it),
// and wait() spins, yielding, on the core kept free before it sleeps.
//
// Token blocking: a micro-kernel computes a register block of up to RB weight rows x TB token rows
// of dot products (AVX-512 4 x 4, AVX2 4 x 2), so each weight vector loaded serves TB tokens and each
// token vector RB rows. With more tokens than one block, an item walks its rows chunk by chunk
// (CHUNK elements): a chunk of every token row stays in L2 while all the item's rows pass, and each
// weight chunk stays in L1 while all the token blocks pass, so the weights leave memory once however
// many tokens there are (batches, prefill); items grow with the tokens so that the weights, not the
// token rows, stay the main traffic.
//
// Summation order: every output element is one dot product, summed by one worker as: per chunk of
// CHUNK elements (in order), one vector accumulator (AVX-512 16 lanes, AVX2 8, portable 1) over the
// chunk's elements in order, the chunk's tail as one more vector step with zeros, the lanes reduced,
// and the chunk's sum added to the running sum. Nothing in it depends on the thread count, the
// scheduling, the register block or the number of tokens run together: one token alone gives the
// bits it gives among 64.
//
// Kernels: AVX-512F, AVX2+FMA and portable scalar C++, chosen once at construction from what the
// CPU reports (__builtin_cpu_supports, which also checks the OS saves the vector state), so a CPU
// without the instructions gets the portable path and never executes them. The vector paths are
// compiled with per-function target attributes: the rest of the extension keeps the baseline ISA.
// MOECACHE_CPU_KERNEL=portable (read in Python, passed as `kernel`) forces the portable path.
//
// The GIL is released in submit/wait/read; workers never touch Python.
#include "cpu_expert.h"
#include "cpu_expert_quant.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#ifdef __linux__
#include <pthread.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
// GCC's intrinsics headers build "undefined" vectors as `__m256d __Y = __Y;`, which -Wall reports
// as uninitialised in every instantiation; nothing uninitialised is read.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#define MOECACHE_X86 1
#define MC_AVX512 __attribute__((target("avx512f")))
#define MC_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace moecache_cpu {

enum Isa : int { PORTABLE = 0, AVX2 = 1, AVX512 = 2 };
const char* const ISA_NAMES[] = {"portable", "avx2", "avx512"};
// Register blocks: up to MAX_RB weight rows x MAX_TB token rows of dot products per micro-kernel call
// (AVX-512: 4 x 4 = 16 accumulators of its 32 registers; AVX2: 4 x 2 = 8 of its 16).
constexpr int MAX_RB = 4, MAX_TB = 4;
// Every dot product is summed chunk by chunk in this order (see "Summation order" above).
constexpr int64_t CHUNK = 1024;
// Software prefetch distance along a weight row, in bytes. The hardware streamer restarts at every
// 4 KiB page and one core keeps few misses in flight; prefetching ahead brings the kernel's
// single-thread bandwidth close to a plain streaming read.
constexpr int64_t PREFETCH_BYTES = 2048;
// Waiting for a task, the caller spins (yielding) this long before it sleeps; prewake()'s workers
// spin this long for the task announced.
constexpr std::chrono::milliseconds WAIT_SPIN{20}, PREWAKE_SPIN{2};

// part[r * ps + t] += (rows[r][k0:k1] . x[t * xs + k0 : t * xs + k1]) for r < RB, t < TB; the
// weight rows are bf16 (raw uint16) or fp32, x fp32. One call is one chunk of the summation order.
using BlockFn = void (*)(const void* const* rows, const float* x, int64_t xs, int64_t k0, int64_t k1, float* part,
                         int64_t ps);

inline float bf16_to_f32(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <bool BF16>
inline float w_at(const void* w, int64_t i) {
  if constexpr (BF16) {
    return bf16_to_f32(static_cast<const uint16_t*>(w)[i]);
  } else {
    return static_cast<const float*>(w)[i];
  }
}

// ---- portable --------------------------------------------------------------------------------
template <int RB, int TB, bool BF16>
void block_portable(const void* const* rows, const float* x, int64_t xs, int64_t k0, int64_t k1, float* part,
                    int64_t ps) {
  float acc[RB][TB] = {};
  for (int64_t k = k0; k < k1; ++k) {
    float w[RB];
    for (int r = 0; r < RB; ++r) w[r] = w_at<BF16>(rows[r], k);
    for (int t = 0; t < TB; ++t) {
      const float xv = x[t * xs + k];
      for (int r = 0; r < RB; ++r) acc[r][t] += w[r] * xv;
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < TB; ++t) part[r * ps + t] += acc[r][t];
}

float sum_portable(const float* p, int64_t n) {
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    a0 += p[i];
    a1 += p[i + 1];
    a2 += p[i + 2];
    a3 += p[i + 3];
  }
  for (; i < n; ++i) a0 += p[i];
  return (a0 + a1) + (a2 + a3);
}

#ifdef MOECACHE_X86
// The cache lines PREFETCH_BYTES past element i of a row that one 32-element step reads (one line
// in bf16, two in fp32). Past the row's end it touches the next row or nothing: a prefetch never faults.
template <bool BF16>
inline void prefetch_ahead(const void* w, int64_t i) {
  const char* p = static_cast<const char*>(w) + i * (BF16 ? 2 : 4) + PREFETCH_BYTES;
  _mm_prefetch(p, _MM_HINT_T0);
  if constexpr (!BF16) _mm_prefetch(p + 64, _MM_HINT_T0);
}

// The last m < lanes elements of a row or of x, zero-padded to a full vector in `buf`: a vector step
// with zeros adds nothing, and nothing past the end of a buffer is read.
template <bool BF16, int LANES>
inline void pad_tail(const void* w, int64_t k, int64_t m, float* buf) {
  for (int64_t i = 0; i < LANES; ++i) buf[i] = i < m ? w_at<BF16>(w, k + i) : 0.f;
}

// ---- AVX2 + FMA ------------------------------------------------------------------------------
template <bool BF16>
MC_AVX2 inline __m256 load8(const void* w, int64_t i) {
  if constexpr (BF16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    return _mm256_loadu_ps(static_cast<const float*>(w) + i);
  }
}

MC_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
  return _mm_cvtss_f32(s);
}

template <int RB, int TB, bool BF16>
MC_AVX2 void block_avx2(const void* const* rows, const float* x, int64_t xs, int64_t k0, int64_t k1, float* part,
                        int64_t ps) {
  __m256 acc[RB][TB];
#pragma GCC unroll 4
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 4
    for (int t = 0; t < TB; ++t) acc[r][t] = _mm256_setzero_ps();
  __m256 w[RB];
  int64_t k = k0;
  for (; k + 8 <= k1; k += 8) {
    if ((k & 31) == 0) {
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) prefetch_ahead<BF16>(rows[r], k);
    }
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) w[r] = load8<BF16>(rows[r], k);
#pragma GCC unroll 4
    for (int t = 0; t < TB; ++t) {
      const __m256 xv = _mm256_loadu_ps(x + t * xs + k);
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) acc[r][t] = _mm256_fmadd_ps(w[r], xv, acc[r][t]);
    }
  }
  if (k < k1) {
    alignas(32) float buf[8];
    for (int r = 0; r < RB; ++r) {
      pad_tail<BF16, 8>(rows[r], k, k1 - k, buf);
      w[r] = _mm256_load_ps(buf);
    }
    for (int t = 0; t < TB; ++t) {
      pad_tail<false, 8>(x + t * xs, k, k1 - k, buf);
      const __m256 xv = _mm256_load_ps(buf);
      for (int r = 0; r < RB; ++r) acc[r][t] = _mm256_fmadd_ps(w[r], xv, acc[r][t]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < TB; ++t) part[r * ps + t] += hsum8(acc[r][t]);
}

MC_AVX2 float sum_avx2(const float* p, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p + i));
    a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p + i + 8));
    a2 = _mm256_add_ps(a2, _mm256_loadu_ps(p + i + 16));
    a3 = _mm256_add_ps(a3, _mm256_loadu_ps(p + i + 24));
  }
  float s = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < n; ++i) s += p[i];
  return s;
}

// ---- AVX-512F --------------------------------------------------------------------------------
template <bool BF16>
MC_AVX512 inline __m512 load16(const void* w, int64_t i) {
  if constexpr (BF16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(w) + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_loadu_ps(static_cast<const float*>(w) + i);
  }
}

template <int RB, int TB, bool BF16>
MC_AVX512 void block_avx512(const void* const* rows, const float* x, int64_t xs, int64_t k0, int64_t k1, float* part,
                            int64_t ps) {
  __m512 acc[RB][TB];
#pragma GCC unroll 4
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 4
    for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_setzero_ps();
  __m512 w[RB];
  int64_t k = k0;
  for (; k + 16 <= k1; k += 16) {
    if ((k & 31) == 0) {
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) prefetch_ahead<BF16>(rows[r], k);
    }
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) w[r] = load16<BF16>(rows[r], k);
#pragma GCC unroll 4
    for (int t = 0; t < TB; ++t) {
      const __m512 xv = _mm512_loadu_ps(x + t * xs + k);
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) acc[r][t] = _mm512_fmadd_ps(w[r], xv, acc[r][t]);
    }
  }
  if (k < k1) {
    alignas(64) float buf[16];
    for (int r = 0; r < RB; ++r) {
      pad_tail<BF16, 16>(rows[r], k, k1 - k, buf);
      w[r] = _mm512_load_ps(buf);
    }
    for (int t = 0; t < TB; ++t) {
      pad_tail<false, 16>(x + t * xs, k, k1 - k, buf);
      const __m512 xv = _mm512_load_ps(buf);
      for (int r = 0; r < RB; ++r) acc[r][t] = _mm512_fmadd_ps(w[r], xv, acc[r][t]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < TB; ++t) part[r * ps + t] += _mm512_reduce_add_ps(acc[r][t]);
}

MC_AVX512 float sum_avx512(const float* p, int64_t n) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    a0 = _mm512_add_ps(a0, _mm512_loadu_ps(p + i));
    a1 = _mm512_add_ps(a1, _mm512_loadu_ps(p + i + 16));
    a2 = _mm512_add_ps(a2, _mm512_loadu_ps(p + i + 32));
    a3 = _mm512_add_ps(a3, _mm512_loadu_ps(p + i + 48));
  }
  float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  for (; i < n; ++i) s += p[i];
  return s;
}
#endif  // MOECACHE_X86

struct Features {
  bool avx2 = false, fma = false, avx512f = false;
};

Features cpu_features() {
  Features f;
#ifdef MOECACHE_X86
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2");
  f.fma = __builtin_cpu_supports("fma");
  f.avx512f = __builtin_cpu_supports("avx512f");
#endif
  return f;
}

// The kernel to run for a request ("auto", "portable", "avx2", "avx512") on a CPU with features `f`:
// the requested one where the CPU has it, else the best one below it that it has.
Isa choose_isa(const std::string& requested, const Features& f) {
  const Isa best = f.avx512f ? AVX512 : (f.avx2 && f.fma ? AVX2 : PORTABLE);
  if (requested == "auto" || requested.empty()) return best;
  if (requested == "portable") return PORTABLE;
  if (requested == "avx2") return best >= AVX2 ? AVX2 : PORTABLE;
  if (requested == "avx512") return best;
  throw std::invalid_argument("unknown CPU kernel '" + requested + "'; valid: auto, portable, avx2, avx512");
}

struct Kernels {
  BlockFn block[2][MAX_RB][MAX_TB] = {};  // [bf16][rows - 1][tokens - 1], up to (rb, tb)
  int rb = 1, tb = 1;                     // the register block of this instruction set
  float (*sum)(const float*, int64_t) = nullptr;
};

// Fill k.block[.][r][t] with F<r + 1, t + 1, bf16> for r < RB, t < TB (recursing over the sizes).
template <template <int, int, bool> class F, int RB, int TB>
struct Fill {
  static void in(Kernels& k) {
    k.block[0][RB - 1][TB - 1] = F<RB, TB, false>::fn;
    k.block[1][RB - 1][TB - 1] = F<RB, TB, true>::fn;
    if constexpr (TB > 1) Fill<F, RB, TB - 1>::in(k);
    if constexpr (TB == 1 && RB > 1) Fill<F, RB - 1, MAX_TB>::in(k);
  }
};

template <int RB, int TB, bool BF16>
struct PortableFn {
  static constexpr BlockFn fn = block_portable<RB, TB, BF16>;
};
#ifdef MOECACHE_X86
template <int RB, int TB, bool BF16>
struct Avx2Fn {
  static constexpr BlockFn fn = block_avx2<RB, TB, BF16>;
};
template <int RB, int TB, bool BF16>
struct Avx512Fn {
  static constexpr BlockFn fn = block_avx512<RB, TB, BF16>;
};
#endif

Kernels kernels_for(Isa isa) {
  Kernels k;
  switch (isa) {
#ifdef MOECACHE_X86
    case AVX512:
      Fill<Avx512Fn, MAX_RB, MAX_TB>::in(k);
      k.rb = 4, k.tb = 4, k.sum = sum_avx512;
      return k;
    case AVX2:
      Fill<Avx2Fn, MAX_RB, MAX_TB>::in(k);
      k.rb = 4, k.tb = 2, k.sum = sum_avx2;  // 8 accumulators + 4 weight vectors of 16 registers
      return k;
#endif
    default:
      Fill<PortableFn, MAX_RB, MAX_TB>::in(k);
      k.rb = 4, k.tb = 4, k.sum = sum_portable;
      return k;
  }
}

inline float silu(float g) { return g / (1.0f + std::exp(-g)); }

// One expert of a task: `tokens` rows of x (tokens, H) -> out (tokens, H); act is its (tokens, I) scratch.
struct Job {
  const float* x;
  int64_t tokens;
  const uint8_t* base = nullptr;  // compressed experts: the expert's row in the host store
  std::vector<float> xp;          // x in even/odd order, where the compressed kernels read it so
  // The fast mode's quantized token rows (cpu_expert_quant.h): x's and act's int16 codes (per token
  // qfast_x_len(H) / qfast_x_len(I)), per group scales and sx * sum(codes).
  std::vector<int16_t> xq, aq;
  std::vector<float> xsx, xzx, asx, azx;
  const void* gate_up;
  const void* down;
  float* out;
  std::vector<float> act;
  int64_t rows1 = 1, rows2 = 1;    // rows per work item: of I in phase 1 (gate and up), of H in phase 2
  int64_t first1 = 0, first2 = 0;  // index of its first work item in phase 1 / phase 2
};

// One expert job's input, token count, output and zeroed activations (both task kinds).
static void start_job(Job& jb, int64_t x, int64_t tokens, int64_t out, int64_t inter) {
  if (tokens < 1) throw std::invalid_argument("every expert job needs >= 1 token row");
  jb.x = reinterpret_cast<const float*>(x);
  jb.tokens = tokens;
  jb.out = reinterpret_cast<float*>(out);
  jb.act.assign(static_cast<size_t>(tokens * inter), 0.f);
}

// What a task of compressed experts shares: the format, the activation and the parts' offsets in an
// expert's row (moecache.quant.ExpertCodec: the same for every expert of a layer).
struct QTask {
  QSpec spec;
  int act = 0;                  // 0: silu(gate) * up, gate rows 0..I-1, up rows I..2I-1; 1: GPT-OSS (below)
  float alpha = 1.f, limit = 0.f;
  bool evenodd = false;         // the kernels read x (and act) in even/odd order
  bool fast = false;            // integer dot products on int16-quantized activations (qfast kernels)
  int64_t off[8] = {};          // gate_up q, scale, zero, bias; down q, scale, zero, bias (-1: absent)
  int64_t q_stride[2] = {}, s_stride[2] = {}, z_stride[2] = {};  // per row: [gate_up, down]
};

struct Task {
  bool read = false;  // a bandwidth probe: sum `buf` (n floats) instead of experts
  bool quant = false;  // compressed experts (QTask q)
  QTask q;
  std::vector<Job> jobs;
  int64_t H = 0, I = 0;
  bool bf16 = false;
  int64_t items1 = 0, items2 = 0;
  const float* buf = nullptr;
  int64_t n = 0, chunk = 0;
  std::vector<float> partial;          // per item (read tasks)
  std::atomic<int64_t> next1{0}, next2{0};
  // Items finished per phase. The phase barrier and the task's end count items, not threads: a
  // worker that wakes late (a descheduled vCPU, a slow futex wake-up) finds no items left and goes
  // back to sleep instead of holding every other thread and the waiter until it arrives.
  std::atomic<int64_t> done1{0}, done2{0};
  std::chrono::steady_clock::time_point t0;
  double ms = 0.0;
  bool done = false;
  std::string error;                   // non-empty: the task failed; wait() raises it
  std::atomic<bool> done_flag{false};  // `done` for a waiter spinning without the lock
};

// Rows of a work item (of `total_rows`, each `row_bytes` of weights; the item reads `x_bytes` of token
// rows whatever its size): ~64 KiB of weights (long streams) and at least `min_rows`; at least as many
// as make its weights outweigh the token rows it reads, so that many tokens (prefill) leave the
// weights the main traffic; at most what leaves ~4 items per thread to balance. Item boundaries never
// change a result.
inline int64_t item_rows(int64_t total_rows, int64_t row_bytes, int64_t x_bytes, int64_t min_rows, int nthreads) {
  int64_t rows = std::max<int64_t>(min_rows, (64 << 10) / row_bytes);
  rows = std::max<int64_t>(rows, (x_bytes + row_bytes - 1) / row_bytes);
  const int64_t balance = std::max<int64_t>(min_rows, (total_rows + 4 * nthreads - 1) / (4 * nthreads));
  rows = std::min<int64_t>({rows, balance, 512});
  return std::max<int64_t>(1, std::min<int64_t>(rows, total_rows));
}

class CpuExpertPool::Impl {
 public:
  Impl(int64_t threads, const std::string& kernel)
      : isa_(choose_isa(kernel, cpu_features())), k_(kernels_for(isa_)), qk_(quant_kernels_for(quant_isa(isa_), bf16_hw(isa_))),
        qfk_(quant_fast_kernels_for(quant_isa(isa_), vnni_hw(isa_))) {
    if (threads < 1) {
      const int64_t hw = static_cast<int64_t>(std::thread::hardware_concurrency());
      threads = std::max<int64_t>(1, hw - 1);
    }
    nthreads_ = static_cast<int>(threads);
    for (int i = 0; i < nthreads_; ++i) workers_.emplace_back([this] { work(); });
  }

  ~Impl() { close(); }

  // Queue one task of experts sharing (hidden, inter, weight dtype); returns its ticket. The buffers
  // are addresses (see the header): x[j] (tokens[j], H) fp32, gate_up[j] (2I, H), down[j] (H, I),
  // out[j] (tokens[j], H) fp32. wtype: 0 = fp32, 1 = bf16.
  int64_t submit(int64_t hidden, int64_t inter, int64_t wtype, const std::vector<int64_t>& x,
                 const std::vector<int64_t>& tokens, const std::vector<int64_t>& gate_up,
                 const std::vector<int64_t>& down, const std::vector<int64_t>& out) {
    if (hidden < 1 || inter < 1) throw std::invalid_argument("hidden and intermediate sizes must be >= 1");
    if (wtype != 0 && wtype != 1) throw std::invalid_argument("wtype must be 0 (fp32) or 1 (bf16)");
    const size_t n = x.size();
    if (tokens.size() != n || gate_up.size() != n || down.size() != n || out.size() != n)
      throw std::invalid_argument("x, tokens, gate_up, down and out differ in length");
    auto t = std::make_shared<Task>();
    t->H = hidden;
    t->I = inter;
    t->bf16 = wtype == 1;
    const int64_t wbytes = t->bf16 ? 2 : 4;
    t->jobs.resize(n);
    for (size_t j = 0; j < n; ++j) {
      Job& jb = t->jobs[j];
      start_job(jb, x[j], tokens[j], out[j], inter);
      jb.gate_up = reinterpret_cast<const void*>(gate_up[j]);
      jb.down = reinterpret_cast<const void*>(down[j]);
      // Phase 1 rows are (gate, up) pairs: two weight rows each.
      jb.rows1 = item_rows(inter, 2 * hidden * wbytes, jb.tokens * hidden * 4, 2, nthreads_);
      jb.rows2 = item_rows(hidden, inter * wbytes, jb.tokens * inter * 4, 4, nthreads_);
      jb.first1 = t->items1;
      jb.first2 = t->items2;
      t->items1 += (inter + jb.rows1 - 1) / jb.rows1;
      t->items2 += (hidden + jb.rows2 - 1) / jb.rows2;
    }
    return enqueue(t);
  }

  // Queue one task of compressed experts (see the header); returns its ticket.
  int64_t submit_quant(int64_t hidden, int64_t inter, int64_t fmt, int64_t group, bool compute_bf16, int64_t act,
                       double alpha, double limit, const std::vector<int64_t>& offsets, const std::vector<int64_t>& x,
                       const std::vector<int64_t>& tokens, const std::vector<int64_t>& experts,
                       const std::vector<int64_t>& out, bool fast) {
    if (hidden < 1 || inter < 1) throw std::invalid_argument("hidden and intermediate sizes must be >= 1");
    if (fmt < Q_INT8 || fmt > Q_MXFP4) throw std::invalid_argument("fmt must be 0 (int8), 1 (int4) or 2 (mxfp4)");
    if (fmt == Q_MXFP4 ? group != 32 : (group != 32 && group != 64 && group != 128))
      throw std::invalid_argument("unsupported group size " + std::to_string(group) +
                                  ": int8/int4 take 32, 64 or 128, mxfp4 takes 32");
    if (hidden % group || inter % group)
      throw std::invalid_argument("hidden (" + std::to_string(hidden) + ") and intermediate (" + std::to_string(inter) +
                                  ") sizes must be multiples of the group size " + std::to_string(group));
    if (act != 0 && act != 1) throw std::invalid_argument("act must be 0 (SiLU) or 1 (GPT-OSS clamped SwiGLU)");
    if (offsets.size() != 8) throw std::invalid_argument("offsets must list 8 part offsets (-1 for an absent part)");
    for (int i : {0, 1, 4, 5})
      if (offsets[i] < 0) throw std::invalid_argument("the codes and scales of both matrices must be present");
    if (fmt != Q_MXFP4 && (offsets[2] < 0 || offsets[6] < 0))
      throw std::invalid_argument("int8/int4 matrices need their zeros");
    const size_t n = x.size();
    if (tokens.size() != n || experts.size() != n || out.size() != n)
      throw std::invalid_argument("x, tokens, experts and out differ in length");
    auto t = std::make_shared<Task>();
    t->quant = true;
    t->H = hidden;
    t->I = inter;
    QTask& q = t->q;
    q.spec.fmt = static_cast<int>(fmt);
    q.spec.group = static_cast<int>(group);
    q.spec.round_bf16 = compute_bf16 && fmt != Q_MXFP4;  // MXFP4 values are exact in bf16
    q.act = static_cast<int>(act);
    q.alpha = static_cast<float>(alpha);
    q.limit = static_cast<float>(limit);
    q.fast = fast;
    q.evenodd = !fast && quant_x_evenodd(qk_, q.spec);
    t->bf16 = compute_bf16;  // the biases' dtype (the compute dtype)
    for (int i = 0; i < 8; ++i) q.off[i] = offsets[i];
    const int64_t ins[2] = {hidden, inter};
    int64_t row_bytes[2];
    for (int m = 0; m < 2; ++m) {
      const int64_t groups = ins[m] / group;
      q.q_stride[m] = fmt == Q_INT8 ? ins[m] : ins[m] / 2;
      q.s_stride[m] = fmt == Q_MXFP4 ? groups : 2 * groups;
      q.z_stride[m] = fmt == Q_MXFP4 ? 0 : groups;
      row_bytes[m] = q.q_stride[m] + q.s_stride[m] + q.z_stride[m];
    }
    t->jobs.resize(n);
    for (size_t j = 0; j < n; ++j) {
      Job& jb = t->jobs[j];
      start_job(jb, x[j], tokens[j], out[j], inter);
      jb.base = reinterpret_cast<const uint8_t*>(experts[j]);
      jb.gate_up = jb.down = nullptr;
      if (q.evenodd) {  // x in the order the kernels read it
        jb.xp.resize(static_cast<size_t>(tokens[j] * hidden));
        for (int64_t p = 0; p < tokens[j]; ++p)
          for (int64_t i = 0; i < hidden; ++i) jb.xp[p * hidden + evenodd_pos(i)] = jb.x[p * hidden + i];
      }
      jb.rows1 = item_rows(inter, 2 * row_bytes[0], jb.tokens * hidden * 4, 2, nthreads_);
      jb.rows2 = item_rows(hidden, row_bytes[1], jb.tokens * inter * 4, 4, nthreads_);
      if (fast) {  // x quantized once; a phase-1 item owns whole groups of act, which it quantizes
        const int64_t G = group, xl = qfast_x_len(hidden), al = qfast_x_len(inter);
        jb.rows1 = std::min(inter, (jb.rows1 + G - 1) / G * G);
        jb.xq.assign(static_cast<size_t>(tokens[j] * xl), 0);
        jb.xsx.resize(static_cast<size_t>(tokens[j] * (hidden / G)));
        jb.xzx.resize(jb.xsx.size());
        for (int64_t p = 0; p < tokens[j]; ++p)
          qfast_quantize(q.spec, jb.x + p * hidden, 0, hidden / G, jb.xq.data() + p * xl, jb.xsx.data() + p * (hidden / G),
                         jb.xzx.data() + p * (hidden / G));
        jb.aq.assign(static_cast<size_t>(tokens[j] * al), 0);
        jb.asx.resize(static_cast<size_t>(tokens[j] * (inter / G)));
        jb.azx.resize(jb.asx.size());
      }
      jb.first1 = t->items1;
      jb.first2 = t->items2;
      t->items1 += (inter + jb.rows1 - 1) / jb.rows1;
      t->items2 += (hidden + jb.rows2 - 1) / jb.rows2;
    }
    return enqueue(t);
  }

  // Block (GIL released) until task `ticket` finished; returns its wall time in ms. The caller spins
  // (yielding) for up to WAIT_SPIN first: its core is the one kept free, and a sleeping waiter pays
  // a thread wake-up when the task ends.
  double wait(int64_t ticket) {
    std::shared_ptr<Task> t;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = tickets_.find(ticket);
      if (it == tickets_.end())
        throw std::invalid_argument("unknown or already waited ticket " + std::to_string(ticket));
      t = it->second;
    }
    const auto until = std::chrono::steady_clock::now() + WAIT_SPIN;
    while (!t->done_flag.load(std::memory_order_acquire) && std::chrono::steady_clock::now() < until)
      std::this_thread::yield();
    std::unique_lock<std::mutex> lock(mu_);
    cv_done_.wait(lock, [&] { return t->done; });
    if (tickets_.erase(ticket) == 0)  // another thread waited for it meanwhile
      throw std::invalid_argument("unknown or already waited ticket " + std::to_string(ticket));
    if (!t->error.empty()) throw std::runtime_error("moecache CPU expert pool: task failed: " + t->error);
    return t->ms;
  }

  // Test hook: the `nth` next task to start (1 = the next one) fails without running; its wait()
  // raises. The pool stays usable for the tasks after it.
  void inject_fault(int64_t nth) {
    std::lock_guard<std::mutex> lock(mu_);
    fault_in_ = nth;
  }

  // A task is about to come (the caller is preparing its inputs): sleeping workers wake now and spin
  // (yielding) for up to PREWAKE_SPIN, so the task starts without the wake-up of every worker.
  void prewake() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (closed_) return;
      ++wake_;
      spin_until_ = std::chrono::steady_clock::now() + PREWAKE_SPIN;
    }
    cv_work_.notify_all();
  }

  bool ready(int64_t ticket) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = tickets_.find(ticket);
    if (it == tickets_.end()) throw std::invalid_argument("unknown or already waited ticket " + std::to_string(ticket));
    return it->second->done;
  }

  // Multi-threaded read of `nbytes` at `addr` (fp32 sum, so nothing is optimised away) with the
  // pool's workers and kernel: (ms, checksum). The host read bandwidth the FFN kernel is compared to.
  std::tuple<double, double> read(int64_t addr, int64_t nbytes) {
    auto t = std::make_shared<Task>();
    t->read = true;
    t->buf = reinterpret_cast<const float*>(addr);
    t->n = nbytes / static_cast<int64_t>(sizeof(float));
    t->chunk = (1 << 20) / sizeof(float);  // 1 MiB per item
    t->items1 = (t->n + t->chunk - 1) / t->chunk;
    t->partial.assign(static_cast<size_t>(t->items1), 0.f);
    const double ms = wait(enqueue(t));
    double s = 0.0;
    for (float v : t->partial) s += v;
    return std::make_tuple(ms, s);
  }

  // [tasks, experts, token rows] run so far, and their summed wall time in ms.
  std::tuple<int64_t, int64_t, int64_t, double> counters() {
    std::lock_guard<std::mutex> lock(mu_);
    return std::make_tuple(tasks_run_, experts_run_, tokens_run_, busy_ms_);
  }

  std::string kernel() const { return ISA_NAMES[isa_]; }
  std::string quant_kernel(bool fast) const {
    if (fast) return std::string(qfk_.name) + "-int16";
    return std::string(ISA_NAMES[quant_isa(isa_)]) + (qk_.bf16_hw ? "+bf16" : "");
  }
  int64_t threads() const { return nthreads_; }

  // Finish queued tasks, stop the workers. Idempotent.
  void close() {
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (closed_) return;
      closed_ = true;
      cv_done_.wait(lock, [&] { return !active_ && queue_.empty(); });
      stop_ = true;
    }
    cv_work_.notify_all();
    for (auto& w : workers_)
      if (w.joinable()) w.join();
    workers_.clear();
  }

 private:
  int64_t enqueue(const std::shared_ptr<Task>& t) {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) throw std::runtime_error("this CpuExpertPool is closed");
    const int64_t ticket = next_ticket_++;
    tickets_[ticket] = t;
    queue_.push_back(t);
    if (!active_) start_next_locked();
    return ticket;
  }

  void start_next_locked() {
    while (!queue_.empty()) {
      std::shared_ptr<Task> t = queue_.front();
      queue_.pop_front();
      if (fault_in_ > 0 && --fault_in_ == 0) {  // inject_fault: fail this task, run the next
        t->error = "injected fault (test hook)";
        t->done = true;
        t->done_flag.store(true, std::memory_order_release);
        cv_done_.notify_all();
        continue;
      }
      active_ = t;
      active_->t0 = std::chrono::steady_clock::now();
      ++generation_;
      started_.store(generation_, std::memory_order_release);
      cv_work_.notify_all();
      return;
    }
  }

  void work() {
#ifdef __linux__
    // Named so that per-thread CPU time (top -H, /proc/PID/task/*/comm) tells the pool apart.
    pthread_setname_np(pthread_self(), "moecache-cpu");
#endif
    uint64_t seen = 0, seen_wake = 0;
    for (;;) {
      std::shared_ptr<Task> t;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_work_.wait(lock, [&] { return stop_ || (active_ && generation_ != seen) || wake_ != seen_wake; });
        if (stop_) return;
        if (!(active_ && generation_ != seen)) {
          // Woken ahead of a task (prewake): spin without the lock until it starts, or give up.
          seen_wake = wake_;
          const auto until = spin_until_;
          lock.unlock();
          while (started_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < until)
            std::this_thread::yield();
          continue;  // decide again under the lock (a task, stop, or back to sleep)
        }
        seen = generation_;
        t = active_;
      }
      if (run(*t)) finish(t);  // this worker finished the task's last item
    }
  }

  void finish(const std::shared_ptr<Task>& t) {
    std::lock_guard<std::mutex> lock(mu_);
    t->ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t->t0).count();
    t->done = true;
    if (!t->read) {
      ++tasks_run_;
      experts_run_ += static_cast<int64_t>(t->jobs.size());
      for (const Job& j : t->jobs) tokens_run_ += j.tokens;
      busy_ms_ += t->ms;
    }
    t->done_flag.store(true, std::memory_order_release);
    active_.reset();
    if (!queue_.empty()) start_next_locked();
    cv_done_.notify_all();
  }

  // Which job an item index belongs to (a task has few jobs: a linear scan).
  static size_t job_of(const Task& t, int64_t item, bool phase2) {
    size_t j = 0;
    while (j + 1 < t.jobs.size() && (phase2 ? t.jobs[j + 1].first2 : t.jobs[j + 1].first1) <= item) ++j;
    return j;
  }

  // part[i * P + p] = rows[i] . x[p] (row length n, x row stride xs) for i < nrows, p < P, summed in
  // the fixed order (chunks of CHUNK elements in order; see the header) whatever the blocking.
  void dots(const void* const* rows, int64_t nrows, int64_t n, const float* x, int64_t xs, int64_t P, bool bf16,
            float* part) const {
    std::fill(part, part + nrows * P, 0.f);
    const int bi = bf16 ? 1 : 0;
    auto block = [&](int64_t i0, int64_t p0, int64_t k0, int64_t k1) {
      const int rb = static_cast<int>(std::min<int64_t>(k_.rb, nrows - i0));
      const int tb = static_cast<int>(std::min<int64_t>(k_.tb, P - p0));
      k_.block[bi][rb - 1][tb - 1](rows + i0, x + p0 * xs, xs, k0, k1, part + i0 * P + p0, P);
    };
    if (P <= k_.tb) {
      // One token block (decode): each row block streams its rows end to end, chunk after chunk.
      for (int64_t i0 = 0; i0 < nrows; i0 += k_.rb)
        for (int64_t k0 = 0; k0 < n; k0 += CHUNK) block(i0, 0, k0, std::min(n, k0 + CHUNK));
      return;
    }
    // Many tokens: per chunk, the item's weights (RB rows at a time, in L1) meet every token block;
    // the chunk of x for all tokens stays in L2 across the item's rows. Weights leave memory once.
    for (int64_t k0 = 0; k0 < n; k0 += CHUNK) {
      const int64_t k1 = std::min(n, k0 + CHUNK);
      for (int64_t i0 = 0; i0 < nrows; i0 += k_.rb)
        for (int64_t p0 = 0; p0 < P; p0 += k_.tb) block(i0, p0, k0, k1);
    }
  }

  // Works on `t` until no item is left; true for the one call that finished the task's last item.
  bool run(Task& t) {
    if (t.quant) return run_quant(t);
    if (t.read) {
      bool last = false;
      for (int64_t it; (it = t.next1.fetch_add(1, std::memory_order_relaxed)) < t.items1;) {
        const int64_t a = it * t.chunk, b = std::min(t.n, a + t.chunk);
        t.partial[static_cast<size_t>(it)] = k_.sum(t.buf + a, b - a);
        last = t.done1.fetch_add(1, std::memory_order_acq_rel) + 1 == t.items1;
      }
      return last;
    }
    const int64_t H = t.H, I = t.I, wb = t.bf16 ? 2 : 4;
    thread_local std::vector<float> part;
    thread_local std::vector<const void*> rows;
    // Phase 1: act[p, r] = silu(gate_r . x_p) * (up_r . x_p) for the item's rows r of I.
    for (int64_t it; (it = t.next1.fetch_add(1, std::memory_order_relaxed)) < t.items1;) {
      Job& jb = t.jobs[job_of(t, it, false)];
      const int64_t r0 = (it - jb.first1) * jb.rows1, r1 = std::min(I, r0 + jb.rows1), nr = r1 - r0, P = jb.tokens;
      const char* gate = static_cast<const char*>(jb.gate_up);
      const char* up = gate + I * H * wb;
      rows.resize(static_cast<size_t>(2 * nr));
      for (int64_t i = 0; i < nr; ++i) {  // interleaved (gate_r, up_r): a row block holds both of a pair
        rows[2 * i] = gate + (r0 + i) * H * wb;
        rows[2 * i + 1] = up + (r0 + i) * H * wb;
      }
      part.resize(static_cast<size_t>(2 * nr * P));
      dots(rows.data(), 2 * nr, H, jb.x, H, P, t.bf16, part.data());
      float* act = jb.act.data();
      for (int64_t i = 0; i < nr; ++i)
        for (int64_t p = 0; p < P; ++p) act[p * I + r0 + i] = silu(part[2 * i * P + p]) * part[(2 * i + 1) * P + p];
      t.done1.fetch_add(1, std::memory_order_acq_rel);
    }
    // Barrier: phase 2 reads every row of act, so it starts once every phase-1 item is done (by
    // whichever workers took them). A worker arriving after phase 2 is handed out skips the wait.
    if (t.next2.load(std::memory_order_relaxed) >= t.items2) return false;
    while (t.done1.load(std::memory_order_acquire) < t.items1) std::this_thread::yield();
    // Phase 2: out[p, j] = down_j . act_p for the item's rows j of H.
    for (int64_t it; (it = t.next2.fetch_add(1, std::memory_order_relaxed)) < t.items2;) {
      Job& jb = t.jobs[job_of(t, it, true)];
      const int64_t r0 = (it - jb.first2) * jb.rows2, r1 = std::min(H, r0 + jb.rows2), nr = r1 - r0, P = jb.tokens;
      const char* down = static_cast<const char*>(jb.down);
      rows.resize(static_cast<size_t>(nr));
      for (int64_t i = 0; i < nr; ++i) rows[i] = down + (r0 + i) * I * wb;
      part.resize(static_cast<size_t>(nr * P));
      dots(rows.data(), nr, I, jb.act.data(), I, P, t.bf16, part.data());
      for (int64_t i = 0; i < nr; ++i)
        for (int64_t p = 0; p < P; ++p) jb.out[p * H + r0 + i] = part[i * P + p];
      if (t.done2.fetch_add(1, std::memory_order_acq_rel) + 1 == t.items2) return true;
    }
    return false;
  }

  // The compressed kernels' instruction set: the pool's, where the CPU converts fp16 (F16C) too.
  static int quant_isa(Isa isa) {
#ifdef MOECACHE_X86
    __builtin_cpu_init();
    if (isa != PORTABLE && !__builtin_cpu_supports("f16c")) return PORTABLE;
    if (isa == AVX512 && !(__builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))) return AVX2;
#endif
    return isa;
  }
  static bool vnni_hw(Isa isa) {
#ifdef MOECACHE_X86
    __builtin_cpu_init();
    return isa == AVX512 && __builtin_cpu_supports("avx512vnni");
#else
    (void)isa;
    return false;
#endif
  }
  static bool bf16_hw(Isa isa) {
#ifdef MOECACHE_X86
    __builtin_cpu_init();
    return isa == AVX512 && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
#else
    (void)isa;
    return false;
#endif
  }

  // Row r of matrix m (0: gate_up (2I, H), 1: down (H, I)) of the expert at `base`.
  static QRow qrow(const QTask& q, const uint8_t* base, int m, int64_t r) {
    const int64_t* off = q.off + 4 * m;
    return QRow{base + off[0] + r * q.q_stride[m], base + off[1] + r * q.s_stride[m],
                q.z_stride[m] ? base + off[2] + r * q.z_stride[m] : nullptr};
  }

  float bias_at(const Task& t, const uint8_t* base, int m, int64_t r) const {
    const int64_t off = t.q.off[4 * m + 3];
    if (off < 0) return 0.f;
    if (t.bf16) {
      uint16_t b;
      std::memcpy(&b, base + off + 2 * r, sizeof b);
      return bf16_to_f32(b);
    }
    float f;
    std::memcpy(&f, base + off + 4 * r, sizeof f);
    return f;
  }

  // part[i * P + p] = rows[i] . x[p] for i < nrows, p < P over n inputs, chunk by chunk (as dots()).
  void dots_q(const QSpec& spec, const QRow* rows, int64_t nrows, int64_t n, const float* x, int64_t xs, int64_t P,
              float* part) const {
    std::fill(part, part + nrows * P, 0.f);
    if (P <= qk_.tb) {
      for (int64_t i0 = 0; i0 < nrows; i0 += qk_.rb) {
        const int rb = static_cast<int>(std::min<int64_t>(qk_.rb, nrows - i0));
        for (int64_t k0 = 0; k0 < n; k0 += CHUNK)
          qk_.block(spec, rows + i0, rb, x, xs, static_cast<int>(P), k0, std::min(n, k0 + CHUNK), part + i0 * P, P);
      }
      return;
    }
    for (int64_t k0 = 0; k0 < n; k0 += CHUNK) {
      const int64_t k1 = std::min(n, k0 + CHUNK);
      for (int64_t i0 = 0; i0 < nrows; i0 += qk_.rb) {
        const int rb = static_cast<int>(std::min<int64_t>(qk_.rb, nrows - i0));
        for (int64_t p0 = 0; p0 < P; p0 += qk_.tb) {
          const int tb = static_cast<int>(std::min<int64_t>(qk_.tb, P - p0));
          qk_.block(spec, rows + i0, rb, x + p0 * xs, xs, tb, k0, k1, part + i0 * P + p0, P);
        }
      }
    }
  }

  // dots_q for the fast mode: x holds the P token rows' quantized forms.
  void dots_qf(const QSpec& spec, const QRow* rows, int64_t nrows, int64_t n, const QxTok* x, int64_t P,
               float* part) const {
    std::fill(part, part + nrows * P, 0.f);
    if (P <= qfk_.tb) {  // one register block of tokens: each row block's rows read start to end, in turn
      for (int64_t i0 = 0; i0 < nrows; i0 += qfk_.rb) {
        const int rb = static_cast<int>(std::min<int64_t>(qfk_.rb, nrows - i0));
        for (int64_t k0 = 0; k0 < n; k0 += CHUNK)
          qfk_.block(spec, rows + i0, rb, x, static_cast<int>(P), k0, std::min(n, k0 + CHUNK), part + i0 * P, P);
      }
      return;
    }
    for (int64_t k0 = 0; k0 < n; k0 += CHUNK) {
      const int64_t k1 = std::min(n, k0 + CHUNK);
      for (int64_t i0 = 0; i0 < nrows; i0 += qfk_.rb) {
        const int rb = static_cast<int>(std::min<int64_t>(qfk_.rb, nrows - i0));
        for (int64_t p0 = 0; p0 < P; p0 += qfk_.tb) {
          const int tb = static_cast<int>(std::min<int64_t>(qfk_.tb, P - p0));
          qfk_.block(spec, rows + i0, rb, x + p0, tb, k0, k1, part + i0 * P + p0, P);
        }
      }
    }
  }

  // Each row's `next`: the row one register block of `rb` rows later, which the fast kernels prefetch at the
  // offset they read, so the next block's rows arrive while this one computes (the last block: none).
  static void link_next(QRow* rows, int64_t n, int rb) {
    for (int64_t i = 0; i < n; ++i) rows[i].next = i + rb < n ? rows[i + rb].q : nullptr;
  }

  // The quantized token rows of a job's x (phase 1) or act (phase 2), for dots_qf.
  static void qx_rows(const QTask& q, const Job& jb, bool act, int64_t n, std::vector<QxTok>& out) {
    const int64_t len = qfast_x_len(n), groups = n / q.spec.group;
    out.resize(static_cast<size_t>(jb.tokens));
    for (int64_t p = 0; p < jb.tokens; ++p)
      out[p] = act ? QxTok{jb.aq.data() + p * len, jb.asx.data() + p * groups, jb.azx.data() + p * groups}
                   : QxTok{jb.xq.data() + p * len, jb.xsx.data() + p * groups, jb.xzx.data() + p * groups};
  }

  // run() for compressed experts: the same two phases, on compressed rows, with the task's activation.
  bool run_quant(Task& t) {
    const QTask& q = t.q;
    const int64_t H = t.H, I = t.I;
    thread_local std::vector<float> part;
    thread_local std::vector<QRow> rows;
    thread_local std::vector<QxTok> qx;
    for (int64_t it; (it = t.next1.fetch_add(1, std::memory_order_relaxed)) < t.items1;) {
      Job& jb = t.jobs[job_of(t, it, false)];
      const int64_t r0 = (it - jb.first1) * jb.rows1, r1 = std::min(I, r0 + jb.rows1), nr = r1 - r0, P = jb.tokens;
      rows.resize(static_cast<size_t>(2 * nr));
      for (int64_t i = 0; i < nr; ++i) {  // (gate_r, up_r) pairs
        const int64_t r = r0 + i;
        rows[2 * i] = qrow(q, jb.base, 0, q.act == 1 ? 2 * r : r);
        rows[2 * i + 1] = qrow(q, jb.base, 0, q.act == 1 ? 2 * r + 1 : I + r);
      }
      part.resize(static_cast<size_t>(2 * nr * P));
      if (q.fast) {
        link_next(rows.data(), 2 * nr, qfk_.rb);
        qx_rows(q, jb, false, H, qx);
        dots_qf(q.spec, rows.data(), 2 * nr, H, qx.data(), P, part.data());
      } else {
        dots_q(q.spec, rows.data(), 2 * nr, H, q.evenodd ? jb.xp.data() : jb.x, H, P, part.data());
      }
      float* act = jb.act.data();
      for (int64_t i = 0; i < nr; ++i) {
        const int64_t r = r0 + i;
        const float bg = bias_at(t, jb.base, 0, q.act == 1 ? 2 * r : r);
        const float bu = bias_at(t, jb.base, 0, q.act == 1 ? 2 * r + 1 : I + r);
        const int64_t col = q.evenodd ? evenodd_pos(r) : r;
        for (int64_t p = 0; p < P; ++p) {
          float g = part[2 * i * P + p] + bg, u = part[(2 * i + 1) * P + p] + bu;
          float a;
          if (q.act == 1) {  // GPT-OSS: clamp, gate * sigmoid(alpha * gate), times (up + 1)
            g = std::min(g, q.limit);
            u = std::min(std::max(u, -q.limit), q.limit);
            a = (u + 1.f) * (g / (1.f + std::exp(-q.alpha * g)));
          } else {
            a = silu(g) * u;
          }
          act[p * I + col] = a;
        }
      }
      if (q.fast) {  // the item's rows are whole groups of act: quantize them for phase 2
        const int64_t G = q.spec.group, len = qfast_x_len(I), groups = I / G;
        for (int64_t p = 0; p < P; ++p)
          qfast_quantize(q.spec, act + p * I, r0 / G, r1 / G, jb.aq.data() + p * len, jb.asx.data() + p * groups,
                         jb.azx.data() + p * groups);
      }
      t.done1.fetch_add(1, std::memory_order_acq_rel);
    }
    if (t.next2.load(std::memory_order_relaxed) >= t.items2) return false;
    while (t.done1.load(std::memory_order_acquire) < t.items1) std::this_thread::yield();
    for (int64_t it; (it = t.next2.fetch_add(1, std::memory_order_relaxed)) < t.items2;) {
      Job& jb = t.jobs[job_of(t, it, true)];
      const int64_t r0 = (it - jb.first2) * jb.rows2, r1 = std::min(H, r0 + jb.rows2), nr = r1 - r0, P = jb.tokens;
      rows.resize(static_cast<size_t>(nr));
      for (int64_t i = 0; i < nr; ++i) rows[i] = qrow(q, jb.base, 1, r0 + i);
      part.resize(static_cast<size_t>(nr * P));
      if (q.fast) {
        link_next(rows.data(), nr, qfk_.rb);
        qx_rows(q, jb, true, I, qx);
        dots_qf(q.spec, rows.data(), nr, I, qx.data(), P, part.data());
      } else {
        dots_q(q.spec, rows.data(), nr, I, jb.act.data(), I, P, part.data());
      }
      for (int64_t i = 0; i < nr; ++i) {
        const float b = bias_at(t, jb.base, 1, r0 + i);
        for (int64_t p = 0; p < P; ++p) jb.out[p * H + r0 + i] = part[i * P + p] + b;
      }
      if (t.done2.fetch_add(1, std::memory_order_acq_rel) + 1 == t.items2) return true;
    }
    return false;
  }

  Isa isa_;
  Kernels k_;
  QKernels qk_;
  QFastKernels qfk_;
  int nthreads_ = 1;
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_work_, cv_done_;
  std::deque<std::shared_ptr<Task>> queue_;
  std::shared_ptr<Task> active_;
  std::map<int64_t, std::shared_ptr<Task>> tickets_;
  uint64_t generation_ = 0;
  std::atomic<uint64_t> started_{0};  // generation_, for workers spinning without the lock
  uint64_t wake_ = 0;                 // prewake() calls
  std::chrono::steady_clock::time_point spin_until_{};
  int64_t next_ticket_ = 1;
  bool stop_ = false, closed_ = false;
  int64_t tasks_run_ = 0, experts_run_ = 0, tokens_run_ = 0;
  int64_t fault_in_ = 0;  // inject_fault countdown (0: off)
  double busy_ms_ = 0.0;
};

// The public face (cpu_expert.h): every call goes to the implementation above.
CpuExpertPool::CpuExpertPool(int64_t threads, const std::string& kernel)
    : impl_(std::make_unique<Impl>(threads, kernel)) {}
CpuExpertPool::~CpuExpertPool() = default;
int64_t CpuExpertPool::submit_quant(int64_t hidden, int64_t inter, int64_t fmt, int64_t group, bool compute_bf16,
                                    int64_t act, double alpha, double limit, const std::vector<int64_t>& offsets,
                                    const std::vector<int64_t>& x, const std::vector<int64_t>& tokens,
                                    const std::vector<int64_t>& experts, const std::vector<int64_t>& out, bool fast) {
  return impl_->submit_quant(hidden, inter, fmt, group, compute_bf16, act, alpha, limit, offsets, x, tokens, experts,
                             out, fast);
}
std::string CpuExpertPool::quant_kernel(bool fast) const { return impl_->quant_kernel(fast); }
int64_t CpuExpertPool::submit(int64_t hidden, int64_t inter, int64_t wtype, const std::vector<int64_t>& x,
                              const std::vector<int64_t>& tokens, const std::vector<int64_t>& gate_up,
                              const std::vector<int64_t>& down, const std::vector<int64_t>& out) {
  return impl_->submit(hidden, inter, wtype, x, tokens, gate_up, down, out);
}
double CpuExpertPool::wait(int64_t ticket) { return impl_->wait(ticket); }
void CpuExpertPool::prewake() { impl_->prewake(); }
bool CpuExpertPool::ready(int64_t ticket) { return impl_->ready(ticket); }
std::tuple<double, double> CpuExpertPool::read(int64_t addr, int64_t nbytes) { return impl_->read(addr, nbytes); }
std::tuple<int64_t, int64_t, int64_t, double> CpuExpertPool::counters() { return impl_->counters(); }
std::string CpuExpertPool::kernel() const { return impl_->kernel(); }
int64_t CpuExpertPool::threads() const { return impl_->threads(); }
void CpuExpertPool::close() { impl_->close(); }
void CpuExpertPool::inject_fault(int64_t nth) { impl_->inject_fault(nth); }

CpuFeatures detect_cpu_features() {
  const Features f = cpu_features();
  return CpuFeatures{f.avx2, f.fma, f.avx512f};
}

std::string choose_cpu_kernel(const std::string& requested, bool avx2, bool fma, bool avx512f) {
  Features f;
  f.avx2 = avx2;
  f.fma = fma;
  f.avx512f = avx512f;
  return ISA_NAMES[choose_isa(requested, f)];
}

}  // namespace moecache_cpu
