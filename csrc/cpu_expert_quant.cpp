// Dot products of compressed expert rows with fp32 token rows, dequantizing in registers (see
// cpu_expert_quant.h for the formats). The pool in cpu_expert.cpp calls them; nothing here allocates.
//
// Each group's weights are produced in registers from its codes, exactly as moecache/quant.py states
// them, and multiplied into fp32 accumulators:
//   * int4 and MXFP4: a group has at most 16 distinct weights, so a 16-entry table of the group's
//     dequantized (and, for bf16 models, rounded) values is built once per group and row, and the codes
//     index it (AVX-512: one vpermps per 16 weights; AVX2: two permutes and a blend per 8). The int4 byte
//     layout (low nibble = first half of the group) gives two contiguous halves; MXFP4's (low nibble =
//     even element) gives the even and the odd elements, matched by reading x in even/odd order. For
//     bf16 models with AVX512_BF16 the int4 tables are rounded two rows at a time (one vcvtne2ps2bf16).
//   * int8: codes widened to fp32, one FMA  q * scale + (-zero * scale)  (both products are exact in fp32,
//     so this is float32(q - zero) * scale rounded once), then rounded to bf16 for bf16 models: with
//     AVX512_BF16 two vectors at once (vcvtne2ps2bf16, round to nearest even, and x in even/odd order to
//     match its interleaved result), else with integer operations (the same rounding). For fp32 models
//     (AVX-512) int8 is factorised per group instead (q8f_avx512): no per-weight scale FMA.
// VNNI and AMX are not used here: they multiply integer or bf16 activations, and rounding the
// activations would change the stated arithmetic. The fast mode (cpu_expert_qfast.cpp) does round them
// (to int16) and uses VNNI.
//
// Summation order (the factorised int8 kernel: per group, then folded in; see q8f_avx512): per row and
// token, one fp32 accumulator (one vector, 16 lanes on AVX-512, 8 on
// AVX2, 1 portable) over the call's range [k0, k1) in the order groups -> 16-weight steps (for int4 and
// MXFP4: the low half's step, then the high half's), lanes reduced at the end and added to `part`. The
// caller cuts a row into the same chunks whatever the number of tokens, so the result depends on
// neither the register block nor the tokens run together.
#include "cpu_expert_quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#define MOECACHE_X86 1
#define MC_Q512 __attribute__((target("avx512f,avx512bw,avx512vl,f16c,fma")))
#define MC_Q512BF __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,f16c,fma")))
#define MC_Q2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace moecache_cpu {

float half_to_float(uint16_t h) {
  const bool neg = (h & 0x8000u) != 0;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: man * 2^-24, exact
    const float f = std::ldexp(static_cast<float>(man), -24);
    return neg ? -f : f;
  }
  const uint32_t bits = (neg ? 0x80000000u : 0u) | (exp == 31 ? (0xffu << 23) | (man << 13) : ((exp + 112) << 23) | (man << 13));
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

namespace {

// e2m1 code -> value (moecache.quant.FP4_VALUES).
alignas(64) const float FP4[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                                   -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

// e8m0 byte -> 2^(byte - 127) (2^-127 is an fp32 subnormal, exact; 255 gives inf as torch.ldexp does).
struct E8M0Table {
  float v[256];
  E8M0Table() {
    for (int i = 0; i < 256; ++i) v[i] = std::ldexp(1.0f, i - 127);
  }
};
const E8M0Table E8M0;

// fp32 -> the nearest bf16 (ties to even), returned as fp32: torch's rounding for finite values.
inline float round_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  u += 0x7fffu + ((u >> 16) & 1u);
  u &= 0xffff0000u;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof h);
  return h;
}

