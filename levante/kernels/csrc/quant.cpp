// y = x·wᵀ over GGUF-quantized weights kept as the file stores them (llama.cpp's block formats).
//
// Each thread dequantizes a group of output rows into the compute dtype, exactly as gguf's
// reference dequantizer and a cast would (one rounding per weight: every product below is exact
// in float32), then runs the dense kernel's tiles over it for every row of x. So a quantized
// layer gives the same bits as its dequantized copy would through `levante::linear`, and is
// batch-invariant for the same reason; what it saves is memory and the bytes read per token.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "gemm.h"

namespace levante {
namespace {

// ggml's type ids, and Levante's own for `--quantization int4` with groups of 64 and 128: Q4_1
// widened (one fp16 scale and min per group, then its 32-weight chunks laid out as Q4_1's)
enum QType : int64_t { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q4_1_G64 = 1064, Q4_1_G128 = 1128 };

struct Format {
  int64_t elements, bytes;  // per block
};

Format format(int64_t type) {
  switch (type) {
    case Q4_0: return {32, 18};
    case Q4_1: return {32, 20};
    case Q8_0: return {32, 34};
    case Q4_K: return {256, 144};
    case Q5_K: return {256, 176};
    case Q6_K: return {256, 210};
    case Q4_1_G64: return {64, 36};
    case Q4_1_G128: return {128, 68};
    default: TORCH_CHECK(false, "levante: unsupported GGUF quantization type ", type);
  }
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

// One block → float32, in gguf's order of operations.
void decode(int64_t type, const uint8_t* b, float* y) {
  switch (type) {
    case Q4_0: {
      const float d = half(b);
      for (int l = 0; l < 16; ++l) {
        y[l] = d * static_cast<float>((b[2 + l] & 15) - 8);
        y[l + 16] = d * static_cast<float>((b[2 + l] >> 4) - 8);
      }
      return;
    }
    case Q4_1:
    case Q4_1_G64:
    case Q4_1_G128: {
      const float d = half(b), m = half(b + 2);
      for (int64_t c = 0; c < format(type).elements / 32; ++c, y += 32) {
        const uint8_t* q = b + 4 + 16 * c;
        for (int l = 0; l < 16; ++l) {
          y[l] = d * static_cast<float>(q[l] & 15) + m;
          y[l + 16] = d * static_cast<float>(q[l] >> 4) + m;
        }
      }
      return;
    }
    case Q8_0: {
      const float d = half(b);
      for (int l = 0; l < 32; ++l) y[l] = d * static_cast<float>(static_cast<int8_t>(b[2 + l]));
      return;
    }
    case Q4_K:
    case Q5_K: {  // 8 sub-blocks of 32: low then high nibbles of each 32 bytes; Q5_K adds a 5th bit
      const float d = half(b), dmin = half(b + 2);
      const uint8_t *scales = b + 4, *qh = b + 16, *qs = type == Q4_K ? b + 16 : b + 48;
      for (int j = 0; j < 8; ++j) {
        float sc, m;
        scale_min(scales, j, sc, m);
        const float dj = d * sc, mj = dmin * m;
        const uint8_t* q = qs + (j / 2) * 32;
        const int shift = (j % 2) * 4;
        for (int l = 0; l < 32; ++l) {
          const int high = type == Q5_K ? ((qh[l] >> j) & 1) << 4 : 0;
          y[j * 32 + l] = dj * static_cast<float>(((q[l] >> shift) & 15) | high) - mj;
        }
      }
      return;
    }
    case Q6_K: {  // 16 sub-blocks of 16; low 4 bits in ql, high 2 in qh, signed scales
      const uint8_t *ql = b, *qh = b + 128;
      const auto* scales = reinterpret_cast<const int8_t*>(b + 192);
      const float d = half(b + 208);
      for (int c = 0; c < 8; ++c) {
        const int h = c / 4, r = c % 4;
        const uint8_t* lo = ql + h * 64 + (r % 2) * 32;
        const uint8_t* hi = qh + h * 32;
        for (int l = 0; l < 32; ++l) {
          const int e = c * 32 + l;
          const int q = (((lo[l] >> (r / 2 * 4)) & 15) | (((hi[l] >> (2 * r)) & 3) << 4)) - 32;
          y[e] = (d * static_cast<float>(scales[e / 16])) * static_cast<float>(q);
        }
      }
      return;
    }
    default: TORCH_CHECK(false, "levante: unsupported GGUF quantization type ", type);
  }
}

#if defined(__AVX512F__)
// The same decoding, 16 weights per vector, written straight into the compute dtype: the same
// operations as `decode` (integer codes converted exactly, one rounding per weight), so the same bits.
inline void put(float* y, __m512 v) { _mm512_storeu_ps(y, v); }

inline void put(c10::BFloat16* y, __m512 v) {  // round to nearest even, as a cast does
#if defined(__AVX512BF16__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), (__m256i)_mm512_cvtneps_pbh(v));
#else
  alignas(64) float t[16];
  _mm512_store_ps(t, v);
  for (int i = 0; i < 16; ++i) y[i] = c10::BFloat16(t[i]);
#endif
}

inline __m512i bytes(const uint8_t* p) {  // 16 unsigned bytes → 16 int32
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline __m512 floats(__m512i v) { return _mm512_cvtepi32_ps(v); }

template <typename T>
void decode_into(int64_t type, const uint8_t* b, T* y) {
  const __m512i low4 = _mm512_set1_epi32(15);
  switch (type) {
    case Q4_0: {
      const __m512 d = _mm512_set1_ps(half(b));
      const __m512i q = bytes(b + 2), eight = _mm512_set1_epi32(8);
      put(y, _mm512_mul_ps(d, floats(_mm512_sub_epi32(_mm512_and_si512(q, low4), eight))));
      put(y + 16, _mm512_mul_ps(d, floats(_mm512_sub_epi32(_mm512_srli_epi32(q, 4), eight))));
      return;
    }
    case Q4_1:
    case Q4_1_G64:
    case Q4_1_G128: {
      const __m512 d = _mm512_set1_ps(half(b)), m = _mm512_set1_ps(half(b + 2));
      for (int64_t c = 0; c < format(type).elements / 32; ++c, y += 32) {
        const __m512i q = bytes(b + 4 + 16 * c);
        put(y, _mm512_fmadd_ps(d, floats(_mm512_and_si512(q, low4)), m));  // d·q is exact: one rounding
        put(y + 16, _mm512_fmadd_ps(d, floats(_mm512_srli_epi32(q, 4)), m));
      }
      return;
    }
    case Q8_0: {
      const __m512 d = _mm512_set1_ps(half(b));
      for (int h = 0; h < 2; ++h)
        put(y + 16 * h, _mm512_mul_ps(d, floats(_mm512_cvtepi8_epi32(
                                               _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2 + 16 * h))))));
      return;
    }
    case Q4_K:
    case Q5_K: {
      const float d = half(b), dmin = half(b + 2);
      const uint8_t *scales = b + 4, *qh = b + 16, *qs = type == Q4_K ? b + 16 : b + 48;
      for (int j = 0; j < 8; ++j) {
        float sc, m;
        scale_min(scales, j, sc, m);
        const __m512 dj = _mm512_set1_ps(d * sc), mj = _mm512_set1_ps(dmin * m);
        for (int h = 0; h < 2; ++h) {
          __m512i q = _mm512_and_si512(_mm512_srli_epi32(bytes(qs + (j / 2) * 32 + 16 * h), (j % 2) * 4), low4);
          if (type == Q5_K)
            q = _mm512_or_si512(
                q, _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(bytes(qh + 16 * h), j), _mm512_set1_epi32(1)), 4));
          put(y + j * 32 + 16 * h, _mm512_fmsub_ps(dj, floats(q), mj));
        }
      }
      return;
    }
    case Q6_K: {
      const uint8_t *ql = b, *qh = b + 128;
      const auto* scales = reinterpret_cast<const int8_t*>(b + 192);
      const float d = half(b + 208);
      const __m512i three = _mm512_set1_epi32(3), bias = _mm512_set1_epi32(32);
      for (int c = 0; c < 8; ++c) {
        const int h = c / 4, r = c % 4;
        for (int s = 0; s < 2; ++s) {
          const __m512i lo = _mm512_and_si512(_mm512_srli_epi32(bytes(ql + h * 64 + (r % 2) * 32 + 16 * s), r / 2 * 4), low4);
          const __m512i hi = _mm512_and_si512(_mm512_srli_epi32(bytes(qh + h * 32 + 16 * s), 2 * r), three);
          const __m512i q = _mm512_sub_epi32(_mm512_or_si512(lo, _mm512_slli_epi32(hi, 4)), bias);
          const __m512 scale = _mm512_set1_ps(d * static_cast<float>(scales[c * 2 + s]));
          put(y + c * 32 + 16 * s, _mm512_mul_ps(scale, floats(q)));
        }
      }
      return;
    }
    default: TORCH_CHECK(false, "levante: unsupported GGUF quantization type ", type);
  }
}

