// Accuracy of the CPU kernels' inline float exp2 / log2 (csrc/cpu/vec_exp_log.h, AVX2 build)
// against double-precision std::exp2 / std::log2: at most 2 ulp of the correctly rounded result
// over the arguments the kernels pass (softmax weights 2^a for a <= 0, sigmoid's 2^(-z log2 e),
// the target factors; log2 of p + q, of rectified values and of x + eps), and IEEE results for
// the special arguments: exp2 of -inf, NaN, arguments past the range, subnormal results; log2
// of zero, subnormal, negative, infinite and NaN lanes. Exits 77 (ctest: skipped) on a CPU
// without AVX2 / FMA or a compiler without the AVX2 build.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "cpu/avx2_target.h"

#ifdef DSNT_HAVE_AVX2_BUILD
#define DSNT_CPU_NS avx2_math_test
#include "cpu/vec_exp_log.h"
#undef DSNT_CPU_NS

namespace {

using Vec = at::vec::Vectorized<float>;
using dsnt_cuda::cpu::avx2_math_test::vec_exp2;
using dsnt_cuda::cpu::avx2_math_test::vec_log2;

// Distance in units in the last place of the float nearest to `exact` (subnormal ulps below the
// normal range).
double ulp_error(float got, double exact) {
  const float nearest = static_cast<float>(exact);
  const float up = std::nextafter(std::fabs(nearest), std::numeric_limits<float>::infinity());
  const double ulp = static_cast<double>(up) - std::fabs(static_cast<double>(nearest));
  return std::fabs(static_cast<double>(got) - exact) / ulp;
}

// Runs fn over xs (padded to whole vectors) and returns the results.
template <typename Fn>
std::vector<float> apply(Fn fn, std::vector<float> xs) {
  const size_t n = xs.size();
  xs.resize((n + Vec::size() - 1) / Vec::size() * Vec::size(), 1.0f);
  std::vector<float> out(xs.size());
  for (size_t i = 0; i < xs.size(); i += Vec::size()) fn(Vec::loadu(xs.data() + i)).store(out.data() + i);
  out.resize(n);
  return out;
}

int failures = 0;

// Worst ulp error over xs against exact(x); specials (non-finite exact results) must match.
template <typename Fn, typename Exact>
void check(const char* name, Fn fn, Exact exact, const std::vector<float>& xs, double max_ulp) {
  const std::vector<float> got = apply(fn, xs);
  double worst = 0;
  float worst_x = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    const double e = exact(static_cast<double>(xs[i]));
    bool ok;
    if (std::isnan(e)) {
      ok = std::isnan(got[i]);
    } else if (!std::isfinite(static_cast<float>(e))) {
      ok = static_cast<double>(got[i]) == static_cast<double>(static_cast<float>(e));  // +-inf
    } else {
      const double u = ulp_error(got[i], e);
      ok = u <= max_ulp;
      if (!(u <= worst)) {
        worst = u;
        worst_x = xs[i];
      }
    }
    if (!ok) {
      std::printf("FAIL %s(%.9g) = %.9g, expected %.9g\n", name, static_cast<double>(xs[i]),
                  static_cast<double>(got[i]), e);
      if (++failures > 20) return;
    }
  }
  std::printf("%s: %zu arguments, worst %.3f ulp at x = %.9g\n", name, xs.size(), worst,
              static_cast<double>(worst_x));
}

// Every float of [lo, hi) at a stride of `step` ulps.
std::vector<float> float_range(float lo, float hi, uint32_t step) {
  std::vector<float> xs;
  uint32_t bits;
  std::memcpy(&bits, &lo, sizeof bits);
  for (float x = lo; x < hi; bits += step) {
    std::memcpy(&x, &bits, sizeof x);
    xs.push_back(x);
  }
  return xs;
}

}  // namespace

int run() {
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
    std::printf("SKIP: this CPU lacks AVX2 / FMA\n");
    return 77;
  }
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  std::mt19937 rng(0);

  // exp2 over [-160, 130]: down through the subnormal results, up past overflow.
  std::vector<float> ex;
  std::uniform_real_distribution<float> arg(-160.0f, 130.0f);
  for (int i = 0; i < 2000000; ++i) ex.push_back(arg(rng));
  for (float x : float_range(-1.0f, 1.0f, 997)) ex.push_back(x);
  for (float x = -150.0f; x <= 128.0f; x += 0.5f) ex.push_back(x);  // the rounding split points
  for (float x :
       {-inf, inf, nan, -0.0f, 0.0f, 127.99f, 128.0f, -126.0f, -149.0f, -149.5f, -150.0f, -1e30f, 1e30f})
    ex.push_back(x);
  check("exp2", [](const Vec& v) { return vec_exp2(v); }, [](double x) { return std::exp2(x); }, ex, 2.0);

  // log2: every float of [1e-24, 4) at a stride, random ones up to the largest float, ulp by ulp
  // around the polynomial's branch point sqrt(2) and 1, the subnormals and the specials.
  std::vector<float> lx = float_range(1e-24f, 4.0f, 97);
  std::uniform_real_distribution<float> exponent(-125.0f, 127.9f);
  for (int i = 0; i < 2000000; ++i) lx.push_back(std::exp2(exponent(rng)));
  for (float centre : {1.0f, 1.41421356f, 0.70710678f, 0.5f, 2.0f}) {
    float x = centre;
    for (int i = 0; i < 4000; ++i) x = std::nextafter(x, 0.0f);
    for (int i = 0; i < 8000; ++i, x = std::nextafter(x, 10.0f)) lx.push_back(x);
  }
  for (float x :
       float_range(std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::min(), 4099))
    lx.push_back(x);
  for (float x : {0.0f, -0.0f, -1.0f, -inf, inf, nan, -1e-30f, std::numeric_limits<float>::max(),
                  std::numeric_limits<float>::min()})
    lx.push_back(x);
  check("log2", [](const Vec& v) { return vec_log2(v); }, [](double x) { return std::log2(x); }, lx, 2.0);

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
