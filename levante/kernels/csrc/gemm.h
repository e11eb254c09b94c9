// The matmul building blocks shared by the dense (linear.cpp) and quantized (quant.cpp) kernels.
// See linear.cpp for the summation order they fix; every function here keeps it.
#pragma once
#include <ATen/ATen.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)  // the epilogue rounds with VCVTNEPS2BF16
#define LEVANTE_AMX 1
#endif

#include <ATen/Parallel.h>

#include <atomic>
#include <vector>

#include "vec.h"

namespace levante {

// Work items [0, n) dealt among `threads` threads for work whose cost per item is even but whose
// threads are not (a core that starts later or reads memory slower): each thread walks its own equal
// share from the front, a step at a time, and one done with its share takes steps from the back of
// the share with the most left, so all finish together and each still streams through contiguous
// memory. What an item computes never depends on the thread, so neither do the results. A share is
// its front << 32 | back, alone on its cache line: a thread taking from its own share does not
// take the line from the others' (for a small matmul's one-group steps, that was a transfer each).
struct alignas(64) Share {
  std::atomic<uint64_t> span;
};

inline void deal(Share* shares, int64_t n, int64_t threads) {
  for (int64_t t = 0; t < threads; ++t)
    shares[t].span = static_cast<uint64_t>(t * n / threads) << 32 | static_cast<uint64_t>((t + 1) * n / threads);
}

// f(first, last) over steps of the dealt items, by thread `mine` (< threads): its own share, then
// the others' backs. Threads that never come leave their shares to those that do, so any number of
// threads covers every item exactly once.
template <typename F>
void take_shares(Share* shares, int64_t n, int64_t threads, int64_t mine, const F& f) {
  const int64_t step = std::max<int64_t>(1, n / (threads * 32));
  auto take = [&](Share& share, bool front, int64_t& first, int64_t& last) {
    uint64_t span = share.span.load();
    for (;;) {
      const int64_t a = static_cast<int64_t>(span >> 32), b = static_cast<int64_t>(span & 0xffffffffu);
      if (a >= b) return false;
      first = front ? a : std::max(a, b - step);
      last = front ? std::min(b, a + step) : b;
      const uint64_t left = front ? static_cast<uint64_t>(last) << 32 | b : static_cast<uint64_t>(a) << 32 | first;
      if (share.span.compare_exchange_weak(span, left)) return true;
    }
  };
  int64_t first, last;
  while (take(shares[mine], true, first, last)) f(first, last);
  for (;;) {  // then the back of whichever share has the most left
    int64_t most = 0, victim = -1;
    for (int64_t t = 0; t < threads; ++t) {
      const uint64_t span = shares[t].span.load();
      const int64_t left = static_cast<int64_t>(span & 0xffffffffu) - static_cast<int64_t>(span >> 32);
      if (left > most) most = left, victim = t;
    }
    if (victim < 0) return;
    if (take(shares[victim], false, first, last)) f(first, last);
  }
}

// f(first, last) over ranges covering [0, n) once, on every thread, dealt as above.
template <typename F>
void balanced_for(int64_t n, const F& f) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (threads <= 1 || at::in_parallel_region()) {
    if (n > 0) f(0, n);
    return;
  }
  std::vector<Share> shares(threads);
  deal(shares.data(), n, threads);
  at::parallel_for(0, threads, 1, [&](int64_t mine, int64_t end) {
    for (int64_t t = mine; t < end; ++t) take_shares(shares.data(), n, threads, t, f);
  });
}

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
// On weights as given ([N, K] rows), each step of a tile also asks for the same k of the rows two
// tiles on, into L2: with short rows (the demo's K = 576) the hardware prefetcher alone leaves a
// core waiting for memory (one row of x: 19 → 28 GB/s of bfloat16 weights here). Weights packed by
// pack_linear need none: a tile's rows lie interleaved in the order the steps read them, one
// sequential stream the hardware prefetcher follows at ~30 GB/s a core here (against ~17 for the
// rows with prefetches). Only where the data comes from; the sums are unchanged.
constexpr int64_t kTilesAhead = 2;