// ---- portable --------------------------------------------------------------------------------
void block_portable(const QSpec& s, const QRow* rows, int rb, const float* x, int64_t xs, int tb, int64_t k0,
                    int64_t k1, float* part, int64_t ps) {
  const int G = s.fmt == Q_MXFP4 ? 32 : s.group, half = G / 2;
  for (int r = 0; r < rb; ++r) {
    const QRow& row = rows[r];
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int t0 = 0; t0 < tb; t0 += 4) {
      const int nt = std::min(4, tb - t0);
      for (int t = 0; t < 4; ++t) acc[t] = 0.f;
      for (int64_t g0 = k0; g0 < k1; g0 += G) {
        const int64_t gi = g0 / G;
        if (s.fmt == Q_INT8) {
          const float sc = half_to_float(load_u16(row.scale + 2 * gi));
          const int z = row.zero[gi];
          for (int j = 0; j < G; ++j) {
            float w = static_cast<float>(static_cast<int>(row.q[g0 + j]) - z) * sc;
            if (s.round_bf16) w = round_bf16(w);
            for (int t = 0; t < nt; ++t) acc[t] += w * x[(t0 + t) * xs + g0 + j];
          }
          continue;
        }
        float lut[16];
        if (s.fmt == Q_MXFP4) {
          const float e = E8M0.v[row.scale[gi]];
          for (int c = 0; c < 16; ++c) lut[c] = FP4[c] * e;
        } else {
          const float sc = half_to_float(load_u16(row.scale + 2 * gi));
          const int z = row.zero[gi];
          for (int c = 0; c < 16; ++c) {
            const float w = static_cast<float>(c - z) * sc;
            lut[c] = s.round_bf16 ? round_bf16(w) : w;
          }
        }
        const uint8_t* q = row.q + g0 / 2;
        for (int j = 0; j < half; ++j) {
          const float wl = lut[q[j] & 15], wh = lut[q[j] >> 4];
          for (int t = 0; t < nt; ++t) {
            const float* xt = x + (t0 + t) * xs + g0;
            acc[t] += wl * xt[j];
            acc[t] += wh * xt[half + j];
          }
        }
      }
      for (int t = 0; t < nt; ++t) part[r * ps + t0 + t] += acc[t];
    }
  }
}

#ifdef MOECACHE_X86
// Bytes ahead of the current position that the vector kernels prefetch along each row's codes.
constexpr int64_t QPREFETCH = 1024;

// ---- AVX-512 -----------------------------------------------------------------------------------
MC_Q512 inline __m512 rnd512(__m512 v) {
  __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}

MC_Q512 inline void prefetch_row(const QRow& row, int64_t qbyte, int64_t gi, int sbytes) {
  if ((qbyte & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(row.q + qbyte + QPREFETCH), _MM_HINT_T0);
  if ((gi & 31) == 0) {
    _mm_prefetch(reinterpret_cast<const char*>(row.scale + sbytes * gi + 128), _MM_HINT_T0);
    if (row.zero) _mm_prefetch(reinterpret_cast<const char*>(row.zero + gi + 128), _MM_HINT_T0);
  }
}

// Scales and -zero * scale (exact) of `n` <= 16 groups from group `gi` of each row, in fp32, for the
// per-group loop to broadcast from memory (masked loads: nothing past a row's last group is read).
template <int RB>
MC_Q512 inline void int_params512(const QRow* rows, int64_t gi, int n, float (*sc)[16], float (*nz)[16]) {
  const __mmask16 m = static_cast<__mmask16>(n >= 16 ? 0xffffu : (1u << n) - 1u);
  for (int r = 0; r < RB; ++r) {
    const __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, rows[r].scale + 2 * gi));
    const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, rows[r].zero + gi)));
    _mm512_store_ps(sc[r], s);
    _mm512_store_ps(nz[r], _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), z), s));
  }
}

