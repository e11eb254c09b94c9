// SIMD primitives shared by the CPU kernels: one float32 vector type per ISA and a fixed-order
// horizontal sum. Every kernel here computes an output element by the same sequence of
// operations whatever else is in the batch, so these are the only places where lanes meet.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace levante {

#if defined(__AVX512F__)
using vf = __m512;
constexpr int64_t kLanes = 16;
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset1(float x) { return _mm512_set1_ps(x); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline vf vload(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
// The sum of the 16 lanes by one tree: lanes l and l^8 first, then l^4, l^2, l^1.
inline float vsum(vf v) {
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  q = _mm_add_ps(q, _mm_shuffle_ps(q, q, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
}
// vsum of 16 vectors at once (lane t: vsum(v[t]), the same tree and so the same bits); the last
// permute undoes the bit-reversed order the pairing leaves.
inline vf lane_sums(vf* v) {
  int n = 16;
  for (int w = 8; w >= 1; w /= 2, n /= 2) {
    const __mmask16 upper = static_cast<__mmask16>(
        w == 8 ? 0xff00 : w == 4 ? 0xf0f0 : w == 2 ? 0xcccc : 0xaaaa);  // lanes whose bit w is set
    const __m512i swap = _mm512_xor_si512(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(w));
    for (int i = 0; i < n / 2; ++i) {
      const vf x = v[2 * i], y = v[2 * i + 1];
      const vf keep = _mm512_mask_blend_ps(upper, x, y), move = _mm512_mask_blend_ps(upper, y, x);
      v[i] = _mm512_add_ps(keep, _mm512_permutexvar_ps(swap, move));
    }
  }
  const __m512i order = _mm512_setr_epi32(0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15);
  return _mm512_permutexvar_ps(order, v[0]);
}
#elif defined(__AVX2__) && defined(__FMA__)
using vf = __m256;
constexpr int64_t kLanes = 8;
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vset1(float x) { return _mm256_set1_ps(x); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline vf vload(const c10::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}
#else
using vf = float;
constexpr int64_t kLanes = 1;
inline vf vzero() { return 0.f; }
inline vf vset1(float x) { return x; }
inline vf vload(const float* p) { return *p; }
inline vf vload(const c10::BFloat16* p) { return static_cast<float>(*p); }
inline void vstore(float* p, vf v) { *p = v; }
inline vf vfma(vf a, vf b, vf c) { return __builtin_fmaf(a, b, c); }
inline float vsum(vf v) { return v; }
#endif

// Every value of an 8-bit float format, by its bits: loads widen fp8 by table (exact).
template <typename F>
inline const float* fp8_values() {
  static const auto table = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) t[i] = static_cast<float>(F(static_cast<uint8_t>(i), F::from_bits()));
    return t;
  }();
  return table.data();
}

template <typename F>
inline vf vload_fp8(const F* p) {
  const float* table = fp8_values<F>();
#if defined(__AVX512F__)
  return _mm512_i32gather_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), table, 4);
#elif defined(__AVX2__) && defined(__FMA__)
  return _mm256_i32gather_ps(table, _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))), 4);
#else
  return table[reinterpret_cast<const uint8_t*>(p)[0]];
#endif
}
inline vf vload(const c10::Float8_e4m3fn* p) { return vload_fp8(p); }
inline vf vload(const c10::Float8_e5m2* p) { return vload_fp8(p); }

// Elementwise arithmetic as eager's operators do it, a vector at a time: each value widened to
// float32, one IEEE operation, and the result rounded to the tensor's dtype (`vround`) where an
// operator would hand back a tensor. For bfloat16 the rounding is c10's (to nearest even, NaN to
// 0x7FC0); for float32 it is the value itself, kept a value so the compiler cannot fuse a product
// into the next sum (an FMA rounds once: other bits than eager's two operators).
#if defined(__AVX512F__)
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }  // b where either is NaN
inline bool any_nan(vf v) { return _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0; }
inline __m512i bf16_bits(vf v) {  // c10::BFloat16's bits of each lane, in the high half of its word
  const __m512i u = _mm512_castps_si512(v), one = _mm512_set1_epi32(1);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), one), _mm512_set1_epi32(0x7fff));
  const __m512i rounded = _mm512_and_si512(_mm512_add_epi32(u, bias), _mm512_set1_epi32(static_cast<int>(0xffff0000u)));
  return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), rounded, _mm512_set1_epi32(0x7fc00000));
}
inline vf vround_bf16(vf v) { return _mm512_castsi512_ps(bf16_bits(v)); }
inline void vstore(c10::BFloat16* p, vf v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_bits(v), 16)));
}
#elif defined(__AVX2__) && defined(__FMA__)
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }  // b where either is NaN
inline bool any_nan(vf v) { return _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0; }
inline __m256i bf16_bits(vf v) {
  const __m256i u = _mm256_castps_si256(v), one = _mm256_set1_epi32(1);
  const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), one), _mm256_set1_epi32(0x7fff));
  const __m256i rounded = _mm256_and_si256(_mm256_add_epi32(u, bias), _mm256_set1_epi32(static_cast<int>(0xffff0000u)));
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(rounded), _mm256_set1_ps(std::bit_cast<float>(0x7fc00000u)), nan));
}
inline vf vround_bf16(vf v) { return _mm256_castsi256_ps(bf16_bits(v)); }
inline void vstore(c10::BFloat16* p, vf v) {
  const __m256i halves = _mm256_srli_epi32(bf16_bits(v), 16);  // 8 words < 2^16: pack, then gather the lanes
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(halves, halves), 0b1000);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
#else
inline vf vadd(vf a, vf b) { return a + b; }
inline vf vmul(vf a, vf b) { return a * b; }
inline vf vdiv(vf a, vf b) { return a / b; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }  // b where either is NaN
inline bool any_nan(vf v) { return v != v; }
inline vf vround_bf16(vf v) { return static_cast<float>(c10::BFloat16(v)); }
inline void vstore(c10::BFloat16* p, vf v) { *p = c10::BFloat16(v); }
#endif

template <typename T>
inline vf vround(vf v) {
  if constexpr (std::is_same_v<T, float>) {
    asm("" : "+x"(v));
    return v;
  } else {
    return vround_bf16(v);
  }
}

// The first n <= lanes values at p (zeros after them), and the first n lanes of v stored at p.
template <typename T>
inline vf vload_n(const T* p, int64_t n) {
  if (n == kLanes) return vload(p);
  T buffer[kLanes] = {};
  std::memcpy(buffer, p, n * sizeof(T));
  return vload(buffer);
}
template <typename T>
inline void vstore_n(T* p, vf v, int64_t n) {
  if (n == kLanes) return vstore(p, v);
  T buffer[kLanes];
  vstore(buffer, v);
  std::memcpy(p, buffer, n * sizeof(T));
}

// The first n < lanes elements at p, zeros after them (adding 0·0 leaves an accumulator as it is).
template <typename T, int64_t Lanes>
inline const T* padded(const T* p, int64_t n, T (&buffer)[Lanes]) {
  std::memset(buffer, 0, sizeof(buffer));
  std::memcpy(buffer, p, n * sizeof(T));
  return buffer;
}

}  // namespace levante
