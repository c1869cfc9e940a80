// The backward block class kernels for bfloat16 logits (launchers.h): a translation unit of their own.
#include "../launcher_impl.cuh"

namespace dsnt_cuda {
#ifndef DSNT_FLOAT_ONLY
DSNT_INSTANTIATE_LAUNCHERS(SizeClass::Block, true, c10::BFloat16)
#endif
}  // namespace dsnt_cuda
