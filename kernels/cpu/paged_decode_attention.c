/* Paged decode attention on the CPU, reading K and V where they lie in the block pool.

   The PyTorch reference (kernels/reference.py) gathers every sequence's blocks into a padded copy each layer and
   step, then runs SDPA over it: the gather writes and re-reads the whole context. Here each (sequence, KV head)
   walks its block table and keeps an online softmax, CHUNK keys at a time, so the cache is read once.
   One OpenMP task per (sequence, KV head); the query heads that share the KV head ride along (GQA).

   Layouts (element strides are passed where a tensor can be a view):
     query, out  [num_tokens, num_heads, head_dim], head_dim contiguous; row i is sequence i's query
     kv_cache    [2, num_blocks, block_size, num_kv_heads, head_dim], contiguous
     block_tables [num_seqs, table_stride] int32; seq_lens [num_seqs] int32
   dtype 0: float32, 1: bfloat16 (query, cache and out share it). Scores, softmax and sums run in float32. */
#include "common.h"

#define MAX_HEAD_DIM 256
#define MAX_GROUP 32
#define CHUNK 32 /* keys scored at a time: one softmax rescale per chunk, any block size */

#ifdef __AVX512BF16__
#include <immintrin.h>

/* s[i] = the sum of a[i]'s 16 lanes, for 16 vectors at once: a tree of 15 adds over shuffled pairs instead of
   16 separate horizontal sums (4 shuffles and 4 adds each). */
static inline __m512 sum_lanes16(const __m512 *a) {
    __m512 pairs[8], quads[4], halves[2];
    for (int j = 0; j < 8; j++) /* per 128-bit lane: a0+a2, b0+b2, a1+a3, b1+b3 */
        pairs[j] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * j], a[2 * j + 1]),
                                 _mm512_unpackhi_ps(a[2 * j], a[2 * j + 1]));
    for (int j = 0; j < 4; j++) { /* per 128-bit lane: the lane's sum of each of four vectors */
        const __m512d x = _mm512_castps_pd(pairs[2 * j]), y = _mm512_castps_pd(pairs[2 * j + 1]);
        quads[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int j = 0; j < 2; j++) /* then across the 128-bit lanes */
        halves[j] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * j], quads[2 * j + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(quads[2 * j], quads[2 * j + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* scores[t] = q . key t for count keys of a bf16 cache, head_dim a multiple of 32: vdpbf16ps on the bf16 values
   as stored (exact products, float32 sums), 16 keys' sums reduced together. The float32 path converts every key
   first and sums each dot product on its own; this is about 2.5x fewer instructions per key. */
static void scores_bf16(const uint16_t *q, const uint16_t *keys, const int64_t *slot, int count, int head_dim,
                        float *scores) {
    for (int t0 = 0; t0 < count; t0 += 16) {
        __m512 acc[16];
        for (int i = 0; i < 16; i++) {
            acc[i] = _mm512_setzero_ps();
            if (t0 + i < count)
                for (int d = 0; d < head_dim; d += 32)
                    acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_loadu_si512(q + d),
                                              (__m512bh)_mm512_loadu_si512(keys + slot[t0 + i] + d));
        }
        float sums[16];
        _mm512_storeu_ps(sums, sum_lanes16(acc));
        for (int i = 0; i < 16 && t0 + i < count; i++) scores[t0 + i] = sums[i];
    }
}
#endif

static inline float dot(const float *a, const float *b, int n) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int d = 0; d < n; d++) sum += a[d] * b[d];
    return sum;
}

