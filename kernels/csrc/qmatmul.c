/* Packed low-bit weight times activations for CPU tensors (spec: qmatmul_ref in kernels/qmatmul.py).
 *
 * The weight W [n, k] is stored as codes of `bits` bits, a little-endian bit stream of the row-major codes
 * (kernels/packing.py): code e = row * k + col sits at stream bits [e * bits, (e + 1) * bits). Each row has
 * `groups = k / group_size` (scale, zero) pairs and W[row, col] = (code - zero[row, g]) * scale[row, g], g =
 * col / group_size.
 *
 * effllm_qmatmul: out [m, n] = x [m, k] @ W^T, for few rows of x (decode): one pass over the packed weight,
 * decoding each run of 8 codes (exactly `bits` bytes) into 8 floats once and using them for up to
 * ROWS_PER_TILE rows of x. Per group it accumulates x * (code - zero) in fp32 and then adds scale * that sum.
 * effllm_dequantize_packed: W as fp32 [n, k], for many rows of x (prefill), where a BLAS matmul pays off.
 *
 * The AVX2 path needs k and group_size to be multiples of 8 (every group then starts on a byte) and reads whole
 * 32- or 64-bit words; other shapes, other CPUs and the last rows of the stream (whose words would reach past
 * its end) take the scalar path, which reads each code from the (at most) two bytes it spans. */
#include <stdint.h>
#include <string.h>

enum { EFFLLM_OK = 0, EFFLLM_BAD_ARGUMENT = 2 };

#define CODES_PER_RUN 8   /* 8 codes of b bits fill exactly b bytes */
#define ROWS_PER_TILE 4   /* rows of x sharing one decode of the weight (their accumulators stay in registers) */
#define MAX_BITS 8
#define BYTE_BITS 8

#define ALWAYS_INLINE static inline __attribute__((always_inline))

static int arguments_ok(int32_t bits, int64_t group_size, int64_t n, int64_t k) {
    return bits >= 1 && bits <= MAX_BITS && n >= 0 && k >= 1 && group_size >= 1 && k % group_size == 0;
}

/* Code number `e` of the stream, from the one or two bytes it spans. */
ALWAYS_INLINE uint32_t code_at(const uint8_t *stream, int64_t e, int bits) {
    const int64_t bit = e * bits;
    const int64_t byte = bit / BYTE_BITS;
    const int shift = (int)(bit % BYTE_BITS);
    uint32_t word = stream[byte];
    if (shift + bits > BYTE_BITS) word |= (uint32_t)stream[byte + 1] << BYTE_BITS;
    return (word >> shift) & ((1u << bits) - 1u);
}

/* Scalar path: out[r * ldo] = x[r] . W[row] for r < rows. */
static void dot_rows_scalar(const float *x, int64_t rows, const uint8_t *stream, int64_t row, const float *scale,
                            const uint8_t *zero, int bits, int64_t group_size, int64_t k, float *out, int64_t ldo) {
    const int64_t groups = k / group_size;
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * k;
        float total = 0.0f;
        for (int64_t g = 0; g < groups; g++) {
            const float z = (float)zero[g];
            float acc = 0.0f;
            for (int64_t c = g * group_size; c < (g + 1) * group_size; c++)
                acc += xr[c] * ((float)code_at(stream, row * k + c, bits) - z);
            total += scale[g] * acc;
        }
        out[r * ldo] = total;
    }
}

