// The whole model for a step whose rows are all paged (each decode step; in batch-invariant mode
// each text step) in one call, from token ids to float32 logits: the kernels the eager model calls
// one operator at a time (embedding rows, rms_norm, linear or quant_linear, write_kv,
// paged_attention, the LM head) on the same values in the same order, and the elementwise work
// between them (rotary, SiLU·mul, residual adds) done as ATen does it for eager: each product,
// quotient and sum in float32, rounded to the model's dtype where an eager operator hands back a
// tensor, and SiLU's exp from the same function ATen's kernel calls for the same element. So the
// same bits as the eager step, without a few hundred operator calls from Python (or from a
// compiled graph's wrapper) per token; a decode step without a fork and join per kernel either
// (see Step).
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
      TORCH_CHECK(pos[t] >= 0 && pos[t] < P, "fused_step: position ", pos[t], " past the rotary table");
      for (int64_t h = 0; h < heads; ++h)
        rope_head(x + t * ld + h * d, cs + pos[t] * d, cs + (P + pos[t]) * d, y + (t * heads + h) * d, d);
    }
  });
}

// silu(gate) · up for columns [c0, c1) of one row: silu rounded to T, then the product. ATen's SiLU
// kernel takes exp from its vectors over each row's first `head` columns (whole multiples of two
// vectors of T, so a multiple of 16) and std::exp over the rest; so here. c0 and c1 lie on multiples
// of 16 or at the row's end, so a split of the row into such ranges gives the same bits. `e`: c1 − c0
// floats.

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

// y = a + b over elements [first, last), rounded: the residual add (y may be a).
template <typename T>
inline void add_range(const T* a, const T* b, T* y, int64_t first, int64_t last) {
  for (int64_t i = first; i < last; i += kLanes) {
    const int64_t m = std::min(kLanes, last - i);
    vstore_n(y + i, vadd(vload_n(a + i, m), vload_n(b + i, m)), m);
  }
}

template <typename T>
at::Tensor add(const at::Tensor& h, const at::Tensor& delta) {
  at::Tensor out = at::empty_like(h);
  const int64_t n = h.numel();
  at::parallel_for(0, (n + kLanes - 1) / kLanes, 16384 / kLanes, [&](int64_t first, int64_t last) {
    add_range(h.data_ptr<T>(), delta.data_ptr<T>(), out.data_ptr<T>(), first * kLanes, std::min(n, last * kLanes));
  });
  return out;
}

// The model's weights as Python lays them out (engine/fused.py): the token embedding; per layer the
// input norm's weight, the qkv and o projections, the post-attention norm's weight, the gate_up and
// down projections; the final norm's weight and the LM head. A projection (or the embedding) is
// described in `spec` by (parts, size, types…): parts 0 is one dense weight with `size` outputs
// (kernels.linear; an embedding [size, hidden]), parts n > 0 is n GGUF block tensors of `size` inputs.
struct Reader {
  at::TensorList weights;
  at::IntArrayRef spec;
  size_t w = 0, s = 0;

  const at::Tensor& next() {
    TORCH_CHECK(w < weights.size(), "fused_step: fewer weights than the spec describes");
    return weights[w++];
  }
  int64_t value() {
    TORCH_CHECK(s < spec.size(), "fused_step: the spec ends early");
    return spec[s++];
  }
};

// A projection, or the token embedding, read from its spec and checked as kernels.linear /
// kernels.quant_linear check their arguments.
template <typename T>
struct Projection {
  at::Tensor weight;  // dense [N, K], packed by pack_linear: rows interleaved, or AMX tiles (then only `apply` takes it)
  std::vector<at::Tensor> blocks;  // or GGUF blocks, read by `quant`
  std::optional<QuantWeights> quant;
  int64_t N = 0, K = 0;

