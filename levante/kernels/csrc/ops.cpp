// The schemas of Levante's CPU operators (torch.ops.levante.*); each kernel file registers its
// implementation (decode.cpp defines fused_step beside the class its schema names).
#include <torch/library.h>

TORCH_LIBRARY(levante, m) {
  m.def("linear(Tensor x, Tensor weight, int out_features) -> Tensor");
  m.def("pack_linear(Tensor weight) -> Tensor");
  m.def("quant_linear(Tensor x, Tensor[] blocks, int[] types, int in_features) -> Tensor");
  m.def("pack_quant(Tensor blocks, int type) -> Tensor");
  m.def("dequantize(Tensor blocks, int type, Tensor(a!) out) -> ()");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("argmax(Tensor x) -> Tensor");
  m.def(
      "paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor rows, Tensor seqs, Tensor tables, "
      "Tensor lens, int block_size, Tensor(a!) out) -> ()");
  m.def("write_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, int layer, Tensor slots, Tensor k, Tensor v) -> ()");
}
