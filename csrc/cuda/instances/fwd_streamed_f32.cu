// The forward streamed class kernels for float32 logits (launchers.h): a translation unit of their own.
#include "../launcher_impl.cuh"

namespace dsnt_cuda {
DSNT_INSTANTIATE_LAUNCHERS(SizeClass::Streamed, false, float)
}  // namespace dsnt_cuda
