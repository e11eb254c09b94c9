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
#include <torch/custom_class.h>
#include <torch/library.h>

#include <omp.h>

#include <cmath>
#include <cstring>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <variant>
#include <vector>

#include "gemm.h"
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

// apply_rope of one head: y[i] = x·cos + rotate_half(x)·sin, each product and the sum rounded.
template <typename T>
inline void rope_head(const T* x, const T* c, const T* s, T* y, int64_t d) {
  const int64_t half = d / 2;
  const vf minus = vset1(-1.f);
  for (const int64_t lo : {int64_t{0}, half}) {  // the first half turns with −x[i + half], the second with x[i − half]
    for (int64_t i = lo; i < lo + half; i += kLanes) {
      const int64_t n = std::min(kLanes, lo + half - i);
      const vf turned = lo == 0 ? vmul(vload_n(x + i + half, n), minus) : vload_n(x + i - half, n);
      const vf a = vround<T>(vmul(vload_n(x + i, n), vload_n(c + i, n)));
      const vf b = vround<T>(vmul(turned, vload_n(s + i, n)));
      vstore_n(y + i, vadd(a, b), n);
    }
  }
}

// apply_rope over the first `heads` heads of each row of qkv → out [rows, heads, d].
template <typename T>
void rope(const at::Tensor& qkv, int64_t heads, int64_t d, const at::Tensor& table, const at::Tensor& positions,
          at::Tensor& out) {
  const int64_t rows = qkv.size(0), ld = qkv.stride(0), P = table.size(1);
  const T* x = qkv.data_ptr<T>();
  const T* cs = table.data_ptr<T>();  // [2, positions, 1, d]
  const int64_t* pos = positions.data_ptr<int64_t>();
  T* y = out.data_ptr<T>();
  at::parallel_for(0, rows, grain(heads * d), [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      TORCH_CHECK(pos[t] >= 0 && pos[t] < P, "decode_layers: position ", pos[t], " past the rotary table");
      for (int64_t h = 0; h < heads; ++h)
        rope_head(x + t * ld + h * d, cs + pos[t] * d, cs + (P + pos[t]) * d, y + (t * heads + h) * d, d);
    }
  });
}

// silu(gate) · up for columns [c0, c1) of one row: silu rounded to T, then the product. ATen's SiLU
// kernel takes exp from its vectors over each row's first `head` columns (whole multiples of two
// vectors of T) and std::exp over the rest; so here. c0 and c1 lie on multiples of kSiluColumns or
// at the row's end, so a split of the row into such ranges gives the same bits. `e`: c1 − c0 floats.
constexpr int64_t kSiluColumns = 64;  // a multiple of two vectors of any T at any width

template <typename T>
inline void silu_cols(const T* gate, const T* up, T* y, int64_t c0, int64_t c1, int64_t head, int lanes, float* e) {
  const vf one = vset1(1.f);
  for (int64_t i = c0; i < c1; ++i) e[i - c0] = -static_cast<float>(gate[i]);
  const int64_t split = std::clamp(head, c0, c1);
  vector_exp(e, e, split - c0, lanes);
  for (int64_t i = split; i < c1; ++i) e[i - c0] = std::exp(e[i - c0]);
  for (int64_t i = c0; i < c1; i += kLanes) {
    const int64_t m = std::min(kLanes, c1 - i);
    const vf silu = vround<T>(vdiv(vload_n(gate + i, m), vadd(one, vload_n(e + i - c0, m))));
    vstore_n(y + i, vmul(silu, vload_n(up + i, m)), m);
  }
}

// The columns of one row of n that ATen's SiLU takes exp of from its vectors.
template <typename T>
int64_t silu_head(int64_t n) {
  const int lanes = aten_lanes();
  const int64_t step = 2 * lanes * static_cast<int64_t>(sizeof(float) / sizeof(T));
  return lanes ? n / step * step : 0;
}

