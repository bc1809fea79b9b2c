/*
 * A VMeanba-reduced scan site (docs/DESIGN.md section 2) for the CPU, fused: for one (batch row,
 * group) it reads the group's u and delta (and z) once, forms the group means while reading,
 * runs the one-channel recurrence and writes every channel's output with the D*u skip and the
 * silu(z) gate, so a reduced site costs about one pass over its inputs and one over its output.
 * lowering/reduced_scan.py is the same computation written as a composition (the reference).
 *
 * Time runs in chunks of CHUNK steps: the means of a chunk are summed channel by channel (each
 * loop over t vectorises), the chunk's recurrence runs on the means (the state loop vectorises),
 * and the output pass re-reads the chunk's u (for D*u) while it is still in cache. Callers split
 * the (batch, group) items [item_begin, item_end) across threads; items share no memory.
 *
 * Modes: dt_raw = 0 averages dt = softplus(delta + bias) per channel and scans the mean as is
 * ("effective"); 1 averages delta and bias and applies softplus to the mean ("raw").
 * skip_mean = 0 applies D*u and silu(z) per channel ("exact"); 1 averages D and z and applies
 * them to the reduced channel ("mean").
 *
 * Layouts: u, delta, z, y are (batch, dim, L) contiguous; A is (dim, N). B and C are read in
 * place: element (b, channel c, state n, t) lives at P[b*sb + (c / cpg)*sg + n*sn + t*st], which
 * covers the grouped, shared and fixed forms (scan_schema.projection_strides; cpg = 1 with no batch or time stride marks the
 * fixed (dim, N) form, whose rows are averaged over the group like A's). Each chunk's B and C
 * are copied into a small time-major buffer first, so the state loop reads them contiguously.
 * The last state (batch, dim, N) is the group's final state given to each of its channels.
 * Compiled with REAL=float and REAL=double by native_build.py; plain C, stable ABI.
 */
/* Every loop here streams whole rows: use 512-bit vectors where the CPU has them (measured 25%
 * faster for the softplus than gcc's default 256-bit preference on an AVX-512 Xeon). */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("prefer-vector-width=512")
#endif
#include "scan_math.h"

#define CHUNK 128

/* Mean of rows [0, width) of a table with row stride `stride` and element stride `sn`, N values a row. */
static void mean_rows(const real *restrict rows, int64_t stride, int64_t sn, int64_t width, int64_t N,
                      real *restrict out)
{
    for (int64_t n = 0; n < N; n++) out[n] = 0;
    for (int64_t c = 0; c < width; c++)
        for (int64_t n = 0; n < N; n++) out[n] += rows[c * stride + n * sn];
    for (int64_t n = 0; n < N; n++) out[n] /= (real)width;
}

/* out[t * N + n] = P[n * sn + t * st] for t in [0, T): one chunk of B or C, time-major. A fixed
 * projection (st = 0, its group mean already in `P` with sn = 1) gives the same row at every t. */
static inline void chunk_rows(const real *restrict P, int64_t sn, int64_t st, int64_t T, int64_t N,
                              real *restrict out)
{
    if (st == 0) {
        for (int64_t t = 0; t < T; t++)
            for (int64_t n = 0; n < N; n++) out[t * N + n] = P[n * sn];
        return;
    }
    for (int64_t n = 0; n < N; n++)
        for (int64_t t = 0; t < T; t++) out[t * N + n] = P[n * sn + t * st];
}

static real mean_of(const real *x, int64_t width)
{
    real total = 0;
    for (int64_t c = 0; c < width; c++) total += x[c];
    return total / (real)width;
}

/* One (batch row, group): u, delta, z, y point at the group's first channel row, D and bias at
 * its first channel (or are NULL), last at its first channel's state row. */
