// Device helpers shared by every kernel of csrc/cuda/: the accumulation type, 16-byte chunks of
// logits, a NaN-keeping max, a division by the keypoint count without an integer divide, and
// the macros that mark device functions. Valid host C++ too (the emulation build, launch.cuh).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "dsnt_math.h"
#include "launch.cuh"

#define DSNT_DEV __device__ __forceinline__
// A device function kept out of line: the rare paths (scalar / strided loads, the per-map
// epilogue one thread runs) stay out of the per-element code of the hot loop.
#if defined(DSNT_CUDA_EMULATION)
#define DSNT_OUT_OF_LINE __attribute__((noinline))
#else
#define DSNT_OUT_OF_LINE __device__ __noinline__
#endif

namespace dsnt_cuda {

constexpr int kRounds = 3;      // reduction rounds per map, each with its own scratch
constexpr int kMaxReduce = 12;  // values per reduction round at most
constexpr int kMaxWarps = 32;   // warps per CTA at most

// float for float16 / bfloat16 / float32 logits, double for float64 (docs/ops.md).
template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Elements of a 16-byte chunk: the unit of every load, store and coordinate in the kernels.
template <typename scalar_t>
constexpr int kChunkElems = 16 / static_cast<int>(sizeof(scalar_t));

template <typename scalar_t>
struct alignas(16) RawChunk {
  scalar_t v[kChunkElems<scalar_t>];
};

// V values of one chunk in the accumulation type; 16-byte aligned so that shared-memory tables
// and tiles are read with 16-byte loads.
template <typename T, int V>
struct alignas((sizeof(T) * V) % 16 == 0 ? 16 : alignof(T)) Vals {
  T v[V];
};

template <typename scalar_t>
DSNT_DEV acc_t<scalar_t> to_acc(scalar_t x) {
  return static_cast<acc_t<scalar_t>>(x);
}

// A load that bypasses L1 (ld.global.cg): values other CTAs wrote, read after a fence.
template <typename T>
DSNT_DEV T load_cg(const T* p) {
#if defined(__CUDA_ARCH__)
  return __ldcg(p);
#else
  return *p;
#endif
}

// A global-memory pointer, opaque to the compiler: a map's base is then formed once and each
// chunk's address is one IMAD.WIDE.U32 (base + 32-bit index), where nvcc would otherwise fold
// the map's 64-bit offset into every chunk's address (four instructions a chunk). The assumption
// keeps its loads and stores global (LDG / STG, not generic).
template <typename P>
DSNT_DEV P* opaque_global_pointer(P* p) {
#if defined(__CUDA_ARCH__)
  asm("" : "+l"(p));
  __builtin_assume(__isGlobal(p));
#endif
  return p;
}

// max(x, lo) for a constant lo that is not NaN: the same as Arith<T>::max(x, lo) (a NaN x gives
// lo in both), in one instruction (FMNMX) where the ternary form takes two.
DSNT_DEV float max_with(float x, float lo) { return fmaxf(x, lo); }
DSNT_DEV double max_with(double x, double lo) { return fmax(x, lo); }

// A sum that carries its rounding error (Neumaier): the target-mean gradient is a small
// difference of large terms of both signs, summed over the whole map.
template <typename T>
struct CompensatedSum {
  T sum = T(0), error = T(0);
  DSNT_DEV void add(T x) {
    const T t = sum + x;
    error += (sum < T(0) ? -sum : sum) >= (x < T(0) ? -x : x) ? (sum - t) + x : (x - t) + sum;
    sum = t;
  }
  DSNT_DEV T value() const { return sum + error; }
};

// A per-map scalar (beta, sigma_t) of map (b, l): PerMapScalar::at with 32-bit indexing (its
// (B, L) view has fewer than 2^31 elements).
template <typename T>
DSNT_DEV T per_map_value(const PerMapScalar<T>& s, uint32_t b, uint32_t l) {
  return s.data != nullptr ? s.data[static_cast<int>(b) * static_cast<int>(s.stride_b) +
                                    static_cast<int>(l) * static_cast<int>(s.stride_l)]
                           : s.value;
}

template <typename T>
DSNT_DEV T neg_inf() {
  return -static_cast<T>(INFINITY);
}

// max(a, b) that keeps a NaN of either operand (max.NaN on sm_80+): a NaN logit makes the
// softmax shift NaN, so the whole map, and only it, turns NaN.
DSNT_DEV float max_keep_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return (a != a || a > b) ? a : b;
#endif
}

DSNT_DEV double max_keep_nan(double a, double b) { return (a != a || a > b) ? a : b; }

// Unsigned 32-bit division by a divisor fixed at launch (the keypoint count): a multiply-high
// and a shift instead of a ~20-instruction integer divide per map (Granlund-Montgomery).
struct FastDivmod {
  uint32_t divisor = 1, multiplier = 0, shift = 0;

  FastDivmod() = default;
  explicit FastDivmod(uint32_t d) : divisor(d) {
    while ((uint64_t{1} << shift) < d) ++shift;
    multiplier = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - d)) / d + 1);
  }
  // n < 2^31
  DSNT_DEV void divmod(uint32_t n, uint32_t& q, uint32_t& r) const {
#if defined(__CUDA_ARCH__)
    const uint32_t hi = __umulhi(n, multiplier);
#else
    const uint32_t hi = static_cast<uint32_t>((static_cast<uint64_t>(n) * multiplier) >> 32);
#endif
    q = (hi + n) >> shift;
    r = n - q * divisor;
  }
};

}  // namespace dsnt_cuda
