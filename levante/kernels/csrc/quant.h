// What quant.cpp (its own translation unit, built beside the others) offers decode.cpp: a
// projection's GGUF blocks checked once (QuantWeights, whose `apply` is quant_linear), and for a
// step that runs every projection in one parallel region, x rounded by each thread into its own
// QuantThread and output groups taken by whichever thread comes: the same code per group as
// quant_linear, so the same bits.
#pragma once

#include <ATen/ATen.h>

#include <memory>

namespace levante {

// One projection's GGUF blocks (as quant_linear takes them), checked and located.
class QuantWeights {
 public:
  QuantWeights(at::TensorList blocks, at::IntArrayRef types, int64_t in_features);
  QuantWeights(QuantWeights&&) noexcept;
  ~QuantWeights();
  at::Tensor apply(const at::Tensor& x) const;  // quant_linear(x, these blocks)
  template <typename T>
  void dequantize(int64_t row, T* y) const;  // one row's weights, as kernels.dequantize decodes them
  int64_t outputs() const;
  int64_t groups() const;  // of 16 outputs: the units of work

 private:
  friend class QuantThread;
  struct Parts;
  std::unique_ptr<Parts> parts_;
  int64_t K_;
};

// One thread's buffers for up to `rows` rows of x and `features` inputs, all allocated here: x
// rounded to int8, and the unpacking room some types and row counts need. Nothing after throws.
class QuantThread {
 public:
  QuantThread(int64_t rows, int64_t features);
  QuantThread(QuantThread&&) noexcept;
  ~QuantThread();
  // x [M, K] (rows at stride ldx) rounded as quant_linear rounds it, for the multiplies that follow
  template <typename T>
  void quantize(const T* x, int64_t ldx, int64_t M, int64_t K);
  // groups [first, last) of y [M, w.outputs()] = x·wᵀ, x the one last quantized
  template <typename T>
  void multiply(const QuantWeights& w, int64_t M, T* y, int64_t first, int64_t last);

 private:
  struct Buffers;
  std::unique_ptr<Buffers> buffers_;
};

}  // namespace levante
