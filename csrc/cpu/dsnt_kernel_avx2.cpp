// The CPU kernels of dsnt_kernel_impl.h built for AVX2 + FMA (8 floats / 4 doubles per vector,
// Sleef's vectorized exp / log from libtorch_cpu), whatever flags the build passes.
//
// setup.py / CMake compile every C++ file with the same portable flags, so this file raises the
// target itself: `#pragma GCC target` for the code, and the ISA macros that g++ does not define
// under the pragma, which at::vec (CPU_CAPABILITY_AVX2) and sleef.h test. Nothing here runs at
// load time (no static initializers); dsnt_kernel.cpp calls in only on a CPU with AVX2 and FMA.
// Other compilers / architectures get no AVX2 table and use the portable build.
//
// Inline functions instantiated here and elsewhere (std::vector, c10 helpers) are merged by the
// linker into the first copy it meets. dsnt_kernel.cpp, the portable twin of this unit,
// instantiates the same ones and links first (setuptools and CMake's GLOB both order sources by
// path), so the merged copies are portable; tests/test_cpu_isa.py checks the built library.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DSNT_HAVE_AVX2_BUILD 1
#pragma GCC target("avx2,fma,f16c")
#pragma GCC diagnostic ignored "-Wpsabi"
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY AVX2
#endif
#define CPU_CAPABILITY_AVX2 1
#endif

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