  // K inputs (-1: the embedding's, taken from its weight) and N outputs (-1: any)
  Projection(Reader& read, int64_t K_, int64_t N_, const char* name) : K(K_) {
    const int64_t parts = read.value(), size = read.value();
    if (parts == 0) {
      weight = read.next().alias();  // a later `.data =` on the module's tensor leaves these be
      K = K < 0 && weight.dim() == 2 ? weight.size(1) : K, N = size;
      constexpr int64_t step = Dot<T>::step;
      const bool rows = weight.dim() == 2 && weight.size(0) == size && weight.size(1) == K;
      const bool packed = weight.dim() == 4 && weight.size(0) == gemm_tile_count(size) &&
                          weight.size(1) == (K + step - 1) / step && weight.size(2) == NR && weight.size(3) == step;
      TORCH_CHECK(weight.dim() == 5 || ((rows || packed) && weight.is_contiguous() &&
                                        weight.scalar_type() == c10::CppTypeToScalarType<T>::value),
                  "fused_step: the ", name, " weight must be dense [", size, ", ", K, "] (or packed) of the model's dtype");
    } else {
      TORCH_CHECK(K < 0 || size == K, "fused_step: the ", name, " projection takes ", size, " features, not ", K);
      TORCH_CHECK(read.s + parts <= read.spec.size() && read.w + parts <= read.weights.size(),
                  "fused_step: the ", name, " weights end early");
      K = size;
      for (const at::Tensor& b : read.weights.slice(read.w, parts)) blocks.push_back(b.alias());
      quant.emplace(blocks, read.spec.slice(read.s, parts), K);
      read.s += parts, read.w += parts;
      N = quant->outputs();
    }
    TORCH_CHECK(N_ < 0 || N == N_, "fused_step: the ", name, " projection has ", N, " outputs, not ", N_);
  }

  bool in_step() const { return quant || weight.dim() != 5; }  // not packed for AMX
  // the units a step deals out: quantized groups of 16 outputs, or NR-wide tiles
  int64_t per_item() const { return quant ? 16 : NR; }
  int64_t items() const { return (N + per_item() - 1) / per_item(); }
  at::Tensor apply(const at::Tensor& x) const { return quant ? quant->apply(x) : linear(x, weight, N); }
  void row(int64_t i, T* y) const {  // row i of an embedding
    if (quant) return quant->dequantize(i, y);
    std::memcpy(y, weight.data_ptr<T>() + i * K, K * sizeof(T));
  }
};

template <typename T>
at::Tensor read_norm(Reader& read, int64_t hidden) {
  const at::Tensor w = read.next().alias();
  TORCH_CHECK(w.dim() == 1 && w.size(0) == hidden && w.is_contiguous() &&
                  w.scalar_type() == c10::CppTypeToScalarType<T>::value,
              "fused_step: a norm's weight must be [", hidden, "] of the model's dtype");
  return w;
}

template <typename T>
struct Layer {
  at::Tensor input_norm;
  Projection<T> qkv, o;
  at::Tensor post_norm;
  Projection<T> gate_up, down;

  Layer(Reader& read, int64_t hidden, int64_t qkv_outputs, int64_t attended, int64_t inter)
      : input_norm(read_norm<T>(read, hidden)),
        qkv(read, hidden, qkv_outputs, "qkv"),
        o(read, attended, hidden, "o"),
        post_norm(read_norm<T>(read, hidden)),
        gate_up(read, hidden, inter < 0 ? -1 : 2 * inter, "gate_up"),
        down(read, gate_up.N / 2, hidden, "down") {
    TORCH_CHECK(gate_up.N % 2 == 0, "fused_step: gate_up has an odd number of outputs");
  }
  bool in_step() const { return qkv.in_step() && o.in_step() && gate_up.in_step() && down.in_step(); }
};

// Every weight of the model, read and checked once.
template <typename T>
struct ModelWeights {
  using Scalar = T;
  Projection<T> embed;
  std::vector<Layer<T>> layers;
  at::Tensor norm;
  std::optional<Projection<T>> head;

