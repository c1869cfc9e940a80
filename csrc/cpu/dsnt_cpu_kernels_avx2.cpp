// The CPU kernels of kernels.h built for AVX2 + FMA (8 floats / 4 doubles per vector, inline
// exp2 / log2 for float), whatever flags the build passes: cpu/avx2_target.h raises the target
// of this unit. Other compilers / architectures get no AVX2 table and use the portable build.
// Nothing here runs at load time (no static initializers); dsnt_cpu_host.cpp calls in only on a
// CPU with AVX2 and FMA.
#include "cpu/avx2_target.h"

// External headers first, then the kernels with hidden visibility: their functions are called
// directly (not through the PLT) and stay out of the library's symbol table. (The pragma must not
// cover a first inclusion of torch's headers: their functions would be declared hidden too.)
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu/kernel_args.h"

#ifdef DSNT_HAVE_AVX2_BUILD
#define DSNT_CPU_NS avx2
#pragma GCC visibility push(hidden)
#include "cpu/kernels.h"
#pragma GCC visibility pop
#undef DSNT_CPU_NS

namespace dsnt_cuda::cpu {
const KernelTable* kernels_avx2() {
  // A function-local static: built on first call, from dsnt_cpu_host.cpp, after the CPU check.
  static const KernelTable table = avx2::make_table();
  return &table;
}
}  // namespace dsnt_cuda::cpu

#else

namespace dsnt_cuda::cpu {
const KernelTable* kernels_avx2() { return nullptr; }
}  // namespace dsnt_cuda::cpu

#endif