// int4 (MX = false) and MXFP4 (MX = true): 16-entry tables, one permute per 16 weights.
// The tables lut[0..RB) rounded to bf16 (RNE) in pairs with one vcvtne2ps2bf16 and two word permutes
// (the integer rounding for an odd last row). The same rounding as rnd512 for the finite tables here.
template <int RB>
MC_Q512BF inline void round_luts_bf(__m512* lut) {
  const __m512i lo = _mm512_set_epi16(15, 0, 14, 0, 13, 0, 12, 0, 11, 0, 10, 0, 9, 0, 8, 0, 7, 0, 6, 0, 5, 0, 4, 0, 3, 0, 2,
                                      0, 1, 0, 0, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  int r = 0;
  for (; r + 1 < RB; r += 2) {
    const __m512i v = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(lut[r + 1], lut[r]));
    lut[r] = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, lo, v));
    lut[r + 1] = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, hi, v));
  }
  if (r < RB) lut[r] = rnd512(lut[r]);
}

template <int RB, int TB, bool MX, bool BFHW = false>
MC_Q512BF void q4_avx512(const QSpec& s, const QRow* rows, const float* x, int64_t xs, int64_t k0, int64_t k1,
                       float* part, int64_t ps) {
  const int G = MX ? 32 : s.group, half = G / 2;
  __m512 acc[RB][TB];
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_setzero_ps();
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 fp4 = _mm512_load_ps(FP4);
  const int64_t gend = k1 / G;
  alignas(64) float sc[RB][16], nz[RB][16];
  for (int64_t gi = k0 / G; gi < gend; ++gi) {
    const int64_t g0 = gi * G, qb = g0 / 2;
    const int jg = static_cast<int>((gi - k0 / G) & 15);
    if constexpr (!MX) {
      if (jg == 0) int_params512<RB>(rows, gi, static_cast<int>(std::min<int64_t>(16, gend - gi)), sc, nz);
    }
    __m512 lut[RB];
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) {
      if constexpr (MX) {
        lut[r] = _mm512_mul_ps(fp4, _mm512_set1_ps(E8M0.v[rows[r].scale[gi]]));
      } else {
        const __m512 l = _mm512_fmadd_ps(iota, _mm512_set1_ps(sc[r][jg]), _mm512_set1_ps(nz[r][jg]));
        lut[r] = s.round_bf16 && !BFHW ? rnd512(l) : l;
      }
    }
    if ((qb & 63) == 0 || (gi & 31) == 0) {  // tested once per group, not per row
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) prefetch_row(rows[r], qb, gi, MX ? 1 : 2);
    }
    if constexpr (BFHW && !MX) {
      if (s.round_bf16) round_luts_bf<RB>(lut);
    }
    for (int j = 0; j < half; j += 16) {
      __m512 wl[RB], wh[RB];
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) {
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[r].q + qb + j)));
        wl[r] = _mm512_permutexvar_ps(b, lut[r]);
        wh[r] = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), lut[r]);
      }
#pragma GCC unroll 4
      for (int t = 0; t < TB; ++t) {
        const __m512 xl = _mm512_loadu_ps(x + t * xs + g0 + j), xh = _mm512_loadu_ps(x + t * xs + g0 + half + j);
#pragma GCC unroll 4
        for (int r = 0; r < RB; ++r) {
          acc[r][t] = _mm512_fmadd_ps(wl[r], xl, acc[r][t]);
          acc[r][t] = _mm512_fmadd_ps(wh[r], xh, acc[r][t]);
        }
      }
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < TB; ++t) part[r * ps + t] += _mm512_reduce_add_ps(acc[r][t]);
}