  ModelWeights(Reader& read, int64_t count, int64_t hq, int64_t hkv, int64_t d)
      : embed(read, -1, -1, "embedding") {
    TORCH_CHECK(embed.quant || embed.weight.dim() == 2, "fused_step: the embedding must be dense or GGUF rows");
    TORCH_CHECK(count > 0, "fused_step: no layers");
    const int64_t hidden = embed.K;
    layers.reserve(count);
    for (int64_t l = 0; l < count; ++l)
      layers.emplace_back(read, hidden, (hq + 2 * hkv) * d, hq * d, l ? layers[0].gate_up.N / 2 : -1);
    norm = read_norm<T>(read, hidden);
    head.emplace(read, hidden, -1, "LM head");
    TORCH_CHECK(read.w == read.weights.size() && read.s == read.spec.size(),
                "fused_step: more weights or spec than ", count, " layers take");
  }
  int64_t hidden() const { return embed.K; }
  bool in_step() const {
    return head->in_step() && std::all_of(layers.begin(), layers.end(), [](const Layer<T>& l) { return l.in_step(); });
  }
};

// The step layer by layer through the per-call kernels (a prefill chunk in batch-invariant mode,
// weights packed for AMX tiles): hidden rows in, hidden rows out.
template <typename T>
at::Tensor layers(at::Tensor h, const ModelWeights<T>& model, const at::Tensor& rope_table,
                  const at::Tensor& positions, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& slots, const at::Tensor& rows, const at::Tensor& seqs, const at::Tensor& tables,
                  const at::Tensor& lens, int64_t block_size, int64_t hq, int64_t hkv, double eps) {
  const int64_t t = h.size(0), d = k_cache.size(3);
  for (int64_t l = 0; l < static_cast<int64_t>(model.layers.size()); ++l) {
    const Layer<T>& layer = model.layers[l];
    const at::Tensor qkv = layer.qkv.apply(rms_norm(h, layer.input_norm, eps)).view({t, hq + 2 * hkv, d});
    at::Tensor qk = at::empty({t, hq + hkv, d}, h.options());
    rope<T>(qkv, hq + hkv, d, rope_table, positions, qk);
    write_kv(k_cache, v_cache, l, slots, qk.narrow(1, hq, hkv), qkv.narrow(1, hq + hkv, hkv));
    const at::Tensor attended = at::empty({t, hq, d}, h.options());
    paged_attention(qk.narrow(1, 0, hq), k_cache.select(0, l), v_cache.select(0, l), rows, seqs, tables, lens,
                    block_size, attended);
    h = add<T>(h, layer.o.apply(attended.view({t, hq * d})));
    h = add<T>(h, layer.down.apply(silu_mul<T>(layer.gate_up.apply(rms_norm(h, layer.post_norm, eps)))));
  }
  return h;
}

// A decode step (a few rows: fewer than quant_linear streams, kStepRows) in one parallel region for
// the whole step instead of a fork and join, tensor allocations and checks per kernel call: ~1 ms of
// a demo token's ~10 went to those, and a small projection read its weights at half the rate of a
// large one. Every thread keeps its own copy of the residual stream and computes the row-wise work
// (embedding rows, norms, residual adds) itself; the projections' outputs, rotary heads, attention
// heads and SiLU columns are dealt among the threads (gemm.h's shares), with a barrier where one
// phase reads what the last wrote. Each value is computed by the same function on the same inputs
// as in `layers` and the per-call kernels, so the same bits.
constexpr int64_t kStepRows = 16;

// The phases of a layer that deal out work, in the order they run; the LM head's after the last.
// Gate_up's items are 16 columns of the gate with the same 16 of up, SiLU·mul applied to them by
// the thread that computed them.
enum Phase { kQkv, kRope, kAttend, kO, kGateUp, kDown, kPhases };
constexpr int64_t kColumns = 16;  // of gate and of up, an item of kGateUp: a quantized group, NR-wide tiles

