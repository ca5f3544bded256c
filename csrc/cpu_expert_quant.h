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
  // The fast kernels only: the codes of the row one register block later, which they prefetch at the
  // offset they read (nullptr: they prefetch further along this row, or the rows after it).
  const uint8_t* next = nullptr;
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

// ---- the fast mode (csrc/cpu_expert_qfast.cpp): integer dot products on quantized activations ------
// Each token row is quantized once, per group of the weights' group size (MXFP4: 32): int16 codes
// xq = round(x / sx) with sx = max|x over the group| / 32767, so |xq| <= 32767. A row then is
//   sum_g sw_g * sx_g * (sum_k q_k xq_k - z_g * sum_k xq_k)        (int8 / int4: w = (q - z) * sw)
//   sum_g (2^(e_g - 127) / 2) * sx_g * sum_k (2 FP4[code_k]) xq_k  (MXFP4: 2 FP4 is an integer in -12..12)
// with the inner sums exact in int32, so the only departures from the weights as moecache.quant states
// them in fp32 are the activations' rounding (relative 2^-16 of a group's largest) and fp32 sums.
// The weights are not rounded to bf16 (the exact mode's reference does that).

// One token row's quantized form: xq in the layout the kernels read (qfast_x_pos), per group its
// scale sx and sx * sum(xq) (the zero points' term).
struct QxTok {
  const int16_t* xq;
  const float* sx;
  const float* zx;
};

// part[r * ps + t] += row r . token t over [k0, k1) (multiples of 64; k1 may be the row's end). The
// summation order depends on neither rb nor tb.
using QFastFn = void (*)(const QSpec& spec, const QRow* rows, int rb, const QxTok* x, int tb, int64_t k0, int64_t k1,
                         float* part, int64_t ps);

struct QFastKernels {
  QFastFn block = nullptr;
  int rb = 4, tb = 2;
  const char* name = "portable";  // "avx512-vnni", "avx512", "avx2", "portable"
};

// isa: 0 portable, 1 AVX2+FMA, 2 AVX-512F+BW+VL (as quant_kernels_for); vnni: the CPU has AVX512_VNNI.
QFastKernels quant_fast_kernels_for(int isa, bool vnni);

// Length of one token's xq buffer for n inputs: n rounded up to 64 (the padding stays zero).
inline int64_t qfast_x_len(int64_t n) { return (n + 63) & ~int64_t{63}; }

// Position of input i in xq. int4 with groups of 32, per 64 inputs (groups a, b): a[0..15], b[0..15],
// a[16..31], b[16..31] (the low nibbles of both groups' bytes, then the high ones); MXFP4, per 64
// inputs: a's even elements, b's even, a's odd, b's odd; every other format: natural order.
inline int64_t qfast_x_pos(const QSpec& s, int64_t i) {
  const bool lohi = s.fmt == Q_INT4 && s.group == 32, evenodd = s.fmt == Q_MXFP4;
  if (!lohi && !evenodd) return i;
  const int64_t b = i & ~int64_t{63}, g = (i >> 5) & 1, k = i & 31;
  if (lohi) return b + (k < 16 ? 0 : 32) + 16 * g + (k & 15);
  return b + ((k & 1) ? 32 : 0) + 16 * g + (k >> 1);
}

// Quantizes groups [g0, g1) of one token row x (natural order) into xq (qfast_x_pos layout), sx, zx.
void qfast_quantize(const QSpec& s, const float* x, int64_t g0, int64_t g1, int16_t* xq, float* sx, float* zx);

// A kernel's instantiations by block shape, for the exact and the fast compressed kernels: rows in blocks of
// RBMAX, 2 or 1 and tokens in blocks of at most TBMAX, each block shape one template instantiation
// K::run<RB, TB> of function type Fn. each_block walks a (rows, tokens) tile in those blocks and hands each
// block's kernel, first row and first token to `call`.
template <class Fn, class K, int RBMAX, int TBMAX>
struct BlockTable {
  Fn fn[3][TBMAX];  // [rows 1, 2, RBMAX][tokens - 1]
  template <int RB, int TB>
  void fill_one(int ri) {
    fn[ri][TB - 1] = &K::template run<RB, TB>;
    if constexpr (TB > 1) fill_one<RB, TB - 1>(ri);
  }
  BlockTable() {
    fill_one<1, TBMAX>(0);
    fill_one<2, TBMAX>(1);
    fill_one<RBMAX, TBMAX>(2);
  }
  template <class Call>
  void each_block(int rb, int tb, Call&& call) const {
    for (int t0 = 0; t0 < tb; t0 += TBMAX) {
      const int nt = tb - t0 < TBMAX ? tb - t0 : TBMAX;
      for (int r = 0; r < rb;) {
        const int left = rb - r;
        const int n = left >= RBMAX ? RBMAX : (left >= 2 ? 2 : 1);
        call(fn[n == RBMAX ? 2 : n - 1][nt - 1], r, t0);
        r += n;
      }
    }
  }
};

}  // namespace moecache_cpu