// int8. RMODE 0: no rounding (fp32 model); 1: bf16 rounding with integer operations; 2: with
// vcvtne2ps2bf16 (x in even/odd order).
#define MC_Q8_512_BODY                                                                                          \
  const int G = s.group;                                                                                        \
  __m512 acc[RB][TB];                                                                                           \
  for (int r = 0; r < RB; ++r)                                                                                  \
    for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_setzero_ps();                                               \
  const int64_t gend = k1 / G;                                                                                  \
  alignas(64) float sc[RB][16], nz[RB][16];                                                                     \
  for (int64_t gi = k0 / G; gi < gend; ++gi) {                                                                  \
    const int64_t g0 = gi * G;                                                                                  \
    const int jg = static_cast<int>((gi - k0 / G) & 15);                                                        \
    if (jg == 0) int_params512<RB>(rows, gi, static_cast<int>(std::min<int64_t>(16, gend - gi)), sc, nz);       \
    __m512 vs[RB], vz[RB];                                                                                      \
    for (int r = 0; r < RB; ++r) {                                                                              \
      vs[r] = _mm512_set1_ps(sc[r][jg]);                                                                        \
      vz[r] = _mm512_set1_ps(nz[r][jg]);                                                                        \
    }                                                                                                           \
    for (int j = 0; j < G; j += 32) {                                                                           \
      __m512 wa[RB], wb[RB];                                                                                    \
      for (int r = 0; r < RB; ++r) {                                                                            \
        if (((g0 + j) & 63) == 0) prefetch_row(rows[r], g0 + j, gi, 2);                                       \
        const uint8_t* q = rows[r].q + g0 + j;                                                                  \
        __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)))); \
        __m512 b = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16)))); \
        a = _mm512_fmadd_ps(a, vs[r], vz[r]);                                                                   \
        b = _mm512_fmadd_ps(b, vs[r], vz[r]);                                                                   \
        MC_Q8_ROUND                                                                                             \
        wa[r] = a;                                                                                              \
        wb[r] = b;                                                                                              \
      }                                                                                                         \
      for (int t = 0; t < TB; ++t) {                                                                            \
        const __m512 xa = _mm512_loadu_ps(x + t * xs + g0 + j), xb = _mm512_loadu_ps(x + t * xs + g0 + j + 16); \
        for (int r = 0; r < RB; ++r) {                                                                          \
          acc[r][t] = _mm512_fmadd_ps(wa[r], xa, acc[r][t]);                                                    \
          acc[r][t] = _mm512_fmadd_ps(wb[r], xb, acc[r][t]);                                                    \
        }                                                                                                       \
      }                                                                                                         \
    }                                                                                                           \
  }                                                                                                             \
  for (int r = 0; r < RB; ++r)                                                                                  \
    for (int t = 0; t < TB; ++t) part[r * ps + t] += _mm512_reduce_add_ps(acc[r][t]);

template <int RB, int TB, int RMODE>
MC_Q512 void q8_avx512(const QSpec& s, const QRow* rows, const float* x, int64_t xs, int64_t k0, int64_t k1,
                       float* part, int64_t ps) {
#define MC_Q8_ROUND          \
  if constexpr (RMODE == 1) { \
    a = rnd512(a);            \
    b = rnd512(b);            \
  }
  MC_Q8_512_BODY
#undef MC_Q8_ROUND
}

template <int RB, int TB>
MC_Q512BF void q8_avx512bf(const QSpec& s, const QRow* rows, const float* x, int64_t xs, int64_t k0, int64_t k1,
                           float* part, int64_t ps) {
  // Words 0..15 of the conversion are a (weights j..j+15), 16..31 are b: each dword lane holds an even
  // weight (low word) and the next odd one (high word).
#define MC_Q8_ROUND                                                                              \
  {                                                                                              \
    const __m512i v = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));                      \
    a = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));                                           \
    b = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xffff0000u)))); \
  }
  MC_Q8_512_BODY
#undef MC_Q8_ROUND
}

