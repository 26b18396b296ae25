/* Blockwise quantize / dequantize for CPU tensors (spec: quantize_blockwise_ref in kernels/blockwise.py).
 * Blocks are independent, so threads split them. */
#include <stdint.h>
#include <stdlib.h>

#include "codes.h"
#include "dtypes.h"

enum { EFFLLM_OK = 0, EFFLLM_OUT_OF_MEMORY = 1 };

/* Blocks a thread takes at a time: dynamic, so a thread the OS holds back does less of the work. */
#define BLOCKS_PER_CHUNK 16

/* x [numel] of dtype -> codes [numel] uint8, absmax [ceil(numel / blocksize)] fp32. */
int effllm_quantize_blockwise(const void *x, int32_t dtype, int64_t numel, int64_t blocksize,
                              const effllm_code_map *map, uint8_t *codes, float *absmax, int32_t num_threads) {
    const int64_t nblocks = (numel + blocksize - 1) / blocksize;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        float *scratch = dtype == EFFLLM_FLOAT32 ? NULL : malloc((size_t)blocksize * sizeof(float));
        if (dtype != EFFLLM_FLOAT32 && scratch == NULL) failed = 1;
#pragma omp for schedule(dynamic, BLOCKS_PER_CHUNK)
        for (int64_t b = 0; b < nblocks; b++) {
            if (failed) continue;
            const int64_t start = b * blocksize;
            const int64_t n = numel - start < blocksize ? numel - start : blocksize;
            const float *block = (const float *)x + start;
            if (dtype != EFFLLM_FLOAT32) {
                load_as_float(scratch, (const char *)x + start * dtype_size(dtype), n, dtype);
                block = scratch;
            }
            absmax[b] = quantize_block(map, block, n, codes + start);
        }
        free(scratch);
    }
    return failed ? EFFLLM_OUT_OF_MEMORY : EFFLLM_OK;
}

/* codes [numel] uint8, absmax [nblocks] -> out [numel] of dtype: map[code] * absmax, rounded to dtype. */
int effllm_dequantize_blockwise(const uint8_t *codes, const float *absmax, int64_t numel, int64_t blocksize,
                                const effllm_code_map *map, void *out, int32_t dtype, int32_t num_threads) {
    const int64_t nblocks = (numel + blocksize - 1) / blocksize;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        float *scratch = dtype == EFFLLM_FLOAT32 ? NULL : malloc((size_t)blocksize * sizeof(float));
        if (dtype != EFFLLM_FLOAT32 && scratch == NULL) failed = 1;
#pragma omp for schedule(dynamic, BLOCKS_PER_CHUNK)
        for (int64_t b = 0; b < nblocks; b++) {
            if (failed) continue;
            const int64_t start = b * blocksize;
            const int64_t n = numel - start < blocksize ? numel - start : blocksize;
            if (dtype == EFFLLM_FLOAT32) {
                dequantize_codes8(map->values, codes + start, n, absmax[b], (float *)out + start);
            } else {
                dequantize_codes8(map->values, codes + start, n, absmax[b], scratch);
                store_from_float((char *)out + start * dtype_size(dtype), scratch, n, dtype);
            }
        }
        free(scratch);
    }
    return failed ? EFFLLM_OUT_OF_MEMORY : EFFLLM_OK;
}
