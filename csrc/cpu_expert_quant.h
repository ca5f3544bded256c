// The CPU expert kernel's dot products on compressed weights (csrc/cpu_expert_quant.cpp), used by the
// pool in cpu_expert.cpp. Plain C++, no torch, no Python.
//
// A compressed matrix is moecache.quant's (out, in) view of an expert weight (moecache/quant.py): each
// row cut into groups of `group` inputs, and per group
//   int8 / int4:  w = float32(q - zero) * float32(scale)   (scale fp16, zero uint8), then rounded once to
//                 the compute dtype (bf16: round to nearest even; fp32: as is);
//   mxfp4:        w = FP4[code] * 2^(scale - 127)          (exact in fp32 and in bf16).
// int4 packs two codes per byte within a group: byte j holds q[j] (low nibble) and q[j + group/2]
// (high nibble). MXFP4 packs byte j = (element 2j, element 2j + 1) in (low, high) nibbles.
#pragma once

#include <cstdint>

namespace moecache_cpu {

enum QFormat : int { Q_INT8 = 0, Q_INT4 = 1, Q_MXFP4 = 2 };

// One row of a compressed matrix: its codes and its groups' scales (fp16 bits, or e8m0 bytes) and zeros.
struct QRow {
  const uint8_t* q;
  const uint8_t* scale;
  const uint8_t* zero;  // nullptr for mxfp4
};

struct QSpec {
  int fmt = Q_INT8;
  int group = 64;
  bool round_bf16 = false;  // the compute dtype is bf16: every dequantized weight is rounded to it
};

// part[r * ps + t] += sum over k in [k0, k1) of w_r[k] * x[t * xs + k] for r < rb, t < tb, summed in a
// fixed order (see cpu_expert_quant.cpp) that depends on neither rb nor tb. k0 and k1 are multiples of
// the group size. x is in the order `x_order` says (natural, or even/odd within each 32 inputs).
using QBlockFn = void (*)(const QSpec& spec, const QRow* rows, int rb, const float* x, int64_t xs, int tb, int64_t k0,
                          int64_t k1, float* part, int64_t ps);

struct QKernels {
  QBlockFn block = nullptr;
  int rb = 4, tb = 4;   // the largest register block (rows x tokens) one call takes
  bool bf16_hw = false;  // AVX-512 BF16 conversions round int8 weights (x then in even/odd order)
};

// isa: 0 portable, 1 AVX2+FMA, 2 AVX-512F (as cpu_expert.cpp's Isa); bf16_hw: the CPU has AVX512_BF16.
QKernels quant_kernels_for(int isa, bool bf16_hw);

// Whether the kernels for (isa, bf16_hw) read x of this format in even/odd order: within each block of
// 32 inputs, the even-indexed ones first (x[0], x[2], ..., x[30]), then the odd ones.
bool quant_x_evenodd(const QKernels& k, const QSpec& spec);

// Position of input i in even/odd order.
inline int64_t evenodd_pos(int64_t i) {
  const int64_t b = i & ~int64_t{31}, r = i & 31;
  return b + ((r & 1) ? 16 + (r >> 1) : (r >> 1));
}

// fp16 bits -> float (exact, denormals included).
float half_to_float(uint16_t h);

}  // namespace moecache_cpu