template <typename T>
struct ThreadState {
  std::vector<T> h, x, k;  // the residual stream, the normed rows, one roped K head
  std::vector<float> e;    // SiLU's exponentials for one range of columns
  AttentionScratch attention;
  QuantThread quant;
  ThreadState(int64_t hidden, int64_t features, int64_t d, int64_t bs)
      : h(kStepRows * hidden), x(kStepRows * hidden), k(d), e(kColumns), attention(1, d, bs),
        quant(kStepRows, features) {}
};

// What the per-call kernels check as they go, checked before `Step`'s parallel region.
void check_step(const at::Tensor& ids, const at::Tensor& rope_table, const at::Tensor& positions,
                const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots, const at::Tensor& rows,
                const at::Tensor& seqs, const at::Tensor& tables, const at::Tensor& lens, const at::Tensor& keep,
                int64_t count, int64_t hkv, int64_t vocab, int64_t block_size) {
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.scalar_type() == v_cache.scalar_type() && k_cache.dim() == 4 && k_cache.size(0) >= count &&
                  k_cache.size(1) == hkv && k_cache.size(3) == rope_table.size(3),
              "fused_step: the caches must be dense [layers, kv_heads, slots, head_dim] of one dtype");
  for (const at::Tensor* index : {&ids, &positions, &slots, &rows, &seqs, &tables, &lens, &keep})
    TORCH_CHECK(index->is_contiguous() && index->scalar_type() == at::kLong,
                "fused_step: ids, positions, slots, rows, seqs, tables, lens and keep must be dense int64");
  const int64_t t = ids.size(0);
  TORCH_CHECK(ids.dim() == 1 && positions.size(0) == t && slots.size(0) == t && rows.size(0) == t,
              "fused_step: one position, slot and paged row per token");
  const int64_t *id = ids.data_ptr<int64_t>(), *pos = positions.data_ptr<int64_t>(), *slot = slots.data_ptr<int64_t>();
  for (int64_t r = 0; r < t; ++r) {
    TORCH_CHECK(id[r] >= 0 && id[r] < vocab, "fused_step: token id ", id[r], " outside the vocabulary");
    TORCH_CHECK(pos[r] >= 0 && pos[r] < rope_table.size(1), "fused_step: position ", pos[r], " past the rotary table");
    TORCH_CHECK(slot[r] >= 0 && slot[r] < k_cache.size(2), "write_kv: slot ", slot[r], " out of range");
  }
  TORCH_CHECK(keep.dim() == 1 && keep.numel() <= t, "fused_step: at most one kept row per token");
  const int64_t* kept = keep.data_ptr<int64_t>();
  for (int64_t i = 0; i < keep.numel(); ++i)
    TORCH_CHECK(kept[i] >= 0 && kept[i] < t, "fused_step: kept row ", kept[i], " is not one of the ", t, " rows");
  // what attention reads: each row's sequence, its context's blocks of the cache
  TORCH_CHECK(tables.dim() == 2 && seqs.size(0) == t && lens.size(0) == t, "fused_step: one sequence and length per row");
  const int64_t *row = rows.data_ptr<int64_t>(), *seq = seqs.data_ptr<int64_t>(), *len = lens.data_ptr<int64_t>();
  const int64_t *table = tables.data_ptr<int64_t>(), width = tables.size(1), blocks = k_cache.size(2) / block_size;
  for (int64_t b = 0; b < t; ++b) {
    TORCH_CHECK(row[b] >= 0 && row[b] < t, "fused_step: paged row ", row[b], " is not one of the ", t, " rows");
    TORCH_CHECK(seq[b] >= 0 && seq[b] < tables.size(0), "fused_step: sequence ", seq[b], " has no block table");
    TORCH_CHECK(len[b] > 0 && len[b] <= width * block_size, "fused_step: a context of ", len[b],
                " tokens does not fit its block table");
    for (int64_t k = 0; k * block_size < len[b]; ++k)
      TORCH_CHECK(table[seq[b] * width + k] >= 0 && table[seq[b] * width + k] < blocks, "fused_step: block ",
                  table[seq[b] * width + k], " is not in the cache");
  }
}

