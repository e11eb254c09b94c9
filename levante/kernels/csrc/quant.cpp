// y = x·wᵀ over GGUF-quantized weights kept as the file stores them (llama.cpp's block formats),
// by integer dot products, as llama.cpp computes them.
//
// Each row of x is rounded per 32 values to int8 with a float32 scale dx (llama.cpp's Q8_0, its
// scale kept in float32). Every weight chunk of 32 is, whatever its type, w_l = D·sc_h·(c_l − o) + Mn
// with unsigned 8-bit codes c, an integer scale sc_h per half (Q6_K's 16-weight sub-blocks; 1
// elsewhere) and an integer offset o. The integer sums Σ c·xq of a chunk (of each half, for Q6_K)
// are exact, in any order and on any instruction set (VPDPBUSD, AMX's TDPBSUD, AVX2 or plain C++),
// and the float part is the same operations for every output element, chunk after chunk in k:
//     acc = fma(float(Σ_h c·xq), D·sc_h·dx, acc);  acc = fma(Mn − D·sc_h·o, dx·Σ_h xq, acc)
// (per half for Q6_K, over the whole chunk otherwise; the factors are exact products of the
// block's fp16 scales and small integers).
// So a row's result depends on that row alone (batch-invariant), and a weight costs a few integer
// instructions instead of a conversion to floating point and a float product. The price is x's
// rounding, llama.cpp's own (about 0.5% of an output's norm; the tests bound it). Embedding
// lookups (`dequantize`) decode blocks exactly as gguf's reference dequantizer does.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <memory>
#include <optional>

#include "gemm.h"
#include "quant.h"

namespace levante {
namespace {

// ggml's type ids, and Levante's own for `--quantization int4` with groups of 64 and 128: Q4_1
// widened (one fp16 scale and min per group, then its 32-weight chunks laid out as Q4_1's)
enum QType : int64_t { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q4_1_G64 = 1064, Q4_1_G128 = 1128 };

struct Format {
  int64_t elements, bytes;  // per block
};

[[noreturn]] void unsupported(int64_t type) { TORCH_CHECK(false, "levante: unsupported GGUF quantization type ", type); }

// constexpr, so the kernels templated on a type unroll their loops over its chunks
constexpr Format format(int64_t type) {
  switch (type) {
    case Q4_0: return {32, 18};
    case Q4_1: return {32, 20};
    case Q8_0: return {32, 34};
    case Q4_K: return {256, 144};
    case Q5_K: return {256, 176};
    case Q6_K: return {256, 210};
    case Q4_1_G64: return {64, 36};
    case Q4_1_G128: return {128, 68};
    default: unsupported(type);
  }
}

// A packed block's bytes: Q4_0's and Q8_0's codes moved past a 2-byte pad after the scale, Q6_K
// padded to a whole word; the other types' fields already start on words.
constexpr int64_t block_bytes(int64_t type, bool packed) {
  const int64_t raw = format(type).bytes;
  return packed && (type == Q4_0 || type == Q8_0 || type == Q6_K) ? raw + 2 : raw;
}

inline float half(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(bits);
}

// The 6-bit scale and min of sub-block j of a Q4_K/Q5_K super-block.
inline void scale_min(const uint8_t* s, int j, float& sc, float& m) {
  if (j < 4) {
    sc = s[j] & 63, m = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4), m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

struct Chunk {  // one 32-weight chunk of a weight row: w_l = D·sc[l / 16]·(c_l − o) + Mn
  float D, Mn;
  int32_t sc[2], o;
};

// One block of a weight row → its codes (`elements` bytes) and one Chunk per 32 weights.
void unpack(int64_t type, const uint8_t* b, uint8_t* c, Chunk* p) {
  switch (type) {
    case Q4_0:
    case Q8_0: {
      const bool q8 = type == Q8_0;
      for (int l = 0; l < (q8 ? 32 : 16); ++l) {
        if (q8) {
          c[l] = b[2 + l] ^ 0x80;  // int8 q as q + 128
        } else {
          c[l] = b[2 + l] & 15, c[l + 16] = b[2 + l] >> 4;
        }
      }
      *p = {half(b), 0.f, {1, 1}, q8 ? 128 : 8};
      return;
    }
    case Q4_1:
    case Q4_1_G64:
    case Q4_1_G128: {
      const float d = half(b), m = half(b + 2);
      for (int64_t k = 0; k < format(type).elements / 32; ++k, c += 32) {
        const uint8_t* q = b + 4 + 16 * k;
        for (int l = 0; l < 16; ++l) c[l] = q[l] & 15, c[l + 16] = q[l] >> 4;
        p[k] = {d, m, {1, 1}, 0};
      }
      return;
    }
    case Q4_K:
    case Q5_K: {
      const float d = half(b), dmin = half(b + 2);
      const uint8_t *scales = b + 4, *qh = b + 16, *qs = type == Q4_K ? b + 16 : b + 48;
      for (int j = 0; j < 8; ++j) {
        float sc, m;
        scale_min(scales, j, sc, m);
        p[j] = {d * sc, -(dmin * m), {1, 1}, 0};  // both products exact: as `decode` forms them
        const uint8_t* q = qs + (j / 2) * 32;
        const int shift = (j % 2) * 4;
        for (int l = 0; l < 32; ++l)
          c[j * 32 + l] = ((q[l] >> shift) & 15) | (type == Q5_K ? ((qh[l] >> j) & 1) << 4 : 0);
      }
      return;
    }
    case Q6_K: {
      const uint8_t *ql = b, *qh = b + 128;
      const auto* scales = reinterpret_cast<const int8_t*>(b + 192);
      const float d = half(b + 208);
      for (int k = 0; k < 8; ++k) {
        const int h = k / 4, r = k % 4;
        const uint8_t* lo = ql + h * 64 + (r % 2) * 32;
        const uint8_t* hi = qh + h * 32;
        for (int l = 0; l < 32; ++l) c[k * 32 + l] = ((lo[l] >> (r / 2 * 4)) & 15) | (((hi[l] >> (2 * r)) & 3) << 4);
        p[k] = {d, 0.f, {scales[2 * k], scales[2 * k + 1]}, 32};
      }
      return;
    }
    default: TORCH_CHECK(false, "levante: unsupported GGUF quantization type ", type);
  }
}

// One row of K weights (K a whole number of blocks) → T, in gguf's order of operations: the
// products (d·sc)·q are exact or rounded once, as gguf's are, then the min is added.
template <typename T>
void dequantize_row(int64_t type, const uint8_t* row, T* y, int64_t K) {
  const Format f = format(type);
  uint8_t c[256];
  Chunk p[8];
  for (int64_t k = 0; k < K; k += f.elements, row += f.bytes) {
    unpack(type, row, c, p);
    for (int64_t l = 0; l < f.elements; ++l) {
      const Chunk& q = p[l / 32];
      const float w = q.D * static_cast<float>(q.sc[l % 32 / 16]) * static_cast<float>(c[l] - q.o);
      y[k + l] = static_cast<T>(q.Mn == 0.f ? w : w + q.Mn);
    }
  }
}


// The rows of one or more quantized tensors stacked (merged projections kept apart: they may
// differ in type, and they are views of the mapped file, which concatenating would copy).
struct Weights {
  struct Part {
    const uint8_t* data;
    int64_t rows, row_bytes, type;
    bool packed = false;  // by pack_quant: row_bytes is then the bytes of 16 rows
  };
  std::vector<Part> parts;

  // The part that holds stacked row n, and n's row within it.
  std::pair<const Part*, int64_t> locate(int64_t n) const {
    for (const Part& p : parts) {
      if (n < p.rows) return {&p, n};
      n -= p.rows;
    }
    TORCH_CHECK(false, "levante: row ", n, " past the weights");
  }

  template <typename T>
  void dequantize(int64_t n, T* y, int64_t K) const {
    const auto [part, row] = locate(n);
    dequantize_row(part->type, part->data + row * part->row_bytes, y, K);
  }
};

// x quantized: q [M, K] int8; per row and chunk of 32 its scale d, s = d·Σq and, per half of
// the chunk, d·Σq (the min terms' factors).
struct QuantizedX {
  std::vector<int8_t> q;
  std::vector<float> d, s, halves;
};

// One chunk of 32 values of x → its codes q, scale d and the sums of its halves' codes, as llama.cpp's
// Q8_0 rounds it with the scale kept in float32. A NaN or infinite value makes the scale NaN (and
// the codes 0), so the outputs are NaN as float's.
template <typename T>
inline void quantize_chunk(const T* x, int8_t* q, float& d, int32_t (&sums)[2]) {
#if defined(__AVX512F__)
  // the same operations 16 lanes at a time: |v|'s maximum is exact in any order, the product
  // and VRNDSCALEPS's nearest-even rounding are nearbyint's under the default rounding mode
  const __m512 a = vload(x), b = vload(x + 16), zero = _mm512_setzero_ps();
  if ((_mm512_cmp_ps_mask(_mm512_sub_ps(a, a), zero, _CMP_EQ_OQ) &
       _mm512_cmp_ps_mask(_mm512_sub_ps(b, b), zero, _CMP_EQ_OQ)) == 0xffff) {
    d = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b))) / 127.f;
    const __m512 id = _mm512_set1_ps(d != 0.f ? 1.f / d : 0.f), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
    const __m512i qa = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(
        _mm512_roundscale_ps(_mm512_mul_ps(a, id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), lo), hi));
    const __m512i qb = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(
        _mm512_roundscale_ps(_mm512_mul_ps(b, id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), lo), hi));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(qa));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(qb));
    sums[0] = _mm512_reduce_add_epi32(qa), sums[1] = _mm512_reduce_add_epi32(qb);
    return;
  }
