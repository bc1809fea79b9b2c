/*
 * A VMeanba-reduced scan site (docs/DESIGN.md section 2) for the CPU, fused: for one (batch row,
 * group) it reads the group's u and delta (and z) once, forms the group means while reading,
 * runs the one-channel recurrence and writes every channel's output with the D*u skip and the
 * silu(z) gate, so a reduced site costs about one pass over its inputs and one over its output.
 * lowering/reduced_scan.py is the same computation written as a composition (the reference).
 *
 * Time runs in chunks (CHUNK steps, fewer for large states). One sweep over the group's channels
 * does two things per channel: it adds the channel's chunk k into the means (each loop over t
 * vectorises), and it writes the channel's output of chunk k - 1, whose reduced row the previous
 * sweep produced, re-reading that u (for D*u) while it is still in cache. Interleaving the
 * compute-bound softplus with the memory-bound output writes lets the core overlap them, so the
 * site costs about its memory traffic (VMamba's stage-0 shape, one thread: separate mean and
 * output sweeps took ~4.2 ms, one interleaved sweep ~2.6 ms, ~2.1 ms with the streaming stores
 * below). Between sweeps the chunk's recurrence runs on the means.
 * The (batch, group) items [item_begin, item_end) share no memory and run on OpenMP threads.
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
 * Compiled with REAL=float and REAL=double by native_build.py; plain C (SSE2 intrinsics for the
 * streaming stores on x86-64), stable ABI.
 */
/* Every loop here streams whole rows: use 512-bit vectors where the CPU has them (measured 25%
 * faster for the softplus than gcc's default 256-bit preference on an AVX-512 Xeon). */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("prefer-vector-width=512")
#endif
#include "scan_math.h"
#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__SSE2__)
#include <immintrin.h>
#endif

#define CHUNK 256          /* time steps per chunk: the group's chunk of u stays in L2 between sweeps */
#define CHUNK_STATES 4096  /* bound on chunk * N, the size of the per-chunk B and C buffers (on the stack) */
/* Channels ahead whose chunk of u and delta a sweep prefetches: the sweep jumps between rows L
 * apart, a short run in each, which the hardware prefetchers do not follow; with inputs not in
 * cache, prefetching 2 channels ahead cut the stage-0 site by 6-8% (1 to 4 ahead tried; with
 * inputs in cache it made no difference beyond the noise). */
#define PREFETCH_CHANNELS 2

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
    for (int64_t t = 0; t < T; t++)
        for (int64_t n = 0; n < N; n++) out[t * N + n] = P[n * sn + t * st];
}

static real mean_of(const real *x, int64_t width)
{
    real total = 0;
    for (int64_t c = 0; c < width; c++) total += x[c];
    return total / (real)width;
}

/* dst[0, T) = src[0, T), on x86-64 with stores that bypass the caches: a site's output is written
 * once and only read after the whole site has run, when a large one (VMamba's stage 0: 9.6 MB at
 * batch 1) has left the core's caches anyway, and a plain store first reads each output line
 * into the cache (measured: ~15% of the site). The widest vector the build targets; unaligned
 * ends take plain stores. */
