// The compressed experts' fast mode: integer dot products of the weights' codes with int16-quantized
// activations (the arithmetic is stated in cpu_expert_quant.h). The pool in cpu_expert.cpp quantizes
// each token row once (qfast_quantize) and calls these kernels; nothing here allocates.
//
// Why: producing each weight in fp32 (a table lookup or a conversion, then an FMA per weight and
// token) costs more instructions per byte than memory delivers at one token per expert. Here the codes
// are widened to 16-bit words once and multiplied by the activations' words in one instruction per 32
// weights (AVX512_VNNI vpdpwssd, else vpmaddwd + vpaddd), exact in int32; a group's scale is applied
// once per group (per vector lane) and the zero points once per group and token through sum(xq).
//
// Layouts, per 32 bytes of codes (one AVX-512 step; AVX2 takes 16 bytes):
//   int8:          32 codes of one group, natural order;
//   int4, G >= 64: byte j holds q[j] (low) and q[j + G/2] (high): the low words meet x[j ..], the high
//                  ones x[j + G/2 ..], both natural order;
//   int4, G = 32:  two groups of 16 bytes; the low nibbles of both, then the high ones meet the
//                  "lo/hi" order of xq (cpu_expert_quant.h: qfast_x_pos);
//   MXFP4:         two blocks of 16 bytes, low nibble = even element: xq in even/odd order; the codes map
//                  to 2 * FP4 (integers -12..12) by a word permute (AVX-512) or a byte shuffle (AVX2).
// Int32 lanes never overflow: a lane sums at most 8 products (G = 128) of |q| <= 255 and |xq| <= 32767.
// The AVX-512 kernels take the group size as a template parameter, so a group's steps unroll fully.
//
// Summation order, per row and token: one fp32 accumulator (16 lanes AVX-512, 8 AVX2, 1 portable) over
// the call's groups in order, each group's int32 lanes converted and multiplied by the group's
// sw * sx; the zero points' terms (per 16 groups on AVX-512, per group elsewhere) are subtracted in
// the same accumulator (AVX-512) or a second one (AVX2, portable); lanes reduced at the end and added to
// `part`. It depends on neither the register block nor the tokens run together; the instruction sets
// differ by fp32 rounding only.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu_expert_quant.h"

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#define MOECACHE_X86 1
#define MC_F512 __attribute__((target("avx512f,avx512bw,avx512vl,f16c,fma")))
#define MC_F512V __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")))
#define MC_F2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace moecache_cpu {

namespace {

// 2 * e2m1 value of each code (an integer), and 2^(e - 127) / 2 of each e8m0 byte (exact in fp32).
alignas(64) const int8_t FP4X2[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
struct HalfE8M0 {
  float v[256];
  HalfE8M0() {
    for (int i = 0; i < 256; ++i) v[i] = std::ldexp(1.0f, i - 128);
  }
};
const HalfE8M0 E8M0_HALF;

inline uint16_t u16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof h);
  return h;
}

// The group's weight scale (int8/int4: fp16; MXFP4: 2^(e-127) / 2, the codes being 2 * FP4).
inline float wscale(const QSpec& s, const QRow& row, int64_t gi) {
  return s.fmt == Q_MXFP4 ? E8M0_HALF.v[row.scale[gi]] : half_to_float(u16_at(row.scale + 2 * gi));
}

// The integer code of input k (0 <= k < G) of group gi of `row`.
inline int code_at(const QSpec& s, const QRow& row, int64_t gi, int k) {
  const int G = s.fmt == Q_MXFP4 ? 32 : s.group;
  if (s.fmt == Q_INT8) return row.q[gi * G + k];
  const uint8_t* q = row.q + gi * G / 2;
  if (s.fmt == Q_MXFP4) return FP4X2[(k & 1) ? q[k >> 1] >> 4 : q[k >> 1] & 15];
  return k < G / 2 ? q[k] & 15 : q[k - G / 2] >> 4;
}

