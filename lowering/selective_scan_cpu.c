/*
 * Selective scan (Mamba S6) for the CPU: one channel at a time, the N-wide state kept in a small
 * array so the compiler vectorises the state update, the time loop sequential. It never
 * materialises exp(dt*A) or dt*B*u over L, which is what makes it fast compared with torch-level
 * formulations (README, "Benchmarks").
 *
 * Compiled twice by native_build.py: once with REAL=float and once with REAL=double. Callers
 * split channels [c_begin, c_end) across threads; nothing here is shared between threads except
 * the per-worker gradient buffers each caller hands in.
 *
 * B and C are read through strides: element (batch b, channel c, time t, state n) lives at
 * P[b*sb + (c / cpg)*sg + t*st + n], which covers grouped, shared and fixed projections.
 */
#include "scan_math.h"

/* d dt / d raw delta: the softplus slope, 1 above the threshold or without softplus. */
static inline real step_size_grad(real raw, int softplus)
{
    if (!softplus || raw > SOFTPLUS_THRESHOLD) return 1;
    return 1 / (1 + exp(-raw));
}

/* One (batch, channel) row forward; N is a compile-time constant in the specialised copies.
 * dts is L entries of scratch. The recurrence loop holds only the state update; the skip and
 * the gate run afterwards as dependency-free loops over t. */
static inline __attribute__((always_inline)) void forward_row(
    const real *restrict u, const real *restrict delta, const real *restrict A,
    const real *restrict B, int64_t B_st, const real *restrict C, int64_t C_st,
    real D, const real *restrict z, real bias, int softplus,
    real *restrict y, real *restrict h, real *restrict dts, int64_t L, const int64_t N)
{
    step_sizes(delta, bias, softplus, dts, L);
    for (int64_t n = 0; n < N; n++) h[n] = 0;
    for (int64_t t = 0; t < L; t++) {
        const real dt = dts[t];
        const real dtu = dt * u[t];
        const real *restrict Bt = B + t * B_st;
        const real *restrict Ct = C + t * C_st;
        real acc = 0;
        for (int64_t n = 0; n < N; n++) {
            h[n] = exp(dt * A[n]) * h[n] + dtu * Bt[n];
            acc += Ct[n] * h[n];
        }
        y[t] = acc;
    }
    for (int64_t t = 0; t < L; t++) y[t] += D * u[t];
    if (z)
        for (int64_t t = 0; t < L; t++) y[t] *= z[t] / (1 + exp(-z[t]));
}

/* scratch: L entries. */
void scan_forward(
    const real *u, const real *delta, const real *A,
    const real *B, int64_t B_sb, int64_t B_sg, int64_t B_st, int64_t B_cpg,
    const real *C, int64_t C_sb, int64_t C_sg, int64_t C_st, int64_t C_cpg,
    const real *D, const real *z, const real *bias, int32_t softplus,
    real *y, real *last_state, real *scratch,
    int64_t batch, int64_t dim, int64_t N, int64_t L, int64_t c_begin, int64_t c_end)
{
    for (int64_t c = c_begin; c < c_end; c++) {
        for (int64_t b = 0; b < batch; b++) {
            const int64_t row = (b * dim + c) * L;
            DISPATCH_N(forward_row, N,
                u + row, delta + row, A + c * N,
                B + b * B_sb + (c / B_cpg) * B_sg, B_st,
                C + b * C_sb + (c / C_cpg) * C_sg, C_st,
                D ? D[c] : 0, z ? z + row : 0, bias ? bias[c] : 0, softplus,
                y + row, last_state + (b * dim + c) * N, scratch, L);
        }
    }
}

/*
 * One (batch, channel) row backward. A forward sweep stores every state h_t in H and every
 * decay a_t = exp(dt_t * A) in decay (both L x N scratch); the reverse sweep then carries
 * gh = dLoss/dh_t:
 *   gh_t = gy_t * C_t + a_{t+1} * gh_{t+1},   b_t = dt_t * B_t * u_t
 * from which dA, dB, dC, du, d(dt) follow (docs/DESIGN.md section 1 recurrence, differentiated).
 * gB, gC, gA, gD, gbias accumulate (+=): several rows add into the same entries.
 */