#endif
  float v[32], amax = 0.f;
  bool finite = true;
  for (int l = 0; l < 32; ++l) {
    v[l] = static_cast<float>(x[l]);
    amax = std::max(amax, std::abs(v[l])), finite &= std::isfinite(v[l]);
  }
  d = finite ? amax / 127.f : std::numeric_limits<float>::quiet_NaN();
  const float id = finite && d != 0.f ? 1.f / d : 0.f;
  sums[0] = sums[1] = 0;
  for (int l = 0; l < 32; ++l) {
    q[l] = finite ? static_cast<int8_t>(std::clamp(std::nearbyint(v[l] * id), -127.f, 127.f)) : 0;
    sums[l / 16] += q[l];
  }
}

// Rows [first, last) of x → out (already sized for M rows of K).
template <typename T>
void quantize_range(const T* x, int64_t ldx, int64_t K, int64_t first, int64_t last, QuantizedX& out) {
  const int64_t chunks = K / 32;
  for (int64_t m = first; m < last; ++m)
    for (int64_t b = 0; b < chunks; ++b) {
      const int64_t i = m * chunks + b;
      float d;
      int32_t sums[2];
      quantize_chunk(x + m * ldx + b * 32, out.q.data() + m * K + b * 32, d, sums);
      out.d[i] = d, out.s[i] = d * static_cast<float>(sums[0] + sums[1]);
      out.halves[2 * i] = d * static_cast<float>(sums[0]), out.halves[2 * i + 1] = d * static_cast<float>(sums[1]);
    }
}

// out sized for M rows of K (within the capacity it was given, no allocation).
void size_for(QuantizedX& out, int64_t M, int64_t K) {
  out.q.resize(M * K), out.d.resize(M * K / 32), out.s.resize(M * K / 32), out.halves.resize(M * K / 16);
}

template <typename T>
QuantizedX quantize_rows(const T* x, int64_t ldx, int64_t M, int64_t K) {
  QuantizedX out;
  size_for(out, M, K);
  at::parallel_for(0, M, 16, [&](int64_t first, int64_t last) { quantize_range(x, ldx, K, first, last, out); });
  return out;
}

constexpr int64_t kGroup = 16;  // weight rows unpacked together: one 64-byte line per 4 k