// ---- portable --------------------------------------------------------------------------------------
void qf_portable(const QSpec& s, const QRow* rows, int rb, const QxTok* x, int tb, int64_t k0, int64_t k1, float* part,
                 int64_t ps) {
  const int G = s.fmt == Q_MXFP4 ? 32 : s.group;
  for (int r = 0; r < rb; ++r)
    for (int t = 0; t < tb; ++t) {
      float acc = 0.f, zacc = 0.f;
      for (int64_t gi = k0 / G; gi < (k1 + G - 1) / G; ++gi) {
        int32_t dot = 0;
        for (int k = 0; k < G; ++k) dot += code_at(s, rows[r], gi, k) * x[t].xq[qfast_x_pos(s, gi * G + k)];
        const float sw = wscale(s, rows[r], gi);
        acc += static_cast<float>(dot) * (sw * x[t].sx[gi]);
        if (s.fmt != Q_MXFP4) zacc += sw * static_cast<float>(rows[r].zero[gi]) * x[t].zx[gi];
      }
      part[r * ps + t] += acc - zacc;
    }
}

#ifdef MOECACHE_X86
constexpr int64_t QF_PREFETCH = 1024;  // bytes ahead along each row's codes
#define QF_HINT _MM_HINT_T0

// How far ahead a row prefetches its `part`: where the first rb rows are evenly spaced by d bytes (as in an
// expert's matrix) and rows are short (d < 2 * along), the next row block's same offset (rb * d: the
// rows of this block are already being read); otherwise `along` bytes further along the row (a long row
// is read chunk by chunk, and one block ahead would be too early for L1).
inline int64_t ahead(const QRow* rows, int rb, const uint8_t* QRow::*part, int64_t along) {
  if (rb < 2 || rows[0].*part == nullptr) return along;
  const int64_t d = rows[1].*part - rows[0].*part;
  for (int r = 2; r < rb; ++r)
    if (rows[r].*part - rows[r - 1].*part != d) return along;
  return d > 0 && d < 2 * along ? d * rb : along;
}

// ---- AVX-512: with VNNI (vpdpwssd) and without (vpmaddwd + vpaddd) ----------------------------------
#define QF_NAME qf_avx512_vnni
#define QF_TARGET MC_F512V
#define QF_DP(acc, a, b) _mm512_dpwssd_epi32(acc, a, b)
#include "cpu_expert_qfast_avx512.inc"
#undef QF_NAME
#undef QF_TARGET
#undef QF_DP
#define QF_NAME qf_avx512_novnni
#define QF_TARGET MC_F512
#define QF_DP(acc, a, b) _mm512_add_epi32(acc, _mm512_madd_epi16(a, b))
#include "cpu_expert_qfast_avx512.inc"
#undef QF_NAME
#undef QF_TARGET
#undef QF_DP

