/* The layer's small ops on the CPU, one pass each: RMSNorm (with the residual add), and the rotary embedding
   with the KV-cache write. The PyTorch reference (kernels/reference.py) spends 10-20 tensor ops on each, every one a pass over
   memory and a dispatch (tens of microseconds at batch 1, where they outnumber the matmuls). The norm and the
   rotation compute in float32 and round to the tensor's dtype exactly where the reference's ops do, so bf16
   results match it; each row goes through float32 buffers on the stack, in loops the compiler vectorizes.

   Rows are tokens (row strides in elements, the last dim contiguous). dtype 0: float32, 1: bfloat16. */
#include "common.h"

/* out = norm(x (+ residual)) * weight. With a residual, residual_out = x + residual (rounded to the dtype, the
   sum the norm then reads). has_offset: Gemma's (1 + weight), multiplied in float32 and rounded once; otherwise
   Llama's: the normalised x rounded to the dtype, then times the weight. */
void rms_norm(const void *x, int64_t x_stride, const void *residual, int64_t residual_stride, void *out,
              int64_t out_stride, void *residual_out, const void *weight, int64_t num_tokens, int hidden, float eps,
              int has_offset, float weight_offset, int dtype, int num_threads) {
    float w_row[hidden];
    float *w = w_row;
    load_row(weight, 0, dtype, hidden, w);
    if (has_offset)
        for (int d = 0; d < hidden; d++) w[d] += weight_offset;
#pragma omp parallel for num_threads(num_threads) if (num_tokens > 1)
    for (int64_t t = 0; t < num_tokens; t++) {
        float v_row[hidden], r_row[hidden];
        float *v = v_row, *r = r_row; /* through pointers: GCC vectorizes no loop over a VLA */
        load_row(x, t * x_stride, dtype, hidden, v);
        if (residual) {
            load_row(residual, t * residual_stride, dtype, hidden, r);
#pragma omp simd
            for (int d = 0; d < hidden; d++) v[d] = round_to(v[d] + r[d], dtype);
            store_row(residual_out, t * hidden, dtype, hidden, v);
        }
        float sum_sq = 0.0f;
#pragma omp simd reduction(+ : sum_sq)
        for (int d = 0; d < hidden; d++) sum_sq += v[d] * v[d];
        const float inv_rms = 1.0f / sqrtf(sum_sq / (float)hidden + eps);
        if (has_offset) {
#pragma omp simd
            for (int d = 0; d < hidden; d++) v[d] = v[d] * inv_rms * w[d];
        } else {
#pragma omp simd
            for (int d = 0; d < hidden; d++) v[d] = round_to(v[d] * inv_rms, dtype) * w[d];
        }
        store_row(out, t * out_stride, dtype, hidden, v);
    }
}

/* Rotate the first 2 * half dims of one head (at element `row` of base) in place: neox pairs (i, i + half), GPT-J
   pairs (2i, 2i + 1). */
static void rotate_head(void *base, int64_t row, const float *cos, const float *sin, int half, int is_neox,
                        int dtype) {
    for (int i = 0; i < half; i++) {
        const int64_t a = row + (is_neox ? i : 2 * i), b = row + (is_neox ? i + half : 2 * i + 1);
        const float x1 = load(base, a, dtype), x2 = load(base, b, dtype);
        store(base, a, x1 * cos[i] - x2 * sin[i], dtype);
        store(base, b, x2 * cos[i] + x1 * sin[i], dtype);
    }
}

/* A layer's new tokens into the cache: each token's query heads rotated in place, its key and value rows
   (num_kv_heads * head_dim elements, contiguous in the projection's output and in the cache) copied into its slot
   of the cache [2, num_slots, row] and the key rotated there; slot -1 is padding (its query is still rotated).
   cos_sin [num_positions, rotary_dim] float32: cos then sin. Key, value and cache share the dtype. One pass where
   the reference takes 10-20 tensor ops, a host sync and two index_copy_ calls. Returns, writing nothing, -1 when a
   slot lies outside the cache and -2 when a position lies outside the table. */
int rotary_embedding_and_write_kv(const int64_t *positions, void *query, int64_t q_stride_token,
                                  int64_t q_stride_head, int num_heads, const void *key, int64_t key_stride,
                                  const void *value, int64_t value_stride, void *kv_cache, int64_t num_slots,
                                  const int64_t *slot_mapping, int num_kv_heads, int head_dim, const float *cos_sin,
                                  int64_t num_positions, int rotary_dim, int64_t num_tokens, int is_neox, int dtype,
                                  int num_threads) {
    for (int64_t t = 0; t < num_tokens; t++) {
        if (slot_mapping[t] < -1 || slot_mapping[t] >= num_slots) return -1;
        if (positions[t] < 0 || positions[t] >= num_positions) return -2;
    }
    const int half = rotary_dim / 2;
    const int64_t row = (int64_t)num_kv_heads * head_dim;
    const size_t element_size = dtype == 0 ? 4 : 2, row_bytes = (size_t)row * element_size;
    char *keys = (char *)kv_cache, *values = keys + (size_t)num_slots * row_bytes;
#pragma omp parallel for num_threads(num_threads) if (num_tokens > 1)
    for (int64_t t = 0; t < num_tokens; t++) {
        const float *cos = cos_sin + positions[t] * rotary_dim, *sin = cos + half;
        for (int h = 0; h < num_heads; h++)
            rotate_head(query, t * q_stride_token + h * q_stride_head, cos, sin, half, is_neox, dtype);
        const int64_t slot = slot_mapping[t];
        if (slot < 0) continue;
        memcpy(keys + (size_t)slot * row_bytes, (const char *)key + (size_t)(t * key_stride) * element_size, row_bytes);
        memcpy(values + (size_t)slot * row_bytes, (const char *)value + (size_t)(t * value_stride) * element_size,
               row_bytes);
        for (int h = 0; h < num_kv_heads; h++)
            rotate_head(keys, slot * row + h * head_dim, cos, sin, half, is_neox, dtype);
    }
    return 0;
}