// Vectors over the rows of a group (lane = weight row): vec.h's float vectors (16 lanes with
// AVX-512, 8 with AVX2, 1 in plain C++) and integer vectors as wide.
#if defined(__AVX512F__)
using iv = __m512i;
inline iv iload(const void* p) { return _mm512_loadu_si512(p); }
inline iv izero() { return _mm512_setzero_si512(); }
inline vf tofloat(iv a) { return _mm512_cvtepi32_ps(a); }
inline iv iadd(iv a, iv b) { return _mm512_add_epi32(a, b); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline iv dpbusd(iv acc, iv codes, int32_t x4) {
#if defined(__AVX512VNNI__)
  return _mm512_dpbusd_epi32(acc, codes, _mm512_set1_epi32(x4));
#else  // unsigned bytes 0, 2 and 1, 3 of each word as 16-bit, times x's bytes sign-extended: exact
  const __m512i x = _mm512_set1_epi32(x4), mask = _mm512_set1_epi16(0xff);
  const __m512i even = _mm512_madd_epi16(_mm512_and_si512(codes, mask), _mm512_srai_epi16(_mm512_slli_epi16(x, 8), 8));
  const __m512i odd = _mm512_madd_epi16(_mm512_srli_epi16(codes, 8), _mm512_srai_epi16(x, 8));
  return _mm512_add_epi32(acc, _mm512_add_epi32(even, odd));
#endif
}
#elif defined(__AVX2__) && defined(__FMA__)
using iv = __m256i;
inline iv iload(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline iv izero() { return _mm256_setzero_si256(); }
inline vf tofloat(iv a) { return _mm256_cvtepi32_ps(a); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline iv dpbusd(iv acc, iv codes, int32_t x4) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, codes, _mm256_set1_epi32(x4));
#else  // as above, 8 lanes
  const __m256i x = _mm256_set1_epi32(x4), mask = _mm256_set1_epi16(0xff);
  const __m256i even = _mm256_madd_epi16(_mm256_and_si256(codes, mask), _mm256_srai_epi16(_mm256_slli_epi16(x, 8), 8));
  const __m256i odd = _mm256_madd_epi16(_mm256_srli_epi16(codes, 8), _mm256_srai_epi16(x, 8));
  return _mm256_add_epi32(acc, _mm256_add_epi32(even, odd));
#endif
}
#else
using iv = int32_t;
inline iv iload(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline iv izero() { return 0; }
inline vf tofloat(iv a) { return static_cast<float>(a); }
inline vf vmul(vf a, vf b) { return a * b; }
inline iv dpbusd(iv acc, iv codes, int32_t x4) {
  uint8_t c[4];
  int8_t x[4];
  std::memcpy(c, &codes, 4), std::memcpy(x, &x4, 4);
  return acc + c[0] * x[0] + c[1] * x[1] + c[2] * x[2] + c[3] * x[3];
}
#endif
constexpr int64_t kRowLanes = kLanes;
constexpr int64_t kVectors = kGroup / kRowLanes;

// A group of weight rows unpacked for the dot products, K weights of each from the row's chunk
// `first` on (the whole row, or one block of it): codes [K/4][16 rows][4 k] (each 4 k of a row one
// 32-bit word, as VPDPBUSD reads them) and, per chunk [K/32][16 rows], the float factors
// of its halves' sums, D_h = D·sc_h, and of x's sums, Mn_h = Mn − D_h·o (all exact products of
// the block's fp16 scales and small integers). Without `scales` (no Q6_K row) the halves share one
// factor, D0 and Mn0, applied to the whole chunk.
struct Group {
  // uninitialized (every entry is written before it is read): a decode step allocates these per
  // call and thread, where zeroing them would cost more than some of the matmuls
  std::unique_ptr<uint8_t[]> codes;
  std::unique_ptr<float[]> D0, D1, Mn0, Mn1;
  bool scales = false;
  int64_t first = 0;

  explicit Group(int64_t K)
      : codes(new uint8_t[K * kGroup]), D0(new float[K / 32 * kGroup]), D1(new float[K / 32 * kGroup]),
        Mn0(new float[K / 32 * kGroup]), Mn1(new float[K / 32 * kGroup]) {}
};

// rows [16][E] bytes at stride ld → out [E/4][16][4]: a transpose of 32-bit words.
void interleave(const uint8_t* rows, int64_t ld, int64_t E, uint8_t* out) {
  int64_t w = 0;
#if defined(__AVX512F__)
  for (; w + 16 <= E / 4; w += 16) {  // 16 words of each row at a time: a 16×16 transpose
    __m512i r[16], a[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(rows + i * ld + w * 4);
    for (int i = 0; i < 8; ++i)
      a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]), a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    for (int i = 0; i < 4; ++i) {  // r[4i + c], 128-bit lane L: rows 4i..4i+3 of word 4L + c
      r[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
      r[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
      r[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
      r[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
    }
    for (int c = 0; c < 4; ++c) {  // lanes L of r[c], r[4 + c], r[8 + c], r[12 + c] → word 4L + c
      const __m512i t0 = _mm512_shuffle_i32x4(r[c], r[4 + c], _MM_SHUFFLE(1, 0, 1, 0));
      const __m512i t1 = _mm512_shuffle_i32x4(r[c], r[4 + c], _MM_SHUFFLE(3, 2, 3, 2));
      const __m512i t2 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], _MM_SHUFFLE(1, 0, 1, 0));
      const __m512i t3 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], _MM_SHUFFLE(3, 2, 3, 2));
      _mm512_storeu_si512(out + (w + c) * 64, _mm512_shuffle_i32x4(t0, t2, _MM_SHUFFLE(2, 0, 2, 0)));
      _mm512_storeu_si512(out + (w + 4 + c) * 64, _mm512_shuffle_i32x4(t0, t2, _MM_SHUFFLE(3, 1, 3, 1)));
      _mm512_storeu_si512(out + (w + 8 + c) * 64, _mm512_shuffle_i32x4(t1, t3, _MM_SHUFFLE(2, 0, 2, 0)));
      _mm512_storeu_si512(out + (w + 12 + c) * 64, _mm512_shuffle_i32x4(t1, t3, _MM_SHUFFLE(3, 1, 3, 1)));
    }
  }
#endif
  for (; w < E / 4; ++w)
    for (int i = 0; i < 16; ++i) std::memcpy(out + w * 64 + i * 4, rows + i * ld + w * 4, 4);
}

#if defined(__AVX512F__)
// The common types unpacked straight into the group's layout, a 32-bit word of 16 rows at a time
// (one gather: lane r reads row r), with their parameters computed for 16 rows at once: the same
// codes and the same float operations as `unpack`, without a pass over each row and a transpose.
struct RowWords {
  static constexpr bool packed = false;
  const uint8_t* base;
  __m512i starts;  // each lane's row, in bytes from base
  __m512i at(int64_t offset) const {
    return _mm512_i32gather_epi32(_mm512_add_epi32(starts, _mm512_set1_epi32(static_cast<int32_t>(offset))), base, 1);
  }
};

// The same words of 16 rows repacked by pack_quant (one 64-byte line per word, lane r: row r): a
// plain load where RowWords gathers. Offsets are into the packed block (`block_bytes`), where
// every field starts on a word.
struct PackedWords {
  static constexpr bool packed = true;
  const uint8_t* base;
  __m512i at(int64_t offset) const { return _mm512_loadu_si512(base + offset * 16); }
};

inline __m512i bits(__m512i w, int shift, int32_t mask) {
  return _mm512_and_si512(_mm512_srli_epi32(w, shift), _mm512_set1_epi32(mask));
}
inline __m512 fp16_at(__m512i w, int shift) {  // the fp16 in bits [shift, shift + 16) of each word
  return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(w, shift)));
}
inline void put(uint8_t* p, __m512i v) { _mm512_storeu_si512(p, v); }

bool lanes_type(int64_t type) {
  return type == Q4_0 || type == Q4_1 || type == Q8_0 || type == Q4_K || type == Q6_K || type == Q4_1_G64 ||
         type == Q4_1_G128;
}

// Rows [first, first + rows) of a part, one per lane (past its last row: the last row again), to f
// as RowWords or, where the part is packed (rows then 16, first a multiple of 16), PackedWords.
template <typename F>
void with_words(const Weights::Part& part, int64_t first, int64_t rows, F&& f) {
  if (part.packed) return f(PackedWords{part.data + first / kGroup * part.row_bytes});
  const __m512i starts = _mm512_min_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(static_cast<int32_t>(rows - 1)));
  f(RowWords{part.data + first * part.row_bytes,
             _mm512_mullo_epi32(starts, _mm512_set1_epi32(static_cast<int32_t>(part.row_bytes)))});
}

// Where `lanes` puts a block's codes (chunk c's 4-weight word t of 16 rows) and the factors of
// each chunk's sums (half h: Q6_K's second 16 weights; 0 elsewhere).
struct ToGroup {  // into a Group, which dot_chunks reads back for each 4 rows of x
  Group& g;
  void codes(int64_t c, int t, __m512i v) const { put(g.codes.get() + (c * 8 + t) * 64, v); }
  void factors(int64_t c, int h, __m512 d, __m512 mn) const {
    _mm512_storeu_ps((h ? g.D1 : g.D0).get() + c * kGroup, d);
    _mm512_storeu_ps((h ? g.Mn1 : g.Mn0).get() + c * kGroup, mn);
  }
  void flush(int64_t, int64_t) const {}  // chunks [c, c + n) are complete: read back later
};