// ---- AVX2 + FMA (vpmaddwd + vpaddd; one group per 16-byte step) -------------------------------------
template <int RB, int TB, int KIND>
MC_F2 void qf_avx2(const QSpec& s, const QRow* rows, const QxTok* x, int64_t k0, int64_t k1, float* part, int64_t ps) {
  const int G = KIND == 3 ? 32 : s.group;
  const int64_t gbeg = k0 / G, gend = (k1 + G - 1) / G;
  __m256 acc[RB][TB];
  float zacc[RB][TB] = {};
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < TB; ++t) acc[r][t] = _mm256_setzero_ps();
  const __m256i nib = _mm256_set1_epi16(15);
  const __m128i nib8 = _mm_set1_epi8(15);
  const __m128i lut = _mm_load_si128(reinterpret_cast<const __m128i*>(FP4X2));
  for (int64_t gi = gbeg; gi < gend; ++gi) {
    const int64_t g0 = gi * G;
    __m256i ai[RB][TB];
    for (int r = 0; r < RB; ++r)
      for (int t = 0; t < TB; ++t) ai[r][t] = _mm256_setzero_si256();
    if constexpr (KIND == 0) {
      for (int j = 0; j < G; j += 16) {
        __m256i w[RB];
        for (int r = 0; r < RB; ++r) {
          const uint8_t* q = rows[r].q + g0 + j;
          if (((g0 + j) & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(q + QF_PREFETCH), _MM_HINT_T0);
          w[r] = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
        }
        for (int t = 0; t < TB; ++t) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[t].xq + g0 + j));
          for (int r = 0; r < RB; ++r) ai[r][t] = _mm256_add_epi32(ai[r][t], _mm256_madd_epi16(w[r], xv));
        }
      }
    } else {
      const int half = G / 2;
      for (int j = 0; j < half; j += 16) {
        __m256i wl[RB], wh[RB];
        for (int r = 0; r < RB; ++r) {
          const uint8_t* q = rows[r].q + g0 / 2 + j;
          if (((g0 / 2 + j) & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(q + QF_PREFETCH), _MM_HINT_T0);
          const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
          if constexpr (KIND == 3) {
            wl[r] = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(lut, _mm_and_si128(b, nib8)));
            wh[r] = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(b, 4), nib8)));
          } else {
            const __m256i w = _mm256_cvtepu8_epi16(b);
            wl[r] = _mm256_and_si256(w, nib);
            wh[r] = _mm256_srli_epi16(w, 4);
          }
        }
        // x of the low and high words: natural order (G >= 64), or the lo/hi / even/odd order of 64 inputs
        const int64_t xl = KIND == 1 ? g0 + j : (g0 & ~int64_t{63}) + 16 * ((g0 >> 5) & 1);
        const int64_t xh = KIND == 1 ? g0 + half + j : xl + 32;
        for (int t = 0; t < TB; ++t) {
          const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[t].xq + xl));
          const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[t].xq + xh));
          for (int r = 0; r < RB; ++r)
            ai[r][t] = _mm256_add_epi32(ai[r][t], _mm256_add_epi32(_mm256_madd_epi16(wl[r], a), _mm256_madd_epi16(wh[r], b)));
        }
      }
    }
    for (int r = 0; r < RB; ++r) {
      const float sw = KIND == 3 ? E8M0_HALF.v[rows[r].scale[gi]] : _cvtsh_ss(u16_at(rows[r].scale + 2 * gi));
      const float zw = KIND == 3 ? 0.f : sw * static_cast<float>(rows[r].zero[gi]);
      for (int t = 0; t < TB; ++t) {
        acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ai[r][t]), _mm256_set1_ps(sw * x[t].sx[gi]), acc[r][t]);
        zacc[r][t] += zw * x[t].zx[gi];
      }
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < TB; ++t) {
      const __m256 v = acc[r][t];
      __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
      q = _mm_add_ps(q, _mm_movehl_ps(q, q));
      q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 0x55));
      part[r * ps + t] += _mm_cvtss_f32(q) - zacc[r][t];
    }
}

// ---- dispatch: rows in blocks of RBMAX, 2, 1; tokens in blocks of TBMAX ---------------------------------
using QfFn = void (*)(const QSpec&, const QRow*, const QxTok*, int64_t, int64_t, float*, int64_t);

template <class K, int RBMAX, int TBMAX>
struct Table : BlockTable<QfFn, K, RBMAX, TBMAX> {
  void run(const QSpec& s, const QRow* rows, int rb, const QxTok* x, int tb, int64_t k0, int64_t k1, float* part,
           int64_t ps) const {
    this->each_block(rb, tb, [&](QfFn f, int r, int t0) { f(s, rows + r, x + t0, k0, k1, part + r * ps + t0, ps); });
  }
};

template <int KIND, int G, bool VNNI>
struct K512 {
  template <int RB, int TB>
  static void run(const QSpec& s, const QRow* r, const QxTok* x, int64_t a, int64_t b, float* p, int64_t ps) {
    if constexpr (VNNI) qf_avx512_vnni<RB, TB, KIND, G>(s, r, x, a, b, p, ps);
    else qf_avx512_novnni<RB, TB, KIND, G>(s, r, x, a, b, p, ps);
  }
};
template <int KIND>
struct K2 {
  template <int RB, int TB>
  static void run(const QSpec& s, const QRow* r, const QxTok* x, int64_t a, int64_t b, float* p, int64_t ps) {
    qf_avx2<RB, TB, KIND>(s, r, x, a, b, p, ps);
  }
};

inline int kind_of(const QSpec& s) {
  if (s.fmt == Q_INT8) return 0;
  if (s.fmt == Q_MXFP4) return 3;
  return s.group == 32 ? 2 : 1;
}

