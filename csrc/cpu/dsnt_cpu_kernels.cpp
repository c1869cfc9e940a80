// The portable build of the CPU kernels (kernels.h): at::vec's scalar fallback, for any CPU.
//
// Linked before dsnt_cpu_kernels_avx2.cpp (setuptools and CMake's GLOB order sources by path):
// inline functions both units instantiate are merged by the linker into the first copy it
// meets, which must be this portable one (tests/test_cpu_isa.py checks the built library).

// at::vec's portable vectors are 32-byte aligned structs: g++ notes an ABI change of 2011 for
// passing them by value, which concerns no caller outside this library.
#pragma GCC diagnostic ignored "-Wpsabi"

#include "cpu/kernel_args.h"

#define DSNT_CPU_NS generic
#include "cpu/kernels.h"
#undef DSNT_CPU_NS

namespace dsnt_cuda::cpu {

const KernelTable& kernels_generic() {
  static const KernelTable table = generic::make_table();
  return table;
}

}  // namespace dsnt_cuda::cpu
