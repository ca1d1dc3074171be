/* y = x @ w.T (+ bias) in bfloat16, float32 sums rounded to bf16 once, with AVX-512 BF16's vdpbf16ps.

   vdpbf16ps multiplies 32 bf16 pairwise and adds each pair's two products into one of 16 float32 lanes. The
   weight is packed (kernels/cpu_ops.py pack_linear_weight) so that one 64-byte load holds 16 output columns'
   values at two consecutive k, [N / 32][K / 2][32][2]; with x's pair (x[k], x[k + 1]) broadcast to every lane,
   one instruction adds two products to each of 16 columns' sums. So no lane ever needs summing across (a
   row-major weight's dot products end in a horizontal sum per output, which took a quarter of the time at 16-32
   rows), and each block of 32 columns is one sequential stream, which the hardware prefetcher follows (four
   rows read side by side streamed 1.3x slower at 1 row). A whole step's matmuls at SmolLM2's shapes
   (benchmarks/cpu_kernels.py, three runs): 1.9-2.6x torch's bf16 matmul (oneDNN) at 1 row, 1.6-1.9x at 32
   (decode steps), 1.2-1.3x at 128; one layer at a prefill chunk's 512-2048 rows 1.1x.

   Tiles: one block of 32 columns (two vectors) by up to 8 rows of x, 16 float32 accumulators in registers. A
   block's packed weight (36-96 KB at K 576-1536) stays in L2 while the rows of x are walked 8 at a time, so only
   the first pass reads it from memory. Threads split the blocks. x, y: row-major, their last dim contiguous. */
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

enum { BLOCK = 32, VECTORS = BLOCK / 16, X_ROWS = 8 };

/* One block's columns for `rows` rows of x: the packed weight wp is that block's [K / 2][BLOCK][2]. The constant
   rows of each call site unroll the loops and keep the accumulators in registers. */
static inline __attribute__((always_inline)) void tile(const uint16_t *x, int64_t x_stride, const uint16_t *wp,
                                                       int k_pairs, const int rows, const uint16_t *bias,
                                                       uint16_t *y, int64_t y_stride) {
    __m512 acc[X_ROWS][VECTORS];
    for (int m = 0; m < rows; m++)
        for (int v = 0; v < VECTORS; v++) acc[m][v] = _mm512_setzero_ps();
    for (int p = 0; p < k_pairs; p++) {
        __m512bh w[VECTORS];
        for (int v = 0; v < VECTORS; v++) w[v] = (__m512bh)_mm512_loadu_si512(wp + (int64_t)p * 2 * BLOCK + 32 * v);
        for (int m = 0; m < rows; m++) {
            int32_t pair; /* x[m][2p] and x[m][2p + 1], as one 32-bit lane */
            memcpy(&pair, x + m * x_stride + 2 * p, sizeof pair);
            const __m512bh xp = (__m512bh)_mm512_set1_epi32(pair);
            for (int v = 0; v < VECTORS; v++) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], xp, w[v]);
        }
    }
    for (int m = 0; m < rows; m++)
        for (int v = 0; v < VECTORS; v++) {
            float sums[16];
            _mm512_storeu_ps(sums, acc[m][v]);
            uint16_t *out = y + m * y_stride + 16 * v;
            const uint16_t *b = bias ? bias + 16 * v : 0;
#pragma omp simd
            for (int i = 0; i < 16; i++) out[i] = to_bf16(sums[i] + (b ? bits_to_float((uint32_t)b[i] << 16) : 0.0f));
        }
}

/* N a multiple of BLOCK and K of 2, as pack_linear_weight packs only such weights. */
void linear_bf16(const uint16_t *x, int64_t x_stride, const uint16_t *packed, const uint16_t *bias, uint16_t *y,
                 int64_t y_stride, int M, int N, int K, int num_threads) {
    const int64_t blocks = N / BLOCK;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t block = 0; block < blocks; block++) {
        const uint16_t *wp = packed + block * BLOCK * K, *b = bias ? bias + block * BLOCK : 0;
        for (int m0 = 0; m0 < M; m0 += X_ROWS) {
            const uint16_t *xm = x + m0 * x_stride;
            uint16_t *ym = y + m0 * y_stride + block * BLOCK;
            switch (M - m0 >= X_ROWS ? X_ROWS : M - m0) { /* constant row counts: each case unrolls */
            case 8: tile(xm, x_stride, wp, K / 2, 8, b, ym, y_stride); break;
            case 7: tile(xm, x_stride, wp, K / 2, 7, b, ym, y_stride); break;
            case 6: tile(xm, x_stride, wp, K / 2, 6, b, ym, y_stride); break;
            case 5: tile(xm, x_stride, wp, K / 2, 5, b, ym, y_stride); break;
            case 4: tile(xm, x_stride, wp, K / 2, 4, b, ym, y_stride); break;
            case 3: tile(xm, x_stride, wp, K / 2, 3, b, ym, y_stride); break;
            case 2: tile(xm, x_stride, wp, K / 2, 2, b, ym, y_stride); break;
            default: tile(xm, x_stride, wp, K / 2, 1, b, ym, y_stride); break;
            }
        }
    }
}
#endif