// int8 for an fp32 compute dtype, factorised per group: sum_k x_k * scale * (q_k - zero) is computed as
// scale * sum_k x_k q_k + (-zero * scale) * sum_k x_k, both sums per lane over the group, then folded
// into the row's accumulator with two FMAs per group (q_k widened to fp32 is exact; only the rounding
// of the sums differs from the stated per-weight form). Rows and tokens stay independent, so the
// summation order depends on neither the register block nor the tokens run together.
template <int RB, int TB>
MC_Q512 void q8f_avx512(const QSpec& s, const QRow* rows, const float* x, int64_t xs, int64_t k0, int64_t k1,
                        float* part, int64_t ps) {
  const int G = s.group;
  __m512 acc[RB][TB];
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_setzero_ps();
  const int64_t gend = k1 / G;
  alignas(64) float sc[RB][16], nz[RB][16];
  for (int64_t gi = k0 / G; gi < gend; ++gi) {
    const int64_t g0 = gi * G;
    const int jg = static_cast<int>((gi - k0 / G) & 15);
    if (jg == 0) int_params512<RB>(rows, gi, static_cast<int>(std::min<int64_t>(16, gend - gi)), sc, nz);
    __m512 ag[RB][TB], sx[TB];
    for (int t = 0; t < TB; ++t) {
      sx[t] = _mm512_setzero_ps();
      for (int r = 0; r < RB; ++r) ag[r][t] = _mm512_setzero_ps();
    }
    for (int j = 0; j < G; j += 32) {
      __m512 wa[RB], wb[RB];
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) {
        if (((g0 + j) & 63) == 0) prefetch_row(rows[r], g0 + j, gi, 2);
        const uint8_t* q = rows[r].q + g0 + j;
        wa[r] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
        wb[r] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16))));
      }
#pragma GCC unroll 4
      for (int t = 0; t < TB; ++t) {
        const __m512 xa = _mm512_loadu_ps(x + t * xs + g0 + j), xb = _mm512_loadu_ps(x + t * xs + g0 + j + 16);
        sx[t] = _mm512_add_ps(sx[t], _mm512_add_ps(xa, xb));
#pragma GCC unroll 4
        for (int r = 0; r < RB; ++r) {
          ag[r][t] = _mm512_fmadd_ps(wa[r], xa, ag[r][t]);
          ag[r][t] = _mm512_fmadd_ps(wb[r], xb, ag[r][t]);
        }
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) {
      const __m512 vs = _mm512_set1_ps(sc[r][jg]), vz = _mm512_set1_ps(nz[r][jg]);
      for (int t = 0; t < TB; ++t) {
        acc[r][t] = _mm512_fmadd_ps(ag[r][t], vs, acc[r][t]);
        acc[r][t] = _mm512_fmadd_ps(sx[t], vz, acc[r][t]);
      }
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < TB; ++t) part[r * ps + t] += _mm512_reduce_add_ps(acc[r][t]);
}

// ---- AVX2 + FMA ----------------------------------------------------------------------------------
MC_Q2 inline __m256 rnd256(__m256 v) {
  __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  u = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}

// A 16-entry table lookup from the low 4 bits of each lane: two 8-entry permutes and a blend on bit 3.
MC_Q2 inline __m256 lut16(__m256 lo, __m256 hi, __m256i idx) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx),
                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// Adds each accumulator's lane sum to its (row, token) partial result.
template <int RB, int TB>
MC_Q2 inline void add_row_sums(const __m256 (&acc)[RB][TB], float* part, int64_t ps) {
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < TB; ++t) {
      const __m256 v = acc[r][t];
      __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
      q = _mm_add_ps(q, _mm_movehl_ps(q, q));
      q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 0x55));
      part[r * ps + t] += _mm_cvtss_f32(q);
    }
}

