// y = x·wᵀ with one fixed summation order per output element.
//
// Library GEMMs (MKL, oneDNN) pick blockings, split-K and micro-kernels by the number of rows, so
// the same row of x gives other bits next to other rows. Here y[m, n] is always computed the same
// way: lane l of one vector accumulator sums, in increasing k, the products of the k that fall in
// lane l (with AVX512-BF16, the pair k = 2l, 2l+1 of each 32-wide step, as VDPBF16PS does), then
// vsum() adds the lanes in a fixed tree. That order depends on K alone: tiles, the thread split,
// the batch size and the row's place in it only decide which accumulators run side by side.
//
// bfloat16 weights on a CPU with AMX are packed once into tiles instead: each output element is
// then one fp32 accumulator that TDPBF16PS advances by 32 products per K step, in K order, and a
// row of the A tile never meets another row (x is copied into zero-padded 16-row tiles, so every
// row, the padding's too, takes the same path whatever the batch size).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)  // the epilogue rounds with VCVTNEPS2BF16
#include <sys/syscall.h>
#include <unistd.h>
#define LEVANTE_AMX 1
#endif

#include "vec.h"

namespace levante {
namespace {

template <typename T>
struct Dot {  // float32, and bfloat16 widened to float32: exact products, fused adds
  using op = vf;
  static constexpr int64_t step = kLanes;
  static op load(const T* p) { return vload(p); }
  static vf madd(vf acc, op a, op b) { return vfma(a, b, acc); }
};

#if defined(__AVX512BF16__)
template <>
struct Dot<c10::BFloat16> {  // 32 bfloat16 pairs per instruction
  using op = __m512bh;
  static constexpr int64_t step = 32;
  static op load(const c10::BFloat16* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static vf madd(vf acc, op a, op b) { return _mm512_dpbf16_ps(acc, a, b); }
};
#endif

constexpr int MR = 4, NR = 4;  // rows of x × rows of w per register tile
constexpr int64_t MC = 64;     // rows of x kept hot while a thread streams its slice of w

template <int R, int C, typename T>
void tile(const T* x, int64_t ldx, const T* w, int64_t ldw, T* y, int64_t ldy, int64_t K) {
  using D = Dot<T>;
  vf acc[R][C];
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < C; ++j) acc[i][j] = vzero();
  auto body = [&](const T* const* xs, const T* const* ws) {
    typename D::op xv[R];
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) xv[i] = D::load(xs[i]);
#pragma GCC unroll 4
    for (int j = 0; j < C; ++j) {
      const typename D::op wv = D::load(ws[j]);
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) acc[i][j] = D::madd(acc[i][j], xv[i], wv);
    }
  };
  int64_t k = 0;
  for (; k + D::step <= K; k += D::step) {
    const T* xs[R];
    const T* ws[C];
    for (int i = 0; i < R; ++i) xs[i] = x + i * ldx + k;
    for (int j = 0; j < C; ++j) ws[j] = w + j * ldw + k;
    body(xs, ws);
  }
  if (k < K) {  // the last partial step, zero-padded
    T xb[R][D::step], wb[C][D::step];
    const T* xs[R];
    const T* ws[C];
    for (int i = 0; i < R; ++i) xs[i] = padded(x + i * ldx + k, K - k, xb[i]);
    for (int j = 0; j < C; ++j) ws[j] = padded(w + j * ldw + k, K - k, wb[j]);
    body(xs, ws);
  }
#if defined(__AVX512F__)
  if constexpr (R * C == 16) {  // a full tile: its 16 sums together
    alignas(64) float sums[16];
    _mm512_store_ps(sums, lane_sums(&acc[0][0]));
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < C; ++j) y[i * ldy + j] = static_cast<T>(sums[i * C + j]);
    return;
  }
#endif
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) y[i * ldy + j] = static_cast<T>(vsum(acc[i][j]));
}

template <int R, typename T>
void row_tile(int64_t cols, const T* x, int64_t ldx, const T* w, int64_t ldw, T* y, int64_t ldy, int64_t K) {
  switch (cols) {
    case 4: return tile<R, 4>(x, ldx, w, ldw, y, ldy, K);
    case 3: return tile<R, 3>(x, ldx, w, ldw, y, ldy, K);
    case 2: return tile<R, 2>(x, ldx, w, ldw, y, ldy, K);
    default: return tile<R, 1>(x, ldx, w, ldw, y, ldy, K);
  }
}

