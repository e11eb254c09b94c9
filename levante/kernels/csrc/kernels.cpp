// The one translation unit the build compiles: every kernel file, so ATen's headers are parsed once
// (a third faster than a unit per file; the build runs once per instruction set, at first use).
#include "ops.cpp"
#include "attention.cpp"
#include "linear.cpp"
#include "norm.cpp"
#include "argmax.cpp"
#include "quant.cpp"
#include "decode.cpp"  // calls the kernels above