MC_Q2 inline void prefetch_row2(const QRow& row, int64_t qbyte, int64_t gi, int sbytes) {
  if ((qbyte & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(row.q + qbyte + QPREFETCH), _MM_HINT_T0);
  if ((gi & 31) == 0) {
    _mm_prefetch(reinterpret_cast<const char*>(row.scale + sbytes * gi + 128), _MM_HINT_T0);
    if (row.zero) _mm_prefetch(reinterpret_cast<const char*>(row.zero + gi + 128), _MM_HINT_T0);
  }
}

template <int RB, int TB, bool MX>
MC_Q2 void q4_avx2(const QSpec& s, const QRow* rows, const float* x, int64_t xs, int64_t k0, int64_t k1, float* part,
                   int64_t ps) {
  const int G = MX ? 32 : s.group, half = G / 2;
  __m256 acc[RB][TB];
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < TB; ++t) acc[r][t] = _mm256_setzero_ps();
  const __m256 iota0 = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), iota1 = _mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15);
  const __m256 fp40 = _mm256_load_ps(FP4), fp41 = _mm256_load_ps(FP4 + 8);
  for (int64_t gi = k0 / G, gend = k1 / G; gi < gend; ++gi) {
    const int64_t g0 = gi * G, qb = g0 / 2;
    __m256 l0[RB], l1[RB];
    for (int r = 0; r < RB; ++r) {
      if constexpr (MX) {
        const __m256 e = _mm256_set1_ps(E8M0.v[rows[r].scale[gi]]);
        l0[r] = _mm256_mul_ps(fp40, e);
        l1[r] = _mm256_mul_ps(fp41, e);
      } else {
        const float sc = _cvtsh_ss(load_u16(rows[r].scale + 2 * gi));
        const __m256 vs = _mm256_set1_ps(sc), vz = _mm256_set1_ps(-static_cast<float>(rows[r].zero[gi]) * sc);
        l0[r] = _mm256_fmadd_ps(iota0, vs, vz);
        l1[r] = _mm256_fmadd_ps(iota1, vs, vz);
        if (s.round_bf16) {
          l0[r] = rnd256(l0[r]);
          l1[r] = rnd256(l1[r]);
        }
      }
      prefetch_row2(rows[r], qb, gi, MX ? 1 : 2);
    }
    for (int j = 0; j < half; j += 8) {
      __m256 wl[RB], wh[RB];
      for (int r = 0; r < RB; ++r) {
        const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(rows[r].q + qb + j)));
        wl[r] = lut16(l0[r], l1[r], b);
        wh[r] = lut16(l0[r], l1[r], _mm256_srli_epi32(b, 4));
      }
      for (int t = 0; t < TB; ++t) {
        const __m256 xl = _mm256_loadu_ps(x + t * xs + g0 + j), xh = _mm256_loadu_ps(x + t * xs + g0 + half + j);
        for (int r = 0; r < RB; ++r) {
          acc[r][t] = _mm256_fmadd_ps(wl[r], xl, acc[r][t]);
          acc[r][t] = _mm256_fmadd_ps(wh[r], xh, acc[r][t]);
        }
      }
    }
  }
  add_row_sums<RB, TB>(acc, part, ps);
}

template <int RB, int TB, int RMODE>
MC_Q2 void q8_avx2(const QSpec& s, const QRow* rows, const float* x, int64_t xs, int64_t k0, int64_t k1, float* part,
                   int64_t ps) {
  const int G = s.group;
  __m256 acc[RB][TB];
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < TB; ++t) acc[r][t] = _mm256_setzero_ps();
  for (int64_t gi = k0 / G, gend = k1 / G; gi < gend; ++gi) {
    const int64_t g0 = gi * G;
    __m256 vs[RB], vz[RB];
    for (int r = 0; r < RB; ++r) {
      const float sc = _cvtsh_ss(load_u16(rows[r].scale + 2 * gi));
      vs[r] = _mm256_set1_ps(sc);
      vz[r] = _mm256_set1_ps(-static_cast<float>(rows[r].zero[gi]) * sc);
    }
    for (int j = 0; j < G; j += 16) {
      __m256 wa[RB], wb[RB];
      for (int r = 0; r < RB; ++r) {
        if (((g0 + j) & 63) == 0) prefetch_row2(rows[r], g0 + j, gi, 2);
        const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[r].q + g0 + j));
        __m256 a = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q));
        __m256 b = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(q, 8)));
        a = _mm256_fmadd_ps(a, vs[r], vz[r]);
        b = _mm256_fmadd_ps(b, vs[r], vz[r]);
        if constexpr (RMODE == 1) {
          a = rnd256(a);
          b = rnd256(b);
        }
        wa[r] = a;
        wb[r] = b;
      }
      for (int t = 0; t < TB; ++t) {
        const __m256 xa = _mm256_loadu_ps(x + t * xs + g0 + j), xb = _mm256_loadu_ps(x + t * xs + g0 + j + 8);
        for (int r = 0; r < RB; ++r) {
          acc[r][t] = _mm256_fmadd_ps(wa[r], xa, acc[r][t]);
          acc[r][t] = _mm256_fmadd_ps(wb[r], xb, acc[r][t]);
        }
      }
    }
  }
  add_row_sums<RB, TB>(acc, part, ps);
}

