// The backward block class kernels for the four logits dtypes (launchers.h).
#include "launcher_impl.cuh"

namespace dsnt_cuda {
DSNT_INSTANTIATE_LAUNCHERS(SizeClass::Block, true)
}  // namespace dsnt_cuda