// Blocks [kb0, kb1) of the rows w reads, of type Type (one lanes_type takes) → out, chunks
// numbered from kb0's first. The loops are unrolled so that a sink holding its sums in registers
// (InRegisters) keeps them there.
template <int64_t Type, typename W, typename Sink>
inline __attribute__((always_inline)) void lanes(const W& w, int64_t kb0, int64_t kb1, Sink& out) {
  constexpr Format f = format(Type);
  const __m512i low4 = _mm512_set1_epi32(0x0f0f0f0f);
  constexpr int64_t codes_at = W::packed ? 4 : 2;  // Q4_0's and Q8_0's codes, after the scale
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    // the block's first byte, and its first chunk
    const int64_t at = kb * block_bytes(Type, W::packed), c0 = (kb - kb0) * f.elements / 32;
    if constexpr (Type == Q4_0 || Type == Q8_0) {
      const __m512 d = fp16_at(w.at(at), 0);
      out.factors(c0, 0, d, _mm512_mul_ps(d, _mm512_set1_ps(Type == Q8_0 ? -128.f : -8.f)));  // the offset
#pragma GCC unroll 8
      for (int t = 0; t < (Type == Q8_0 ? 8 : 4); ++t) {
        const __m512i raw = w.at(at + codes_at + 4 * t);
        if constexpr (Type == Q8_0) {
          out.codes(c0, t, _mm512_xor_si512(raw, _mm512_set1_epi32(static_cast<int32_t>(0x80808080))));
        } else {
          out.codes(c0, t, _mm512_and_si512(raw, low4));
          out.codes(c0, t + 4, _mm512_and_si512(_mm512_srli_epi32(raw, 4), low4));
        }
      }
      out.flush(c0, 1);
    } else if constexpr (Type == Q4_1 || Type == Q4_1_G64 || Type == Q4_1_G128) {
      const __m512i head = w.at(at);
      const __m512 d = fp16_at(head, 0), m = fp16_at(head, 16);
#pragma GCC unroll 4
      for (int64_t c = 0; c < f.elements / 32; ++c) {
        out.factors(c0 + c, 0, d, m);
#pragma GCC unroll 4
        for (int t = 0; t < 4; ++t) {
          const __m512i raw = w.at(at + 4 + 16 * c + 4 * t);
          out.codes(c0 + c, t, _mm512_and_si512(raw, low4));
          out.codes(c0 + c, t + 4, _mm512_and_si512(_mm512_srli_epi32(raw, 4), low4));
        }
        out.flush(c0 + c, 1);
      }
    } else if constexpr (Type == Q4_K) {
      const __m512i head = w.at(at), s0 = w.at(at + 4), s1 = w.at(at + 8), s2 = w.at(at + 12);
      const __m512 d = fp16_at(head, 0), dmin = fp16_at(head, 16);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {  // scale_min's two cases, for sub-blocks j and j + 4
        const __m512i b0 = bits(s0, 8 * j, 255), b1 = bits(s1, 8 * j, 255), b2 = bits(s2, 8 * j, 255);
        const __m512i sc[2] = {_mm512_and_si512(b0, _mm512_set1_epi32(63)),
                               _mm512_or_si512(_mm512_and_si512(b2, _mm512_set1_epi32(15)),
                                               _mm512_slli_epi32(_mm512_srli_epi32(b0, 6), 4))};
        const __m512i mn[2] = {_mm512_and_si512(b1, _mm512_set1_epi32(63)),
                               _mm512_or_si512(_mm512_srli_epi32(b2, 4), _mm512_slli_epi32(_mm512_srli_epi32(b1, 6), 4))};
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h)
          out.factors(c0 + j + 4 * h, 0, _mm512_mul_ps(d, _mm512_cvtepi32_ps(sc[h])),
                      _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(mn[h]))));
      }
#pragma GCC unroll 4
      for (int p = 0; p < 4; ++p) {  // 32 bytes: sub-block 2p in the low nibbles, 2p + 1 in the high
#pragma GCC unroll 8
        for (int t = 0; t < 8; ++t) {
          const __m512i raw = w.at(at + 16 + 32 * p + 4 * t);
          out.codes(c0 + 2 * p, t, _mm512_and_si512(raw, low4));
          out.codes(c0 + 2 * p + 1, t, _mm512_and_si512(_mm512_srli_epi32(raw, 4), low4));
        }
        out.flush(c0 + 2 * p, 2);
      }
    } else {
      static_assert(Type == Q6_K);
      // bytes 208-209, read without passing the block (packed: the word before the pad)
      const __m512 d = W::packed ? fp16_at(w.at(at + 208), 0) : fp16_at(w.at(at + 206), 16);
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {  // chunks 4h..4h + 3, one after the other (fewer live sums)
#pragma GCC unroll 2
        for (int s = 2 * h; s < 2 * h + 2; ++s) {  // int8 scales 4s..4s+3: halves of chunks 2s, 2s + 1
          const __m512i word = w.at(at + 192 + 4 * s);
#pragma GCC unroll 4
          for (int e = 0; e < 4; ++e) {
            const __m512 dh = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(word, 24 - 8 * e), 24)));
            out.factors(c0 + 2 * s + e / 2, e % 2, dh, _mm512_mul_ps(dh, _mm512_set1_ps(-32.f)));
          }
        }
#pragma GCC unroll 8
        for (int t = 0; t < 8; ++t) {
          const __m512i hi = w.at(at + 128 + h * 32 + 4 * t);
#pragma GCC unroll 2
          for (int half = 0; half < 2; ++half) {  // ql bytes (r % 2) = half
            const __m512i lo = w.at(at + h * 64 + half * 32 + 4 * t);
#pragma GCC unroll 2
            for (int shift = 0; shift < 2; ++shift) {  // r / 2
              const int r = 2 * shift + half;
              // bits 2r, 2r + 1 of each qh byte to bits 4, 5 (shifts of 32-bit lanes that move no
              // kept bit across a byte), then ql's nibble below them: (lo' & 0x0f) | hi' in one op
              const __m512i up = r < 2 ? _mm512_slli_epi32(hi, 4 - 2 * r) : _mm512_srli_epi32(hi, 2 * r - 4);
              const __m512i high = _mm512_and_si512(up, _mm512_set1_epi32(0x30303030));
              const __m512i q = _mm512_ternarylogic_epi32(_mm512_srli_epi32(lo, 4 * shift), high, low4, 0xEC);
              out.codes(c0 + 4 * h + r, t, q);
            }
          }
        }
        out.flush(c0 + 4 * h, 4);
      }
    }
  }
}

// f(std::integral_constant<int64_t, type>{}) for a type lanes_type takes.
template <typename F>
void with_lanes_type(int64_t type, F&& f) {
  switch (type) {
    case Q4_0: return f(std::integral_constant<int64_t, Q4_0>{});
    case Q4_1: return f(std::integral_constant<int64_t, Q4_1>{});
    case Q8_0: return f(std::integral_constant<int64_t, Q8_0>{});
    case Q4_K: return f(std::integral_constant<int64_t, Q4_K>{});
    case Q6_K: return f(std::integral_constant<int64_t, Q6_K>{});
    case Q4_1_G64: return f(std::integral_constant<int64_t, Q4_1_G64>{});
    case Q4_1_G128: return f(std::integral_constant<int64_t, Q4_1_G128>{});
    default: TORCH_CHECK(false, "levante: GGUF type ", type, " is not read 16 rows at a time");
  }
}

// Blocks [kb0, kb1) of the rows w reads → g (from its start, g.first = kb0's first chunk).
template <int64_t Type, typename W>
void unpack_lanes(const W& w, int64_t kb0, int64_t kb1, Group& g) {
  g.scales = Type == Q6_K, g.first = kb0 * format(Type).elements / 32;
  ToGroup sink{g};
  lanes<Type>(w, kb0, kb1, sink);
}
#endif

