/* The layer's small ops on the CPU, one pass each: RMSNorm (with the residual add), rotary embedding and the gated
   activations. The PyTorch reference (kernels/reference.py) spends 5-20 tensor ops on each, every one a pass over
   memory and a dispatch (tens of microseconds at batch 1, where they outnumber the matmuls). These compute in
   float32 and round to the tensor's dtype exactly where the reference's ops do, so bf16 results match it.

   Rows are tokens (row strides in elements, the last dim contiguous). dtype 0: float32, 1: bfloat16. */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float load(const void *base, int64_t i, int dtype) {
    if (dtype == 0) return ((const float *)base)[i];
    uint32_t bits = (uint32_t)((const uint16_t *)base)[i] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40); /* NaN stays NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static inline float round_to(float f, int dtype) { /* f as the dtype holds it */
    if (dtype == 0) return f;
    uint32_t bits = (uint32_t)to_bf16(f) << 16;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline void store(void *base, int64_t i, float f, int dtype) {
    if (dtype == 0)
        ((float *)base)[i] = f;
    else
        ((uint16_t *)base)[i] = to_bf16(f);
}

/* out = norm(x (+ residual)) * weight. With a residual, residual_out = x + residual (rounded to the dtype, the
   sum the norm then reads). has_offset: Gemma's (1 + weight), multiplied in float32 and rounded once; otherwise
   Llama's: the normalised x rounded to the dtype, then times the weight. */
void rms_norm(const void *x, int64_t x_stride, const void *residual, int64_t residual_stride, void *out,
              int64_t out_stride, void *residual_out, const void *weight, int64_t num_tokens, int hidden, float eps,
              int has_offset, float weight_offset, int dtype, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (num_tokens > 1)
    for (int64_t t = 0; t < num_tokens; t++) {
        const int64_t xi = t * x_stride, ri = t * residual_stride, oi = t * out_stride, si = t * hidden;
        float sum_sq = 0.0f;
        for (int d = 0; d < hidden; d++) {
            float v = load(x, xi + d, dtype);
            if (residual) {
                v = round_to(v + load(residual, ri + d, dtype), dtype);
                store(residual_out, si + d, v, dtype);
            }
            sum_sq += v * v;
        }
        const float inv_rms = 1.0f / sqrtf(sum_sq / (float)hidden + eps);
        const void *src = residual ? residual_out : x;
        const int64_t src_i = residual ? si : xi;
        for (int d = 0; d < hidden; d++) {
            float normed = load(src, src_i + d, dtype) * inv_rms;
            float w = load(weight, d, dtype);
            store(out, oi + d, has_offset ? normed * (w + weight_offset) : round_to(normed, dtype) * w, dtype);
        }
    }
}

/* Rotate the first rotary_dim dims of every head of query and key in place. cos_sin [max_position, rotary_dim]
   float32: cos then sin. neox pairs (i, i + rotary_dim / 2); GPT-J pairs (2i, 2i + 1). */
void rotary_embedding(const int64_t *positions, void *query, int64_t q_stride_token, int64_t q_stride_head,
                      int num_heads, void *key, int64_t k_stride_token, int64_t k_stride_head, int num_kv_heads,
                      const float *cos_sin, int rotary_dim, int64_t num_tokens, int is_neox, int dtype,
                      int num_threads) {
    const int half = rotary_dim / 2;
#pragma omp parallel for num_threads(num_threads) if (num_tokens > 1)
    for (int64_t t = 0; t < num_tokens; t++) {
        const float *cos = cos_sin + positions[t] * rotary_dim, *sin = cos + half;
        for (int h = 0; h < num_heads + num_kv_heads; h++) {
            void *base = h < num_heads ? query : key;
            const int64_t row = h < num_heads ? t * q_stride_token + h * q_stride_head
                                              : t * k_stride_token + (h - num_heads) * k_stride_head;
            for (int i = 0; i < half; i++) {
                const int64_t a = row + (is_neox ? i : 2 * i), b = row + (is_neox ? i + half : 2 * i + 1);
                const float x1 = load(base, a, dtype), x2 = load(base, b, dtype);
                store(base, a, x1 * cos[i] - x2 * sin[i], dtype);
                store(base, b, x2 * cos[i] + x1 * sin[i], dtype);
            }
        }
    }
}

/* out[t] = act(gate) * up for x[t] = [gate | up] of 2 * d; act(gate) is rounded to the dtype first, as the
   reference's two ops round it. gelu_tanh: GELU with the tanh approximation, else SiLU. */
void act_and_mul(const void *x, int64_t x_stride, void *out, int64_t out_stride, int64_t num_tokens, int d,
                 int gelu_tanh, int dtype, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (num_tokens > 1)
    for (int64_t t = 0; t < num_tokens; t++) {
        for (int i = 0; i < d; i++) {
            const float gate = load(x, t * x_stride + i, dtype), up = load(x, t * x_stride + d + i, dtype);
            const float act = gelu_tanh
                ? 0.5f * gate * (1.0f + tanhf(0.7978845608028654f * (gate + 0.044715f * gate * gate * gate)))
                : gate / (1.0f + expf(-gate));
            store(out, t * out_stride + i, round_to(act, dtype) * up, dtype);
        }
    }
}