// A model's weights ready for decode steps, with buffers for up to kStepRows − 1 rows allocated
// once (per thread as threads are first asked for).
template <typename T>
class Step {
 public:
  Step(const ModelWeights<T>& model, int64_t hq, int64_t hkv, int64_t d, int64_t block_size, double eps)
      : model_(model), hidden_(model.hidden()), inter_(model.layers[0].gate_up.N / 2), vocab_(model.head->N),
        hq_(hq), hkv_(hkv), d_(d), bs_(block_size), eps_(eps), qkv_(kStepRows * (hq + 2 * hkv) * d),
        q_(kStepRows * hq * d), attended_(kStepRows * hq * d), o_(kStepRows * hidden_), gu_(kStepRows * 2 * inter_),
        act_(kStepRows * inter_), down_(kStepRows * hidden_), logits_(kStepRows * vocab_) {
    TORCH_CHECK(hkv > 0 && hq % hkv == 0, "fused_step: ", hq, " heads do not share ", hkv, " KV heads");
    TORCH_CHECK(d % kLanes == 0, "paged_attention: head_dim must be a multiple of ", kLanes);
  }
  // whether the model's shapes are ones `run` takes (else every step goes kernel by kernel)
  static bool takes(const ModelWeights<T>& model) {
    return model.in_step() && model.layers[0].gate_up.N / 2 % kColumns == 0;
  }

  // float32 logits [keep, vocab] of the step's rows
  template <typename C>
  at::Tensor run(const at::Tensor& ids, const at::Tensor& rope_table, const at::Tensor& positions,
                 const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots, const at::Tensor& rows,
                 const at::Tensor& seqs, const at::Tensor& tables, const at::Tensor& lens, const at::Tensor& keep);

 private:
  int64_t items(int64_t l, Phase phase, int64_t t) const {
    if (l == static_cast<int64_t>(model_.layers.size())) return model_.head->items();
    const Layer<T>& layer = model_.layers[l];
    switch (phase) {
      case kQkv: return layer.qkv.items();
      case kRope: return t * (hq_ + hkv_);
      case kAttend: return t * hq_;
      case kO: return layer.o.items();
      case kGateUp: return inter_ / kColumns;
      default: return layer.down.items();
    }
  }

  const ModelWeights<T>& model_;
  int64_t hidden_, inter_, vocab_, hq_, hkv_, d_, bs_;
  double eps_;
  // what more than one thread reads: the projections' outputs, roped queries, attention's output
  std::vector<T> qkv_, q_, attended_, o_, gu_, act_, down_, logits_;
  std::vector<ThreadState<T>> threads_;
  std::vector<Share> shares_;
};