static inline __attribute__((always_inline)) void reduced_item(
    const real *restrict u, const real *restrict delta, const real *restrict z,
    const real *restrict A_mean, const real *restrict B, int64_t B_sn, int64_t B_st,
    const real *restrict C, int64_t C_sn, int64_t C_st,
    const real *restrict D, const real *restrict bias, int softplus, int dt_raw, int skip_mean,
    real *restrict y, real *restrict last, int64_t width, int64_t L, const int64_t N)
{
    real h[N > 0 ? N : 1];
    real um[CHUNK], dtm[CHUNK], zm[CHUNK], yr[CHUNK], dts[CHUNK];
    real Bc[CHUNK * (N > 0 ? N : 1)], Cc[CHUNK * (N > 0 ? N : 1)];
    const real inv = 1 / (real)width;
    const real bias_mean = (dt_raw && bias) ? mean_of(bias, width) : 0;
    const real D_mean = (skip_mean && D) ? mean_of(D, width) : 0;
    const int mean_gate = skip_mean && z;
    for (int64_t n = 0; n < N; n++) h[n] = 0;

    for (int64_t t0 = 0; t0 < L; t0 += CHUNK) {
        const int64_t T = L - t0 < CHUNK ? L - t0 : CHUNK;
        /* 1. group means of u, the step and (mean skip) z over the chunk */
        for (int64_t t = 0; t < T; t++) um[t] = dtm[t] = zm[t] = 0;
        for (int64_t c = 0; c < width; c++) {
            const real *restrict uc = u + c * L + t0;
            const real *restrict dc = delta + c * L + t0;
            for (int64_t t = 0; t < T; t++) um[t] += uc[t];
            if (dt_raw || !softplus) {
                const real bc = (!dt_raw && bias) ? bias[c] : 0;
                for (int64_t t = 0; t < T; t++) dtm[t] += dc[t] + bc;
            } else {
                step_sizes(dc, bias ? bias[c] : 0, softplus, dts, T);
                for (int64_t t = 0; t < T; t++) dtm[t] += dts[t];
            }
            if (mean_gate) {
                const real *restrict zc = z + c * L + t0;
                for (int64_t t = 0; t < T; t++) zm[t] += zc[t];
            }
        }
        for (int64_t t = 0; t < T; t++) {
            um[t] *= inv;
            dtm[t] *= inv;
            zm[t] *= inv;
        }
        if (dt_raw) {
            for (int64_t t = 0; t < T; t++) dtm[t] += bias_mean;
            if (softplus) softplus_row(dtm, T);
        }

        /* 2. the reduced channel's recurrence */
        chunk_rows(B + t0 * B_st, B_sn, B_st, T, N, Bc);
        chunk_rows(C + t0 * C_st, C_sn, C_st, T, N, Cc);
        for (int64_t t = 0; t < T; t++) {
            const real dt = dtm[t];
            const real dtu = dt * um[t];
            const real *restrict Bt = Bc + t * N;
            const real *restrict Ct = Cc + t * N;
            real acc = 0;
            for (int64_t n = 0; n < N; n++) {
                h[n] = exp(dt * A_mean[n]) * h[n] + dtu * Bt[n];
                acc += Ct[n] * h[n];
            }
            yr[t] = acc;
        }
        if (skip_mean) {
            for (int64_t t = 0; t < T; t++) yr[t] += D_mean * um[t];
            if (mean_gate)
                for (int64_t t = 0; t < T; t++) yr[t] *= zm[t] / (1 + exp(-zm[t]));
        }

        /* 3. every channel's output, with the per-channel skip and gate in exact mode */
        for (int64_t c = 0; c < width; c++) {
            real *restrict yc = y + c * L + t0;
            if (skip_mean || (!D && !z)) {
                memcpy(yc, yr, (size_t)T * sizeof(real));
                continue;
            }
            const real Dc = D ? D[c] : 0;
            const real *restrict uc = u + c * L + t0;
            if (z) {
                const real *restrict zc = z + c * L + t0;
                for (int64_t t = 0; t < T; t++) yc[t] = (yr[t] + Dc * uc[t]) * (zc[t] / (1 + exp(-zc[t])));
            } else {
                for (int64_t t = 0; t < T; t++) yc[t] = yr[t] + Dc * uc[t];
            }
        }
    }
    for (int64_t c = 0; c < width; c++) memcpy(last + c * N, h, (size_t)N * sizeof(real));
}

void reduced_scan_forward(
    const real *u, const real *delta, const real *A,
    const real *B, int64_t B_sb, int64_t B_sg, int64_t B_sn, int64_t B_st, int64_t B_cpg,
    const real *C, int64_t C_sb, int64_t C_sg, int64_t C_sn, int64_t C_st, int64_t C_cpg,
    const real *D, const real *z, const real *bias, int32_t softplus, int32_t dt_raw, int32_t skip_mean,
    real *y, real *last_state,
    int64_t batch, int64_t dim, int64_t N, int64_t L, int64_t groups, int64_t item_begin, int64_t item_end)
{
    const int64_t width = dim / groups;
    real A_mean[N > 0 ? N : 1], B_mean[N > 0 ? N : 1], C_mean[N > 0 ? N : 1];
    (void)batch;
    for (int64_t item = item_begin; item < item_end; item++) {
        const int64_t b = item / groups, c0 = (item % groups) * width;
        const int64_t row = (b * dim + c0) * L;
        int64_t B_n = B_sn, C_n = C_sn;
        mean_rows(A + c0 * N, N, 1, width, N, A_mean);
        const real *Bp = B + b * B_sb + (c0 / B_cpg) * B_sg;
        const real *Cp = C + b * C_sb + (c0 / C_cpg) * C_sg;
        if (B_cpg == 1 && B_sb == 0 && B_st == 0) { /* fixed form (or a single-channel group) */
            mean_rows(Bp, B_sg, B_sn, width, N, B_mean);
            Bp = B_mean;
            B_n = 1;
        }
        if (C_cpg == 1 && C_sb == 0 && C_st == 0) {
            mean_rows(Cp, C_sg, C_sn, width, N, C_mean);
            Cp = C_mean;
            C_n = 1;
        }
        DISPATCH_N(reduced_item, N,
                   u + row, delta + row, z ? z + row : 0, A_mean, Bp, B_n, B_st, Cp, C_n, C_st,
                   D ? D + c0 : 0, bias ? bias + c0 : 0, softplus, dt_raw, skip_mean,
                   y + row, last_state + (b * dim + c0) * N, width, L);
    }
}