// Rows [n0, n0 + 16) of w (zeros past N) → g.
void unpack_group(const Weights& w, int64_t n0, int64_t N, int64_t K, Group& g, std::vector<uint8_t>& tmp) {
#if defined(__AVX512F__)
  const auto [part, first] = w.locate(n0);
  const int64_t rows = std::min(kGroup, N - n0);
  if (first + rows <= part->rows && lanes_type(part->type))  // every packed part
    return with_words(*part, first, rows, [&](const auto& words) {
      with_lanes_type(part->type, [&](auto type) { unpack_lanes<type()>(words, 0, K / format(type()).elements, g); });
    });
#endif
  g.scales = false, g.first = 0;
  constexpr int64_t kSpan = 256;  // weights unpacked per row before interleaving: every block type's size
  tmp.resize(kGroup * kSpan);
  Chunk p[kSpan / 32];
  for (int64_t k0 = 0; k0 < K; k0 += kSpan) {
    const int64_t E = std::min(kSpan, K - k0);
    for (int64_t r = 0; r < kGroup; ++r) {
      uint8_t* c = tmp.data() + r * kSpan;
      if (n0 + r >= N) {
        std::memset(c, 0, E);
        for (int64_t j = 0; j < E / 32; ++j) p[j] = {0.f, 0.f, {1, 1}, 0};
      } else {
        const auto [part, n] = w.locate(n0 + r);
        g.scales |= part->type == Q6_K;
        const Format f = format(part->type);
        const uint8_t* row = part->data + n * part->row_bytes;
        for (int64_t e = 0; e < E; e += f.elements)  // E is a whole number of this type's blocks
          levante::unpack(part->type, row + (k0 + e) / f.elements * f.bytes, c + e, p + e / 32);
      }
      for (int64_t j = 0; j < E / 32; ++j) {
        const int64_t i = (k0 / 32 + j) * kGroup + r;
        const float d0 = p[j].D * static_cast<float>(p[j].sc[0]), d1 = p[j].D * static_cast<float>(p[j].sc[1]);
        g.D0[i] = d0, g.D1[i] = d1;
        g.Mn0[i] = p[j].Mn - d0 * static_cast<float>(p[j].o), g.Mn1[i] = p[j].Mn - d1 * static_cast<float>(p[j].o);
      }
    }
    interleave(tmp.data(), kSpan, E, g.codes.get() + k0 * kGroup);
  }
}

// One chunk's integer sums (per half with Scales; all in t0 otherwise) → acc: the float part,
// the same for every way of getting the sums.
template <bool Scales>
inline vf accumulate(vf acc, iv t0, iv t1, vf D0, vf D1, vf Mn0, vf Mn1, const QuantizedX& xq, int64_t i) {
  const vf dx = vset1(xq.d[i]);
  acc = vfma(tofloat(t0), vmul(D0, dx), acc);
  if constexpr (Scales) {
    acc = vfma(tofloat(t1), vmul(D1, dx), acc);
    acc = vfma(Mn0, vset1(xq.halves[2 * i]), acc);
    return vfma(Mn1, vset1(xq.halves[2 * i + 1]), acc);
  }
  return vfma(Mn0, vset1(xq.s[i]), acc);
}

// The same, with the factors of a Group's entry l.
template <bool Scales>
inline vf accumulate(vf acc, iv t0, iv t1, const Group& g, int64_t l, const QuantizedX& xq, int64_t i) {
  const vf none = vzero();
  return accumulate<Scales>(acc, t0, t1, vload(g.D0.get() + l), Scales ? vload(g.D1.get() + l) : none,
                            vload(g.Mn0.get() + l), Scales ? vload(g.Mn1.get() + l) : none, xq, i);
}

template <int R, typename T>
void store_rows(const vf (&acc)[R][kVectors], int64_t m0, T* y, int64_t N, int64_t n0) {
  const int64_t cols = std::min(kGroup, N - n0);
  for (int r = 0; r < R; ++r) {
    alignas(64) float out[kGroup];
    for (int64_t v = 0; v < kVectors; ++v) vstore(out + v * kRowLanes, acc[r][v]);
    for (int64_t n = 0; n < cols; ++n) y[(m0 + r) * N + n0 + n] = static_cast<T>(out[n]);
  }
}

// Rows [m0, m0 + R) of x times chunks [b0, b1) of the group, into acc: integer sums by VPDPBUSD
// (or its emulation).
template <int R, bool Scales>
void dot_chunks(const Group& g, const QuantizedX& xq, int64_t m0, int64_t K, int64_t b0, int64_t b1,
                vf (&acc)[R][kVectors]) {
  const int64_t chunks = K / 32;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t local = b - g.first;
    const uint8_t* c = g.codes.get() + local * 32 * kGroup;
    iv dot[R][2][kVectors];
    for (int r = 0; r < R; ++r)
      for (int h = 0; h < 2; ++h)
        for (int64_t v = 0; v < kVectors; ++v) dot[r][h][v] = izero();
    for (int q = 0; q < 8; ++q) {
      const int h = Scales ? q / 4 : 0;
      iv w[kVectors];
      for (int64_t v = 0; v < kVectors; ++v) w[v] = iload(c + q * 64 + v * kRowLanes * 4);
      for (int r = 0; r < R; ++r) {
        int32_t x4;
        std::memcpy(&x4, xq.q.data() + (m0 + r) * K + b * 32 + 4 * q, 4);
        for (int64_t v = 0; v < kVectors; ++v) dot[r][h][v] = dpbusd(dot[r][h][v], w[v], x4);
      }
    }
    for (int64_t v = 0; v < kVectors; ++v)
      for (int r = 0; r < R; ++r)
        acc[r][v] = accumulate<Scales>(acc[r][v], dot[r][0][v], dot[r][1][v], g, local * kGroup + v * kRowLanes,
                                       xq, (m0 + r) * chunks + b);
  }
}

template <int R>
void zero(vf (&acc)[R][kVectors]) {
  for (int r = 0; r < R; ++r)
    for (int64_t v = 0; v < kVectors; ++v) acc[r][v] = vzero();
}

// Rows [m0, m0 + R) of x times the whole group.
template <int R, bool Scales, typename T>
void dot_rows(const Group& g, const QuantizedX& xq, int64_t m0, int64_t K, T* y, int64_t N, int64_t n0) {
  vf acc[R][kVectors];
  zero(acc);
  dot_chunks<R, Scales>(g, xq, m0, K, 0, K / 32, acc);
  store_rows<R>(acc, m0, y, N, n0);
}

constexpr int kRows = 4;       // rows of x per pass over a group's codes
constexpr int64_t kStream = 16;  // rows of x up to which the weights stream (below AMX's tile)

// Rows [m, m + R) of acc, as dot_chunks and store_rows take them.
template <int R>
vf (&rows_at(vf (*acc)[kVectors], int64_t m))[R][kVectors] {
  return *reinterpret_cast<vf(*)[R][kVectors]>(acc + m);
}

