/*
 * The entry points of lowering's C kernels as the op library calls them.
 *
 * op_library.py compiles lowering/selective_scan_cpu.c and lowering/reduced_scan_cpu.c once per
 * precision with this header force-included (-include) and the entry points renamed
 * (-Dscan_forward=vmeanba_scan_forward_float, ...): a kernel whose definition no longer matches
 * the declaration below stops the build with "conflicting types", instead of the library calling
 * it with the wrong arguments. vmeanba_ops.cpp includes it for the same declarations.
 *
 * Full scan: B and C in the kernel's layout, state axis last and contiguous; element (b, channel c,
 * t, n) at P[b*sb + (c / cpg)*sg + t*st + n]. Reduced site: B and C read in place through their own
 * strides, element (b, c, n, t) at P[b*sb + (c / cpg)*sg + n*sn + t*st].
 */
#ifndef VMEANBA_KERNEL_ABI_H
#define VMEANBA_KERNEL_ABI_H

#include <stdint.h>

#define VMEANBA_SCAN_FORWARD_ARGS(real)                                                             \
    const real *u, const real *delta, const real *A,                                                \
    const real *B, int64_t B_sb, int64_t B_sg, int64_t B_st, int64_t B_cpg,                         \
    const real *C, int64_t C_sb, int64_t C_sg, int64_t C_st, int64_t C_cpg,                         \
    const real *D, const real *z, const real *bias, int32_t softplus,                               \
    real *y, real *last_state, real *scratch,                                                       \
    int64_t batch, int64_t dim, int64_t N, int64_t L, int64_t c_begin, int64_t c_end

#define VMEANBA_REDUCED_FORWARD_ARGS(real)                                                          \
    const real *u, const real *delta, const real *A,                                                \
    const real *B, int64_t B_sb, int64_t B_sg, int64_t B_sn, int64_t B_st, int64_t B_cpg,           \
    const real *C, int64_t C_sb, int64_t C_sg, int64_t C_sn, int64_t C_st, int64_t C_cpg,           \
    const real *D, const real *z, const real *bias, int32_t softplus, int32_t dt_raw,               \
    int32_t skip_mean, real *y, real *last_state,                                                   \
    int64_t batch, int64_t dim, int64_t N, int64_t L, int64_t groups, int64_t item_begin, int64_t item_end

#ifdef __cplusplus
extern "C" {
void vmeanba_scan_forward_float(VMEANBA_SCAN_FORWARD_ARGS(float));
void vmeanba_scan_forward_double(VMEANBA_SCAN_FORWARD_ARGS(double));
void vmeanba_reduced_scan_forward_float(VMEANBA_REDUCED_FORWARD_ARGS(float));
void vmeanba_reduced_scan_forward_double(VMEANBA_REDUCED_FORWARD_ARGS(double));
}
#else /* a kernel source, compiled with REAL and the renames */
void scan_forward(VMEANBA_SCAN_FORWARD_ARGS(REAL));
void reduced_scan_forward(VMEANBA_REDUCED_FORWARD_ARGS(REAL));
#endif

#endif
