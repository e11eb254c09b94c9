// Causal attention of single query rows over their sequences' blocks in the paged KV cache.
//
// One task per (row, KV head) attends the query heads that share the head, block by block in
// position order, with an online softmax in float32. A row's result depends only on its own
// query, its context length and the cached K/V, never on the other rows of the step: the same
// token gives the same bits whether it is decoded alone, beside others, or sits anywhere in a
// prefill chunk of any size (the batch-invariant mode sends every row here).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace levante {
namespace {

// score[t] = q·k_t for the block's tokens t < bs (rows past the context are computed and ignored).
template <typename T>
inline void block_scores(const float* q, const T* kb, int64_t d, int64_t bs, float* score) {
#if defined(__AVX512F__)
  if (bs == 16) {  // 16 vector accumulators, one per token, then summed across lanes together
    __m512 acc[16];
    for (int t = 0; t < 16; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 16) {
      const __m512 qv = _mm512_loadu_ps(q + i);
      for (int t = 0; t < 16; ++t) acc[t] = _mm512_fmadd_ps(qv, vload(kb + t * d + i), acc[t]);
    }
    _mm512_storeu_ps(score, lane_sums(acc));
    return;
  }
#endif
  for (int64_t t = 0; t < bs; ++t) {
    vf acc = vzero();
    for (int64_t i = 0; i < d; i += kLanes) acc = vfma(vload(q + i), vload(kb + t * d + i), acc);
    score[t] = vsum(acc);
  }
}

// acc += Σ_t p[t]·v_t over the block's first n tokens, in t order for every element.
template <typename T>
inline void block_values(float* acc, const float* p, const T* vb, int64_t n, int64_t d) {
  for (int64_t i = 0; i < d; i += kLanes) {
    vf a = vload(acc + i);
    for (int64_t t = 0; t < n; ++t) a = vfma(vset1(p[t]), vload(vb + t * d + i), a);
    vstore(acc + i, a);
  }
}

// s[t] = exp(s[t] - mx) for t < n, returning their sum.
#if defined(__AVX512F__)
// exp(x) = 2^k · e^r with k = round(x / ln 2), |r| <= ln 2 / 2, e^r by its degree-6 Taylor
// polynomial (relative error ~2e-7).
inline float exp_shifted_sum(float* s, int64_t n, float mx) {
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
#else
inline float exp_shifted_sum(float* s, int64_t n, float mx) {
  float sum = 0.f;
  for (int64_t t = 0; t < n; ++t) sum += s[t] = std::exp(s[t] - mx);
  return sum;
}
#endif

// A thread's room for attend_heads: float32 copies of the query heads, their sums, one block's scores.
struct AttentionScratch {
  std::vector<float> qf, acc, score, m, l;
  AttentionScratch(int64_t heads, int64_t d, int64_t bs) : qf(heads * d), acc(heads * d), score(heads * bs), m(heads), l(heads) {}
};

// The paged caches (one layer's, or fp8 of either dtype) and the step's rows, as paged_attention
// takes them; `q` [rows, ...] with heads at q_stride per row, out [rows, hq, d].
template <typename T, typename C>
struct Paged {
  const T* q;
  const C *kc, *vc;
  const int64_t *rows, *seqs, *tables, *lens;
  T* out;
  int64_t width, q_stride, hq, hkv, d, slots, bs;
  float scale;
};

// Row b's query heads [j0, j1) (those of KV head h = j0 / (hq / hkv)) over its context. Each head's
// arithmetic is its own: splitting a KV head's heads among tasks leaves every bit as it is.
template <typename T, typename C>
void attend_heads(const Paged<T, C>& p, int64_t b, int64_t j0, int64_t j1, AttentionScratch& s) {
  const int64_t d = p.d, bs = p.bs, h = j0 / (p.hq / p.hkv), g = j1 - j0, len = p.lens[b];
  const int64_t* table = p.tables + p.seqs[b] * p.width;
  const T* qrow = p.q + p.rows[b] * p.q_stride + j0 * d;
  float *qf = s.qf.data(), *acc = s.acc.data(), *score = s.score.data(), *m = s.m.data(), *l = s.l.data();
  for (int64_t i = 0; i < g * d; ++i) qf[i] = static_cast<float>(qrow[i]) * p.scale;
  std::fill(acc, acc + g * d, 0.f);
  std::fill(m, m + g, std::numeric_limits<float>::lowest());
  std::fill(l, l + g, 0.f);
  for (int64_t blk = 0; blk * bs < len; ++blk) {
    const int64_t n = std::min(bs, len - blk * bs);
    const int64_t base = (h * p.slots + table[blk] * bs) * d;
    const C* kb = p.kc + base;
    const C* vb = p.vc + base;
    for (int64_t j = 0; j < g; ++j) block_scores(qf + j * d, kb, d, bs, score + j * bs);
    for (int64_t j = 0; j < g; ++j) {
      float* sj = score + j * bs;
      const float mx = std::max(m[j], *std::max_element(sj, sj + n));
      const float correction = std::exp(m[j] - mx);
      l[j] = l[j] * correction + exp_shifted_sum(sj, n, mx);
      m[j] = mx;
      float* aj = acc + j * d;
      for (int64_t i = 0; i < d; ++i) aj[i] *= correction;
    }
    for (int64_t j = 0; j < g; ++j) block_values(acc + j * d, score + j * bs, vb, n, d);
  }
  T* orow = p.out + (p.rows[b] * p.hq + j0) * d;
  for (int64_t j = 0; j < g; ++j)
    for (int64_t i = 0; i < d; ++i) orow[j * d + i] = static_cast<T>(acc[j * d + i] / l[j]);
}

template <typename T, typename C>
void attend(const Paged<T, C>& p, int64_t batch) {
  const int64_t g = p.hq / p.hkv;
  at::parallel_for(0, batch * p.hkv, 1, [&](int64_t begin, int64_t end) {
    AttentionScratch scratch(g, p.d, p.bs);
    for (int64_t task = begin; task < end; ++task) {
      // rows taken from both ends in turn: a prefill chunk's rows grow in length, and each
      // thread gets a contiguous range of tasks
      const int64_t i = task / p.hkv, h = task % p.hkv;
      attend_heads(p, i % 2 ? batch - 1 - i / 2 : i / 2, h * g, (h + 1) * g, scratch);
    }
  });
}

void paged_attention(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& rows,
                     const at::Tensor& seqs, const at::Tensor& tables, const at::Tensor& lens,
                     int64_t block_size, const at::Tensor& out) {
  // q may be a slice of a wider projection: only its rows may be strided
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2), "paged_attention: q heads must be dense");
  TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous() && out.is_contiguous());
  TORCH_CHECK(rows.is_contiguous() && seqs.is_contiguous() && tables.is_contiguous() && lens.is_contiguous());
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && vc.scalar_type() == kc.scalar_type());
  const int64_t hq = q.size(1), d = q.size(2), hkv = kc.size(0), slots = kc.size(1);
  TORCH_CHECK(d % kLanes == 0, "paged_attention: head_dim must be a multiple of ", kLanes);
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  const int64_t batch = rows.size(0), width = tables.size(1);
  auto run = [&](auto* qp, auto* cache) {  // q/out in float32 or bfloat16; the cache in those or fp8
    using T = std::remove_pointer_t<decltype(qp)>;
    using C = std::remove_pointer_t<decltype(cache)>;
    attend(Paged<T, C>{q.data_ptr<T>(), kc.data_ptr<C>(), vc.data_ptr<C>(), rows.data_ptr<int64_t>(),
                       seqs.data_ptr<int64_t>(), tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(),
                       out.data_ptr<T>(), width, q.stride(0), hq, hkv, d, slots, block_size, scale},
           batch);
  };
  auto with_cache = [&](auto* qp) {
    using T = std::remove_pointer_t<decltype(qp)>;
    switch (kc.scalar_type()) {
      case at::kFloat8_e4m3fn: return run(qp, static_cast<c10::Float8_e4m3fn*>(nullptr));
      case at::kFloat8_e5m2: return run(qp, static_cast<c10::Float8_e5m2*>(nullptr));
      default:
        TORCH_CHECK(kc.scalar_type() == q.scalar_type(), "paged_attention: the cache is q's dtype or fp8");
        return run(qp, static_cast<T*>(nullptr));
    }
  };
  if (q.scalar_type() == at::kBFloat16) {
    with_cache(static_cast<c10::BFloat16*>(nullptr));
  } else {
    TORCH_CHECK(q.scalar_type() == at::kFloat, "paged_attention: float32 or bfloat16 only");
    with_cache(static_cast<float*>(nullptr));
  }
}

