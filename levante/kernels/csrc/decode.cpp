// Every decoder layer of a step whose rows are all paged (each decode step; in batch-invariant mode
// each text step) in one call: the kernels the eager model calls one operator at a time (rms_norm,
// linear or quant_linear, write_kv, paged_attention), called here in the same order on the same
// tensors, and the elementwise work between them (rotary, SiLU·mul, residual adds) done as ATen
// does it for eager: each product, quotient and sum in float32, rounded to the model's dtype where
// an eager operator hands back a tensor, and SiLU's exp from the same function ATen's kernel calls
// for the same element. So the same bits as the eager step, without a few hundred operator calls
// from Python (or from a compiled graph's wrapper) per token.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "quant.h"
#include "vec.h"

extern "C" {  // exported by libtorch_cpu: the exp of ATen's float vectors (Vectorized<float>::exp)
#if defined(__AVX512F__)
__m512 Sleef_expf16_u10(__m512);
#endif
#if defined(__AVX2__)
__m256 Sleef_expf8_u10(__m256);
#endif
}

namespace levante {
namespace {

// The float lanes of ATen's vectors at the capability it runs with (its elementwise kernels take
// exp from Sleef at that width, std::exp in their scalar tails), 0 where it runs scalar code only,
// -1 where this build cannot call the function it uses (e.g. ATen at AVX-512, kernels forced to AVX2).
int aten_lanes() {
  static const int lanes = [] {
    const std::string cap = at::get_cpu_capability();
#if defined(__AVX512F__)
    if (cap == "AVX512") return 16;
#endif
#if defined(__AVX2__)
    if (cap == "AVX2") return 8;
#endif
    return cap == "DEFAULT" ? 0 : -1;
  }();
  return lanes;
}

bool decode_supported() { return aten_lanes() >= 0; }

// exp of n floats (a multiple of `lanes`) as Vectorized<float>::exp computes them.
inline void vector_exp(const float* x, float* y, int64_t n, int lanes) {
#if defined(__AVX512F__)
  if (lanes == 16) {
    for (int64_t i = 0; i < n; i += 16) _mm512_storeu_ps(y + i, Sleef_expf16_u10(_mm512_loadu_ps(x + i)));
    return;
  }
#endif
#if defined(__AVX2__)
  for (int64_t i = 0; i < n; i += 8) _mm256_storeu_ps(y + i, Sleef_expf8_u10(_mm256_loadu_ps(x + i)));
#endif
}

// Rows at a time per thread for elementwise work over rows of `width` values: one row (a decode
// step) stays on the calling thread.
inline int64_t grain(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)); }

// apply_rope: out[h, i] = x·cos + rotate_half(x)·sin per head of d, each product and the sum rounded.
template <typename T>
void rope(const at::Tensor& qkv, int64_t heads, int64_t d, const at::Tensor& table, const at::Tensor& positions,
          at::Tensor& out) {
  const int64_t rows = qkv.size(0), half = d / 2, ld = qkv.stride(0), P = table.size(1);
  const T* x = qkv.data_ptr<T>();
  const T* cs = table.data_ptr<T>();  // [2, positions, 1, d]
  const int64_t* pos = positions.data_ptr<int64_t>();
  T* y = out.data_ptr<T>();
  const vf minus = vset1(-1.f);
  at::parallel_for(0, rows, grain(heads * d), [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      TORCH_CHECK(pos[t] >= 0 && pos[t] < P, "decode_layers: position ", pos[t], " past the rotary table");
      const T* c = cs + pos[t] * d;
      const T* s = cs + (P + pos[t]) * d;
      for (int64_t h = 0; h < heads; ++h) {
        const T* xh = x + t * ld + h * d;
        T* yh = y + (t * heads + h) * d;
        for (const int64_t lo : {int64_t{0}, half}) {  // the first half turns with −x[i + half], the second with x[i − half]
          for (int64_t i = lo; i < lo + half; i += kLanes) {
            const int64_t n = std::min(kLanes, lo + half - i);
            const vf turned = lo == 0 ? vmul(vload_n(xh + i + half, n), minus) : vload_n(xh + i - half, n);
            const vf a = vround<T>(vmul(vload_n(xh + i, n), vload_n(c + i, n)));
            const vf b = vround<T>(vmul(turned, vload_n(s + i, n)));
            vstore_n(yh + i, vadd(a, b), n);
          }
        }
      }
    }
  });
}