// Where a tile's weights lie: row j's k-th step of Dot<T>::step values at
// w + tile·tile_stride + j·ldw + step·kstride. As given: rows of K; packed ([ceil(N/NR),
// ceil(K/step), NR, step], zeros past N and K): a tile's NR rows interleaved step by step.
struct Layout {
  int64_t ldw, kstride, tile_stride;
  bool rows;  // as given, not packed
};

template <int R, int C, typename T>
void tile(const T* x, int64_t ldx, const T* w, Layout at, T* y, int64_t ldy, int64_t K) {
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
    for (int j = 0; j < C; ++j) ws[j] = w + j * at.ldw + k / D::step * at.kstride;
    if (at.rows)
      for (int j = 0; j < C; ++j) __builtin_prefetch(ws[j] + kTilesAhead * C * at.ldw, 0, 1);
    body(xs, ws);
  }
  if (k < K) {  // the last partial step, zero-padded
    T xb[R][D::step], wb[C][D::step];
    const T* xs[R];
    const T* ws[C];
    for (int i = 0; i < R; ++i) xs[i] = padded(x + i * ldx + k, K - k, xb[i]);
    for (int j = 0; j < C; ++j) ws[j] = padded(w + j * at.ldw + k / D::step * at.kstride, K - k, wb[j]);
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
void row_tile(int64_t cols, const T* x, int64_t ldx, const T* w, Layout at, T* y, int64_t ldy, int64_t K) {
  switch (cols) {
    case 4: return tile<R, 4>(x, ldx, w, at, y, ldy, K);
    case 3: return tile<R, 3>(x, ldx, w, at, y, ldy, K);
    case 2: return tile<R, 2>(x, ldx, w, at, y, ldy, K);
    default: return tile<R, 1>(x, ldx, w, at, y, ldy, K);
  }
}

template <typename T>
void any_tile(int64_t rows, int64_t cols, const T* x, int64_t ldx, const T* w, Layout at, T* y, int64_t ldy,
              int64_t K) {
  switch (rows) {
    case 4: return row_tile<4>(cols, x, ldx, w, at, y, ldy, K);
    case 3: return row_tile<3>(cols, x, ldx, w, at, y, ldy, K);
    case 2: return row_tile<2>(cols, x, ldx, w, at, y, ldy, K);
    default: return row_tile<1>(cols, x, ldx, w, at, y, ldy, K);
  }
}

// The layout of weights as given (packed = false) or packed by pack_linear, for K inputs.
template <typename T>
Layout layout(bool packed, int64_t K) {
  constexpr int64_t step = Dot<T>::step;
  if (!packed) return {K, step, NR * K, true};
  return {step, NR * step, NR * ((K + step - 1) / step * step), false};
}

// Tiles [first, last) of NR outputs of y [M, N] = x·wᵀ (w laid out as `at` says): the work
// balanced_for shares out, M rows of x at a time.
template <typename T>
void gemm_tiles(const T* x, int64_t ldx, const T* w, Layout at, T* y, int64_t M, int64_t N, int64_t K,
                int64_t first, int64_t last) {
  for (int64_t m0 = 0; m0 < M; m0 += MC) {
    const int64_t m1 = std::min(M, m0 + MC);
    for (int64_t t = first; t < last; ++t) {
      const int64_t n = t * NR, cols = std::min<int64_t>(NR, N - n);
      for (int64_t m = m0; m < m1; m += MR)
        any_tile(std::min<int64_t>(MR, m1 - m), cols, x + m * ldx, ldx, w + t * at.tile_stride, at, y + m * N + n, N,
                 K);
    }
  }
}

inline int64_t gemm_tile_count(int64_t N) { return (N + NR - 1) / NR; }

// x [..., K] as rows [M, K] whose rows may be strided, and y [M, N] for them, to be returned as
// `shape` (x's leading dimensions, then N).
struct Rows {
  at::Tensor x, y;
  std::vector<int64_t> shape;
};

inline Rows as_rows(const at::Tensor& x, int64_t K, int64_t N) {
  at::Tensor rows = x.reshape({-1, K});
  if (rows.stride(1) != 1) rows = rows.contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return {rows, at::empty({rows.size(0), N}, x.options()), shape};
}

constexpr int64_t kTile = 16, kTileK = 32, kBlockN = 2 * kTile;  // AMX: 16 rows × 64 bytes per tile

bool amx_available();

// One block of up to 32 outputs, given as rows of kb·32 bfloat16 (zeros past K and past the last
// row) at stride ld → [kb, 2, 16, 32]: per 32 k, two B tiles of 16 k-pairs × 16 outputs × the pair
// (VNNI order): a 16×16 transpose of 32-bit words per tile.
inline void amx_pack_block(const c10::BFloat16* rows, int64_t ld, int64_t kb, c10::BFloat16* dst) {
  const auto* src = reinterpret_cast<const uint32_t*>(rows);
  auto* out = reinterpret_cast<uint32_t*>(dst);
  const int64_t ldw = ld / 2;
  for (int64_t k = 0; k < kb; ++k)
    for (int64_t s = 0; s < 2; ++s)
      for (int64_t p = 0; p < kTile; ++p)
        for (int64_t j = 0; j < kTile; ++j)
          out[((k * 2 + s) * kTile + p) * kTile + j] = src[(s * kTile + j) * ldw + k * kTile + p];
}

#ifdef LEVANTE_AMX
struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3 accumulate, 4-5 hold x, 6-7 the weights; each thread loads this once.
inline void amx_configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = kTile;
  _tile_loadconfig(&cfg);
}