#if defined(__AVX512F__)
#define STREAM_BYTES 64
#define STREAM_FLOAT(d, s) _mm512_stream_ps(d, _mm512_loadu_ps(s))
#define STREAM_DOUBLE(d, s) _mm512_stream_pd(d, _mm512_loadu_pd(s))
#elif defined(__AVX__)
#define STREAM_BYTES 32
#define STREAM_FLOAT(d, s) _mm256_stream_ps(d, _mm256_loadu_ps(s))
#define STREAM_DOUBLE(d, s) _mm256_stream_pd(d, _mm256_loadu_pd(s))
#elif defined(__SSE2__)
#define STREAM_BYTES 16
#define STREAM_FLOAT(d, s) _mm_stream_ps(d, _mm_loadu_ps(s))
#define STREAM_DOUBLE(d, s) _mm_stream_pd(d, _mm_loadu_pd(s))
#endif
static inline void stream_row(real *restrict dst, const real *restrict src, int64_t T)
{
    int64_t t = 0;
#ifdef STREAM_BYTES
    const int64_t lanes = STREAM_BYTES / sizeof(real);
    for (; t < T && ((uintptr_t)(dst + t) % STREAM_BYTES); t++) dst[t] = src[t];
    for (; t + lanes <= T; t += lanes) {
        if (sizeof(real) == sizeof(float))
            STREAM_FLOAT((float *)(dst + t), (const float *)(src + t));
        else
            STREAM_DOUBLE((double *)(dst + t), (const double *)(src + t));
    }
#endif
    for (; t < T; t++) dst[t] = src[t];
}

/* Asks Linux for 2 MB pages over the whole 2 MB blocks of [p, p + bytes). A large output is fresh
 * memory on every call (glibc maps allocations above 32 MB anew each time), and writing it costs
 * one page fault per 4 KB otherwise: about half of the site's time at VMamba's stage 0 at batch 8
 * (18,800 faults per call). A hint only: nothing changes where transparent huge pages are off. */
static void prefer_huge_pages(void *p, size_t bytes)
{
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)2 << 20;
    const uintptr_t begin = ((uintptr_t)p + huge - 1) & ~(huge - 1);
    const uintptr_t end = ((uintptr_t)p + bytes) & ~(huge - 1);
    if (end > begin) madvise((void *)begin, end - begin, MADV_HUGEPAGE);
#else
    (void)p;
    (void)bytes;
#endif
}

/* One channel's output over T steps from the reduced row yr: yr + D*u, times silu(z), in exact
 * skip mode (skip and gate per channel); yr itself otherwise. `row` is T entries of scratch. */
static inline __attribute__((always_inline)) void write_channel(
    const real *restrict yr, const real *restrict uc, const real *restrict zc, const real *restrict Dc,
    real *restrict row, real *restrict yc, int64_t T)
{
    if (!Dc && !zc) {
        stream_row(yc, yr, T);
        return;
    }
    const real D = Dc ? *Dc : 0;
    if (zc && Dc)
        for (int64_t t = 0; t < T; t++) row[t] = (yr[t] + D * uc[t]) * (zc[t] / (1 + exp(-zc[t])));
    else if (zc)
        for (int64_t t = 0; t < T; t++) row[t] = yr[t] * (zc[t] / (1 + exp(-zc[t])));
    else
        for (int64_t t = 0; t < T; t++) row[t] = yr[t] + D * uc[t];
    stream_row(yc, row, T);
}

/* The reduced channel's recurrence over one chunk: yr[t] = C_t . h_t with
 * h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t (the state loop vectorises). */