template <typename T>
template <typename C>
at::Tensor Step<T>::run(const at::Tensor& ids, const at::Tensor& rope_table, const at::Tensor& positions,
                        const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
                        const at::Tensor& rows, const at::Tensor& seqs, const at::Tensor& tables,
                        const at::Tensor& lens, const at::Tensor& keep) {
  const int64_t t = ids.size(0), kept = keep.numel(), hidden = hidden_, inter = inter_, hq = hq_, hkv = hkv_, d = d_;
  const int64_t count = model_.layers.size(), qkv_width = (hq + 2 * hkv) * d, P = rope_table.size(1);
  const int64_t cache_slots = k_cache.size(2), head = silu_head<T>(inter), lanes = aten_lanes();
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  while (static_cast<int64_t>(threads_.size()) < threads)
    threads_.emplace_back(hidden, std::max({hidden, hq * d, inter}), d, bs_);
  const int64_t sets = count * kPhases + 1;  // and the LM head's
  if (static_cast<int64_t>(shares_.size()) < sets * threads) shares_ = std::vector<Share>(sets * threads);
  Share* shares = shares_.data();
  for (int64_t l = 0; l < count; ++l)
    for (int phase = 0; phase < kPhases; ++phase)
      deal(shares + (l * kPhases + phase) * threads, items(l, static_cast<Phase>(phase), t), threads);
  deal(shares + count * kPhases * threads, items(count, kQkv, t), threads);

  at::Tensor out = at::empty({kept, vocab_}, ids.options().dtype(at::kFloat));
  float* logits_out = out.data_ptr<float>();
  const int64_t *id = ids.data_ptr<int64_t>(), *kept_rows = keep.data_ptr<int64_t>();
  const T* cs = rope_table.data_ptr<T>();  // [2, positions, 1, d]
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  C* kc = k_cache.data_ptr<C>();
  C* vc = v_cache.data_ptr<C>();
  const int64_t layer_stride = hkv * cache_slots * d;
  T *qkv = qkv_.data(), *q = q_.data(), *attended = attended_.data(), *o = o_.data(), *gu = gu_.data(),
    *act = act_.data(), *down = down_.data(), *logits = logits_.data();
  const Paged<T, C> paged{q, kc, vc, rows.data_ptr<int64_t>(), seqs.data_ptr<int64_t>(), tables.data_ptr<int64_t>(),
                          lens.data_ptr<int64_t>(), attended, tables.size(1), hq * d, hq, hkv, d, cache_slots, bs_,
                          1.f / std::sqrt(static_cast<float>(d))};

#pragma omp parallel num_threads(threads)
  {
    const int64_t me = omp_get_thread_num();
    ThreadState<T>& mine = threads_[me];
    T *h = mine.h.data(), *x = mine.x.data();
    auto dealt = [&](int64_t l, Phase phase, auto&& f) {
      take_shares(shares + (l * kPhases + phase) * threads, items(l, phase, t), threads, me, f);
    };
    // items [first, last) of y [m, N] = in [m, K]·wᵀ (Projection::per_item outputs each)
    auto multiply = [&](const Projection<T>& p, const T* in, int64_t m, T* y, int64_t first, int64_t last) {
      if (p.quant) return mine.quant.multiply(*p.quant, m, y, first, last);
      gemm_tiles(in, p.K, p.weight.template data_ptr<T>(), layout<T>(p.weight.dim() == 4, p.K), y, m, p.N, p.K,
                 first, last);
    };
    // y = in·wᵀ, dealt, `then` on each range of items as it is done; then a barrier
    auto project = [&](int64_t l, Phase phase, const Projection<T>& p, const T* in, int64_t m, T* y, auto&& then) {
      if (p.quant) mine.quant.quantize(in, p.K, m, p.K);  // every thread rounds x for itself
      dealt(l, phase, [&](int64_t first, int64_t last) {
        multiply(p, in, m, y, first, last);
        then(first, last);
      });
#pragma omp barrier
    };
    auto nothing = [](int64_t, int64_t) {};
    auto residual = [&](const T* delta) { add_range(h, delta, h, 0, t * hidden); };

    for (int64_t r = 0; r < t; ++r) model_.embed.row(id[r], h + r * hidden);
    for (int64_t l = 0; l < count; ++l) {
      const Layer<T>& layer = model_.layers[l];
      for (int64_t r = 0; r < t; ++r)
        norm_row(h + r * hidden, layer.input_norm.template data_ptr<T>(), x + r * hidden, hidden, eps_);
      project(l, kQkv, layer.qkv, x, t, qkv, nothing);
      dealt(l, kRope, [&](int64_t first, int64_t last) {  // a query head, or a KV head: K roped, K and V stored
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
      dealt(l, kAttend, [&](int64_t first, int64_t last) {
        for (int64_t task = first; task < last; ++task)
          attend_heads(cache, task / hq, task % hq, task % hq + 1, mine.attention);
      });
#pragma omp barrier
      project(l, kO, layer.o, attended, t, o, nothing);
      residual(o);
      for (int64_t r = 0; r < t; ++r)
        norm_row(h + r * hidden, layer.post_norm.template data_ptr<T>(), x + r * hidden, hidden, eps_);
      const Projection<T>& gate_up = layer.gate_up;
      if (gate_up.quant) mine.quant.quantize(x, hidden, t, hidden);
      const int64_t per = kColumns / gate_up.per_item();  // items of `multiply` in one of ours
      dealt(l, kGateUp, [&](int64_t first, int64_t last) {
        for (int64_t i = first; i < last; ++i) {
          multiply(gate_up, x, t, gu, i * per, (i + 1) * per);
          multiply(gate_up, x, t, gu, (inter / kColumns + i) * per, (inter / kColumns + i + 1) * per);
          for (int64_t r = 0; r < t; ++r)
            silu_cols(gu + r * 2 * inter, gu + r * 2 * inter + inter, act + r * inter, i * kColumns,
                      (i + 1) * kColumns, head, lanes, mine.e.data());
        }
      });
#pragma omp barrier
      project(l, kDown, layer.down, act, t, down, nothing);
      residual(down);
    }
    // the kept rows' final norm, the LM head over them, each output widened to float32 as it lands
    for (int64_t i = 0; i < kept; ++i)
      norm_row(h + kept_rows[i] * hidden, model_.norm.template data_ptr<T>(), x + i * hidden, hidden, eps_);
    const Projection<T>& lm = *model_.head;
    project(count, kQkv, lm, x, kept, logits, [&](int64_t first, int64_t last) {
      const int64_t n0 = first * lm.per_item(), n1 = std::min(vocab_, last * lm.per_item());
      for (int64_t i = 0; i < kept; ++i)
        for (int64_t n = n0; n < n1; ++n) logits_out[i * vocab_ + n] = static_cast<float>(logits[i * vocab_ + n]);
    });
  }
  return out;
}

// fused_step's model: the rotary table, every weight (as engine/fused.py lays them out, see Reader)
// and the attention's shapes; a decode step (fewer than kStepRows rows) runs as one `Step`, anything
// larger (a prefill chunk in batch-invariant mode) layer by layer through the per-call kernels.
class FusedPlan : public torch::CustomClassHolder {
  // (defined first: the members below deduce their return types from it)
  template <typename F>
  auto with_dtype(F&& f) {
    if (rope_.scalar_type() == at::kBFloat16) return f(std::get<ModelWeights<c10::BFloat16>>(model_));
    return f(std::get<ModelWeights<float>>(model_));
  }

 public:
  FusedPlan(const at::Tensor& rope, const std::vector<at::Tensor>& weights, const std::vector<int64_t>& spec,
            int64_t count, int64_t block_size, int64_t heads, int64_t kv_heads, double eps)
      : rope_(rope), block_size_(block_size), hq_(heads), hkv_(kv_heads), eps_(eps) {
    TORCH_CHECK(decode_supported(), "fused_step: built for another instruction set than ATen runs");
    TORCH_CHECK(rope.is_contiguous() && rope.dim() == 4 && rope.size(0) == 2 && rope.size(2) == 1 &&
                    (rope.scalar_type() == at::kBFloat16 || rope.scalar_type() == at::kFloat),
                "fused_step: the rotary table must be [2, positions, 1, head_dim] of float32 or bfloat16");
    Reader read{weights, spec};
    const int64_t d = rope.size(3);
    if (rope.scalar_type() == at::kBFloat16) {
      model_.emplace<ModelWeights<c10::BFloat16>>(read, count, heads, kv_heads, d);
    } else {
      model_.emplace<ModelWeights<float>>(read, count, heads, kv_heads, d);
    }
    with_dtype([&](auto& model) {
      using T = typename std::remove_reference_t<decltype(model)>::Scalar;
      if (Step<T>::takes(model)) step_.template emplace<Step<T>>(model, heads, kv_heads, d, block_size, eps);
      return 0;
    });
  }

  // whether a decode step runs in one parallel region (else kernel by kernel, as a prefill chunk)
  bool one_region() const { return step_.index() != 0; }

  at::Tensor run(const at::Tensor& ids, const at::Tensor& positions, const at::Tensor& k_cache,
                 const at::Tensor& v_cache, const at::Tensor& slots, const at::Tensor& rows, const at::Tensor& seqs,
                 const at::Tensor& tables, const at::Tensor& lens, const at::Tensor& keep) {
    const std::lock_guard<std::mutex> lock(mutex_);  // one step at a time: the buffers are the plan's
    return with_dtype([&](auto& model) {
      using T = typename std::remove_reference_t<decltype(model)>::Scalar;
      check_step(ids, rope_, positions, k_cache, v_cache, slots, rows, seqs, tables, lens, keep,
                 model.layers.size(), hkv_, model.embed.N, block_size_);
      const int64_t t = ids.size(0);
      if (auto* step = std::get_if<Step<T>>(&step_); step && t > 0 && t < kStepRows) {
        switch (k_cache.scalar_type()) {
          case at::kFloat8_e4m3fn:
            return step->template run<c10::Float8_e4m3fn>(ids, rope_, positions, k_cache, v_cache, slots, rows, seqs,
                                                          tables, lens, keep);
          case at::kFloat8_e5m2:
            return step->template run<c10::Float8_e5m2>(ids, rope_, positions, k_cache, v_cache, slots, rows, seqs,
                                                        tables, lens, keep);
          default:
            TORCH_CHECK(k_cache.scalar_type() == rope_.scalar_type(), "fused_step: the cache is the model's dtype or fp8");
            return step->template run<T>(ids, rope_, positions, k_cache, v_cache, slots, rows, seqs, tables, lens,
                                         keep);
        }
      }
      at::Tensor h = at::empty({t, model.hidden()}, rope_.options());
      for (int64_t r = 0; r < t; ++r) model.embed.row(ids.data_ptr<int64_t>()[r], h.data_ptr<T>() + r * model.hidden());
      h = layers<T>(h, model, rope_, positions, k_cache, v_cache, slots, rows, seqs, tables, lens, block_size_, hq_,
                    hkv_, eps_);
      return model.head->apply(rms_norm(h.index_select(0, keep), model.norm, eps_)).to(at::kFloat);
    });
  }

 private:
  at::Tensor rope_;
  int64_t block_size_, hq_, hkv_;
  double eps_;
  std::variant<std::monostate, ModelWeights<float>, ModelWeights<c10::BFloat16>> model_;
  std::variant<std::monostate, Step<float>, Step<c10::BFloat16>> step_;  // none where a weight is packed for AMX
  std::mutex mutex_;
};

at::Tensor fused_step(const c10::intrusive_ptr<FusedPlan>& plan, const at::Tensor& ids, const at::Tensor& positions,
                      const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
                      const at::Tensor& rows, const at::Tensor& seqs, const at::Tensor& tables, const at::Tensor& lens,
                      const at::Tensor& keep) {
  return plan->run(ids, positions, k_cache, v_cache, slots, rows, seqs, tables, lens, keep);
}

}  // namespace
}  // namespace levante

TORCH_LIBRARY_FRAGMENT(levante, m) {
  m.def("decode_supported() -> bool", &levante::decode_supported);
  m.class_<levante::FusedPlan>("FusedPlan")
      .def(torch::init<at::Tensor, std::vector<at::Tensor>, std::vector<int64_t>, int64_t, int64_t, int64_t, int64_t,
                       double>())
      .def("one_region", &levante::FusedPlan::one_region);
  m.def(
      "fused_step(__torch__.torch.classes.levante.FusedPlan plan, Tensor ids, Tensor positions, Tensor(a!) k_cache, "
      "Tensor(b!) v_cache, Tensor slots, Tensor rows, Tensor seqs, Tensor tables, Tensor lens, Tensor keep) -> Tensor");
}
TORCH_LIBRARY_IMPL(levante, CPU, m) { m.impl("fused_step", &levante::fused_step); }