// One row of K weights (K a whole number of blocks) → T.
template <typename T>
void dequantize_row(int64_t type, const uint8_t* row, T* y, int64_t K) {
  const Format f = format(type);
  for (int64_t k = 0; k < K; k += f.elements, row += f.bytes) decode_into(type, row, y + k);
}
#else
inline void convert(const float* x, float* y, int64_t n) { std::memcpy(y, x, n * sizeof(float)); }

inline void convert(const float* x, c10::BFloat16* y, int64_t n) {  // round to nearest even, as a cast does
  for (int64_t i = 0; i < n; ++i) y[i] = c10::BFloat16(x[i]);
}

// One row of K weights (K a whole number of blocks) → T.
template <typename T>
void dequantize_row(int64_t type, const uint8_t* row, T* y, int64_t K) {
  const Format f = format(type);
  alignas(64) float block[256];
  for (int64_t k = 0; k < K; k += f.elements, row += f.bytes) {
    decode(type, row, block);
    convert(block, y + k, f.elements);
  }
}
#endif

// The rows of one or more quantized tensors stacked (merged projections kept apart: they may
// differ in type, and they are views of the mapped file, which concatenating would copy).
struct Weights {
  struct Part {
    const uint8_t* data;
    int64_t rows, row_bytes, type;
  };
  std::vector<Part> parts;