static inline __attribute__((always_inline)) void backward_row(
    const real *restrict grad_y, const real *restrict grad_last,
    const real *restrict u, const real *restrict delta, const real *restrict A,
    const real *restrict B, int64_t B_st, const real *restrict C, int64_t C_st,
    real D, const real *restrict z, real bias, int softplus,
    real *restrict gu, real *restrict gdelta, real *restrict gA,
    real *restrict gB, real *restrict gC, real *restrict gD, real *restrict gz, real *restrict gbias,
    real *restrict H, real *restrict decay, real *restrict dts, int64_t L, const int64_t N)
{
    real gh[N > 0 ? N : 1];
    step_sizes(delta, bias, softplus, dts, L);
    for (int64_t t = 0; t < L; t++) {
        const real dt = dts[t];
        const real dtu = dt * u[t];
        const real *restrict Bt = B + t * B_st;
        for (int64_t n = 0; n < N; n++) {
            const real a = exp(dt * A[n]);
            const real hprev = t > 0 ? H[(t - 1) * N + n] : 0;
            decay[t * N + n] = a;
            H[t * N + n] = a * hprev + dtu * Bt[n];
        }
    }
    for (int64_t n = 0; n < N; n++) gh[n] = grad_last ? grad_last[n] : 0;
    real gD_acc = 0, gbias_acc = 0;
    for (int64_t t = L - 1; t >= 0; t--) {
        const real dt = dts[t];
        const real ut = u[t];
        const real *restrict Bt = B + t * B_st;
        const real *restrict Ct = C + t * C_st;
        const real *restrict Ht = H + t * N;
        const real *restrict at = decay + t * N;
        real *restrict gBt = gB + t * B_st;
        real *restrict gCt = gC + t * C_st;
        real g = grad_y[t];
        if (z) {
            real yt = D * ut;
            for (int64_t n = 0; n < N; n++) yt += Ct[n] * Ht[n];
            const real sig = 1 / (1 + exp(-z[t]));
            gz[t] = g * yt * sig * (1 + z[t] * (1 - sig));
            g *= z[t] * sig;
        }
        gD_acc += g * ut;
        real gut = g * D, gdt = 0;
        for (int64_t n = 0; n < N; n++) {
            const real hprev = t > 0 ? H[(t - 1) * N + n] : 0;
            gh[n] += g * Ct[n];
            gCt[n] += g * Ht[n];
            gdt += gh[n] * (at[n] * A[n] * hprev + Bt[n] * ut);
            gA[n] += gh[n] * at[n] * dt * hprev;
            gBt[n] += gh[n] * dt * ut;
            gut += gh[n] * dt * Bt[n];
            gh[n] *= at[n];
        }
        const real gd = gdt * step_size_grad(delta[t] + bias, softplus);
        gdelta[t] = gd;
        gbias_acc += gd;
        gu[t] = gut;
    }
    *gD += gD_acc;
    *gbias += gbias_acc;
}

/* scratch: (2 * N + 1) * L entries. */
void scan_backward(
    const real *grad_y, const real *grad_last,
    const real *u, const real *delta, const real *A,
    const real *B, int64_t B_sb, int64_t B_sg, int64_t B_st, int64_t B_cpg,
    const real *C, int64_t C_sb, int64_t C_sg, int64_t C_st, int64_t C_cpg,
    const real *D, const real *z, const real *bias, int32_t softplus,
    real *gu, real *gdelta, real *gA, real *gB, real *gC, real *gD, real *gz, real *gbias,
    real *scratch, int64_t batch, int64_t dim, int64_t N, int64_t L, int64_t c_begin, int64_t c_end)
{
    for (int64_t c = c_begin; c < c_end; c++) {
        for (int64_t b = 0; b < batch; b++) {
            const int64_t row = (b * dim + c) * L;
            const int64_t B_off = b * B_sb + (c / B_cpg) * B_sg;
            const int64_t C_off = b * C_sb + (c / C_cpg) * C_sg;
            DISPATCH_N(backward_row, N,
                grad_y + row, grad_last ? grad_last + (b * dim + c) * N : 0,
                u + row, delta + row, A + c * N,
                B + B_off, B_st, C + C_off, C_st,
                D ? D[c] : 0, z ? z + row : 0, bias ? bias[c] : 0, softplus,
                gu + row, gdelta + row, gA + c * N, gB + B_off, gC + C_off,
                gD + c, z ? gz + row : 0, gbias + c,
                scratch, scratch + L * N, scratch + 2 * L * N, L);
        }
    }
}
