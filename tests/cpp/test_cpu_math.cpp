// Accuracy of the CPU kernels' inline float logarithm (log_eps_arg in dsnt_kernel_impl.h, AVX2
// build) against double-precision std::log: at most 2 ulp of the correctly rounded result over
// the arguments the divergence passes (x + eps, eps = 1e-24, up to any float), and std::log's
// answer for zero, subnormal, negative, NaN and infinite lanes. Exits 77 (ctest: skipped) on a
// CPU without AVX2 / FMA or a compiler without the AVX2 build.
#include "cpu/avx2_target.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#ifdef DSNT_HAVE_AVX2_BUILD
#include "cpu/dsnt_cpu.h"
#define DSNT_CPU_NS avx2_math_test
#include "cpu/dsnt_kernel_impl.h"
#undef DSNT_CPU_NS

namespace {

using dsnt_cuda::cpu::avx2_math_test::log_eps_arg;
using Vec = at::vec::Vectorized<float>;

// Distance in units in the last place of the float nearest to `exact`.
double ulp_error(float got, double exact) {
  const float nearest = static_cast<float>(exact);
  const float up = std::nextafter(std::fabs(nearest), std::numeric_limits<float>::infinity());
  const double ulp = static_cast<double>(up) - std::fabs(static_cast<double>(nearest));
  return std::fabs(static_cast<double>(got) - exact) / ulp;
}

// Runs log_eps_arg over xs (padded to whole vectors) and returns the results.
std::vector<float> vector_log(std::vector<float> xs) {
  const size_t n = xs.size();
  xs.resize((n + Vec::size() - 1) / Vec::size() * Vec::size(), 1.0f);
  std::vector<float> out(xs.size());
  for (size_t i = 0; i < xs.size(); i += Vec::size()) log_eps_arg(Vec::loadu(xs.data() + i)).store(out.data() + i);
  out.resize(n);
  return out;
}

bool same_special(float got, double exact) {
  if (std::isnan(exact)) return std::isnan(got);
  return static_cast<double>(got) == exact;  // +-inf
}

}  // namespace

int run() {
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
    std::printf("SKIP: this CPU lacks AVX2 / FMA\n");
    return 77;
  }
  std::vector<float> xs;
  // Every float of [1e-24, 4) at a coarse stride, plus random ones up to the largest float.
  const float lo = 1e-24f;
  uint32_t bits;
  std::memcpy(&bits, &lo, sizeof bits);
  for (float x = lo; x < 4.0f; bits += 97) {
    std::memcpy(&x, &bits, sizeof x);
    xs.push_back(x);
  }
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> exponent(-55.0f, 88.0f);
  for (int i = 0; i < 2000000; ++i) xs.push_back(std::exp(exponent(rng)));
  // Around 1 (log near 0) and the polynomial's branch point sqrt(1/2), ulp by ulp.
  for (float centre : {1.0f, 0.70710678f, 0.5f, 2.0f}) {
    float x = centre;
    for (int i = 0; i < 4000; ++i) x = std::nextafter(x, 0.0f);
    for (int i = 0; i < 8000; ++i, x = std::nextafter(x, 10.0f)) xs.push_back(x);
  }
  const std::vector<float> got = vector_log(xs);
  double worst = 0;
  float worst_x = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    const double e = ulp_error(got[i], std::log(static_cast<double>(xs[i])));
    if (!(e <= worst)) {
      worst = e;
      worst_x = xs[i];
    }
  }
  std::printf("log_eps_arg: %zu arguments, worst %.3f ulp at x = %.9g\n", xs.size(), worst,
              static_cast<double>(worst_x));
  int failures = 0;
  if (!(worst <= 2.0)) {
    std::printf("FAIL: more than 2 ulp\n");
    ++failures;
  }

  // Lanes outside the fast path, mixed with ordinary ones in the same vector.
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<float> special = {0.0f, -0.0f, 1e-40f, std::numeric_limits<float>::denorm_min(),
                                      -1.0f, -inf, inf, nan, 3.0f, 1e-24f, 0.5f, 7.0f, -1e-30f,
                                      std::numeric_limits<float>::max(), std::numeric_limits<float>::min(), 1.0f};
  const std::vector<float> special_got = vector_log(special);
  for (size_t i = 0; i < special.size(); ++i) {
    const double exact = std::log(static_cast<double>(special[i]));
    const bool ok = std::isfinite(exact) ? ulp_error(special_got[i], exact) <= 2.0
                                         : same_special(special_got[i], exact);
    if (!ok) {
      std::printf("FAIL: log(%g) = %g, expected %g\n", static_cast<double>(special[i]),
                  static_cast<double>(special_got[i]), exact);
      ++failures;
    }
  }
  if (failures == 0) std::printf("OK\n");
  return failures == 0 ? 0 : 1;
}

int main() { return run(); }

#else

int main() {
  std::printf("SKIP: no AVX2 build with this compiler / architecture\n");
  return 77;
}

#endif
