// The forward cluster class kernels for float16 logits (launchers.h): a translation unit of their own.
#include "../launcher_impl.cuh"

namespace dsnt_cuda {
#ifndef DSNT_FLOAT_ONLY
DSNT_INSTANTIATE_LAUNCHERS(SizeClass::Cluster, false, c10::Half)
#endif
}  // namespace dsnt_cuda
