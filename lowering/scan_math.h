/*
 * What both CPU kernels (selective_scan_cpu.c, reduced_scan_cpu.c) share: the math setup, the
 * element type and the step size dt = softplus(delta + bias). Included by each; REAL is set by
 * native_build.py (float or double).
 */
#ifndef VMEANBA_SCAN_MATH_H
#define VMEANBA_SCAN_MATH_H

/* The build keeps IEEE NaN and inf (-fno-finite-math-only on top of -ffast-math, see
 * native_build.py). GCC then no longer defines __FAST_MATH__, and glibc only declares its
 * vectorised exp/log1p (libmvec) under that macro, so the loops would call the scalar
 * functions one element at a time. libmvec's variants treat NaN and inf as the scalar functions
 * do (special lanes take the scalar path), so ask glibc for their declarations anyway. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__FAST_MATH__)
#define __FAST_MATH__ 1
#endif
#include <tgmath.h> /* exp, log1p resolve to the float or double variant of REAL */
#include <stdint.h>
#include <string.h>

typedef REAL real;

#define SOFTPLUS_THRESHOLD 20 /* torch.nn.functional.softplus's default: identity above it */

/* softplus of a float without libm calls or divisions, so a loop over it vectorises with any
 * compiler and C library (glibc's libmvec log1pf is the slowest part of a reduced site otherwise):
 *   softplus(x) = max(x, 0) + log1p(e),  e = exp(-|x|) in (0, 1]
 *   exp(-|x|) = 2^k exp(r), |r| <= ln2/2, exp(r) = 1 + r + r^2 q(r) (q of degree 4);
 *   log1p(e) = e + e^2 l(e) (l of degree 7), which keeps the relative precision of small e, so very
 *   negative x keep theirs.
 * q and l are least-squares fits (relative error, Chebyshev nodes) made for this file: 2e-8 and
 * 4e-8; the result is within 2.3 float ulp of log1p(exp(x)) in double for x >= -20 and within 4.5
 * down to float's normal range (x ~ -87.3; checked in steps of 1e-4 up to 30).
 * The special values need no compares of their own: NaN passes through max(x, 0) (written so it
 * propagates NaN); for x > 20 the log1p term is below half an ulp of x, so the sum is x itself,
 * which is torch's threshold; for x < -87.7 the clamped exponent k = -127 makes 2^k exactly 0, so
 * the result is 0 (and -inf gives 0, inf gives inf, as in torch). */
static inline float softplus_float(float x)
{
    const float a = x < 0 ? -x : x;
    const float m = a > 88.0f ? -88.0f : -a; /* exp's argument, in [-88, 0] */
    const float k = floorf(m * 1.44269504088896341f + 0.5f);
    const float r = (m - k * 0.693145751953125f) - k * 1.428606765330187045e-06f; /* ln2 split hi + lo */
    float q = 1.392954378e-03f;
    q = q * r + 8.359857835e-03f;
    q = q * r + 4.166650400e-02f;
    q = q * r + 1.666659862e-01f;
    q = q * r + 0.5f;
    const int32_t bits = ((int32_t)k + 127) << 23; /* 2^k, k in [-127, 0]; k = -127 gives 0 */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    const float e = (1.0f + r + r * r * q) * scale;
    float l = 5.219003651e-03f;
    l = l * e - 2.947810851e-02f;
    l = l * e + 7.824200392e-02f;
    l = l * e - 1.367172748e-01f;
    l = l * e + 1.911494434e-01f;
    l = l * e - 2.484730482e-01f;
    l = l * e + 3.332011402e-01f;
    l = l * e - 4.999959767e-01f;
    return (x < 0 ? 0.0f : x) + (e + e * e * l);
}

/* x = softplus(x) for a whole row, in a loop without dependencies so it vectorises: float rows
 * through softplus_float, double rows (tests, gradcheck) through libm. */
static inline void softplus_row(real *restrict x, int64_t L)
{
    if (sizeof(real) == sizeof(float)) {
        for (int64_t t = 0; t < L; t++) x[t] = (real)softplus_float((float)x[t]);
        return;
    }
    for (int64_t t = 0; t < L; t++) {
        const real v = x[t];
        /* not fmin: fmin(NaN, 20) is 20, and softplus(NaN) must stay NaN */
        const real smooth = log1p(exp(v > SOFTPLUS_THRESHOLD ? (real)SOFTPLUS_THRESHOLD : v));
        x[t] = v > SOFTPLUS_THRESHOLD ? v : smooth;
    }
}

/* dt_t for a whole row (libmvec log1p/exp). */
static inline void step_sizes(const real *restrict delta, real bias, int softplus,
                              real *restrict dts, int64_t L)
{
    for (int64_t t = 0; t < L; t++) dts[t] = delta[t] + bias;
    if (softplus) softplus_row(dts, L);
}

/* Calls fn(..., N) with N a compile-time constant for the common state sizes, so the loops over
 * the state unroll and vectorise; other sizes take the generic copy. */
#define DISPATCH_N(fn, N, ...)                                    \
    do {                                                          \
        switch (N) {                                              \
        case 1: fn(__VA_ARGS__, 1); break;                        \
        case 4: fn(__VA_ARGS__, 4); break;                        \
        case 8: fn(__VA_ARGS__, 8); break;                        \
        case 16: fn(__VA_ARGS__, 16); break;                      \
        default: fn(__VA_ARGS__, N); break;                       \
        }                                                         \
    } while (0)

#endif
