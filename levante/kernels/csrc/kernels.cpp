// The first of the two translation units the build compiles side by side (the other is quant.cpp,
// about half the build's time): every other kernel file, so ATen's headers are parsed twice, not
// once per file (the build runs once per instruction set, at first use).
#include "ops.cpp"
#include "attention.cpp"
#include "linear.cpp"
#include "norm.cpp"
#include "argmax.cpp"
#include "decode.cpp"  // calls the kernels above, and quant.cpp's quant_linear