// silu(gate) · up over rows [gate | up] of 2·n.
template <typename T>
at::Tensor silu_mul(const at::Tensor& gu) {
  const int64_t rows = gu.size(0), n = gu.size(1) / 2, head = silu_head<T>(n);
  at::Tensor out = at::empty({rows, n}, gu.options());
  const T* g = gu.data_ptr<T>();
  T* y = out.data_ptr<T>();
  at::parallel_for(0, rows, grain(n), [&](int64_t first, int64_t last) {
    std::vector<float> e(n);
    for (int64_t r = first; r < last; ++r) silu_cols(g + r * 2 * n, g + r * 2 * n + n, y + r * n, 0, n, head, aten_lanes(), e.data());
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

// A decode step (a few rows: fewer than quant_linear streams, kStepRows) in one parallel region for
// the whole step instead of a fork and join, tensor allocations and checks per kernel call: ~1 ms of
// a demo token's ~10 went to those, and a small projection read its weights at half the rate of a
// large one. Every thread keeps its own copy of the residual stream and computes the row-wise work
// (norms, residual adds) itself; the projections' outputs, rotary heads, attention heads and SiLU
// columns are dealt among the threads (gemm.h's shares), with a barrier where one phase reads what
// the last wrote. Each value is computed by the same function on the same inputs as in `layers`,
// so the same bits.
constexpr int64_t kStepRows = 16;

template <typename T>
struct Projection {
  const T* dense = nullptr;  // [N, K]
  std::optional<QuantWeights> quant;
  int64_t N = 0, K = 0;

  int64_t items() const { return quant ? quant->groups() : gemm_tile_count(N); }
};

template <typename T>
struct StepLayer {
  const T *input_norm = nullptr, *post_norm = nullptr;
  Projection<T> qkv, o, gate_up, down;
};

// The phases of a layer that deal out work, in the order they run.
enum Phase { kQkv, kRope, kAttend, kO, kGateUp, kSilu, kDown, kPhases };

template <typename T>
struct ThreadState {
  std::vector<T> h, x, k;  // the residual stream, the normed rows, one roped K head
  std::vector<float> e;    // SiLU's exponentials for one range of columns
  AttentionScratch attention;
  QuantThread quant;
  ThreadState(int64_t hidden, int64_t features, int64_t d, int64_t bs)
      : h(kStepRows * hidden), x(kStepRows * hidden), k(d), e(kSiluColumns), attention(1, d, bs),
        quant(kStepRows, features) {}
};

// Reads a projection, checked as linear / quant_linear check it; false (read past) for dense
// weights packed for AMX tiles, which only the per-call kernels take.
template <typename T>
bool read_projection(Reader& read, int64_t K, int64_t N, const char* name, Projection<T>& p) {
  const int64_t parts = read.value(), size = read.value();
  p.K = K;
  if (parts == 0) {
    const at::Tensor& w = read.next();
    if (w.dim() == 5) return false;
    TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == c10::CppTypeToScalarType<T>::value &&
                    w.size(0) == size && w.size(1) == K,
                "decode_layers: the ", name, " weight must be dense [", size, ", ", K, "] of the model's dtype");
    p.dense = w.data_ptr<T>(), p.N = size;
  } else {
    TORCH_CHECK(size == K, "decode_layers: the ", name, " projection takes ", size, " features, not ", K);
    TORCH_CHECK(read.s + parts <= read.spec.size() && read.w + parts <= read.weights.size(),
                "decode_layers: a projection ends early");
    p.quant.emplace(read.weights.slice(read.w, parts), read.spec.slice(read.s, parts), K);
    read.s += parts, read.w += parts;
    p.N = p.quant->outputs();
  }
  TORCH_CHECK(N < 0 || p.N == N, "decode_layers: the ", name, " projection has ", p.N, " outputs, not ", N);
  return true;
}

template <typename T>
const T* read_norm(Reader& read, int64_t hidden) {
  const at::Tensor& w = read.norm();
  TORCH_CHECK(w.dim() == 1 && w.size(0) == hidden && w.is_contiguous() &&
                  w.scalar_type() == c10::CppTypeToScalarType<T>::value,
              "decode_layers: a norm's weight must be [", hidden, "] of the model's dtype");
  return w.data_ptr<T>();
}

// The layers as `Step` runs them, every weight checked; nullopt where one is packed for AMX tiles.
template <typename T>
std::optional<std::vector<StepLayer<T>>> step_layers(at::TensorList weights, at::IntArrayRef spec, int64_t count,
                                                     int64_t hidden, int64_t hq, int64_t hkv, int64_t d) {
  TORCH_CHECK(count > 0, "decode_layers: no layers");
  Reader read{weights, spec};
  std::vector<StepLayer<T>> layers(count);
  bool dense = true;
  for (StepLayer<T>& layer : layers) {
    layer.input_norm = read_norm<T>(read, hidden);
    dense &= read_projection(read, hidden, (hq + 2 * hkv) * d, "qkv", layer.qkv);
    dense &= read_projection(read, hq * d, hidden, "o", layer.o);
    layer.post_norm = read_norm<T>(read, hidden);
    dense &= read_projection(read, hidden, -1, "gate_up", layer.gate_up);
    const int64_t inter = layers[0].gate_up.N / 2;
    TORCH_CHECK(layer.gate_up.N == 2 * inter, "decode_layers: every gate_up must have ", 2 * inter, " outputs");
    dense &= read_projection(read, inter, hidden, "down", layer.down);
  }
  TORCH_CHECK(read.w == read.weights.size() && read.s == read.spec.size(),
              "decode_layers: more weights or spec than ", count, " layers take");
  if (!dense) return std::nullopt;
  return layers;
}

// What the per-call kernels check as they go, checked before `Step`'s parallel region.
void check_step(const at::Tensor& rope_table, const at::Tensor& positions, const at::Tensor& k_cache,
                const at::Tensor& v_cache, const at::Tensor& slots, const at::Tensor& rows, const at::Tensor& seqs,
                const at::Tensor& tables, const at::Tensor& lens, int64_t count, int64_t hkv) {
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.scalar_type() == v_cache.scalar_type() && k_cache.dim() == 4 && k_cache.size(0) >= count &&
                  k_cache.size(1) == hkv && k_cache.size(3) == rope_table.size(3),
              "decode_layers: the caches must be dense [layers, kv_heads, slots, head_dim] of one dtype");
  TORCH_CHECK(rows.is_contiguous() && seqs.is_contiguous() && tables.is_contiguous() && lens.is_contiguous(),
              "decode_layers: rows, seqs, tables and lens must be dense");
  TORCH_CHECK(slots.is_contiguous() && slots.size(0) == positions.size(0), "decode_layers: one slot per token");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t r = 0; r < positions.size(0); ++r) {
    TORCH_CHECK(pos[r] >= 0 && pos[r] < rope_table.size(1), "decode_layers: position ", pos[r],
                " past the rotary table");
    TORCH_CHECK(slot[r] >= 0 && slot[r] < k_cache.size(2), "write_kv: slot ", slot[r], " out of range");
  }
}