static void dequantize_row_scalar(const uint8_t *stream, int64_t row, const float *scale, const uint8_t *zero,
                                  int bits, int64_t group_size, int64_t k, float *out) {
    for (int64_t c = 0; c < k; c++) {
        const int64_t g = c / group_size;
        out[c] = ((float)code_at(stream, row * k + c, bits) - (float)zero[g]) * scale[g];
    }
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#define FLOATS_PER_VECTOR 8
#define WORD32_BYTES 4
#define WORD64_BYTES 8

/* Whether decode_run may read whole words all along weight row `row`: true for every row but the last one or
 * few, whose final words would reach past the stream; those take the scalar path. */
ALWAYS_INLINE int row_fits_words(const uint8_t *stream, const uint8_t *end, int64_t row, int bits, int64_t k) {
    return stream + (row + 1) * k / CODES_PER_RUN * bits + WORD64_BYTES <= end;
}

/* A run of 8 codes (`bits` bytes at p) as 8 floats. Reads a whole 32-bit word (up to 4 bits) or 64-bit word
 * (5..8 bits) at p: callers make sure that many bytes exist (see row_fits_words). */
ALWAYS_INLINE __m256 decode_run(const uint8_t *p, int bits) {
    __m256i codes;
    if (bits == 8) {
        codes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    } else if (bits <= 4) {  /* 8 codes in at most 32 bits: broadcast, shift each lane by its offset, mask */
        uint32_t word;
        memcpy(&word, p, WORD32_BYTES);
        const __m256i offsets = _mm256_setr_epi32(0, bits, 2 * bits, 3 * bits, 4 * bits, 5 * bits, 6 * bits,
                                                  7 * bits);
        codes = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int32_t)word), offsets),
                                 _mm256_set1_epi32((1 << bits) - 1));
    } else {  /* 5..7 bits: 8 codes in at most 56 bits; shift in 64-bit lanes, then gather the low halves */
        uint64_t word;
        memcpy(&word, p, WORD64_BYTES);
        const __m256i broadcast = _mm256_set1_epi64x((long long)word);
        const __m256i first = _mm256_srlv_epi64(broadcast, _mm256_setr_epi64x(0, bits, 2 * bits, 3 * bits));
        const __m256i second = _mm256_srlv_epi64(broadcast, _mm256_setr_epi64x(4 * bits, 5 * bits, 6 * bits,
                                                                                7 * bits));
        /* 32-bit lanes: c0 c4 c1 c5 c2 c6 c3 c7 (garbage above each code, masked below) */
        const __m256i interleaved = _mm256_blend_epi32(first, _mm256_slli_epi64(second, 32), 0xAA);
        codes = _mm256_and_si256(_mm256_permutevar8x32_epi32(interleaved, _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7)),
                                 _mm256_set1_epi32((1 << bits) - 1));
    }
    return _mm256_cvtepi32_ps(codes);
}

ALWAYS_INLINE float horizontal_sum(__m256 v) {
    __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
    sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
    return _mm_cvtss_f32(sum);
}

/* out[r * ldo] = x[r] . W[row] for r < ROWS (a compile-time constant in each inlined copy). `p` is the row's
 * first byte. Two accumulators per row of x (even and odd runs) hide the latency of the fused multiply-add. */
ALWAYS_INLINE void dot_rows_avx2(const float *x, const int ROWS, const uint8_t *p, const float *scale, const uint8_t *zero, const int bits, int64_t group_size,
                                 int64_t k, float *out, int64_t ldo) {
    __m256 total[ROWS_PER_TILE];
    for (int r = 0; r < ROWS; r++) total[r] = _mm256_setzero_ps();
    const int64_t groups = k / group_size;
    const int64_t runs = group_size / CODES_PER_RUN;
    for (int64_t g = 0; g < groups; g++) {
        const __m256 z = _mm256_set1_ps((float)zero[g]);
        const float *xg = x + g * group_size;
        __m256 even[ROWS_PER_TILE], odd[ROWS_PER_TILE];
        for (int r = 0; r < ROWS; r++) even[r] = odd[r] = _mm256_setzero_ps();
        int64_t run = 0;
        for (; run + 1 < runs; run += 2, p += 2 * bits) {
            const __m256 w0 = _mm256_sub_ps(decode_run(p, bits), z);
            const __m256 w1 = _mm256_sub_ps(decode_run(p + bits, bits), z);
            for (int r = 0; r < ROWS; r++) {
                const float *xr = xg + r * k + run * CODES_PER_RUN;
                even[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xr), w0, even[r]);
                odd[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + FLOATS_PER_VECTOR), w1, odd[r]);
            }
        }
        if (run < runs) {  /* an odd number of runs per group */
            const __m256 w0 = _mm256_sub_ps(decode_run(p, bits), z);
            for (int r = 0; r < ROWS; r++)
                even[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xg + r * k + run * CODES_PER_RUN), w0, even[r]);
            p += bits;
        }
        const __m256 s = _mm256_set1_ps(scale[g]);
        for (int r = 0; r < ROWS; r++) total[r] = _mm256_fmadd_ps(_mm256_add_ps(even[r], odd[r]), s, total[r]);
    }
    for (int r = 0; r < ROWS; r++) out[r * ldo] = horizontal_sum(total[r]);
}