template <typename T>
void any_tile(int64_t rows, int64_t cols, const T* x, int64_t ldx, const T* w, int64_t ldw, T* y,
              int64_t ldy, int64_t K) {
  switch (rows) {
    case 4: return row_tile<4>(cols, x, ldx, w, ldw, y, ldy, K);
    case 3: return row_tile<3>(cols, x, ldx, w, ldw, y, ldy, K);
    case 2: return row_tile<2>(cols, x, ldx, w, ldw, y, ldy, K);
    default: return row_tile<1>(cols, x, ldx, w, ldw, y, ldy, K);
  }
}

template <typename T>
void gemm(const T* x, int64_t ldx, const T* w, T* y, int64_t M, int64_t N, int64_t K) {
  const int64_t tiles = (N + NR - 1) / NR;
  at::parallel_for(0, tiles, 1, [&](int64_t first, int64_t last) {
    for (int64_t m0 = 0; m0 < M; m0 += MC) {
      const int64_t m1 = std::min(M, m0 + MC);
      for (int64_t t = first; t < last; ++t) {
        const int64_t n = t * NR, cols = std::min<int64_t>(NR, N - n);
        for (int64_t m = m0; m < m1; m += MR)
          any_tile(std::min<int64_t>(MR, m1 - m), cols, x + m * ldx, ldx, w + n * K, K, y + m * N + n, N, K);
      }
    }
  });
}

constexpr int64_t kTile = 16, kTileK = 32, kBlockN = 2 * kTile;  // AMX: 16 rows × 64 bytes per tile

bool amx_available() {
#ifdef LEVANTE_AMX
  static const bool ok = [] {  // Linux hands out the tile state only to processes that ask for it
    constexpr long kRequestPermission = 0x1023, kTileData = 18;
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

// [N, K] → [ceil(N/32), ceil(K/32), 2, 16, 32]: per block of 32 outputs and 32 k, two B tiles of 16
// k-pairs × 16 outputs × the pair (VNNI order), zero-padded.
at::Tensor pack_linear(const at::Tensor& weight) {
  TORCH_CHECK(amx_available() && weight.scalar_type() == at::kBFloat16 && weight.dim() == 2,
              "levante::pack_linear: bfloat16 [N, K] weights on a CPU with AMX only");
  const at::Tensor w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1), nb = (N + kBlockN - 1) / kBlockN, kb = (K + kTileK - 1) / kTileK;
  at::Tensor out = at::zeros({nb, kb, 2, kTile, kTileK}, w.options());
  const auto* src = w.data_ptr<c10::BFloat16>();
  auto* dst = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, nb, 1, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b)
      for (int64_t s = 0; s < 2; ++s)
        for (int64_t j = 0; j < kTile; ++j) {
          const int64_t n = b * kBlockN + s * kTile + j;
          if (n >= N) break;
          for (int64_t k = 0; k < K; ++k)
            dst[(((b * kb + k / kTileK) * 2 + s) * kTile + (k % kTileK) / 2) * kTileK + j * 2 + k % 2] =
                src[n * K + k];
        }
  });
  return out;
}

#ifdef LEVANTE_AMX
struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