  template <typename T>
  void dequantize(int64_t n, T* y, int64_t K) const {
    for (const Part& p : parts) {
      if (n < p.rows) return dequantize_row(p.type, p.data + n * p.row_bytes, y, K);
      n -= p.rows;
    }
  }
};

template <typename T>
void qgemm(const T* x, int64_t ldx, const Weights& w, T* y, int64_t M, int64_t N, int64_t K) {
  constexpr int64_t NB = 16;  // output rows dequantized together: a few KiB to a few hundred, in cache
  at::parallel_for(0, (N + NB - 1) / NB, 1, [&](int64_t first, int64_t last) {
    std::vector<T> buf(NB * K);
    for (int64_t g = first; g < last; ++g) {
      const int64_t n0 = g * NB, rows = std::min(NB, N - n0);
      for (int64_t r = 0; r < rows; ++r) w.dequantize(n0 + r, buf.data() + r * K, K);
      for (int64_t m0 = 0; m0 < M; m0 += MC) {
        const int64_t m1 = std::min(M, m0 + MC);
        for (int64_t n = n0; n < n0 + rows; n += NR)
          for (int64_t m = m0; m < m1; m += MR)
            any_tile(std::min<int64_t>(MR, m1 - m), std::min<int64_t>(NR, n0 + rows - n), x + m * ldx, ldx,
                     buf.data() + (n - n0) * K, K, y + m * N + n, N, K);
      }
    }
  });
}

#ifdef LEVANTE_AMX
// On AMX the dequantized weights are the A operand, rows as they come (yᵀ = W·xᵀ), and x is
// packed once into VNNI B tiles [tiles of 16 rows][kb][16 k-pairs][16 rows][2]: no transpose of
// the weights per call. TDPBF16PS still multiplies the same pairs in the same order for every
// output element as with the weights as B (pack_linear), so the bits are the dense kernel's.
std::vector<c10::BFloat16> vnni_rows(const c10::BFloat16* x, int64_t ldx, int64_t M, int64_t K, int64_t kb) {
  const int64_t mb = (M + kTile - 1) / kTile;
  std::vector<c10::BFloat16> out(mb * kb * kTile * kTileK, c10::BFloat16(0.f));
  // the 16 k-pairs of row m in one 32-wide step are one vector of 32-bit words: they go down
  // column m % 16 of that step's tile
  const __m512i down = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(kTile));
  auto* words = reinterpret_cast<int*>(out.data());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < kb; ++k)
      _mm512_i32scatter_epi32(words + ((m / kTile) * kb + k) * kTile * kTile + m % kTile, down,
                              _mm512_loadu_si512(x + m * ldx + k * kTileK), 4);
  return out;
}

