/* Element types of parameters and gradients, and their conversions to and from fp32.
 * Conversions to 16-bit round to nearest even, as torch's .to() does. */
#ifndef EFFLLM_DTYPES_H
#define EFFLLM_DTYPES_H

#include <stdint.h>
#include <string.h>
#ifdef __F16C__
#include <immintrin.h>
#define F16C_LANES 8 /* fp16 <-> fp32 conversions per instruction */
#endif

/* Must match DTYPE_CODES in kernels/_cpu_abi.py. */
enum effllm_dtype { EFFLLM_FLOAT32 = 0, EFFLLM_BFLOAT16 = 1, EFFLLM_FLOAT16 = 2 };

#define BF16_SHIFT 16
#define BF16_QUIET_NAN 0x7FC0u /* what torch writes for any NaN */
#define FP32_ABS_MASK 0x7FFFFFFFu
#define FP32_SIGN_MASK 0x80000000u
#define FP32_INF_BITS 0x7F800000u

static inline uint32_t float_bits(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return bits;
}

static inline float bits_float(uint32_t bits) {
    float x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

static inline float bf16_to_float(uint16_t h) { return bits_float((uint32_t)h << BF16_SHIFT); }

static inline uint16_t float_to_bf16(float x) {
    uint32_t bits = float_bits(x);
    if ((bits & FP32_ABS_MASK) > FP32_INF_BITS) return BF16_QUIET_NAN;
    uint32_t round_to_even = 0x7FFFu + ((bits >> BF16_SHIFT) & 1u);
    return (uint16_t)((bits + round_to_even) >> BF16_SHIFT);
}

/* dst[0:n] = src[0:n] as fp32. */
static inline void load_as_float(float *restrict dst, const void *restrict src, int64_t n, int dtype) {
    if (dtype == EFFLLM_BFLOAT16) {
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_float(s[i]);
    } else if (dtype == EFFLLM_FLOAT16) {
        const _Float16 *s = (const _Float16 *)src;
        int64_t i = 0;
#ifdef __F16C__
        for (; i + F16C_LANES <= n; i += F16C_LANES)
            _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
#endif
        for (; i < n; i++) dst[i] = (float)s[i];
    } else {
        memcpy(dst, src, (size_t)n * sizeof(float));
    }
}

/* dst[0:n] = src[0:n] converted from fp32 to dtype. */
static inline void store_from_float(void *restrict dst, const float *restrict src, int64_t n, int dtype) {
    if (dtype == EFFLLM_BFLOAT16) {
        uint16_t *d = (uint16_t *)dst;
        for (int64_t i = 0; i < n; i++) d[i] = float_to_bf16(src[i]);
    } else if (dtype == EFFLLM_FLOAT16) {
        _Float16 *d = (_Float16 *)dst;
        int64_t i = 0;
#ifdef __F16C__
        for (; i + F16C_LANES <= n; i += F16C_LANES)
            _mm_storeu_si128((__m128i *)(d + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
        for (; i < n; i++) d[i] = (_Float16)src[i];
    } else {
        memcpy(dst, src, (size_t)n * sizeof(float));
    }
}

static inline int64_t dtype_size(int dtype) { return dtype == EFFLLM_FLOAT32 ? 4 : 2; }

#endif