// A model's layers ready for decode steps: weights checked and laid out once, buffers for up to
// kStepRows − 1 rows allocated once (per thread as threads are first asked for).
template <typename T>
class Step {
 public:
  Step(std::vector<StepLayer<T>> layers, int64_t hidden, int64_t hq, int64_t hkv, int64_t d, int64_t block_size,
       double eps)
      : layers_(std::move(layers)), hidden_(hidden), inter_(layers_[0].gate_up.N / 2), hq_(hq), hkv_(hkv), d_(d),
        bs_(block_size), eps_(eps), qkv_(kStepRows * (hq + 2 * hkv) * d), q_(kStepRows * hq * d),
        attended_(kStepRows * hq * d), o_(kStepRows * hidden), gu_(kStepRows * 2 * inter_),
        act_(kStepRows * inter_), down_(kStepRows * hidden) {
    TORCH_CHECK(hkv > 0 && hq % hkv == 0, "decode_layers: ", hq, " heads do not share ", hkv, " KV heads");
    TORCH_CHECK(d % kLanes == 0, "paged_attention: head_dim must be a multiple of ", kLanes);
  }

  template <typename C>
  at::Tensor run(const at::Tensor& embeds, const at::Tensor& rope_table, const at::Tensor& positions,
                 const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots, const at::Tensor& rows,
                 const at::Tensor& seqs, const at::Tensor& tables, const at::Tensor& lens);