void qgemm_amx(const c10::BFloat16* x, int64_t ldx, const Weights& w, c10::BFloat16* y, int64_t M, int64_t N, int64_t K) {
  const int64_t kb = K / kTileK, mb = (M + kTile - 1) / kTile;  // K: whole blocks, so whole tiles
  const std::vector<c10::BFloat16> xv = vnni_rows(x, ldx, M, K, kb);
  const int64_t a_stride = K * sizeof(c10::BFloat16), x_tile = kb * kTile * kTileK;
  at::parallel_for(0, (N + kBlockN - 1) / kBlockN, 1, [&](int64_t first, int64_t last) {
    amx_configure();
    std::vector<c10::BFloat16> rows(kBlockN * K, c10::BFloat16(0.f));
    alignas(64) float c[kTile][kTile];
    for (int64_t b = first; b < last; ++b) {
      const int64_t n0 = b * kBlockN, count = std::min(kBlockN, N - n0);
      for (int64_t r = 0; r < count; ++r) w.dequantize(n0 + r, rows.data() + r * K, K);
      if (count < kBlockN) std::fill(rows.begin() + count * K, rows.end(), c10::BFloat16(0.f));
      auto store = [&](int64_t t, int64_t half) {  // c [16 outputs][16 rows of x] → y, transposed
        const int64_t cols = std::min(kTile, N - n0 - half * kTile);
        if (cols <= 0) return;
        const __mmask16 mask = cols == kTile ? 0xffff : static_cast<__mmask16>((1u << cols) - 1);
        const __m512i column = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                  _mm512_set1_epi32(kTile));
        for (int64_t r = 0; r < std::min(kTile, M - t * kTile); ++r)
          _mm256_mask_storeu_epi16(y + (t * kTile + r) * N + n0 + half * kTile, mask,
                                   (__m256i)_mm512_cvtneps_pbh(_mm512_i32gather_ps(column, &c[0][r], 4)));
      };
      for (int64_t t = 0; t < mb; t += 2) {
        const bool pair = t + 1 < mb;
        const c10::BFloat16* b0 = xv.data() + t * x_tile;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t k = 0; k < kb; ++k) {
          _tile_loadd(4, rows.data() + k * kTileK, a_stride);
          _tile_loadd(5, rows.data() + kTile * K + k * kTileK, a_stride);
          _tile_loadd(6, b0 + k * kTile * kTileK, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 5, 6);
          if (pair) {
            _tile_loadd(7, b0 + x_tile + k * kTile * kTileK, 64);
            _tile_dpbf16ps(2, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
        _tile_stored(0, c, 64);
        store(t, 0);
        _tile_stored(1, c, 64);
        store(t, 1);
        if (pair) {
          _tile_stored(2, c, 64);
          store(t + 1, 0);
          _tile_stored(3, c, 64);
          store(t + 1, 1);
        }
      }
    }
    _tile_release();
  });
}
#endif

void check(const at::Tensor& blocks, int64_t type, int64_t K) {
  const Format f = format(type);
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.dim() == 2 && blocks.is_contiguous(),
              "levante: quantized weights must be dense uint8 [N, bytes per row]");
  TORCH_CHECK(K % f.elements == 0 && blocks.size(1) == K / f.elements * f.bytes, "levante: a row of ",
              blocks.size(1), " bytes does not hold ", K, " weights of GGUF type ", type);
}

at::Tensor quant_linear(const at::Tensor& x, at::TensorList blocks, at::IntArrayRef types, int64_t in_features) {
  TORCH_CHECK(!blocks.empty() && blocks.size() == types.size(), "levante::quant_linear: one type per tensor");
  const int64_t K = in_features;
  Weights w;
  int64_t N = 0;
  for (size_t i = 0; i < blocks.size(); ++i) {
    check(blocks[i], types[i], K);
    w.parts.push_back({blocks[i].data_ptr<uint8_t>(), blocks[i].size(0), blocks[i].size(1), types[i]});
    N += blocks[i].size(0);
  }
  TORCH_CHECK(x.size(-1) == K, "levante::quant_linear: x has ", x.size(-1), " features, the weight ", K);
  auto [rows, y, shape] = as_rows(x, K, N);
  const int64_t M = rows.size(0);
  if (M == 0) return y.view(shape);
  if (x.scalar_type() == at::kBFloat16) {
    const auto* xp = rows.data_ptr<c10::BFloat16>();
    auto* yp = y.data_ptr<c10::BFloat16>();
#ifdef LEVANTE_AMX
    if (amx_available()) return qgemm_amx(xp, rows.stride(0), w, yp, M, N, K), y.view(shape);
#endif
    qgemm(xp, rows.stride(0), w, yp, M, N, K);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "levante::quant_linear: float32 or bfloat16 only");
    qgemm(rows.data_ptr<float>(), rows.stride(0), w, y.data_ptr<float>(), M, N, K);
  }
  return y.view(shape);
}

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
}