#if defined(__AVX512F__)
// R rows of x's integer sums for one block, taken from the codes as `lanes` makes them (all in
// registers: no round trip through the L1 cache), and the block's factors.
template <int R, bool Scales>
struct InRegisters {
  const int8_t* x;  // row 0's quantized values from the block's first k; row r's r·K further on
  int64_t K;
  // per row and chunk, the sums of its halves (Scales), else one chain of dependent VPDPBUSDs a
  // row, or two for one row alone (its even and odd words; integer sums: any split adds up the same)
  static constexpr int kChains = Scales || R == 1 ? 2 : 1;
  iv dot[R][8][kChains] = {};
  vf D[8][2], Mn[8][2];
  void codes(int64_t c, int t, iv v) {
    const int s = Scales ? t / 4 : t % kChains;
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      int32_t x4;
      std::memcpy(&x4, x + r * K + c * 32 + 4 * t, 4);
      dot[r][c][s] = dpbusd(dot[r][c][s], v, x4);
    }
  }
  void factors(int64_t c, int h, vf d, vf mn) { D[c][h] = d, Mn[c][h] = mn; }
  iv sum(int r, int64_t c, int h) const {
    if constexpr (Scales) return dot[r][c][h];
    return kChains == 2 ? iadd(dot[r][c][0], dot[r][c][kChains - 1]) : dot[r][c][0];
  }
  // chunks [c, c + n) are complete: into each row's accumulator, in k order (lanes completes them so)
  vf* acc;  // R accumulators
  const QuantizedX* xq;
  int64_t chunk;  // the block's first chunk in a row
  void flush(int64_t c0, int64_t n) {
#pragma GCC unroll 8
    for (int64_t c = c0; c < c0 + n; ++c)
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r)
        acc[r] = accumulate<Scales>(acc[r], sum(r, c, 0), sum(r, c, 1), D[c][0], Scales ? D[c][1] : vzero(),
                                    Mn[c][0], Scales ? Mn[c][1] : vzero(), *xq, r * (K / 32) + chunk + c);
  }
};

// Asks for the lines 8 KB past block kb of packed rows, into L2. A packed group's blocks, and the
// next group's, lie one after the other in the order they are read, yet the hardware prefetcher
// alone leaves the unpacking waiting for memory: Q6_K's one-row decode 20 → 28 GB/s here.
template <int64_t Type, typename W>
inline void prefetch_ahead(const W& w, int64_t kb) {
  if constexpr (W::packed) {
    constexpr int64_t bytes = block_bytes(Type, true) * kGroup, ahead = 8192;
    for (int64_t l = 0; l < bytes; l += 64) __builtin_prefetch(w.base + kb * bytes + ahead + l, 0, 1);
  }
}

// dot_streamed for R rows of x (decode, one sequence or a few), the sums in registers: the same
// sums and the same float operations in the same order, so the same bits.
template <int64_t Type, int R, typename W, typename T>
void dot_in_registers(const W& w, const QuantizedX& xq, int64_t K, T* y, int64_t N, int64_t n0) {
  static_assert(kVectors == 1);
  constexpr bool Scales = Type == Q6_K;
  constexpr int64_t per = format(Type).elements / 32;
  vf acc[R][kVectors];
  zero(acc);
  for (int64_t kb = 0; kb < K / 32 / per; ++kb) {
    InRegisters<R, Scales> rows{xq.q.data() + kb * per * 32, K};
    rows.acc = &acc[0][0], rows.xq = &xq, rows.chunk = kb * per;
    prefetch_ahead<Type>(w, kb);
    lanes<Type>(w, kb, kb + 1, rows);
  }
  store_rows<R>(acc, 0, y, N, n0);
}

// M < kStream rows of x (decode, a few sequences) times rows [n0, n0 + 16) of one part, a block at
// a time: up to 5 rows by dot_in_registers; more, each block's codes go from the weights to the dot
// products through the L1 cache (`block`, one block's Group) instead of through a whole row's
// Group, so reading the weights overlaps the arithmetic and nothing is allocated per call. The same sums and factors, in the
// same order, as dot_rows: the same bits.
template <int64_t Type, typename W, typename T>
void dot_streamed(const W& w, const QuantizedX& xq, int64_t M, int64_t K, T* y, int64_t N, int64_t n0,
                  std::optional<Group>& block) {
  constexpr bool Scales = Type == Q6_K;
  const int64_t per = format(Type).elements / 32;  // chunks per block
  switch (M) {  // up to 5 rows' sums fit the registers (from 6 they spill, and lose to the Group)
    case 1: return dot_in_registers<Type, 1>(w, xq, K, y, N, n0);
    case 2: return dot_in_registers<Type, 2>(w, xq, K, y, N, n0);
    case 3: return dot_in_registers<Type, 3>(w, xq, K, y, N, n0);
    case 4: return dot_in_registers<Type, 4>(w, xq, K, y, N, n0);
    case 5: return dot_in_registers<Type, 5>(w, xq, K, y, N, n0);
    default: break;
  }
  Group& g = block ? *block : block.emplace(256);  // the largest block; allocated once a call needs it
  vf acc[kStream][kVectors];
  zero(rows_at<kStream>(acc, 0));
  for (int64_t kb = 0; kb < K / 32 / per; ++kb) {
    prefetch_ahead<Type>(w, kb);
    unpack_lanes<Type>(w, kb, kb + 1, g);
    const int64_t b0 = kb * per, b1 = b0 + per;
    int64_t m = 0;
    for (; m + kRows <= M; m += kRows) dot_chunks<kRows, Scales>(g, xq, m, K, b0, b1, rows_at<kRows>(acc, m));
    switch (M - m) {
      case 3: dot_chunks<3, Scales>(g, xq, m, K, b0, b1, rows_at<3>(acc, m)); break;
      case 2: dot_chunks<2, Scales>(g, xq, m, K, b0, b1, rows_at<2>(acc, m)); break;
      case 1: dot_chunks<1, Scales>(g, xq, m, K, b0, b1, rows_at<1>(acc, m)); break;
      default: break;
    }
  }
  for (int64_t m = 0; m < M; ++m) store_rows<1>(rows_at<1>(acc, m), m, y, N, n0);
}
#endif

// All M < kStream rows of x times rows [n0, n0 + 16) by dot_streamed, where the group's rows are
// of one part and a type unpack_lanes takes; false (nothing done) elsewhere.
template <typename T>
bool stream_group(const Weights& w, const QuantizedX& xq, int64_t M, int64_t K, T* y, int64_t N, int64_t n0,
                  std::optional<Group>& block) {
#if defined(__AVX512F__)
  const auto [part, first] = w.locate(n0);
  const int64_t rows = std::min(kGroup, N - n0);
  if (M >= kStream || first + rows > part->rows || !lanes_type(part->type)) return false;
  with_words(*part, first, rows, [&](const auto& words) {
    with_lanes_type(part->type, [&](auto type) { dot_streamed<type()>(words, xq, M, K, y, N, n0, block); });
  });
  return true;
#else
  return false;
#endif
}

#if defined(LEVANTE_AMX) && defined(__AMX_INT8__)
// With AMX, 16 rows of x at a time take their integer sums from one TDPBSUD per chunk (x signed,
// the codes unsigned; the codes' layout is already a B tile's) — the same exact sums, so the same
// bits as dot_rows, at several times the rate for prefill.
inline void amx_configure_int8() {
  TileConfig cfg;
  const std::pair<int, int> shapes[] = {{16, 64}, {16, 64}, {16, 32}, {8, 64}, {16, 16}, {4, 64}};
  for (int t = 0; t < 6; ++t) cfg.rows[t] = shapes[t].first, cfg.colsb[t] = shapes[t].second;  // rows, bytes
  _tile_loadconfig(&cfg);
}