// ---- dispatch: (format, rounding) -> a kernel template; rows in blocks of RBMAX, 2, 1 ---------------
using QFn = void (*)(const QSpec&, const QRow*, const float*, int64_t, int64_t, int64_t, float*, int64_t);

template <class K, int RBMAX, int TBMAX>
struct Table : BlockTable<QFn, K, RBMAX, TBMAX> {
  void run(const QSpec& s, const QRow* rows, int rb, const float* x, int64_t xs, int tb, int64_t k0, int64_t k1,
           float* part, int64_t ps) const {
    this->each_block(rb, tb, [&](QFn f, int r, int t0) {
      f(s, rows + r, x + t0 * xs, xs, k0, k1, part + r * ps + t0, ps);
    });
  }
};

struct Q4_512 { template <int RB, int TB> static void run(const QSpec& s, const QRow* r, const float* x, int64_t xs, int64_t a, int64_t b, float* p, int64_t ps) { q4_avx512<RB, TB, false>(s, r, x, xs, a, b, p, ps); } };
struct MX_512 { template <int RB, int TB> static void run(const QSpec& s, const QRow* r, const float* x, int64_t xs, int64_t a, int64_t b, float* p, int64_t ps) { q4_avx512<RB, TB, true>(s, r, x, xs, a, b, p, ps); } };
struct Q4_512BF { template <int RB, int TB> static void run(const QSpec& s, const QRow* r, const float* x, int64_t xs, int64_t a, int64_t b, float* p, int64_t ps) { q4_avx512<RB, TB, false, true>(s, r, x, xs, a, b, p, ps); } };
struct Q8F_512 { template <int RB, int TB> static void run(const QSpec& s, const QRow* r, const float* x, int64_t xs, int64_t a, int64_t b, float* p, int64_t ps) { q8f_avx512<RB, TB>(s, r, x, xs, a, b, p, ps); } };

struct Q8_512_1 { template <int RB, int TB> static void run(const QSpec& s, const QRow* r, const float* x, int64_t xs, int64_t a, int64_t b, float* p, int64_t ps) { q8_avx512<RB, TB, 1>(s, r, x, xs, a, b, p, ps); } };
struct Q8_512_BF { template <int RB, int TB> static void run(const QSpec& s, const QRow* r, const float* x, int64_t xs, int64_t a, int64_t b, float* p, int64_t ps) { q8_avx512bf<RB, TB>(s, r, x, xs, a, b, p, ps); } };
struct Q4_2 { template <int RB, int TB> static void run(const QSpec& s, const QRow* r, const float* x, int64_t xs, int64_t a, int64_t b, float* p, int64_t ps) { q4_avx2<RB, TB, false>(s, r, x, xs, a, b, p, ps); } };
struct MX_2 { template <int RB, int TB> static void run(const QSpec& s, const QRow* r, const float* x, int64_t xs, int64_t a, int64_t b, float* p, int64_t ps) { q4_avx2<RB, TB, true>(s, r, x, xs, a, b, p, ps); } };
struct Q8_2_0 { template <int RB, int TB> static void run(const QSpec& s, const QRow* r, const float* x, int64_t xs, int64_t a, int64_t b, float* p, int64_t ps) { q8_avx2<RB, TB, 0>(s, r, x, xs, a, b, p, ps); } };
struct Q8_2_1 { template <int RB, int TB> static void run(const QSpec& s, const QRow* r, const float* x, int64_t xs, int64_t a, int64_t b, float* p, int64_t ps) { q8_avx2<RB, TB, 1>(s, r, x, xs, a, b, p, ps); } };

