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

#include "gemm.h"

#ifdef LEVANTE_AMX
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace levante {

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

namespace {

template <typename T>
void gemm(const T* x, int64_t ldx, const T* w, Layout at, T* y, int64_t M, int64_t N, int64_t K) {
  balanced_for(gemm_tile_count(N), [&](int64_t first, int64_t last) { gemm_tiles(x, ldx, w, at, y, M, N, K, first, last); });
}

// [N, K] → [ceil(N/NR), ceil(K/step), NR, step] (gemm.h's packed Layout), zeros past N and K: each
// tile's rows interleaved a step of Dot<T> at a time, in the order `tile` reads them.
template <typename T>
at::Tensor pack_rows(const at::Tensor& w) {
  constexpr int64_t step = Dot<T>::step;
  const int64_t N = w.size(0), K = w.size(1), tiles = gemm_tile_count(N), steps = (K + step - 1) / step;
  at::Tensor out = at::zeros({tiles, steps, NR, step}, w.options());
  const T* src = w.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  at::parallel_for(0, tiles, 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t)
      for (int64_t j = 0; j < NR && t * NR + j < N; ++j)
        for (int64_t k = 0; k < K; ++k) dst[((t * steps + k / step) * NR + j) * step + k % step] = src[(t * NR + j) * K + k];
  });
  return out;
}

// [N, K] → [ceil(N/32), ceil(K/32), 2, 16, 32]: amx_pack_block per block of 32 outputs.
at::Tensor pack_amx(const at::Tensor& w) {
  const int64_t N = w.size(0), K = w.size(1), nb = (N + kBlockN - 1) / kBlockN, kb = (K + kTileK - 1) / kTileK;
  const int64_t kpad = kb * kTileK;
  at::Tensor out = at::empty({nb, kb, 2, kTile, kTileK}, w.options());
  const auto* src = w.data_ptr<c10::BFloat16>();
  auto* dst = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, nb, 1, [&](int64_t first, int64_t last) {
    std::vector<c10::BFloat16> rows(kBlockN * kpad);
    for (int64_t b = first; b < last; ++b) {
      std::fill(rows.begin(), rows.end(), c10::BFloat16(0.f));
      for (int64_t n = b * kBlockN; n < std::min(N, (b + 1) * kBlockN); ++n)
        std::memcpy(rows.data() + (n - b * kBlockN) * kpad, src + n * K, K * sizeof(c10::BFloat16));
      amx_pack_block(rows.data(), kpad, kb, dst + b * kb * 2 * kTile * kTileK);
    }
  });
  return out;
}

// The weight in the layout `linear` reads fastest: AMX tiles for bfloat16 on a CPU with AMX, else
// each tile's rows interleaved (pack_rows).
at::Tensor pack_linear(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "levante::pack_linear: the weight must be [N, K]");
  const at::Tensor w = weight.contiguous();
  if (w.scalar_type() == at::kBFloat16) return amx_available() ? pack_amx(w) : pack_rows<c10::BFloat16>(w);
  TORCH_CHECK(w.scalar_type() == at::kFloat, "levante::pack_linear: float32 or bfloat16 only");
  return pack_rows<float>(w);
}

#ifdef LEVANTE_AMX
void gemm_amx(const c10::BFloat16* x, int64_t ldx, const c10::BFloat16* packed, c10::BFloat16* y, int64_t M,
              int64_t N, int64_t K) {
  const int64_t kb = (K + kTileK - 1) / kTileK, mb = (M + kTile - 1) / kTile, nb = (N + kBlockN - 1) / kBlockN;
  const std::vector<c10::BFloat16> a = amx_rows(x, ldx, M, K, kb * kTileK);
  at::parallel_for(0, nb, 1, [&](int64_t first, int64_t last) {
    amx_configure();
    constexpr int64_t kChunk = MC / kTile;  // row tiles kept hot while the thread walks its weights
    for (int64_t m0 = 0; m0 < mb; m0 += kChunk)
      for (int64_t b = first; b < last; ++b)
        amx_block(a.data(), kb, m0, std::min(mb, m0 + kChunk), packed + b * kb * 2 * kTile * kTileK, b, y, M, N);
    _tile_release();
  });
}
#endif

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, int64_t out_features) {
  TORCH_CHECK(weight.is_contiguous(), "levante::linear: weight must be dense");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "levante::linear: x and weight dtypes differ");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "levante::linear: float32 or bfloat16 only");
  const bool tiles = weight.dim() == 5, packed = weight.dim() == 4;  // by pack_linear: AMX tiles, rows interleaved
  TORCH_CHECK(tiles || packed || weight.dim() == 2, "levante::linear: weight must be [N, K] or packed");
  const int64_t K = x.size(-1), N = out_features;
  const int64_t step = x.scalar_type() == at::kBFloat16 ? Dot<c10::BFloat16>::step : Dot<float>::step;
  TORCH_CHECK(tiles    ? weight.size(1) == (K + kTileK - 1) / kTileK && weight.size(0) * kBlockN >= N
              : packed ? weight.size(0) == gemm_tile_count(N) && weight.size(1) == (K + step - 1) / step &&
                             weight.size(2) == NR && weight.size(3) == step
                       : weight.size(0) == N && weight.size(1) == K,
              "levante::linear: x has ", K, " features; the weight does not match it and ", N, " outputs");
  auto [rows, y, shape] = as_rows(x, K, N);
  const int64_t M = rows.size(0);
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
           layout<c10::BFloat16>(packed, K), y.data_ptr<c10::BFloat16>(), M, N, K);
    } else {
      gemm(rows.data_ptr<float>(), rows.stride(0), weight.data_ptr<float>(), layout<float>(packed, K),
           y.data_ptr<float>(), M, N, K);
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
