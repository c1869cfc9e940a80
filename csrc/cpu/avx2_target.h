// Include first in a translation unit to compile the rest of it for AVX2 + FMA (g++ on x86-64;
// elsewhere it defines nothing and the unit stays portable). Defines DSNT_HAVE_AVX2_BUILD when
// it applies.
//
// setup.py / CMake compile every C++ file with the same portable flags, so the unit raises the
// target itself: `#pragma GCC target` for the code, and the ISA macros that g++ does not define
// under the pragma, which at::vec (CPU_CAPABILITY_AVX2) and sleef.h test. Code of such a unit
// may only run after a check that the CPU has AVX2 and FMA.
#pragma once

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