/* All rows of x against weight row `row`, ROWS_PER_TILE at a time; the constant tile sizes let the compiler
 * keep every accumulator in a register. */
ALWAYS_INLINE void dot_all_rows_avx2(const float *x, int64_t m, const uint8_t *stream, const uint8_t *end,
                                     int64_t row, const float *scale, const uint8_t *zero, const int bits,
                                     int64_t group_size, int64_t n, int64_t k, float *out) {
    if (!row_fits_words(stream, end, row, bits, k)) {
        dot_rows_scalar(x, m, stream, row, scale, zero, bits, group_size, k, out + row, n);
        return;
    }
    const uint8_t *p = stream + row * k / CODES_PER_RUN * bits;
    int64_t r = 0;
    for (; r + ROWS_PER_TILE <= m; r += ROWS_PER_TILE)
        dot_rows_avx2(x + r * k, ROWS_PER_TILE, p, scale, zero, bits, group_size, k, out + r * n + row, n);
    switch (m - r) {
        case 3: dot_rows_avx2(x + r * k, 3, p, scale, zero, bits, group_size, k, out + r * n + row, n); break;
        case 2: dot_rows_avx2(x + r * k, 2, p, scale, zero, bits, group_size, k, out + r * n + row, n); break;
        case 1: dot_rows_avx2(x + r * k, 1, p, scale, zero, bits, group_size, k, out + r * n + row, n); break;
        default: break;
    }
}

/* One copy of the row loop per width, so `bits` is a constant inside each. */
#define QMATMUL_FOR_BITS(B)                                                                                      \
    static void qmatmul_avx2_##B(const float *x, int64_t m, const uint8_t *stream, const uint8_t *end,          \
                                 const float *scales, const uint8_t *zeros, int64_t group_size, int64_t n,       \
                                 int64_t k, float *out, int32_t num_threads) {                                   \
        const int64_t groups = k / group_size;                                                                   \
        _Pragma("omp parallel for num_threads(num_threads) schedule(static) if (num_threads > 1)")               \
        for (int64_t row = 0; row < n; row++)                                                                    \
            dot_all_rows_avx2(x, m, stream, end, row, scales + row * groups, zeros + row * groups, B,            \
                              group_size, n, k, out);                                                            \
    }
QMATMUL_FOR_BITS(1)
QMATMUL_FOR_BITS(2)
QMATMUL_FOR_BITS(3)
QMATMUL_FOR_BITS(4)
QMATMUL_FOR_BITS(5)
QMATMUL_FOR_BITS(6)
QMATMUL_FOR_BITS(7)
QMATMUL_FOR_BITS(8)

typedef void (*qmatmul_avx2_fn)(const float *, int64_t, const uint8_t *, const uint8_t *, const float *,
                                const uint8_t *, int64_t, int64_t, int64_t, float *, int32_t);
static const qmatmul_avx2_fn QMATMUL_AVX2[MAX_BITS + 1] = {
    NULL, qmatmul_avx2_1, qmatmul_avx2_2, qmatmul_avx2_3, qmatmul_avx2_4,
    qmatmul_avx2_5, qmatmul_avx2_6, qmatmul_avx2_7, qmatmul_avx2_8,
};