static inline __attribute__((always_inline)) void chunk_recurrence(
    const real *restrict dt, const real *restrict um, const real *restrict A, const real *restrict Bc,
    const real *restrict Cc, real *restrict h, real *restrict yr, int64_t T, const int64_t N)
{
    for (int64_t t = 0; t < T; t++) {
        const real dtu = dt[t] * um[t];
        real acc = 0;
        for (int64_t n = 0; n < N; n++) {
            h[n] = exp(dt[t] * A[n]) * h[n] + dtu * Bc[t * N + n];
            acc += Cc[t * N + n] * h[n];
        }
        yr[t] = acc;
    }
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
    const int64_t states = N > 0 ? N : 1;
    const int64_t chunk = states * CHUNK <= CHUNK_STATES ? CHUNK
                          : (CHUNK_STATES / states > 0 ? CHUNK_STATES / states : 1);
    real h[states];
    real um[CHUNK], dtm[CHUNK], zm[CHUNK], yr[2][CHUNK], dts[CHUNK], row[CHUNK];
    real Bc[chunk * states], Cc[chunk * states];
    const real inv = 1 / (real)width;
    const real bias_mean = (dt_raw && bias) ? mean_of(bias, width) : 0;
    const real D_mean = (skip_mean && D) ? mean_of(D, width) : 0;
    const int mean_gate = skip_mean && z;
    const int64_t chunks = (L + chunk - 1) / chunk;
    for (int64_t n = 0; n < N; n++) h[n] = 0;

    /* Sweep k reads chunk k into the means and writes chunk k - 1; sweep `chunks` only writes. */
    for (int64_t k = 0; k <= chunks; k++) {
        const int64_t t0 = k * chunk, p0 = t0 - chunk;
        const int64_t T = k < chunks ? (L - t0 < chunk ? L - t0 : chunk) : 0;
        const int64_t P = k > 0 ? (L - p0 < chunk ? L - p0 : chunk) : 0;
        const real *restrict y_prev = yr[(k + 1) & 1];
        real *restrict y_next = yr[k & 1];
        for (int64_t t = 0; t < T; t++) um[t] = dtm[t] = zm[t] = 0;
        for (int64_t c = 0; c < width; c++) {
            const real *restrict uc = u + c * L + t0;
            const real *restrict dc = delta + c * L + t0;
            if (c + PREFETCH_CHANNELS < width)
                for (int64_t t = 0; t < T; t += 64 / sizeof(real)) {
                    __builtin_prefetch(uc + PREFETCH_CHANNELS * L + t);
                    __builtin_prefetch(dc + PREFETCH_CHANNELS * L + t);
                }
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
            if (P > 0)
                write_channel(y_prev, u + c * L + p0, skip_mean || !z ? 0 : z + c * L + p0,
                              skip_mean || !D ? 0 : D + c, row, y + c * L + p0, P);
        }
        if (T == 0) break;
        for (int64_t t = 0; t < T; t++) {
            um[t] *= inv;
            dtm[t] *= inv;
            zm[t] *= inv;
        }
        if (dt_raw) {
            for (int64_t t = 0; t < T; t++) dtm[t] += bias_mean;
            if (softplus) softplus_row(dtm, T);
        }
        chunk_rows(B + t0 * B_st, B_sn, B_st, T, N, Bc);
        chunk_rows(C + t0 * C_st, C_sn, C_st, T, N, Cc);
        chunk_recurrence(dtm, um, A_mean, Bc, Cc, h, y_next, T, N);
        if (skip_mean) {
            for (int64_t t = 0; t < T; t++) y_next[t] += D_mean * um[t];
            if (mean_gate)
                for (int64_t t = 0; t < T; t++) y_next[t] *= zm[t] / (1 + exp(-zm[t]));
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
    (void)batch;
    prefer_huge_pages(y + item_begin * width * L, (size_t)((item_end - item_begin) * width * L) * sizeof(real));
    /* The items run on OpenMP threads. The build links libgomp, and in a process that has loaded
     * torch that is torch's own copy, so these are torch's intra-op threads (torch.set_num_threads),
     * the ones Inductor's kernels run on. A separate pool would compete with them: their workers
     * spin between parallel regions (measured on v2-tiny at 2 threads, load average ~2: all
     * reduced / floor 1.17-1.21 with a Python thread pool, 1.01-1.07 on OpenMP). Inside another
     * parallel region (the deploy op library's blocks) this one is inactive and runs the items in
     * the calling thread; built without OpenMP, the pragma is ignored and so is the thread count. */
#pragma omp parallel for schedule(static)
    for (int64_t item = item_begin; item < item_end; item++) {
        real A_mean[N > 0 ? N : 1], B_mean[N > 0 ? N : 1], C_mean[N > 0 ? N : 1];
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
#if defined(__SSE2__)
        _mm_sfence(); /* this thread's streaming stores are weakly ordered: make them visible */
#endif
    }
}
