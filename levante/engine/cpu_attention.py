"""Decode attention on CPU as one compiled kernel that reads K/V straight from the paged cache.

The pure-PyTorch backend gathers every decode row's blocks into a padded copy per layer and
attends over it with batched matmuls; on CPU that gather and the padding dominate decode. This
kernel walks each row's block table instead: one task per (row, KV head) attends the query
heads that share the head, with an online softmax in float32. It is compiled from source at
first use (torch's extension builder, cached under ~/.cache/torch_extensions); when no compiler
is there the engine falls back to the pure-PyTorch backend."""

from __future__ import annotations

import functools
import logging
from types import ModuleType

import torch

from levante.engine.attention import BatchLayout, TorchPagedAttention
from levante.engine.kv_cache import KVStore

log = logging.getLogger("levante.engine")

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

// Row primitives over head_dim floats; K/V rows are float32 or bfloat16 (its top 16 bits).
#ifdef __AVX512F__
static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
template <typename T>
static inline float dot(const float* q, const T* k, int64_t d) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < d; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load16(k + i), acc);
  return _mm512_reduce_add_ps(acc);
}
template <typename T>
static inline void axpy(float* acc, float p, const T* v, int64_t d) {
  const __m512 pv = _mm512_set1_ps(p);
  for (int64_t i = 0; i < d; i += 16)
    _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(pv, load16(v + i), _mm512_loadu_ps(acc + i)));
}
// s[t] = exp(s[t] - mx) for t < n, returning their sum: exp(x) = 2^k * e^r with k = round(x / ln 2),
// |r| <= ln 2 / 2 and e^r by its degree-6 Taylor polynomial (relative error ~2e-7).
static inline float exp_shifted_sum(float* s, int64_t n, float mx) {
  const __m512 log2e = _mm512_set1_ps(1.44269504f), ln2 = _mm512_set1_ps(0.69314718f);
  const __m512 shift = _mm512_set1_ps(mx), floor = _mm512_set1_ps(-87.f);
  const float c[] = {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f};
  __m512 total = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 mask = n - t >= 16 ? 0xffff : static_cast<__mmask16>((1u << (n - t)) - 1);
    const __m512 x = _mm512_max_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, s + t), shift), floor);
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT);
    const __m512 r = _mm512_fnmadd_ps(k, ln2, x);
    __m512 p = _mm512_set1_ps(c[0]);
    for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c[i]));
    const __m512 e = _mm512_scalef_ps(p, k);
    _mm512_mask_storeu_ps(s + t, mask, e);
    total = _mm512_mask_add_ps(total, mask, total, e);
  }
  return _mm512_reduce_add_ps(total);
}
static constexpr int64_t kLanes = 16;
#else
template <typename T>
static inline float dot(const float* q, const T* k, int64_t d) {
  float s = 0.f;
  for (int64_t i = 0; i < d; ++i) s += q[i] * static_cast<float>(k[i]);
  return s;
}
template <typename T>
static inline void axpy(float* acc, float p, const T* v, int64_t d) {
  for (int64_t i = 0; i < d; ++i) acc[i] += p * static_cast<float>(v[i]);
}
static inline float exp_shifted_sum(float* s, int64_t n, float mx) {
  float sum = 0.f;
  for (int64_t t = 0; t < n; ++t) sum += s[t] = std::exp(s[t] - mx);
  return sum;
}
static constexpr int64_t kLanes = 1;
#endif

