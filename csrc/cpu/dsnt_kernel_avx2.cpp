// The CPU kernels of dsnt_kernel_impl.h built for AVX2 + FMA (8 floats / 4 doubles per vector,
// Sleef's vectorized exp / log from libtorch_cpu), whatever flags the build passes:
// cpu/avx2_target.h raises the target of this unit. Other compilers / architectures get no AVX2
// table and use the portable build. Nothing here runs at load time (no static initializers);
// dsnt_kernel.cpp calls in only on a CPU with AVX2 and FMA.
//
// Inline functions instantiated here and elsewhere (std::vector, c10 helpers) are merged by the
// linker into the first copy it meets. dsnt_kernel.cpp, the portable twin of this unit,
// instantiates the same ones and links first (setuptools and CMake's GLOB both order sources by
// path), so the merged copies are portable; tests/test_cpu_isa.py checks the built library.
#include "cpu/avx2_target.h"

#include "cpu/dsnt_cpu.h"

#ifdef DSNT_HAVE_AVX2_BUILD
#define DSNT_CPU_NS avx2
#include "cpu/dsnt_kernel_impl.h"
#undef DSNT_CPU_NS

namespace dsnt_cuda::cpu {
const KernelTable* kernels_avx2() {
  // A function-local static: built on first call, from dsnt_kernel.cpp, after the CPU check.
  static const KernelTable table = avx2::make_table();
  return &table;
}
}  // namespace dsnt_cuda::cpu

#else

namespace dsnt_cuda::cpu {
const KernelTable* kernels_avx2() { return nullptr; }
}  // namespace dsnt_cuda::cpu

#endif