 private:
  int64_t items(int64_t l, Phase phase, int64_t t) const {
    const StepLayer<T>& layer = layers_[l];
    switch (phase) {
      case kQkv: return layer.qkv.items();
      case kRope: return t * (hq_ + hkv_);
      case kAttend: return t * hq_;
      case kO: return layer.o.items();
      case kGateUp: return layer.gate_up.items();
      case kSilu: return t * ((inter_ + kSiluColumns - 1) / kSiluColumns);
      default: return layer.down.items();
    }
  }

  std::vector<StepLayer<T>> layers_;
  int64_t hidden_, inter_, hq_, hkv_, d_, bs_;
  double eps_;
  // what more than one thread reads: the projections' outputs, roped queries, attention's output
  std::vector<T> qkv_, q_, attended_, o_, gu_, act_, down_;
  std::vector<ThreadState<T>> threads_;
  std::vector<Share> shares_;
};

template <typename T>
template <typename C>
at::Tensor Step<T>::run(const at::Tensor& embeds, const at::Tensor& rope_table, const at::Tensor& positions,
                        const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
                        const at::Tensor& rows, const at::Tensor& seqs, const at::Tensor& tables,
                        const at::Tensor& lens) {
  const int64_t t = embeds.size(0), hidden = hidden_, inter = inter_, hq = hq_, hkv = hkv_, d = d_;
  const int64_t count = layers_.size(), qkv_width = (hq + 2 * hkv) * d, P = rope_table.size(1);
  const int64_t cache_slots = k_cache.size(2), head = silu_head<T>(inter), lanes = aten_lanes();
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  while (static_cast<int64_t>(threads_.size()) < threads)
    threads_.emplace_back(hidden, std::max({hidden, hq * d, inter}), d, bs_);
  if (static_cast<int64_t>(shares_.size()) < count * kPhases * threads)
    shares_ = std::vector<Share>(count * kPhases * threads);
  Share* shares = shares_.data();
  for (int64_t l = 0; l < count; ++l)
    for (int phase = 0; phase < kPhases; ++phase)
      deal(shares + (l * kPhases + phase) * threads, items(l, static_cast<Phase>(phase), t), threads);
  for (int64_t i = 0; i < threads; ++i)
    std::memcpy(threads_[i].h.data(), embeds.data_ptr<T>(), t * hidden * sizeof(T));

  const T* cs = rope_table.data_ptr<T>();  // [2, positions, 1, d]
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  C* kc = k_cache.data_ptr<C>();
  C* vc = v_cache.data_ptr<C>();
  const int64_t layer_stride = hkv * cache_slots * d;
  T *qkv = qkv_.data(), *q = q_.data(), *attended = attended_.data(), *o = o_.data(), *gu = gu_.data(),
    *act = act_.data(), *down = down_.data();
  const Paged<T, C> paged{q, kc, vc, rows.data_ptr<int64_t>(), seqs.data_ptr<int64_t>(), tables.data_ptr<int64_t>(),
                          lens.data_ptr<int64_t>(), attended, tables.size(1), hq * d, hq, hkv, d, cache_slots, bs_,
                          1.f / std::sqrt(static_cast<float>(d))};

#pragma omp parallel num_threads(threads)
  {
    const int64_t me = omp_get_thread_num();
    ThreadState<T>& mine = threads_[me];
    T *h = mine.h.data(), *x = mine.x.data();
    for (int64_t l = 0; l < count; ++l) {
      const StepLayer<T>& layer = layers_[l];
      auto dealt = [&](Phase phase, auto&& f) {
        take_shares(shares + (l * kPhases + phase) * threads, items(l, phase, t), threads, me, f);
      };
      auto project = [&](Phase phase, const Projection<T>& p, const T* in, T* out) {
        if (p.quant) mine.quant.quantize(in, p.K, t, p.K);  // every thread rounds x for itself
        dealt(phase, [&](int64_t first, int64_t last) {
          if (p.quant) return mine.quant.multiply(*p.quant, t, out, first, last);
          gemm_tiles(in, p.K, p.dense, out, t, p.N, p.K, first, last);
        });
#pragma omp barrier
      };
      auto residual = [&](const T* delta) {
        for (int64_t i = 0; i < t * hidden; i += kLanes) {
          const int64_t m = std::min(kLanes, t * hidden - i);
          vstore_n(h + i, vadd(vload_n(h + i, m), vload_n(delta + i, m)), m);
        }
      };

      for (int64_t r = 0; r < t; ++r) norm_row(h + r * hidden, layer.input_norm, x + r * hidden, hidden, eps_);
      project(kQkv, layer.qkv, x, qkv);
      dealt(kRope, [&](int64_t first, int64_t last) {  // a query head, or a KV head: K roped, K and V stored
        for (int64_t task = first; task < last; ++task) {
          const int64_t r = task / (hq + hkv), j = task % (hq + hkv);
          const T* c = cs + pos[r] * d;
          const T* in = qkv + r * qkv_width + j * d;
          if (j < hq) {
            rope_head(in, c, c + P * d, q + (r * hq + j) * d, d);
            continue;
          }
          rope_head(in, c, c + P * d, mine.k.data(), d);
          const int64_t at = l * layer_stride + ((j - hq) * cache_slots + slot[r]) * d;
          store_head(mine.k.data(), kc + at, d);
          store_head(in + hkv * d, vc + at, d);
        }
      });
#pragma omp barrier
      Paged<T, C> cache = paged;  // this layer's
      cache.kc += l * layer_stride, cache.vc += l * layer_stride;
      dealt(kAttend, [&](int64_t first, int64_t last) {
        for (int64_t task = first; task < last; ++task)
          attend_heads(cache, task / hq, task % hq, task % hq + 1, mine.attention);
      });
#pragma omp barrier
      project(kO, layer.o, attended, o);
      residual(o);
      for (int64_t r = 0; r < t; ++r) norm_row(h + r * hidden, layer.post_norm, x + r * hidden, hidden, eps_);
      project(kGateUp, layer.gate_up, x, gu);
      const int64_t spans = (inter + kSiluColumns - 1) / kSiluColumns;
      dealt(kSilu, [&](int64_t first, int64_t last) {
        for (int64_t task = first; task < last; ++task) {
          const int64_t r = task / spans, c0 = task % spans * kSiluColumns;
          silu_cols(gu + r * 2 * inter, gu + r * 2 * inter + inter, act + r * inter, c0,
                    std::min(inter, c0 + kSiluColumns), head, lanes, mine.e.data());
        }
      });
#pragma omp barrier
      project(kDown, layer.down, act, down);
      residual(down);
    }
  }
  at::Tensor out = at::empty({t, hidden}, embeds.options());
  std::memcpy(out.data_ptr<T>(), threads_[0].h.data(), t * hidden * sizeof(T));
  return out;
}

