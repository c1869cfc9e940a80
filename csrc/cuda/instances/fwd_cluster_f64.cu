// The forward cluster class kernel for float64 logits (launchers.h): a translation unit of its own.
#include "../launcher_impl.cuh"

namespace dsnt_cuda {
#ifndef DSNT_FLOAT_ONLY
template struct Launcher<SizeClass::Cluster, false, false, double>;  // no standard-loss kernel (launchers.h)
#endif
}  // namespace dsnt_cuda