// x padded to whole 16-row tiles of kpad = kb·32 columns (zeros after K and after M).
inline std::vector<c10::BFloat16> amx_rows(const c10::BFloat16* x, int64_t ldx, int64_t M, int64_t K, int64_t kpad) {
  std::vector<c10::BFloat16> a((M + kTile - 1) / kTile * kTile * kpad, c10::BFloat16(0.f));
  for (int64_t m = 0; m < M; ++m) std::memcpy(a.data() + m * kpad, x + m * ldx, K * sizeof(c10::BFloat16));
  return a;
}

// Row tiles [t0, t1) of the padded x `a` times one block of 32 outputs (b) packed as pack_linear
// packs it (`wb`, kb tiles deep) → y [M, N] bfloat16.
inline void amx_block(const c10::BFloat16* a, int64_t kb, int64_t t0, int64_t t1, const c10::BFloat16* wb,
                      int64_t b, c10::BFloat16* y, int64_t M, int64_t N) {
  const int64_t kpad = kb * kTileK, a_stride = kpad * sizeof(c10::BFloat16);
  alignas(64) float c[2][kTile][kTile];
  auto store = [&](int64_t t) {  // fp32 tiles of row tile t → bfloat16, nearest even
    const int64_t n0 = b * kBlockN, rows = std::min(kTile, M - t * kTile);
    for (int64_t s = 0; s < 2 && n0 + s * kTile < N; ++s) {
      const int64_t cols = std::min(kTile, N - n0 - s * kTile);
      const __mmask16 mask = cols == kTile ? 0xffff : static_cast<__mmask16>((1u << cols) - 1);
      for (int64_t r = 0; r < rows; ++r)
        _mm256_mask_storeu_epi16(y + (t * kTile + r) * N + n0 + s * kTile, mask,
                                 (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(c[s][r])));
    }
  };
  for (int64_t t = t0; t < t1; t += 2) {
    // two row tiles share each B tile load when there are two; the arithmetic of an output
    // element is the same either way
    const c10::BFloat16* a0 = a + t * kTile * kpad;
    const c10::BFloat16* a1 = a0 + kTile * kpad;
    _tile_zero(0);
    _tile_zero(1);
    if (t + 1 < t1) {
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
    store(t);
    if (t + 1 < t1) {
      _tile_stored(2, c[0], 64);
      _tile_stored(3, c[1], 64);
      store(t + 1);
    }
  }
}
#endif

}  // namespace levante