static void dequantize_row_avx2(const uint8_t *stream, const uint8_t *end, int64_t row, const float *scale,
                                const uint8_t *zero, int bits, int64_t group_size, int64_t k, float *out) {
    if (!row_fits_words(stream, end, row, bits, k)) {
        dequantize_row_scalar(stream, row, scale, zero, bits, group_size, k, out);
        return;
    }
    const uint8_t *p = stream + row * k / CODES_PER_RUN * bits;
    for (int64_t g = 0; g < k / group_size; g++) {
        const __m256 z = _mm256_set1_ps((float)zero[g]), s = _mm256_set1_ps(scale[g]);
        for (int64_t c = g * group_size; c < (g + 1) * group_size; c += CODES_PER_RUN, p += bits)
            _mm256_storeu_ps(out + c, _mm256_mul_ps(_mm256_sub_ps(decode_run(p, bits), z), s));
    }
}
#define HAVE_AVX2_PATH 1
#else
#define HAVE_AVX2_PATH 0
#endif

static int avx2_fits(int64_t group_size, int64_t k) {
    return HAVE_AVX2_PATH && k % CODES_PER_RUN == 0 && group_size % CODES_PER_RUN == 0;
}

/* The packed weight as the Python side describes it. Must match PackedWeight in kernels/_qmatmul_cpu.py. */
typedef struct {
    const uint8_t *qweight; /* [stream_bytes]: codes of the row-major [n, k] weight, `bits` each */
    int64_t stream_bytes;   /* ceil(n * k * bits / 8) or more */
    const float *scales;    /* [n, k / group_size] */
    const uint8_t *zeros;   /* [n, k / group_size] */
    int64_t group_size;
    int64_t n;
    int64_t k;
    int32_t bits;
} effllm_packed_weight;

static int weight_ok(const effllm_packed_weight *w) {
    return arguments_ok(w->bits, w->group_size, w->n, w->k) && w->stream_bytes * BYTE_BITS >= w->n * w->k * w->bits;
}

/* out [m, n] fp32 = x [m, k] fp32 @ W^T. */
int effllm_qmatmul(const effllm_packed_weight *w, const float *x, int64_t m, float *out, int32_t num_threads) {
    if (!weight_ok(w) || m < 0) return EFFLLM_BAD_ARGUMENT;
    const int64_t groups = w->k / w->group_size;
#if HAVE_AVX2_PATH
    if (avx2_fits(w->group_size, w->k)) {
        QMATMUL_AVX2[w->bits](x, m, w->qweight, w->qweight + w->stream_bytes, w->scales, w->zeros, w->group_size,
                              w->n, w->k, out, num_threads);
        return EFFLLM_OK;
    }
#endif
#pragma omp parallel for num_threads(num_threads) schedule(static) if (num_threads > 1)
    for (int64_t row = 0; row < w->n; row++)
        dot_rows_scalar(x, m, w->qweight, row, w->scales + row * groups, w->zeros + row * groups, w->bits,
                        w->group_size, w->k, out + row, w->n);
    return EFFLLM_OK;
}

/* out [n, k] fp32 = W. */
int effllm_dequantize_packed(const effllm_packed_weight *w, float *out, int32_t num_threads) {
    if (!weight_ok(w)) return EFFLLM_BAD_ARGUMENT;
    const int64_t groups = w->k / w->group_size;
    const int vectorised = avx2_fits(w->group_size, w->k);
#pragma omp parallel for num_threads(num_threads) schedule(static) if (num_threads > 1)
    for (int64_t row = 0; row < w->n; row++) {
        const float *scale = w->scales + row * groups;
        const uint8_t *zero = w->zeros + row * groups;
#if HAVE_AVX2_PATH
        if (vectorised) {
            dequantize_row_avx2(w->qweight, w->qweight + w->stream_bytes, row, scale, zero, w->bits, w->group_size,
                                w->k, out + row * w->k);
            continue;
        }
#endif
        (void)vectorised;
        dequantize_row_scalar(w->qweight, row, scale, zero, w->bits, w->group_size, w->k, out + row * w->k);
    }
    return EFFLLM_OK;
}