// One head's d values → the cache's dtype; an fp8 cache saturates at its largest finite value.
template <typename X, typename C>
inline void store_head(const X* row, C* dst, int64_t d) {
  const float top = sizeof(C) == 1 ? static_cast<float>(std::numeric_limits<C>::max())
                                   : std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<C>(std::min(std::max(static_cast<float>(row[i]), -top), top));
}

// Stores one layer's new k, v [T, Hkv, D] at their cache slots (caches [layers, Hkv, slots, D]); an fp8
// cache saturates at its largest finite value, as `KVStore.write` does. The whole caches and the layer
// index are passed, not the layer's view, so a compiled graph mutates its input in place.
void write_kv(const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t layer, const at::Tensor& slots,
              const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && slots.is_contiguous());
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, "write_kv: k and v heads must be dense");
  TORCH_CHECK(k.scalar_type() == v.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type());
  const int64_t tokens = k.size(0), hkv = k.size(1), d = k.size(2), n = k_cache.size(2);
  TORCH_CHECK(k_cache.size(1) == hkv && k_cache.size(3) == d && v.sizes() == k.sizes());
  const int64_t* slot = slots.data_ptr<int64_t>();
  auto run = [&](auto* xp, auto* cp) {
    using X = std::remove_pointer_t<decltype(xp)>;
    using C = std::remove_pointer_t<decltype(cp)>;
    for (const auto& [src, cache] : {std::pair{&k, &k_cache}, std::pair{&v, &v_cache}}) {
      const X* x = src->template data_ptr<X>();
      C* c = cache->template data_ptr<C>() + layer * hkv * n * d;
      for (int64_t t = 0; t < tokens; ++t) {
        TORCH_CHECK(slot[t] >= 0 && slot[t] < n, "write_kv: slot ", slot[t], " out of range");
        for (int64_t h = 0; h < hkv; ++h) {
          const X* row = x + t * src->stride(0) + h * src->stride(1);
          C* dst = c + (h * n + slot[t]) * d;
          store_head(row, dst, d);
        }
      }
    }
  };
  auto with_cache = [&](auto* xp) {
    switch (k_cache.scalar_type()) {
      case at::kFloat8_e4m3fn: return run(xp, static_cast<c10::Float8_e4m3fn*>(nullptr));
      case at::kFloat8_e5m2: return run(xp, static_cast<c10::Float8_e5m2*>(nullptr));
      case at::kBFloat16: return run(xp, static_cast<c10::BFloat16*>(nullptr));
      default:
        TORCH_CHECK(k_cache.scalar_type() == at::kFloat, "write_kv: a float32, bfloat16 or fp8 cache");
        return run(xp, static_cast<float*>(nullptr));
    }
  };
  if (k.scalar_type() == at::kBFloat16) {
    with_cache(static_cast<c10::BFloat16*>(nullptr));
  } else {
    TORCH_CHECK(k.scalar_type() == at::kFloat, "write_kv: float32 or bfloat16 k and v");
    with_cache(static_cast<float*>(nullptr));
  }
}

}  // namespace
}  // namespace levante

TORCH_LIBRARY_IMPL(levante, CPU, m) {
  m.impl("paged_attention", &levante::paged_attention);
  m.impl("write_kv", &levante::write_kv);
}
