/* What the CPU kernels share: bf16 <-> float32 conversion and exp/tanh that vectorize.

   libm's expf and tanhf are scalar calls (glibc vectorizes them only under -ffast-math, whose finite-math
   assumptions the softmax's -inf would break): at one call per score or activation they were most of the
   kernels' time. These are Cephes' single-precision exp (Cody-Waite reduction, degree-6 polynomial, about 1 ulp)
   written so that the compiler vectorizes a loop of them (with -fno-trapping-math, which lets it if-convert the
   clamps: nothing here reads floating-point exception flags). */
#ifndef TOKMODEL_CPU_COMMON_H
#define TOKMODEL_CPU_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bits_to_float(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint32_t float_to_bits(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return bits;
}

static inline uint16_t to_bf16(float f) { /* round to nearest even, as torch does; NaN stays NaN */
    const uint32_t bits = float_to_bits(f);
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    return (uint16_t)((bits & 0x7fffffffu) > 0x7f800000u ? (bits >> 16) | 0x40u : rounded);
}

static inline float round_to(float f, int dtype) { /* f as the dtype holds it (0: float32, 1: bfloat16) */
    return dtype == 0 ? f : bits_to_float((uint32_t)to_bf16(f) << 16);
}

static inline float load(const void *base, int64_t i, int dtype) {
    return dtype == 0 ? ((const float *)base)[i] : bits_to_float((uint32_t)((const uint16_t *)base)[i] << 16);
}

static inline void store(void *base, int64_t i, float f, int dtype) {
    if (dtype == 0)
        ((float *)base)[i] = f;
    else
        ((uint16_t *)base)[i] = to_bf16(f);
}

static inline void load_row(const void *base, int64_t offset, int dtype, int n, float *dst) {
    if (dtype == 0) {
        memcpy(dst, (const float *)base + offset, (size_t)n * sizeof(float));
    } else {
        const uint16_t *src = (const uint16_t *)base + offset;
#pragma omp simd
        for (int i = 0; i < n; i++) dst[i] = bits_to_float((uint32_t)src[i] << 16);
    }
}

static inline void store_row(void *base, int64_t offset, int dtype, int n, const float *src) {
    if (dtype == 0) {
        memcpy((float *)base + offset, src, (size_t)n * sizeof(float));
    } else {
        uint16_t *dst = (uint16_t *)base + offset;
#pragma omp simd
        for (int i = 0; i < n; i++) dst[i] = to_bf16(src[i]);
    }
}

static inline float fast_exp(float x) { /* e^x, clamped to [e^-87.3, e^88.3] (e^-inf is ~1e-38) */
    float clamped = x < -87.3f ? -87.3f : x; /* (fminf/fmaxf would not vectorize) */
    clamped = clamped > 88.3f ? 88.3f : clamped;
    /* n: x / ln 2 rounded to an integer by adding 1.5 * 2^23, which leaves it in the low mantissa bits, read as
       k without a float-to-int conversion (which, like floorf, would stop vectorization) */
    const float shifter = 12582912.0f;
    const float shifted = clamped * 1.44269504088896341f + shifter;
    const float n = shifted - shifter;
    const uint32_t k = float_to_bits(shifted) - float_to_bits(shifter); /* two's complement */
    const float r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * bits_to_float((k + 127u) << 23);
}

static inline float fast_tanh(float x) { /* 1 - 2 / (e^2x + 1): exact at both ends */
    return 1.0f - 2.0f / (fast_exp(2.0f * x) + 1.0f);
}

#endif