// The AVX-512 kernels take the group size as a template parameter (their loops unroll fully).
template <bool VNNI>
void block_512(const QSpec& s, const QRow* rows, int rb, const QxTok* x, int tb, int64_t k0, int64_t k1, float* part,
               int64_t ps) {
  static const Table<K512<0, 32, VNNI>, 4, 2> q8_32;
  static const Table<K512<0, 64, VNNI>, 4, 2> q8_64;
  static const Table<K512<0, 128, VNNI>, 4, 2> q8_128;
  static const Table<K512<1, 64, VNNI>, 4, 2> q4_64;
  static const Table<K512<1, 128, VNNI>, 4, 2> q4_128;
  static const Table<K512<2, 32, VNNI>, 4, 2> q4_32;
  static const Table<K512<3, 32, VNNI>, 4, 2> mx;
  const bool g32 = s.group == 32, g64 = s.group == 64;
  switch (kind_of(s)) {
    case 0:
      if (g32) return q8_32.run(s, rows, rb, x, tb, k0, k1, part, ps);
      if (g64) return q8_64.run(s, rows, rb, x, tb, k0, k1, part, ps);
      return q8_128.run(s, rows, rb, x, tb, k0, k1, part, ps);
    case 1:
      if (g64) return q4_64.run(s, rows, rb, x, tb, k0, k1, part, ps);
      return q4_128.run(s, rows, rb, x, tb, k0, k1, part, ps);
    case 2: return q4_32.run(s, rows, rb, x, tb, k0, k1, part, ps);
    default: return mx.run(s, rows, rb, x, tb, k0, k1, part, ps);
  }
}

void block_2(const QSpec& s, const QRow* rows, int rb, const QxTok* x, int tb, int64_t k0, int64_t k1, float* part,
             int64_t ps) {
  static const Table<K2<0>, 2, 2> t0;
  static const Table<K2<1>, 2, 2> t1;
  static const Table<K2<2>, 2, 2> t2;
  static const Table<K2<3>, 2, 2> t3;
  switch (kind_of(s)) {
    case 0: return t0.run(s, rows, rb, x, tb, k0, k1, part, ps);
    case 1: return t1.run(s, rows, rb, x, tb, k0, k1, part, ps);
    case 2: return t2.run(s, rows, rb, x, tb, k0, k1, part, ps);
    default: return t3.run(s, rows, rb, x, tb, k0, k1, part, ps);
  }
}
#endif

}  // namespace

QFastKernels quant_fast_kernels_for(int isa, bool vnni) {
  QFastKernels k;
#ifdef MOECACHE_X86
  if (isa == 2) {
    k.block = vnni ? block_512<true> : block_512<false>;
    k.rb = 4, k.tb = 2, k.name = vnni ? "avx512-vnni" : "avx512";
    return k;
  }
  if (isa == 1) {
    k.block = block_2;
    k.rb = 2, k.tb = 2, k.name = "avx2";
    return k;
  }
#else
  (void)isa;
  (void)vnni;
#endif
  k.block = qf_portable;
  k.rb = 4, k.tb = 2, k.name = "portable";
  return k;
}

void qfast_quantize(const QSpec& s, const float* x, int64_t g0, int64_t g1, int16_t* xq, float* sx, float* zx) {
  const int G = s.fmt == Q_MXFP4 ? 32 : s.group;
  const bool natural = qfast_x_pos(s, 33) == 33;
  // Round to nearest even by adding and subtracting 1.5 * 2^23 (exact for |v| <= 2^22; no libm call).
  const float magic = 12582912.f;
  for (int64_t gi = g0; gi < g1; ++gi) {
    const float* v = x + gi * G;
    float amax = 0.f;
    for (int k = 0; k < G; ++k) amax = std::max(amax, std::fabs(v[k]));
    int32_t sum = 0;
    const bool ok = amax > 0.f && std::isfinite(amax);
    const float inv = ok ? 32767.f / amax : 0.f;
    for (int k = 0; k < G; ++k) {
      // |v * inv| <= 32767 (up to rounding: clamped); a non-finite group quantizes to zeros and keeps its
      // scale (NaN or inf), so its output is not finite either.
      const float c = std::min(32767.f, std::max(-32767.f, (v[k] * inv + magic) - magic));
      const int32_t ci = static_cast<int32_t>(c);
      xq[natural ? gi * G + k : qfast_x_pos(s, gi * G + k)] = static_cast<int16_t>(ci);
      sum += ci;
    }
    sx[gi] = ok ? amax / 32767.f : (amax == 0.f ? 0.f : amax);
    zx[gi] = sx[gi] * static_cast<float>(sum);
  }
}

}  // namespace moecache_cpu