// silu(gate) · up over rows [gate | up] of 2·n: silu rounded to T, then the product. ATen's SiLU
// kernel takes exp from its vectors over each row's first whole multiples of two vectors of T and
// std::exp over the rest; so here.
template <typename T>
at::Tensor silu_mul(const at::Tensor& gu) {
  const int64_t rows = gu.size(0), n = gu.size(1) / 2;
  at::Tensor out = at::empty({rows, n}, gu.options());
  const int lanes = aten_lanes();
  const int64_t step = 2 * lanes * static_cast<int64_t>(sizeof(float) / sizeof(T)), head = lanes ? n / step * step : 0;
  const T* g = gu.data_ptr<T>();
  T* y = out.data_ptr<T>();
  const vf one = vset1(1.f);
  at::parallel_for(0, rows, grain(n), [&](int64_t first, int64_t last) {
    std::vector<float> e(n);
    for (int64_t r = first; r < last; ++r) {
      const T* gate = g + r * 2 * n;
      const T* up = gate + n;
      for (int64_t i = 0; i < n; ++i) e[i] = -static_cast<float>(gate[i]);
      vector_exp(e.data(), e.data(), head, lanes);
      for (int64_t i = head; i < n; ++i) e[i] = std::exp(e[i]);
      for (int64_t i = 0; i < n; i += kLanes) {
        const int64_t m = std::min(kLanes, n - i);
        const vf silu = vround<T>(vdiv(vload_n(gate + i, m), vadd(one, vload_n(e.data() + i, m))));
        vstore_n(y + r * n + i, vmul(silu, vload_n(up + i, m)), m);
      }
    }
  });
  return out;
}

// h + delta, rounded: the residual add.
template <typename T>
at::Tensor add(const at::Tensor& h, const at::Tensor& delta) {
  at::Tensor out = at::empty_like(h);
  const int64_t n = h.numel();
  const T* a = h.data_ptr<T>();
  const T* b = delta.data_ptr<T>();
  T* y = out.data_ptr<T>();
  at::parallel_for(0, (n + kLanes - 1) / kLanes, 16384 / kLanes, [&](int64_t first, int64_t last) {
    for (int64_t i = first * kLanes; i < std::min(n, last * kLanes); i += kLanes) {
      const int64_t m = std::min(kLanes, n - i);
      vstore_n(y + i, vadd(vload_n(a + i, m), vload_n(b + i, m)), m);
    }
  });
  return out;
}

// The layers' weights as Python lays them out (engine/fused.py): per layer the input norm's weight,
// the qkv, o, gate_up and down projections, the post-attention norm's weight between o and gate_up.
// A projection is described in `spec` by (parts, size, types…): parts 0 is one dense weight with
// `size` outputs (kernels.linear), parts n > 0 is n GGUF block tensors of `size` inputs.
struct Reader {
  at::TensorList weights;
  at::IntArrayRef spec;
  size_t w = 0, s = 0;

  const at::Tensor& norm() { return next(); }
  const at::Tensor& next() {
    TORCH_CHECK(w < weights.size(), "decode_layers: fewer weights than the spec describes");
    return weights[w++];
  }
  int64_t value() {
    TORCH_CHECK(s < spec.size(), "decode_layers: the spec ends early");
    return spec[s++];
  }
  at::Tensor project(const at::Tensor& x) {
    const int64_t parts = value(), size = value();
    if (parts == 0) return linear(x, next(), size);
    TORCH_CHECK(s + parts <= spec.size() && w + parts <= weights.size(), "decode_layers: a projection ends early");
    const at::IntArrayRef types = spec.slice(s, parts);
    const at::TensorList blocks = weights.slice(w, parts);
    s += parts;
    w += parts;
    return quant_linear(x, blocks, types, size);
  }
};