template <bool Scales, typename T>
void dot_rows_amx(const Group& g, const QuantizedX& xq, int64_t m0, int64_t K, T* y, int64_t N, int64_t n0) {
  static_assert(kVectors == 1);
  constexpr int R = 16;
  const int64_t chunks = K / 32;
  vf acc[R][kVectors];
  for (int r = 0; r < R; ++r) acc[r][0] = vzero();
  // chunk b's sums are stored while chunk b − 1's are read: loads right after a tile store of
  // the same lines wait for it to reach the cache (no store forwarding from tiles)
  alignas(64) int32_t sums[2][2][R][kGroup];
  const int8_t* x = xq.q.data() + m0 * K;
  auto finish = [&](int64_t b) {
    const auto& s = sums[b % 2];
    for (int r = 0; r < R; ++r)
      acc[r][0] = accumulate<Scales>(acc[r][0], iload(s[0][r]), Scales ? iload(s[1][r]) : izero(), g, b * kGroup,
                                     xq, (m0 + r) * chunks + b);
  };
  for (int64_t b = 0; b < chunks; ++b) {
    const uint8_t* c = g.codes.get() + b * 32 * kGroup;
    _tile_zero(0);
    if constexpr (Scales) {  // the halves apart: 16 k of x against 4 words of codes, twice
      _tile_zero(1);
      _tile_loadd(4, x + b * 32, K);
      _tile_loadd(5, c, 64);
      _tile_dpbsud(0, 4, 5);
      _tile_loadd(4, x + b * 32 + 16, K);
      _tile_loadd(5, c + 4 * 64, 64);
      _tile_dpbsud(1, 4, 5);
      _tile_stored(1, sums[b % 2][1], 64);
    } else {
      _tile_loadd(2, x + b * 32, K);
      _tile_loadd(3, c, 64);
      _tile_dpbsud(0, 2, 3);
    }
    _tile_stored(0, sums[b % 2][0], 64);
    if (b > 0) finish(b - 1);
  }
  finish(chunks - 1);
  store_rows<R>(acc, m0, y, N, n0);
}
#endif

template <bool Scales, typename T>
void dot_group(const Group& g, const QuantizedX& xq, int64_t M, int64_t K, T* y, int64_t N, int64_t n0, bool amx) {
  int64_t m = 0;
#if defined(LEVANTE_AMX) && defined(__AMX_INT8__)
  if (amx)
    for (; m + 16 <= M; m += 16) dot_rows_amx<Scales>(g, xq, m, K, y, N, n0);
#else
  (void)amx;
#endif
  for (; m + kRows <= M; m += kRows) dot_rows<kRows, Scales>(g, xq, m, K, y, N, n0);
  switch (M - m) {
    case 3: return dot_rows<3, Scales>(g, xq, m, K, y, N, n0);
    case 2: return dot_rows<2, Scales>(g, xq, m, K, y, N, n0);
    case 1: return dot_rows<1, Scales>(g, xq, m, K, y, N, n0);
    default: return;
  }
}

// A thread's room for the groups that do not stream (`whole`) or stream through L1 (`block`):
// allocated where first needed (never in a decode step's few rows, whose sums stay in registers;
// five allocations a thread and call were 0.1-0.2 ms a token), or ahead of time by QuantThread.
struct Scratch {
  std::optional<Group> whole, block;
  std::vector<uint8_t> tmp;
};

// Groups [first, last) of y [M, N] = x·wᵀ, x quantized as xq.
template <typename T>
void multiply_groups(const Weights& w, const QuantizedX& xq, int64_t M, int64_t K, T* y, int64_t N, int64_t first,
                     int64_t last, bool amx, Scratch& scratch) {
  for (int64_t i = first; i < last; ++i) {
    const int64_t n0 = i * kGroup;
    if (stream_group(w, xq, M, K, y, N, n0, scratch.block)) continue;
    Group& g = scratch.whole ? *scratch.whole : scratch.whole.emplace(K);
    unpack_group(w, n0, N, K, g, scratch.tmp);
    g.scales ? dot_group<true>(g, xq, M, K, y, N, n0, amx) : dot_group<false>(g, xq, M, K, y, N, n0, amx);
  }
}

template <typename T>
void qgemm(const T* x, int64_t ldx, const Weights& w, T* y, int64_t M, int64_t N, int64_t K) {
  const QuantizedX xq = quantize_rows(x, ldx, M, K);
#if defined(LEVANTE_AMX) && defined(__AMX_INT8__)
  const bool amx = M >= 16 && amx_available();
#else
  const bool amx = false;
#endif
  balanced_for((N + kGroup - 1) / kGroup, [&](int64_t first, int64_t last) {
#if defined(LEVANTE_AMX) && defined(__AMX_INT8__)
    if (amx) amx_configure_int8();
#endif
    Scratch scratch;
    multiply_groups(w, xq, M, K, y, N, first, last, amx, scratch);
#if defined(LEVANTE_AMX) && defined(__AMX_INT8__)
    if (amx) _tile_release();
#endif
  });
}

void check(const at::Tensor& blocks, int64_t type, int64_t K) {
  const Format f = format(type);
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.dim() == 2 && blocks.is_contiguous(),
              "levante: quantized weights must be dense uint8 [N, bytes per row]");
  TORCH_CHECK(K % f.elements == 0 && blocks.size(1) == K / f.elements * f.bytes, "levante: a row of ",
              blocks.size(1), " bytes does not hold ", K, " weights of GGUF type ", type);
}

// Whether pack_quant takes this type: the types unpack_lanes reads, in an AVX-512 build.
bool quant_packable(int64_t type) {
#if defined(__AVX512F__)
  return lanes_type(type);
#else
  (void)type;
  return false;
#endif
}

void check_packed(const at::Tensor& packed, int64_t type, int64_t K) {
  TORCH_CHECK(quant_packable(type), "levante: GGUF type ", type, " is not packed in this build");
  const Format f = format(type);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && K % f.elements == 0 &&
                  packed.size(1) == K / f.elements && packed.size(2) == kGroup * block_bytes(type, true),
              "levante: packed weights must be dense uint8 [rows / 16, ", K / f.elements, ", ",
              kGroup * block_bytes(type, true), "]");
}

