/* Blockwise codes: the nearest entry of a sorted quantization map, and the way back.
 *
 * Nearest-code search without a search: the top 16 bits of an fp32 value (sign, exponent, 7 mantissa bits)
 * name a "cell" of values. A 65536-entry table, built per map in kernels/_cpu_code_maps.py, holds for each cell
 * the code of its lowest value and, in the upper 16 bits, the low 16 bits of the one decision boundary
 * (midpoint) that falls inside the cell, if any. A value is above that boundary exactly when its own low
 * 16 bits are above it (below it, for negative values, whose bit patterns grow as they fall), so one table
 * read and one integer comparison give torch.bucketize(x, midpoints) exactly. Maps with two or more
 * boundaries in some cell walk the midpoints from the table's code instead. */
#ifndef EFFLLM_CODES_H
#define EFFLLM_CODES_H

#include <stdint.h>

#include "dtypes.h"

#define MAP_CAPACITY 256 /* values[] always has 256 entries (zero-padded), so any uint8 code is safe */
#define CELL_SHIFT 16
#define CELL_CODE_MASK 0xFFu
#define CELL_LOW_MASK 0xFFFFu
#define SIGN_SHIFT 31
#define NIBBLE_BITS 4
#define NIBBLE_MASK 0xFu

/* Must match the CodeMap structure in kernels/_cpu_abi.py. */
typedef struct {
    const float *values;    /* [MAP_CAPACITY] the sorted map, zero-padded */
    const float *midpoints; /* [size - 1] decision boundaries between neighbouring entries */
    const uint32_t *cells;  /* [65536] code of the cell's lowest value | boundary low bits << CELL_SHIFT */
    int32_t size;           /* entries in the map */
    int32_t one_boundary_per_cell;
} effllm_code_map;

/* torch.bucketize(x, midpoints): the nearest entry, the lower one on an exact tie. */
static inline uint32_t nearest_code(const effllm_code_map *map, float x) {
    uint32_t bits = float_bits(x);
    uint32_t cell = map->cells[bits >> CELL_SHIFT];
    uint32_t code = cell & CELL_CODE_MASK;
    if (map->one_boundary_per_cell) {
        uint32_t low = bits & CELL_LOW_MASK, boundary = cell >> CELL_SHIFT;
        uint32_t above = (bits >> SIGN_SHIFT) ? (low < boundary) : (low > boundary);
        return code + above;
    }
    while (code + 1 < (uint32_t)map->size && x > map->midpoints[code]) code++;
    return code;
}

#ifdef __AVX2__
#include <immintrin.h>
#define AVX2_FLOATS 8         /* fp32 lanes of a 256-bit register */
#define NORMALIZED_CHUNK 256 /* values normalised per pass of quantize_block (1 KiB of stack) */

/* The codes of 8 normalised values, given as the 16 halves of their fp32 bit patterns [16] (little-endian:
 * low half first). The table entries are read with scalar loads indexed by the upper halves straight from
 * memory, which on AMD Zen cores costs about half of a hardware gather; then one comparison per lane (see
 * the top of this file). */
static inline __m256i nearest_codes_avx2(const uint32_t *cells, const uint16_t *halves) {
    const __m256i cell = _mm256_setr_epi32((int)cells[halves[1]], (int)cells[halves[3]], (int)cells[halves[5]],
                                           (int)cells[halves[7]], (int)cells[halves[9]], (int)cells[halves[11]],
                                           (int)cells[halves[13]], (int)cells[halves[15]]);
    const __m256i bits = _mm256_loadu_si256((const __m256i *)halves);
    const __m256i low = _mm256_and_si256(bits, _mm256_set1_epi32(CELL_LOW_MASK));
    const __m256i boundary = _mm256_srli_epi32(cell, CELL_SHIFT);
    /* low - boundary, negated for negative values (whose bit patterns grow as they fall; psign reads the sign
     * bit of `bits`, and zeroes the lane for +0.0, which lies above no boundary); above is all ones (-1)
     * where the value lies past the cell's boundary: subtracting it adds 1. */
    const __m256i past = _mm256_sign_epi32(_mm256_sub_epi32(low, boundary), bits);
    const __m256i above = _mm256_cmpgt_epi32(past, _mm256_setzero_si256());
    return _mm256_sub_epi32(_mm256_and_si256(cell, _mm256_set1_epi32(CELL_CODE_MASK)), above);
}

/* The largest of 8 unsigned 32-bit lanes. */
static inline uint32_t horizontal_max_epu32(__m256i x) {
    __m128i half = _mm_max_epu32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
    half = _mm_max_epu32(half, _mm_shuffle_epi32(half, _MM_SHUFFLE(1, 0, 3, 2)));
    half = _mm_max_epu32(half, _mm_shuffle_epi32(half, _MM_SHUFFLE(2, 3, 0, 1)));
    return (uint32_t)_mm_cvtsi128_si32(half);
}

