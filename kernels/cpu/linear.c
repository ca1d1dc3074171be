/* y = x @ w.T (+ bias) in bfloat16 for the few rows of a decode step: float32 sums, rounded to bf16 once.

   At 1-32 rows a linear layer is a stream over its weight: every weight element is read once and used for
   each row of x, where torch's bf16 matmul (oneDNN) is 1.2-1.7x slower than this (benchmarks/cpu_kernels.py).
   This reads each weight row once, in 64-byte chunks, and multiplies it into every row of x
   while it is in registers, with AVX-512 BF16's vdpbf16ps (32 products a chunk, summed in pairs into 16 float32
   lanes).

   Tiles: ROWS weight rows by up to X_ROWS rows of x, ROWS * X_ROWS accumulators. A tile's weight rows (a few
   KB) stay in L1 while the x rows are walked in groups, so larger batches re-read them from cache, not memory.
   Threads split the weight rows. x, w, y: row-major with a contiguous last dim (row strides in elements). */
#include "common.h"

/* Whether this build has the kernel: only a CPU with AVX-512 BF16 gets it, since a plain float32 loop over bf16
   weights is slower than torch's matmul (the engine defaults to float32 on such CPUs anyway). */
int linear_bf16_available(void) {
#ifdef __AVX512BF16__
    return 1;
#else
    return 0;
#endif
}

#ifdef __AVX512BF16__
#include <immintrin.h>

enum { ROWS = 4, X_ROWS = 4, PREFETCH_BYTES = 4096 };

/* A row's last `left` (1-31) bf16 at p, the rest of the chunk zero. */
static inline __m512bh load_tail(const uint16_t *p, int left) {
    return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1u << left) - 1u), p);
}

/* The sums of one tile: rows weight rows from w by x_rows rows of x, into sums[r][m]. The constant rows and
   x_rows of each call site unroll the loops, and the accumulators live in registers. */
static inline __attribute__((always_inline)) void tile_sums(const uint16_t *x, int64_t x_stride, const uint16_t *w,
                                                            int64_t w_stride, int K, const int rows,
                                                            const int x_rows, float sums[ROWS][X_ROWS]) {
    __m512 acc[ROWS][X_ROWS];
    for (int r = 0; r < rows; r++)
        for (int m = 0; m < x_rows; m++) acc[r][m] = _mm512_setzero_ps();
    const int k_full = K & ~31;
    for (int k = 0; k < k_full; k += 32) {
        __m512bh wk[ROWS];
        for (int r = 0; r < rows; r++) {
            _mm_prefetch((const char *)(w + r * w_stride + k) + PREFETCH_BYTES, _MM_HINT_T0);
            wk[r] = (__m512bh)_mm512_loadu_si512(w + r * w_stride + k);
        }
        for (int m = 0; m < x_rows; m++) {
            const __m512bh xk = (__m512bh)_mm512_loadu_si512(x + m * x_stride + k);
            for (int r = 0; r < rows; r++) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], xk, wk[r]);
        }
    }
    if (k_full < K) {
        __m512bh wk[ROWS];
        for (int r = 0; r < rows; r++) wk[r] = load_tail(w + r * w_stride + k_full, K - k_full);
        for (int m = 0; m < x_rows; m++) {
            const __m512bh xk = load_tail(x + m * x_stride + k_full, K - k_full);
            for (int r = 0; r < rows; r++) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], xk, wk[r]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int m = 0; m < x_rows; m++) sums[r][m] = _mm512_reduce_add_ps(acc[r][m]);
}

/* One tile's sums for each group of x rows, with the bias, rounded into y. */
static inline __attribute__((always_inline)) void tile(const uint16_t *x, int64_t x_stride, const uint16_t *w,
                                                       int64_t w_stride, const uint16_t *bias, uint16_t *y,
                                                       int64_t y_stride, int M, int K, const int rows) {
    float sums[ROWS][X_ROWS];
    for (int m0 = 0; m0 < M; m0 += X_ROWS) {
        const uint16_t *xm = x + m0 * x_stride;
        switch (M - m0 >= X_ROWS ? X_ROWS : M - m0) { /* constant counts: each case unrolls */
        case 4: tile_sums(xm, x_stride, w, w_stride, K, rows, 4, sums); break;
        case 3: tile_sums(xm, x_stride, w, w_stride, K, rows, 3, sums); break;
        case 2: tile_sums(xm, x_stride, w, w_stride, K, rows, 2, sums); break;
        default: tile_sums(xm, x_stride, w, w_stride, K, rows, 1, sums); break;
        }
        for (int m = 0; m < X_ROWS && m0 + m < M; m++)
            for (int r = 0; r < rows; r++) {
                const float b = bias ? bits_to_float((uint32_t)bias[r] << 16) : 0.0f;
                y[(m0 + m) * y_stride + r] = to_bf16(sums[r][m] + b);
            }
    }
}

void linear_bf16(const uint16_t *x, int64_t x_stride, const uint16_t *w, int64_t w_stride, const uint16_t *bias,
                 uint16_t *y, int64_t y_stride, int M, int N, int K, int num_threads) {
    const int64_t num_tiles = (N + ROWS - 1) / ROWS;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < num_tiles; t++) {
        const int64_t n = t * ROWS;
        const uint16_t *wt = w + n * w_stride, *bt = bias ? bias + n : 0;
        uint16_t *yt = y + n;
        switch (N - n >= ROWS ? ROWS : (int)(N - n)) { /* the last tile's 1-3 rows, as tile's x-row groups */
        case 4: tile(x, x_stride, wt, w_stride, bt, yt, y_stride, M, K, 4); break;
        case 3: tile(x, x_stride, wt, w_stride, bt, yt, y_stride, M, K, 3); break;
        case 2: tile(x, x_stride, wt, w_stride, bt, yt, y_stride, M, K, 2); break;
        default: tile(x, x_stride, wt, w_stride, bt, yt, y_stride, M, K, 1); break;
        }
    }
}
#endif