// decode_layers' model: the rotary table, every layer's weights (as engine/fused.py lays them out,
// see Reader) and shapes; a decode step (fewer than kStepRows rows) runs as one `Step`, anything
// larger (a prefill chunk in batch-invariant mode) layer by layer through the per-call kernels.
// Holds its own references to the weights' storage, so it reads what it was made with.
class DecodePlan : public torch::CustomClassHolder {
  // (defined first: the members below deduce their return types from these)
  template <typename F>
  auto with_dtype(F&& f) {
    if (rope_.scalar_type() == at::kBFloat16) return f(static_cast<c10::BFloat16*>(nullptr));
    return f(static_cast<float*>(nullptr));
  }
  int64_t hidden() const { return weights_[0].size(0); }  // the first layer's input norm's

 public:
  DecodePlan(const at::Tensor& rope, const std::vector<at::Tensor>& weights, std::vector<int64_t> spec, int64_t count,
             int64_t block_size, int64_t heads, int64_t kv_heads, double eps)
      : rope_(rope), spec_(std::move(spec)), count_(count), block_size_(block_size), hq_(heads), hkv_(kv_heads),
        eps_(eps) {
    TORCH_CHECK(decode_supported(), "decode_layers: built for another instruction set than ATen runs");
    TORCH_CHECK(rope.is_contiguous() && rope.dim() == 4 && rope.size(0) == 2 && rope.size(2) == 1 &&
                    (rope.scalar_type() == at::kBFloat16 || rope.scalar_type() == at::kFloat),
                "decode_layers: the rotary table must be [2, positions, 1, head_dim] of float32 or bfloat16");
    TORCH_CHECK(!weights.empty() && weights[0].dim() == 1, "decode_layers: the weights begin with a norm's");
    for (const at::Tensor& w : weights) weights_.push_back(w.alias());  // a later `.data =` leaves these be
    with_dtype([&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      auto layers = step_layers<T>(weights_, spec_, count_, hidden(), hq_, hkv_, rope.size(3));
      if (layers) step_.template emplace<Step<T>>(std::move(*layers), hidden(), hq_, hkv_, rope.size(3), block_size_, eps_);
      return 0;
    });
  }