// Raw blocks [N, bytes per row] (N a multiple of 16) → [N / 16, blocks per row, 16 · packed block]:
// per 16 rows and block, word w of the packed block (block_bytes: fields moved to start on words)
// of every row in one 64-byte line, lane r row r; so decode reads 16 rows' words by a plain load,
// not a gather. The same codes and scales, so the same bits.
at::Tensor pack_quant(const at::Tensor& blocks, int64_t type) {
  TORCH_CHECK(quant_packable(type), "levante::pack_quant: GGUF type ", type, " is not packed in this build");
  const Format f = format(type);
  TORCH_CHECK(blocks.dim() == 2 && blocks.size(0) % kGroup == 0, "levante::pack_quant: rows must be a multiple of ",
              kGroup);
  check(blocks, type, blocks.size(1) / f.bytes * f.elements);
  const int64_t groups = blocks.size(0) / kGroup, nb = blocks.size(1) / f.bytes, pb = block_bytes(type, true);
  const int64_t lead = pb == f.bytes || type == Q6_K ? 0 : 2;  // Q4_0/Q8_0: the pad after the 2-byte scale
  at::Tensor out = at::empty({groups, nb, kGroup * pb}, blocks.options());  // every byte written below
  const uint8_t* src = blocks.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, groups, 1, [&](int64_t first, int64_t last) {
    for (int64_t g = first; g < last; ++g)
      for (int64_t kb = 0; kb < nb; ++kb) {
        uint8_t* block = dst + (g * nb + kb) * kGroup * pb;
        for (int64_t r = 0; r < kGroup; ++r) {
          const uint8_t* row = src + (g * kGroup + r) * blocks.size(1) + kb * f.bytes;
          uint8_t laid[256] = {};  // the row's block as the packed block lays it out
          std::memcpy(laid, row, 2), std::memcpy(laid + 2 + lead, row + 2, f.bytes - 2);
          for (int64_t w = 0; w < pb / 4; ++w) std::memcpy(block + w * 64 + r * 4, laid + 4 * w, 4);
        }
      }
  });
  return out;
}

}  // namespace

namespace {

// The checked parts of a projection's blocks, and its outputs.
Weights weights_of(at::TensorList blocks, at::IntArrayRef types, int64_t K, int64_t& N) {
  TORCH_CHECK(!blocks.empty() && blocks.size() == types.size(), "levante::quant_linear: one type per tensor");
  Weights w;
  N = 0;
  for (size_t i = 0; i < blocks.size(); ++i) {
    if (blocks[i].dim() == 3) {  // packed by pack_quant: [rows / 16, blocks per row, 16 · packed block]
      check_packed(blocks[i], types[i], K);
      TORCH_CHECK(N % kGroup == 0, "levante::quant_linear: packed weights must start on a row that is a multiple of ",
                  kGroup, ", not ", N);
      w.parts.push_back({blocks[i].data_ptr<uint8_t>(), blocks[i].size(0) * kGroup,
                         blocks[i].size(1) * blocks[i].size(2), types[i], true});
    } else {
      check(blocks[i], types[i], K);
      w.parts.push_back({blocks[i].data_ptr<uint8_t>(), blocks[i].size(0), blocks[i].size(1), types[i]});
    }
    N += w.parts.back().rows;
  }
  return w;
}

at::Tensor quant_linear(const at::Tensor& x, at::TensorList blocks, at::IntArrayRef types, int64_t in_features) {
  return QuantWeights(blocks, types, in_features).apply(x);
}

}  // namespace

struct QuantWeights::Parts {
  Weights w;
  int64_t N;
};

QuantWeights::QuantWeights(at::TensorList blocks, at::IntArrayRef types, int64_t in_features)
    : parts_(std::make_unique<Parts>()), K_(in_features) {
  parts_->w = weights_of(blocks, types, K_, parts_->N);
}
QuantWeights::QuantWeights(QuantWeights&&) noexcept = default;
QuantWeights::~QuantWeights() = default;
int64_t QuantWeights::outputs() const { return parts_->N; }

at::Tensor QuantWeights::apply(const at::Tensor& x) const {
  const Weights& w = parts_->w;
  const int64_t K = K_, N = parts_->N;
  TORCH_CHECK(x.size(-1) == K, "levante::quant_linear: x has ", x.size(-1), " features, the weight ", K);
  auto [rows, y, shape] = as_rows(x, K, N);
  const int64_t M = rows.size(0);
  if (M == 0) return y.view(shape);
  if (x.scalar_type() == at::kBFloat16) {
    qgemm(rows.data_ptr<c10::BFloat16>(), rows.stride(0), w, y.data_ptr<c10::BFloat16>(), M, N, K);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "levante::quant_linear: float32 or bfloat16 only");
    qgemm(rows.data_ptr<float>(), rows.stride(0), w, y.data_ptr<float>(), M, N, K);
  }
  return y.view(shape);
}

template <typename T>
void QuantWeights::dequantize(int64_t row, T* y) const {
  parts_->w.dequantize(row, y, K_);
}
template void QuantWeights::dequantize(int64_t, float*) const;
template void QuantWeights::dequantize(int64_t, c10::BFloat16*) const;
int64_t QuantWeights::groups() const { return (parts_->N + kGroup - 1) / kGroup; }

struct QuantThread::Buffers {
  QuantizedX xq;
  Scratch scratch;
};

QuantThread::QuantThread(int64_t rows, int64_t features) : buffers_(std::make_unique<Buffers>()) {
  QuantizedX& xq = buffers_->xq;
  xq.q.reserve(rows * features), xq.d.reserve(rows * features / 32), xq.s.reserve(rows * features / 32);
  xq.halves.reserve(rows * features / 16);
  buffers_->scratch.whole.emplace(features);
  buffers_->scratch.block.emplace(256);
  buffers_->scratch.tmp.reserve(kGroup * 256);
}
QuantThread::QuantThread(QuantThread&&) noexcept = default;
QuantThread::~QuantThread() = default;

template <typename T>
void QuantThread::quantize(const T* x, int64_t ldx, int64_t M, int64_t K) {
  size_for(buffers_->xq, M, K);
  quantize_range(x, ldx, K, 0, M, buffers_->xq);
}

template <typename T>
void QuantThread::multiply(const QuantWeights& w, int64_t M, T* y, int64_t first, int64_t last) {
  multiply_groups(w.parts_->w, buffers_->xq, M, w.K_, y, w.parts_->N, first, last, false, buffers_->scratch);
}

template void QuantThread::quantize(const float*, int64_t, int64_t, int64_t);
template void QuantThread::quantize(const c10::BFloat16*, int64_t, int64_t, int64_t);
template void QuantThread::multiply(const QuantWeights&, int64_t, float*, int64_t, int64_t);
template void QuantThread::multiply(const QuantWeights&, int64_t, c10::BFloat16*, int64_t, int64_t);

namespace {

// Rows of quantized weights → `out` [rows, K] (float32 or bfloat16): embedding lookups and tests.
void dequantize(const at::Tensor& blocks, int64_t type, at::Tensor& out) {
  const int64_t K = out.size(1);
  check(blocks, type, K);
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.size(0) == blocks.size(0),
              "levante::dequantize: out must be dense [rows, K]");
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16,
              "levante::dequantize: float32 or bfloat16 only");
  const Weights w{{{blocks.data_ptr<uint8_t>(), blocks.size(0), blocks.size(1), type}}};
  const bool bf16 = out.scalar_type() == at::kBFloat16;
  at::parallel_for(0, blocks.size(0), 16, [&](int64_t first, int64_t last) {
    for (int64_t n = first; n < last; ++n) {
      if (bf16) {
        w.dequantize(n, out.data_ptr<c10::BFloat16>() + n * K, K);
      } else {
        w.dequantize(n, out.data_ptr<float>() + n * K, K);
      }
    }
  });
}

}  // namespace
}  // namespace levante

TORCH_LIBRARY_IMPL(levante, CPU, m) {
  m.impl("quant_linear", &levante::quant_linear);
  m.impl("dequantize", &levante::dequantize);
  m.impl("pack_quant", &levante::pack_quant);
}
TORCH_LIBRARY_FRAGMENT(levante, m) { m.def("quant_packable(int type) -> bool", &levante::quant_packable); }