const Table<Q4_512, 4, 4> T_Q4_512;
const Table<MX_512, 4, 4> T_MX_512;
const Table<Q4_512BF, 4, 4> T_Q4_512BF;
const Table<Q8F_512, 4, 2> T_Q8F_512;  // two tokens at most: a group's partial sums take the registers
const Table<Q8_512_1, 4, 4> T_Q8_512_1;
const Table<Q8_512_BF, 4, 4> T_Q8_512_BF;
const Table<Q4_2, 2, 2> T_Q4_2;
const Table<MX_2, 2, 2> T_MX_2;
const Table<Q8_2_0, 2, 2> T_Q8_2_0;
const Table<Q8_2_1, 2, 2> T_Q8_2_1;

void block_avx512(const QSpec& s, const QRow* rows, int rb, const float* x, int64_t xs, int tb, int64_t k0, int64_t k1,
                  float* part, int64_t ps) {
  if (s.fmt == Q_INT4) return T_Q4_512.run(s, rows, rb, x, xs, tb, k0, k1, part, ps);
  if (s.fmt == Q_MXFP4) return T_MX_512.run(s, rows, rb, x, xs, tb, k0, k1, part, ps);
  if (!s.round_bf16) return T_Q8F_512.run(s, rows, rb, x, xs, tb, k0, k1, part, ps);
  T_Q8_512_1.run(s, rows, rb, x, xs, tb, k0, k1, part, ps);
}

void block_avx512bf(const QSpec& s, const QRow* rows, int rb, const float* x, int64_t xs, int tb, int64_t k0,
                    int64_t k1, float* part, int64_t ps) {
  if (s.fmt == Q_INT8 && s.round_bf16) return T_Q8_512_BF.run(s, rows, rb, x, xs, tb, k0, k1, part, ps);
  if (s.fmt == Q_INT4 && s.round_bf16) return T_Q4_512BF.run(s, rows, rb, x, xs, tb, k0, k1, part, ps);
  block_avx512(s, rows, rb, x, xs, tb, k0, k1, part, ps);
}

void block_avx2(const QSpec& s, const QRow* rows, int rb, const float* x, int64_t xs, int tb, int64_t k0, int64_t k1,
                float* part, int64_t ps) {
  if (s.fmt == Q_INT4) return T_Q4_2.run(s, rows, rb, x, xs, tb, k0, k1, part, ps);
  if (s.fmt == Q_MXFP4) return T_MX_2.run(s, rows, rb, x, xs, tb, k0, k1, part, ps);
  if (!s.round_bf16) return T_Q8_2_0.run(s, rows, rb, x, xs, tb, k0, k1, part, ps);
  T_Q8_2_1.run(s, rows, rb, x, xs, tb, k0, k1, part, ps);
}
#endif

}  // namespace

QKernels quant_kernels_for(int isa, bool bf16_hw) {
  QKernels k;
#ifdef MOECACHE_X86
  if (isa == 2) {
    k.block = bf16_hw ? block_avx512bf : block_avx512;
    k.rb = 4, k.tb = 4, k.bf16_hw = bf16_hw;
    return k;
  }
  if (isa == 1) {
    k.block = block_avx2;
    k.rb = 2, k.tb = 2;
    return k;
  }
#else
  (void)isa;
  (void)bf16_hw;
#endif
  k.block = block_portable;
  k.rb = 4, k.tb = 4;
  return k;
}

bool quant_x_evenodd(const QKernels& k, const QSpec& spec) {
  return spec.fmt == Q_MXFP4 || (spec.fmt == Q_INT8 && spec.round_bf16 && k.bf16_hw);
}

}  // namespace moecache_cpu