static void attend_one(const void *query, const void *kv_cache, void *out, const int32_t *table, int seq_len,
                       int64_t q_row, int64_t q_stride_head, int64_t out_row, int64_t out_stride_head,
                       int64_t v_offset, int kv_head, int group, int num_kv_heads, int head_dim, int block_size,
                       float scale, int sliding_window, float soft_cap, int dtype) {
    float q[MAX_GROUP][MAX_HEAD_DIM], acc[MAX_GROUP][MAX_HEAD_DIM];
    float scores[MAX_GROUP][CHUNK], row_max[MAX_GROUP], row_sum[MAX_GROUP];
    float key[CHUNK][MAX_HEAD_DIM], value[MAX_HEAD_DIM];
    int64_t slot[CHUNK]; /* each key's offset in the K half of the cache */
    /* With a soft cap the score is cap * tanh(q.k * scale / cap), without q.k * scale: in float32 the factor is
       folded into q; bf16 scores come straight from the stored values, the factor applied to each sum. */
    float q_scale = soft_cap > 0.0f ? scale / soft_cap : scale;
#ifdef __AVX512BF16__
    const int bf16_scores = dtype == 1 && head_dim % 32 == 0;
#else
    const int bf16_scores = 0;
#endif
    for (int g = 0; g < group; g++) {
        if (!bf16_scores) {
            load_row(query, q_row + (int64_t)(kv_head * group + g) * q_stride_head, dtype, head_dim, q[g]);
            for (int d = 0; d < head_dim; d++) q[g][d] *= q_scale;
        }
        memset(acc[g], 0, (size_t)head_dim * sizeof(float));
        row_max[g] = -INFINITY;
        row_sum[g] = 0.0f;
    }
    int first = sliding_window > 0 && seq_len > sliding_window ? seq_len - sliding_window : 0;
    int64_t token_stride = (int64_t)num_kv_heads * head_dim;
    for (int start = first; start < seq_len; start += CHUNK) {
        int count = seq_len - start < CHUNK ? seq_len - start : CHUNK;
        for (int t = 0; t < count; t++) {
            int position = start + t;
            slot[t] = ((int64_t)table[position / block_size] * block_size + position % block_size) * token_stride
                      + (int64_t)kv_head * head_dim;
            if (!bf16_scores) load_row(kv_cache, slot[t], dtype, head_dim, key[t]);
        }
        for (int g = 0; g < group; g++) {
            float chunk_max = -INFINITY;
#ifdef __AVX512BF16__
            if (bf16_scores)
                scores_bf16((const uint16_t *)query + q_row + (int64_t)(kv_head * group + g) * q_stride_head,
                            (const uint16_t *)kv_cache, slot, count, head_dim, scores[g]);
#endif
            for (int t = 0; t < count; t++) {
                float s = bf16_scores ? scores[g][t] * q_scale : dot(q[g], key[t], head_dim);
                if (soft_cap > 0.0f) s = soft_cap * fast_tanh(s);
                scores[g][t] = s;
                chunk_max = s > chunk_max ? s : chunk_max;
            }
            float new_max = chunk_max > row_max[g] ? chunk_max : row_max[g];
            float correction = fast_exp(row_max[g] - new_max); /* 0 on the first chunk (-inf) */
            row_sum[g] *= correction;
            for (int d = 0; d < head_dim; d++) acc[g][d] *= correction;
            row_max[g] = new_max;
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int t = 0; t < count; t++) {
                scores[g][t] = fast_exp(scores[g][t] - new_max);
                sum += scores[g][t];
            }
            row_sum[g] += sum;
        }
        for (int t = 0; t < count; t++) {
            load_row(kv_cache, v_offset + slot[t], dtype, head_dim, value);
            for (int g = 0; g < group; g++) {
                float p = scores[g][t];
#pragma omp simd
                for (int d = 0; d < head_dim; d++) acc[g][d] += p * value[d];
            }
        }
    }
    for (int g = 0; g < group; g++) {
        float inv = row_sum[g] > 0.0f ? 1.0f / row_sum[g] : 0.0f; /* an empty sequence (padding) gives zeros */
        int64_t o = out_row + (int64_t)(kv_head * group + g) * out_stride_head;
        for (int d = 0; d < head_dim; d++) acc[g][d] *= inv;
        store_row(out, o, dtype, head_dim, acc[g]);
    }
}

/* Returns 0, or -1 when a head is larger than the fixed buffers (the caller then takes the reference path). */
int paged_decode_attention(const void *query, int64_t q_stride_token, int64_t q_stride_head, const void *kv_cache,
                           int64_t num_blocks, const int32_t *block_tables, int64_t table_stride,
                           const int32_t *seq_lens, int seq_start, int seq_stop, void *out, int64_t out_stride_token,
                           int64_t out_stride_head, int num_heads, int num_kv_heads, int head_dim, int block_size,
                           float scale, int sliding_window, float soft_cap, int dtype, int num_threads) {
    int group = num_heads / num_kv_heads;
    if (head_dim > MAX_HEAD_DIM || group > MAX_GROUP) return -1;
    int64_t v_offset = num_blocks * block_size * (int64_t)num_kv_heads * head_dim;
    int64_t num_tasks = (int64_t)(seq_stop - seq_start) * num_kv_heads;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t task = 0; task < num_tasks; task++) {
        int seq = seq_start + (int)(task / num_kv_heads);
        int kv_head = (int)(task % num_kv_heads);
        attend_one(query, kv_cache, out, block_tables + (int64_t)seq * table_stride, seq_lens[seq],
                   (int64_t)seq * q_stride_token, q_stride_head, (int64_t)seq * out_stride_token, out_stride_head,
                   v_offset, kv_head, group, num_kv_heads, head_dim, block_size, scale, sliding_window, soft_cap,
                   dtype);
    }
    return 0;
}