void gemm_amx(const c10::BFloat16* x, int64_t ldx, const c10::BFloat16* packed, c10::BFloat16* y, int64_t M,
              int64_t N, int64_t K) {
  const int64_t kb = (K + kTileK - 1) / kTileK, kpad = kb * kTileK, mb = (M + kTile - 1) / kTile;
  const int64_t nb = (N + kBlockN - 1) / kBlockN;
  std::vector<c10::BFloat16> a(mb * kTile * kpad, c10::BFloat16(0.f));
  for (int64_t m = 0; m < M; ++m) std::memcpy(a.data() + m * kpad, x + m * ldx, K * sizeof(c10::BFloat16));
  at::parallel_for(0, nb, 1, [&](int64_t first, int64_t last) {
    TileConfig cfg;
    for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = kTile;
    _tile_loadconfig(&cfg);
    alignas(64) float c[2][kTile][kTile];
    const int64_t a_stride = kpad * sizeof(c10::BFloat16);
    auto store = [&](int64_t t, int64_t b) {  // fp32 tiles of row tile t → bfloat16, nearest even
      const int64_t n0 = b * kBlockN, rows = std::min(kTile, M - t * kTile);
      for (int64_t s = 0; s < 2 && n0 + s * kTile < N; ++s) {
        const int64_t cols = std::min(kTile, N - n0 - s * kTile);
        const __mmask16 mask = cols == kTile ? 0xffff : static_cast<__mmask16>((1u << cols) - 1);
        for (int64_t r = 0; r < rows; ++r)
          _mm256_mask_storeu_epi16(y + (t * kTile + r) * N + n0 + s * kTile, mask,
                                   (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(c[s][r])));
      }
    };
    constexpr int64_t kChunk = MC / kTile;  // row tiles kept hot while the thread walks its weights
    for (int64_t m0 = 0; m0 < mb; m0 += kChunk)
      for (int64_t b = first; b < last; ++b) {
        const c10::BFloat16* wb = packed + b * kb * 2 * kTile * kTileK;
        const int64_t m1 = std::min(mb, m0 + kChunk);
        for (int64_t t = m0; t < m1; t += 2) {
          // two row tiles share each B tile load when there are two; the arithmetic of an output
          // element is the same either way
          const c10::BFloat16* a0 = a.data() + t * kTile * kpad;
          const c10::BFloat16* a1 = a0 + kTile * kpad;
          _tile_zero(0);
          _tile_zero(1);
          if (t + 1 < m1) {
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t k = 0; k < kb; ++k) {
              _tile_loadd(4, a0 + k * kTileK, a_stride);
              _tile_loadd(5, a1 + k * kTileK, a_stride);
              _tile_loadd(6, wb + (k * 2) * kTile * kTileK, 64);
              _tile_loadd(7, wb + (k * 2 + 1) * kTile * kTileK, 64);
              _tile_dpbf16ps(0, 4, 6);
              _tile_dpbf16ps(1, 4, 7);
              _tile_dpbf16ps(2, 5, 6);
              _tile_dpbf16ps(3, 5, 7);
            }
          } else {
            for (int64_t k = 0; k < kb; ++k) {
              _tile_loadd(4, a0 + k * kTileK, a_stride);
              _tile_loadd(6, wb + (k * 2) * kTile * kTileK, 64);
              _tile_loadd(7, wb + (k * 2 + 1) * kTile * kTileK, 64);
              _tile_dpbf16ps(0, 4, 6);
              _tile_dpbf16ps(1, 4, 7);
            }
          }
          _tile_stored(0, c[0], 64);
          _tile_stored(1, c[1], 64);
          store(t, b);
          if (t + 1 < m1) {
            _tile_stored(2, c[0], 64);
            _tile_stored(3, c[1], 64);
            store(t + 1, b);
          }
        }
      }
    _tile_release();
  });
}
#endif

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, int64_t out_features) {
  TORCH_CHECK(weight.is_contiguous(), "levante::linear: weight must be dense");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "levante::linear: x and weight dtypes differ");
  const bool tiles = weight.dim() == 5;  // packed by pack_linear
  TORCH_CHECK(tiles || weight.dim() == 2, "levante::linear: weight must be [N, K] or packed");
  const int64_t K = x.size(-1), N = out_features;
  TORCH_CHECK(tiles ? weight.size(1) == (K + kTileK - 1) / kTileK && weight.size(0) * kBlockN >= N
                    : weight.size(0) == N && weight.size(1) == K,
              "levante::linear: x has ", K, " features; the weight does not match it and ", N, " outputs");
  at::Tensor rows = x.reshape({-1, K});
  if (rows.stride(1) != 1) rows = rows.contiguous();
  const int64_t M = rows.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M > 0 && tiles) {
#ifdef LEVANTE_AMX
    gemm_amx(rows.data_ptr<c10::BFloat16>(), rows.stride(0), weight.data_ptr<c10::BFloat16>(),
             y.data_ptr<c10::BFloat16>(), M, N, K);
#else
    TORCH_CHECK(false, "levante::linear: weights packed for AMX, in a build without AMX");
#endif
  } else if (M > 0) {
    if (x.scalar_type() == at::kBFloat16) {
      gemm(rows.data_ptr<c10::BFloat16>(), rows.stride(0), weight.data_ptr<c10::BFloat16>(),
           y.data_ptr<c10::BFloat16>(), M, N, K);
    } else {
      TORCH_CHECK(x.scalar_type() == at::kFloat, "levante::linear: float32 or bfloat16 only");
      gemm(rows.data_ptr<float>(), rows.stride(0), weight.data_ptr<float>(), y.data_ptr<float>(), M, N, K);
    }
  }
  return y.view(shape);
}

}  // namespace
}  // namespace levante

TORCH_LIBRARY_IMPL(levante, CPU, m) {
  m.impl("linear", &levante::linear);
  m.impl("pack_linear", &levante::pack_linear);
}
TORCH_LIBRARY_FRAGMENT(levante, m) { m.def("amx_available() -> bool", &levante::amx_available); }