template <typename T>
at::Tensor layers(at::Tensor h, const at::Tensor& rope_table, const at::Tensor& positions, Reader& read,
                  int64_t count, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
                  const at::Tensor& rows, const at::Tensor& seqs, const at::Tensor& tables, const at::Tensor& lens,
                  int64_t block_size, int64_t hq, int64_t hkv, double eps) {
  const int64_t t = h.size(0), d = k_cache.size(3);
  for (int64_t layer = 0; layer < count; ++layer) {
    const at::Tensor qkv = read.project(rms_norm(h, read.norm(), eps)).view({t, hq + 2 * hkv, d});
    at::Tensor qk = at::empty({t, hq + hkv, d}, h.options());
    rope<T>(qkv, hq + hkv, d, rope_table, positions, qk);
    write_kv(k_cache, v_cache, layer, slots, qk.narrow(1, hq, hkv), qkv.narrow(1, hq + hkv, hkv));
    const at::Tensor attended = at::empty({t, hq, d}, h.options());
    paged_attention(qk.narrow(1, 0, hq), k_cache.select(0, layer), v_cache.select(0, layer), rows, seqs, tables,
                    lens, block_size, attended);
    h = add<T>(h, read.project(attended.view({t, hq * d})));
    const at::Tensor& post = read.norm();
    h = add<T>(h, read.project(silu_mul<T>(read.project(rms_norm(h, post, eps)))));
  }
  TORCH_CHECK(read.w == read.weights.size() && read.s == read.spec.size(),
              "decode_layers: more weights or spec than ", count, " layers take");
  return h;
}

at::Tensor decode_layers(const at::Tensor& embeds, const at::Tensor& rope_table, const at::Tensor& positions,
                         at::TensorList weights, at::IntArrayRef spec, int64_t count, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const at::Tensor& slots, const at::Tensor& rows,
                         const at::Tensor& seqs, const at::Tensor& tables, const at::Tensor& lens, int64_t block_size,
                         int64_t heads, int64_t kv_heads, double eps) {
  TORCH_CHECK(decode_supported(), "decode_layers: built for another instruction set than ATen runs");
  TORCH_CHECK(embeds.dim() == 2 && embeds.is_contiguous(), "decode_layers: embeds must be dense [T, hidden]");
  TORCH_CHECK(rope_table.is_contiguous() && rope_table.scalar_type() == embeds.scalar_type() &&
                  rope_table.dim() == 4 && rope_table.size(3) == k_cache.size(3),
              "decode_layers: the rotary table must be [2, positions, 1, head_dim] of the model's dtype");
  TORCH_CHECK(positions.is_contiguous() && positions.size(0) == embeds.size(0) && rows.size(0) == embeds.size(0),
              "decode_layers: one position and one paged row per token");
  Reader read{weights, spec};
  auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return layers<T>(embeds, rope_table, positions, read, count, k_cache, v_cache, slots, rows, seqs, tables, lens,
                     block_size, heads, kv_heads, eps);
  };
  if (embeds.scalar_type() == at::kBFloat16) return run(static_cast<c10::BFloat16*>(nullptr));
  TORCH_CHECK(embeds.scalar_type() == at::kFloat, "decode_layers: float32 or bfloat16 only");
  return run(static_cast<float*>(nullptr));
}

}  // namespace
}  // namespace levante

TORCH_LIBRARY_IMPL(levante, CPU, m) { m.impl("decode_layers", &levante::decode_layers); }
TORCH_LIBRARY_FRAGMENT(levante, m) { m.def("decode_supported() -> bool", &levante::decode_supported); }