  at::Tensor run(const at::Tensor& embeds, const at::Tensor& positions, const at::Tensor& k_cache,
                 const at::Tensor& v_cache, const at::Tensor& slots, const at::Tensor& rows, const at::Tensor& seqs,
                 const at::Tensor& tables, const at::Tensor& lens) {
    TORCH_CHECK(embeds.dim() == 2 && embeds.is_contiguous() && embeds.scalar_type() == rope_.scalar_type() &&
                    embeds.size(1) == hidden(),
                "decode_layers: embeds must be dense [T, ", hidden(), "] of the model's dtype");
    TORCH_CHECK(positions.is_contiguous() && positions.size(0) == embeds.size(0) && rows.size(0) == embeds.size(0),
                "decode_layers: one position and one paged row per token");
    const std::lock_guard<std::mutex> lock(mutex_);  // one step at a time: the buffers are the plan's
    return with_dtype([&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      const int64_t t = embeds.size(0);
      if (auto* step = std::get_if<Step<T>>(&step_); step && t > 0 && t < kStepRows) {
        check_step(rope_, positions, k_cache, v_cache, slots, rows, seqs, tables, lens, count_, hkv_);
        switch (k_cache.scalar_type()) {
          case at::kFloat8_e4m3fn:
            return step->template run<c10::Float8_e4m3fn>(embeds, rope_, positions, k_cache, v_cache, slots, rows,
                                                          seqs, tables, lens);
          case at::kFloat8_e5m2:
            return step->template run<c10::Float8_e5m2>(embeds, rope_, positions, k_cache, v_cache, slots, rows, seqs,
                                                        tables, lens);
          default:
            TORCH_CHECK(k_cache.scalar_type() == embeds.scalar_type(),
                        "decode_layers: the cache is the model's dtype or fp8");
            return step->template run<T>(embeds, rope_, positions, k_cache, v_cache, slots, rows, seqs, tables, lens);
        }
      }
      Reader read{weights_, spec_};
      return layers<T>(embeds, rope_, positions, read, count_, k_cache, v_cache, slots, rows, seqs, tables, lens,
                       block_size_, hq_, hkv_, eps_);
    });
  }

 private:
  at::Tensor rope_;
  std::vector<at::Tensor> weights_;
  std::vector<int64_t> spec_;
  int64_t count_, block_size_, hq_, hkv_;
  double eps_;
  std::variant<std::monostate, Step<float>, Step<c10::BFloat16>> step_;
  std::mutex mutex_;
};

at::Tensor decode_layers(const c10::intrusive_ptr<DecodePlan>& plan, const at::Tensor& embeds,
                         const at::Tensor& positions, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& slots, const at::Tensor& rows, const at::Tensor& seqs,
                         const at::Tensor& tables, const at::Tensor& lens) {
  return plan->run(embeds, positions, k_cache, v_cache, slots, rows, seqs, tables, lens);
}

}  // namespace
}  // namespace levante

TORCH_LIBRARY_FRAGMENT(levante, m) {
  m.def("decode_supported() -> bool", &levante::decode_supported);
  m.class_<levante::DecodePlan>("DecodePlan")
      .def(torch::init<at::Tensor, std::vector<at::Tensor>, std::vector<int64_t>, int64_t, int64_t, int64_t, int64_t,
                       double>());
  m.def(
      "decode_layers(__torch__.torch.classes.levante.DecodePlan plan, Tensor embeds, Tensor positions, "
      "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, Tensor rows, Tensor seqs, Tensor tables, Tensor lens) "
      "-> Tensor");
}
TORCH_LIBRARY_IMPL(levante, CPU, m) { m.impl("decode_layers", &levante::decode_layers); }
