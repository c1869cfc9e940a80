// The forward streamed class kernels for bfloat16 logits (launchers.h): a translation unit of their own.
#include "../launcher_impl.cuh"

namespace dsnt_cuda {
#ifndef DSNT_FLOAT_ONLY
DSNT_INSTANTIATE_LAUNCHERS(SizeClass::Streamed, false, c10::BFloat16)
#endif
}  // namespace dsnt_cuda
