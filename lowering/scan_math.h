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
#include <tgmath.h> /* exp, log1p resolve to the float or double variant of REAL */
#include <stdint.h>
#include <string.h>

typedef REAL real;

#define SOFTPLUS_THRESHOLD 20 /* torch.nn.functional.softplus's default: identity above it */

/* x = softplus(x) for a whole row, in a loop without dependencies so it vectorises. */
static inline void softplus_row(real *restrict x, int64_t L)
{
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