template <typename T>
static void decode(const T* q, const T* kc, const T* vc, const int64_t* rows, const int64_t* tables,
                   const int64_t* lens, T* out, int64_t batch, int64_t width, int64_t q_stride,
                   int64_t hq, int64_t hkv, int64_t d, int64_t slots, int64_t bs, float scale) {
  const int64_t g = hq / hkv;
  at::parallel_for(0, batch * hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(g * d), acc(g * d), score(g * bs), m(g), l(g);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / hkv, h = task % hkv, len = lens[b];
      const T* qrow = q + rows[b] * q_stride + h * g * d;
      for (int64_t i = 0; i < g * d; ++i) qf[i] = static_cast<float>(qrow[i]) * scale;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), std::numeric_limits<float>::lowest());
      std::fill(l.begin(), l.end(), 0.f);
      for (int64_t blk = 0; blk * bs < len; ++blk) {
        const int64_t n = std::min(bs, len - blk * bs);
        const int64_t base = (h * slots + tables[b * width + blk] * bs) * d;
        const T* kb = kc + base;
        const T* vb = vc + base;
        for (int64_t t = 0; t < n; ++t)
          for (int64_t j = 0; j < g; ++j) score[j * bs + t] = dot(qf.data() + j * d, kb + t * d, d);
        for (int64_t j = 0; j < g; ++j) {
          float* sj = score.data() + j * bs;
          const float mx = std::max(m[j], *std::max_element(sj, sj + n));
          const float correction = std::exp(m[j] - mx);
          l[j] = l[j] * correction + exp_shifted_sum(sj, n, mx);
          m[j] = mx;
          float* aj = acc.data() + j * d;
          for (int64_t i = 0; i < d; ++i) aj[i] *= correction;
        }
        for (int64_t t = 0; t < n; ++t)
          for (int64_t j = 0; j < g; ++j) axpy(acc.data() + j * d, score[j * bs + t], vb + t * d, d);
      }
      T* orow = out + (rows[b] * hq + h * g) * d;
      for (int64_t j = 0; j < g; ++j)
        for (int64_t i = 0; i < d; ++i) orow[j * d + i] = static_cast<T>(acc[j * d + i] / l[j]);
    }
  });
}

void paged_decode(torch::Tensor q, torch::Tensor kc, torch::Tensor vc, torch::Tensor rows,
                  torch::Tensor tables, torch::Tensor lens, int64_t block_size, torch::Tensor out) {
  // q may be a slice of a wider projection: only its rows may be strided
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2), "paged_decode: q heads must be dense");
  TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous() && out.is_contiguous());
  TORCH_CHECK(rows.is_contiguous() && tables.is_contiguous() && lens.is_contiguous());
  TORCH_CHECK(q.scalar_type() == kc.scalar_type() && out.scalar_type() == kc.scalar_type());
  const int64_t hq = q.size(1), d = q.size(2), hkv = kc.size(0), slots = kc.size(1);
  TORCH_CHECK(d % kLanes == 0, "paged_decode: head_dim must be a multiple of ", kLanes);
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  const int64_t batch = rows.size(0), width = tables.size(1);
  if (kc.scalar_type() == at::kBFloat16) {
    decode(q.data_ptr<c10::BFloat16>(), kc.data_ptr<c10::BFloat16>(), vc.data_ptr<c10::BFloat16>(),
           rows.data_ptr<int64_t>(), tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(),
           out.data_ptr<c10::BFloat16>(), batch, width, q.stride(0), hq, hkv, d, slots, block_size, scale);
  } else {
    TORCH_CHECK(kc.scalar_type() == at::kFloat, "paged_decode: float32 or bfloat16 only");
    decode(q.data_ptr<float>(), kc.data_ptr<float>(), vc.data_ptr<float>(), rows.data_ptr<int64_t>(),
           tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<float>(), batch, width,
           q.stride(0), hq, hkv, d, slots, block_size, scale);
  }
}
"""


@functools.cache
def kernel() -> ModuleType | None:
    """The compiled extension, or None (logged once) where it cannot be built."""
    from torch.utils.cpp_extension import load_inline

    try:
        return load_inline(
            name="levante_paged_decode",
            cpp_sources=_SOURCE,
            functions=["paged_decode"],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],  # at::parallel_for is OpenMP inline
            extra_ldflags=["-fopenmp"],
        )
    except Exception as exc:  # no compiler, no ninja, unsupported platform: the torch path still works
        log.warning("CPU decode-attention kernel unavailable (%s); using the pure-PyTorch backend", exc)
        return None


class CpuPagedAttention(TorchPagedAttention):
    """Same writes and prefill path as the pure-PyTorch backend; decode rows go to the kernel."""

    def __init__(self, store: KVStore, ext: ModuleType) -> None:
        super().__init__(store)
        self.ext = ext

    def _decode(
        self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, layout: BatchLayout, out: torch.Tensor
    ) -> None:
        self.ext.paged_decode(
            q,
            kc,
            vc,
            layout.decode_rows,
            layout.decode_tables,
            layout.decode_lens,
            self.store.block_size,
            out,
        )


def paged_attention(store: KVStore) -> TorchPagedAttention:
    """The fastest backend for the cache's device and dtype."""
    if store.k.device.type == "cpu" and store.k.dtype in (torch.float32, torch.bfloat16):
        ext = kernel()
        if ext is not None:
            return CpuPagedAttention(store, ext)
    return TorchPagedAttention(store)
