// The portable build of the CPU kernels (kernels.h): at::vec's scalar fallback, for any CPU.
//
// Linked before dsnt_cpu_kernels_avx2.cpp (setuptools and CMake's GLOB order sources by path):
// inline functions both units instantiate are merged by the linker into the first copy it
// meets, which must be this portable one (tests/test_cpu_isa.py checks the built library).

// at::vec's portable vectors are 32-byte aligned structs: g++ notes an ABI change of 2011 for
// passing them by value, which concerns no caller outside this library.
#pragma GCC diagnostic ignored "-Wpsabi"

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

#define DSNT_CPU_NS generic
#pragma GCC visibility push(hidden)
#include "cpu/kernels.h"
#pragma GCC visibility pop
#undef DSNT_CPU_NS

namespace dsnt_cuda::cpu {

const KernelTable& kernels_generic() {
  static const KernelTable table = generic::make_table();
  return table;
}

}  // namespace dsnt_cuda::cpu