/* codes[0:n] for x[0:n] / scale, n <= NORMALIZED_CHUNK, one_boundary_per_cell maps only. */
static inline void quantize_chunk_avx2(const effllm_code_map *map, const float *restrict x, int64_t n, float scale,
                                       uint8_t *restrict codes) {
    /* The quotients' bit patterns as 16-bit halves: written and read whole by vector instructions (which
     * may alias anything) and read half by half as uint16_t, the array's own type. */
    uint16_t halves[2 * NORMALIZED_CHUNK] __attribute__((aligned(32)));
    const __m256 divisor = _mm256_set1_ps(scale);
    const int64_t whole = n / (4 * AVX2_FLOATS) * (4 * AVX2_FLOATS);
    for (int64_t i = 0; i < whole; i += 4 * AVX2_FLOATS)
        for (int k = 0; k < 4; k++) /* unrolled: four divisions per loop test */
            _mm256_store_ps((float *)(halves + 2 * (i + k * AVX2_FLOATS)),
                            _mm256_div_ps(_mm256_loadu_ps(x + i + k * AVX2_FLOATS), divisor));
    const __m256i lane_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7); /* undoes the per-lane packs */
    for (int64_t i = 0; i < whole; i += 4 * AVX2_FLOATS) {
        __m256i c[4]; /* 32 codes as int32, narrowed to bytes below */
        for (int k = 0; k < 4; k++) c[k] = nearest_codes_avx2(map->cells, halves + 2 * (i + k * AVX2_FLOATS));
        const __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(c[0], c[1]), _mm256_packus_epi32(c[2], c[3]));
        _mm256_storeu_si256((__m256i *)(codes + i), _mm256_permutevar8x32_epi32(bytes, lane_order));
    }
    for (int64_t i = whole; i < n; i++) codes[i] = (uint8_t)nearest_code(map, x[i] / scale);
}
#endif

/* Largest |x[i]|, NaN if any is NaN (as torch's amax): magnitudes compared as unsigned integers. */
static inline float block_absmax(const float *restrict x, int64_t n) {
    uint32_t largest = 0;
    int64_t i = 0;
#ifdef __AVX2__
    const __m256i magnitude_mask = _mm256_set1_epi32((int)FP32_ABS_MASK);
    __m256i even = _mm256_setzero_si256(), odd = even; /* two accumulators hide the max latency */
    for (; i + 2 * AVX2_FLOATS <= n; i += 2 * AVX2_FLOATS) {
        const __m256i a = _mm256_loadu_si256((const __m256i *)(x + i));
        const __m256i b = _mm256_loadu_si256((const __m256i *)(x + i + AVX2_FLOATS));
        even = _mm256_max_epu32(even, _mm256_and_si256(a, magnitude_mask));
        odd = _mm256_max_epu32(odd, _mm256_and_si256(b, magnitude_mask));
    }
    largest = horizontal_max_epu32(_mm256_max_epu32(even, odd));
#endif
    for (; i < n; i++) {
        const uint32_t magnitude = float_bits(x[i]) & FP32_ABS_MASK;
        largest = magnitude > largest ? magnitude : largest;
    }
    return bits_float(largest);
}

/* codes[0:n] = nearest codes of x / absmax, absmax being the largest |x[i]| (NaN if any is NaN). An all-zero
 * block divides by 1. */
static inline void quantize_scaled(const effllm_code_map *map, const float *restrict x, int64_t n, float absmax,
                                   uint8_t *restrict codes) {
    const float scale = absmax > 0.0f ? absmax : 1.0f;
    int64_t i = 0;
    if (!map->one_boundary_per_cell) {
        for (; i < n; i++) codes[i] = (uint8_t)nearest_code(map, x[i] / scale);
        return;
    }
#ifdef __AVX2__
    for (; i < n; i += NORMALIZED_CHUNK) {
        const int64_t chunk = n - i < NORMALIZED_CHUNK ? n - i : NORMALIZED_CHUNK;
        quantize_chunk_avx2(map, x + i, chunk, scale, codes + i);
    }
#endif
    for (; i < n; i++) codes[i] = (uint8_t)nearest_code(map, x[i] / scale);
}

/* codes[0:n] = nearest codes of x / absmax(x); returns absmax. */
static inline float quantize_block(const effllm_code_map *map, const float *restrict x, int64_t n,
                                   uint8_t *restrict codes) {
    const float absmax = block_absmax(x, n);
    quantize_scaled(map, x, n, absmax, codes);
    return absmax;
}

/* out[0:n] = values[codes[0:n]] * absmax. */
static inline void dequantize_codes8(const float *restrict values, const uint8_t *restrict codes, int64_t n,
                                     float absmax, float *restrict out) {
    for (int64_t i = 0; i < n; i++) out[i] = values[codes[i]] * absmax;
}

/* codes[0:n] = elements first .. first+n-1 of a packed 4-bit tensor (two codes per byte, low nibble first). */
static inline void unpack_codes4(const uint8_t *restrict packed, int64_t first, int64_t n, uint8_t *restrict codes) {
    if ((first & 1) == 0 && (n & 1) == 0) {
        const uint8_t *bytes = packed + first / 2;
        for (int64_t j = 0; j < n / 2; j++) {
            codes[2 * j] = bytes[j] & NIBBLE_MASK;
            codes[2 * j + 1] = bytes[j] >> NIBBLE_BITS;
        }
        return;
    }
    for (int64_t i = 0; i < n; i++) {
        const int64_t e = first + i;
        codes[i] = (packed[e / 2] >> ((e & 1) * NIBBLE_BITS)) & NIBBLE_MASK;
    }
}

/* Writes codes[0:n] (each < 16) as elements first .. first+n-1 of a packed 4-bit tensor. */
static inline void pack_codes4(const uint8_t *restrict codes, int64_t first, int64_t n,
                               uint8_t *restrict packed) {
    if ((first & 1) == 0 && (n & 1) == 0) {
        uint8_t *bytes = packed + first / 2;
        for (int64_t j = 0; j < n / 2; j++)
            bytes[j] = (uint8_t)(codes[2 * j] | (codes[2 * j + 1] << NIBBLE_BITS));
        return;
    }
    /* A block that starts or ends mid-byte shares that byte with its neighbour: read-modify-write. */
    for (int64_t i = 0; i < n; i++) {
        int64_t e = first + i;
        int shift = (int)(e & 1) * NIBBLE_BITS;
        packed[e / 2] = (uint8_t)((packed[e / 2] & ~(NIBBLE_MASK << shift)) | ((uint32_t)codes[i] << shift));
    }
}

#endif
