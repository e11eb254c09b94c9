// quant_linear, the one function of quant.cpp (its own translation unit, built beside the others)
// that another file calls: decode.cpp's projections on GGUF blocks.
#pragma once

#include <ATen/ATen.h>

namespace levante {

at::Tensor quant_linear(const at::Tensor& x, at::TensorList blocks, at::IntArrayRef types, int64_t in_features);

}  // namespace levante
