/* One fused optimizer update for CPU tensors: every parameter of a bucket in one call.
 * Spec: optim_update_ref in kernels/optim_update.py (same operations in the same order, each rounded to fp32
 * as torch rounds each elementwise op; compiled with -ffp-contract=off so nothing else is fused).
 *
 * Work is cut into units (a quantization block, two blocks when 4-bit blocks are odd-sized so that no byte
 * is shared between threads, or a chunk of elements at 32 bits) numbered across all parameters; threads take
 * runs of units as they go. Per block: load param and grad as fp32 (bf16/fp16 into scratch), dequantize the
 * states into scratch that stays in L1, update in place, store the param, requantize the states with fresh
 * absmaxes. fp32 parameters and states are updated where they lie. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#else
#define omp_get_num_threads() 1
#define omp_get_thread_num() 0
#endif

#include "codes.h"
#include "dtypes.h"

enum { EFFLLM_OK = 0, EFFLLM_OUT_OF_MEMORY = 1, EFFLLM_BAD_ARGUMENT = 2 };
/* Must match ALGORITHM_CODES in kernels/_optim_update_cpu.py. */
enum { ALGO_ADAM = 0, ALGO_ADAMW = 1, ALGO_LION = 2, ALGO_SGD = 3, ALGO_RMSPROP = 4 };

#define CHUNK_32BIT 1024 /* elements per unit of work with fp32 states: the scratch fits in L1 */
#define PREFETCH_SPANS_AHEAD 8 /* software prefetch distance, in spans (blocks) */
#define PREFETCH_PARTS 4 /* a span's prefetches are spread over this many points of the one before */
#define CACHE_LINE 64
#define PREFETCH_READ 0
#define PREFETCH_TO_L2 1 /* __builtin_prefetch locality 1: prefetcht2 (L2, not L1) */
/* Units a thread takes at a time: about CHUNKS_PER_THREAD chunks per thread, between 16 and 256 units. Large
 * chunks are faster (2 threads, 8-bit AdamW: 5-15% at 1M-64M parameters with 256 units rather than 16);
 * enough chunks per thread keep the threads busy to the end when one of them is held back. */
#define UNITS_PER_CHUNK_MIN 16
#define UNITS_PER_CHUNK_MAX 256
#define CHUNKS_PER_THREAD 8

/* Must match the ParamSlot structure in kernels/_cpu_abi.py. */
typedef struct {
    void *param;       /* [numel] of dtype */
    const void *grad;  /* [numel] of dtype */
    void *state1;      /* fp32 [numel] at 32 bits, uint8 codes [numel] at 8, [ceil(numel/2)] at 4; or NULL */
    void *state2;
    float *absmax1;    /* [nblocks], NULL at 32 bits */
    float *absmax2;
    int64_t numel;
    int32_t dtype;
} effllm_param_slot;

/* Scalars of one step, each already rounded to fp32 the way torch rounds a Python scalar operand.
 * Must match the Hyper structure in kernels/_cpu_abi.py. */
typedef struct {
    float lr;
    float beta1, beta2;
    float one_minus_beta1, one_minus_beta2;
    float eps;
    float weight_decay;          /* L2: g += weight_decay * p (adam, sgd, rmsprop) */
    float decay_factor;          /* decoupled: p *= 1 - lr * weight_decay (adamw, lion) */
    float step_size;             /* adam: lr / (1 - beta1^step) */
    float bias_correction2_sqrt; /* adam: sqrt(1 - beta2^step) */
    float one_minus_dampening;   /* sgd */
    int32_t has_weight_decay;
    int32_t first_step;          /* sgd: the momentum buffer starts as the gradient */
    int32_t nesterov;
    int32_t maximize;            /* step along +grad (torch.optim's maximize=True) */
} effllm_hyper;

/* torch.lerp(start, end, weight) as torch's vectorised CPU kernel computes it: one fused multiply-add from
 * the nearer end. `weight_small` is |weight| < 0.5, `coefficient` weight or weight - 1 accordingly. */
static inline float lerp(float start, float end, float coefficient, int weight_small) {
    return fmaf(coefficient, end - start, weight_small ? start : end);
}

static inline float lerp_coefficient(float weight) { return fabsf(weight) < 0.5f ? weight : weight - 1.0f; }

static inline int is_finite(float x) { return fabsf(x) <= FLT_MAX; }

#define INLINE static inline __attribute__((always_inline))

/* One element's parameter and states. */
typedef struct {
    float p, m, v;
} element;

/* One step of each algorithm on one element. The int options are compile-time constants in every inlined
 * copy (see update_elements), so each loop runs only its operations and vectorises. */
INLINE element adam_step(element old, float grad, const effllm_hyper *h, const int l2, const int shrink) {
    if (l2) grad = grad + h->weight_decay * old.p;
    const float param = shrink ? old.p * h->decay_factor : old.p;
    element new;
    new.m = lerp(old.m, grad, lerp_coefficient(h->one_minus_beta1), fabsf(h->one_minus_beta1) < 0.5f);
    new.v = old.v * h->beta2 + (h->one_minus_beta2 * grad) * grad;
    const float denom = sqrtf(new.v) / h->bias_correction2_sqrt + h->eps;
    new.p = param - h->step_size * (new.m / denom);
    return new;
}

INLINE element lion_step(element old, float grad, const effllm_hyper *h, const int unused1, const int unused2) {
    (void)unused1, (void)unused2;
    const float mix = old.m * h->beta1 + grad * h->one_minus_beta1;
    const float direction = (float)((mix > 0.0f) - (mix < 0.0f)); /* torch.sign of a finite value */
    element new = old;
    new.p = old.p * h->decay_factor - h->lr * direction;
    new.m = lerp(old.m, grad, lerp_coefficient(h->one_minus_beta2), fabsf(h->one_minus_beta2) < 0.5f);
    return new;
}

INLINE element sgd_step(element old, float grad, const effllm_hyper *h, const int l2, const int momentum_buffer) {
    if (l2) grad = grad + h->weight_decay * old.p;
    element new = old;
    if (momentum_buffer) {
        new.m = h->first_step ? grad : old.m * h->beta1 + h->one_minus_dampening * grad;
        grad = h->nesterov ? grad + h->beta1 * new.m : new.m;
    }
    new.p = old.p - h->lr * grad;
    return new;
}

INLINE element rmsprop_step(element old, float grad, const effllm_hyper *h, const int l2, const int unused) {
    (void)unused;
    if (l2) grad = grad + h->weight_decay * old.p;
    element new = old;
    new.v = old.v * h->beta2 + (h->one_minus_beta2 * grad) * grad;
    new.p = old.p - (h->lr * grad) / (sqrtf(new.v) + h->eps);
    return new;
}

typedef element (*step_function)(element, float, const effllm_hyper *, int, int);

/* Applies `step` to p [n] in place and to the states m, v (unused where has_m / has_v is 0). fp32 states
 * (`coded` 0) are read from and written to m, v [n]; coded states are read as map[codes[i]] * absmax and their
 * new values written to m, v [n] (scratch), with their largest magnitudes in new_absmax[0:2] for the
 * requantization. One pass per block: dequantizing, updating and finding the absmax in one loop lets the
 * table reads overlap the divider's work. An element whose gradient is NaN or Inf keeps its old values
 * (selected, not branched on, so the loop vectorises). */
INLINE void update_elements(int64_t n, float *restrict p, const float *restrict g, float *restrict m,
                            const uint8_t *restrict m_codes, const float *restrict m_map, float m_absmax,
                            float *restrict v, const uint8_t *restrict v_codes, const float *restrict v_map,
                            float v_absmax, const effllm_hyper *h, step_function step, const int option1,
                            const int option2, const int has_m, const int has_v, const int coded,
                            float *restrict new_absmax) {
    uint32_t largest_m = 0, largest_v = 0; /* magnitudes compared as integers: NaN above Inf, as torch's amax */
    const uint32_t negate = h->maximize ? FP32_SIGN_MASK : 0u; /* maximize: the update sees -grad */
    for (int64_t i = 0; i < n; i++) {
        const float grad = bits_float(float_bits(g[i]) ^ negate);
        element old = {p[i], 0.0f, 0.0f};
        if (has_m) old.m = coded ? m_map[m_codes[i]] * m_absmax : m[i];
        if (has_v) old.v = coded ? v_map[v_codes[i]] * v_absmax : v[i];
        element new = step(old, grad, h, option1, option2);
        if (!is_finite(grad)) new = old;
        p[i] = new.p;
        if (has_m) {
            m[i] = new.m;
            const uint32_t magnitude = float_bits(new.m) & FP32_ABS_MASK;
            largest_m = magnitude > largest_m ? magnitude : largest_m;
        }
        if (has_v) {
            v[i] = new.v;
            const uint32_t magnitude = float_bits(new.v) & FP32_ABS_MASK;
            largest_v = magnitude > largest_v ? magnitude : largest_v;
        }
    }
    if (coded) {
        new_absmax[0] = bits_float(largest_m);
        new_absmax[1] = bits_float(largest_v);
    }
}

/* The old values of one state over a span: fp32 values, or codes (one per byte) with the map and absmax. */
typedef struct {
    float *values; /* fp32 states: the state itself; coded ones: scratch for the new values */
    const uint8_t *codes;
    const float *map;
    float absmax;
} state_span;

/* Every (algorithm, options, coded) combination as its own loop. */
#define UPDATE(step, option1, option2, has_m, has_v, coded)                                                   \
    update_elements(n, p, g, m.values, m.codes, m.map, m.absmax, v.values, v.codes, v.map, v.absmax, h, step,  \
                    option1, option2, has_m, has_v, coded, new_absmax)

INLINE void update_span_values(int algo, int64_t n, float *p, const float *g, state_span m, state_span v,
                               const effllm_hyper *h, const int coded, float *new_absmax) {
    const int l2 = h->has_weight_decay;
    switch (algo) {
    case ALGO_ADAM:
        if (l2) UPDATE(adam_step, 1, 0, 1, 1, coded);
        else UPDATE(adam_step, 0, 0, 1, 1, coded);
        break;
    case ALGO_ADAMW:
        if (l2) UPDATE(adam_step, 0, 1, 1, 1, coded);
        else UPDATE(adam_step, 0, 0, 1, 1, coded);
        break;
    case ALGO_LION: UPDATE(lion_step, 0, 0, 1, 0, coded); break;
    case ALGO_SGD:
        if (m.values && l2) UPDATE(sgd_step, 1, 1, 1, 0, coded);
        else if (m.values) UPDATE(sgd_step, 0, 1, 1, 0, coded);
        else if (l2) UPDATE(sgd_step, 1, 0, 0, 0, coded);
        else UPDATE(sgd_step, 0, 0, 0, 0, coded);
        break;
    case ALGO_RMSPROP:
        if (l2) UPDATE(rmsprop_step, 1, 0, 0, 1, coded);
        else UPDATE(rmsprop_step, 0, 0, 0, 1, coded);
        break;
    }
}
#undef UPDATE

#ifdef __AVX2__
/* map[codes[0:8]] as one vector: scalar loads, which on AMD Zen cores cost less than a hardware gather. */
INLINE __m256 lookup8(const float *map, const uint8_t *codes) {
    return _mm256_setr_ps(map[codes[0]], map[codes[1]], map[codes[2]], map[codes[3]], map[codes[4]], map[codes[5]],
                          map[codes[6]], map[codes[7]]);
}

/* map[codes[0:8]] for codes below 16 (4-bit states): the 16 entries are two registers, looked up with
 * permutes and one blend on bit 3 of the code, no memory reads. */
INLINE __m256 lookup8_small(__m256 low_entries, __m256 high_entries, const uint8_t *codes) {
    const __m256i index = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)codes));
    const __m256 low = _mm256_permutevar8x32_ps(low_entries, index);
    const __m256 high = _mm256_permutevar8x32_ps(high_entries, index);
    /* Bit 3 of the code moved to the sign bit, which is what blendv reads. */
    return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(index, 28)));
}

/* adam_step over the first n - n % 8 elements with coded states and finite gradients, written out in AVX2:
 * the same operations in the same order as adam_step, 8 lanes at a time, and no more registers than there
 * are (gcc's own vectorisation of update_elements unrolls to 32 lanes and spills). Returns the elements
 * done; the states' largest magnitudes (as integers) go to largest[0:2]. */
INLINE int64_t adam_coded_avx2(int64_t n, float *restrict p, const float *restrict g, float *restrict m,
                               const uint8_t *restrict m_codes, const float *restrict m_map, float m_absmax,
                               float *restrict v, const uint8_t *restrict v_codes, const float *restrict v_map,
                               float v_absmax, const effllm_hyper *h, const int l2, const int shrink,
                               const int small_codes, uint32_t *largest) {
    /* With small_codes (every code below 16), the maps' first 16 entries as registers, times the absmax (the
     * same one rounding as multiplying each looked-up entry). */
    const __m256 m_low = _mm256_mul_ps(_mm256_loadu_ps(m_map), _mm256_set1_ps(m_absmax));
    const __m256 m_high = _mm256_mul_ps(_mm256_loadu_ps(m_map + AVX2_FLOATS), _mm256_set1_ps(m_absmax));
    const __m256 v_low = _mm256_mul_ps(_mm256_loadu_ps(v_map), _mm256_set1_ps(v_absmax));
    const __m256 v_high = _mm256_mul_ps(_mm256_loadu_ps(v_map + AVX2_FLOATS), _mm256_set1_ps(v_absmax));
    const __m256 absmax1 = _mm256_set1_ps(m_absmax), absmax2 = _mm256_set1_ps(v_absmax);
    const __m256 weight_decay = _mm256_set1_ps(h->weight_decay), decay_factor = _mm256_set1_ps(h->decay_factor);
    const int weight_small = fabsf(h->one_minus_beta1) < 0.5f;
    const __m256 coefficient = _mm256_set1_ps(lerp_coefficient(h->one_minus_beta1));
    const __m256 beta2 = _mm256_set1_ps(h->beta2), one_minus_beta2 = _mm256_set1_ps(h->one_minus_beta2);
    const __m256 correction2 = _mm256_set1_ps(h->bias_correction2_sqrt), eps = _mm256_set1_ps(h->eps);
    const __m256 step_size = _mm256_set1_ps(h->step_size);
    const __m256 negate = _mm256_set1_ps(h->maximize ? -0.0f : 0.0f); /* maximize: the sign bit of every grad flipped */
    const __m256i magnitude_mask = _mm256_set1_epi32((int)FP32_ABS_MASK);
    __m256i largest_m = _mm256_setzero_si256(), largest_v = largest_m;
    const int64_t whole = n / AVX2_FLOATS * AVX2_FLOATS;
    /* Software-pipelined: each group of 8 elements goes through stage 1 (table reads, new moments, stored
     * to scratch) in one iteration, stage 2 (sqrt, / correction, + eps) in the next, and stage 3 (/ denom,
     * the new parameter, stored) in the one after. The ~50-cycle chain of sqrt and two divisions no longer
     * holds up the retirement of the 16 table reads of its own group, so more groups are in flight. Measured
     * on the shared 2-core EPYC (Zen 3, load ~3), one thread, 8-bit AdamW, interleaved in one process with the
     * unpipelined loop: the C call 1-9% faster at 1M parameters, 3-5% at 16M; the whole step 4-5%. Splitting
     * the sqrt from the divisions (four stages), reading the tables a group ahead, or a separate pass for the
     * table reads was slower. Every element still sees adam_step's operations in adam_step's order. */
    __m256 param, new_m, new_v;       /* stage 1's results for the current group */
    __m256 param_1, new_m_1, new_v_1; /* the group before: waits for stage 2 */
    __m256 param_2, new_m_2, denom_2; /* two groups before: waits for stage 3 */
#define ADAM_STAGE1(i)                                                                                         \
    do {                                                                                                       \
        __m256 grad = _mm256_xor_ps(_mm256_loadu_ps(g + (i)), negate);                                         \
        const __m256 old_p = _mm256_loadu_ps(p + (i));                                                         \
        const __m256 old_m = small_codes ? lookup8_small(m_low, m_high, m_codes + (i))                         \
                                         : _mm256_mul_ps(lookup8(m_map, m_codes + (i)), absmax1);              \
        const __m256 old_v = small_codes ? lookup8_small(v_low, v_high, v_codes + (i))                         \
                                         : _mm256_mul_ps(lookup8(v_map, v_codes + (i)), absmax2);              \
        if (l2) grad = _mm256_add_ps(grad, _mm256_mul_ps(weight_decay, old_p));                                \
        param = shrink ? _mm256_mul_ps(old_p, decay_factor) : old_p;                                           \
        new_m = _mm256_fmadd_ps(coefficient, _mm256_sub_ps(grad, old_m), weight_small ? old_m : grad);         \
        new_v = _mm256_add_ps(_mm256_mul_ps(old_v, beta2), _mm256_mul_ps(_mm256_mul_ps(one_minus_beta2, grad), grad)); \
        _mm256_storeu_ps(m + (i), new_m);                                                                      \
        _mm256_storeu_ps(v + (i), new_v);                                                                      \
        largest_m = _mm256_max_epu32(largest_m, _mm256_and_si256(_mm256_castps_si256(new_m), magnitude_mask)); \
        largest_v = _mm256_max_epu32(largest_v, _mm256_and_si256(_mm256_castps_si256(new_v), magnitude_mask)); \
    } while (0)
#define ADAM_STAGE2(second) _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(second), correction2), eps)
#define ADAM_STAGE3(i, old, first, denom)                                                                      \
    _mm256_storeu_ps(p + (i), _mm256_sub_ps(old, _mm256_mul_ps(step_size, _mm256_div_ps(first, denom))))
    const int64_t groups = whole / AVX2_FLOATS;
    if (groups == 1) {
        ADAM_STAGE1(0);
        ADAM_STAGE3(0, param, new_m, ADAM_STAGE2(new_v));
    } else if (groups >= 2) {
        ADAM_STAGE1(0);
        param_2 = param, new_m_2 = new_m, denom_2 = ADAM_STAGE2(new_v);
        ADAM_STAGE1(AVX2_FLOATS);
        param_1 = param, new_m_1 = new_m, new_v_1 = new_v;
        for (int64_t k = 2; k < groups; k++) {
            const __m256 denom_1 = ADAM_STAGE2(new_v_1);
            ADAM_STAGE3((k - 2) * AVX2_FLOATS, param_2, new_m_2, denom_2);
            ADAM_STAGE1(k * AVX2_FLOATS);
            param_2 = param_1, new_m_2 = new_m_1, denom_2 = denom_1;
            param_1 = param, new_m_1 = new_m, new_v_1 = new_v;
        }
        ADAM_STAGE3((groups - 2) * AVX2_FLOATS, param_2, new_m_2, denom_2);
        ADAM_STAGE3((groups - 1) * AVX2_FLOATS, param_1, new_m_1, ADAM_STAGE2(new_v_1));
    }
#undef ADAM_STAGE1
#undef ADAM_STAGE2
#undef ADAM_STAGE3
    largest[0] = horizontal_max_epu32(largest_m);
    largest[1] = horizontal_max_epu32(largest_v);
    return whole;
}
#endif

static void apply_update(int algo, int64_t n, float *p, const float *g, state_span m, state_span v,
                         const effllm_hyper *h, int coded, int small_codes, float *new_absmax) {
#ifdef __AVX2__
    /* The common case on its own loop: Adam(W) with quantized states and no NaN/Inf gradient in the span
     * (the largest |g| is finite exactly when every g is). */
    if (coded && (algo == ALGO_ADAM || algo == ALGO_ADAMW) && is_finite(block_absmax(g, n))) {
        uint32_t largest[2];
        const int options = (algo == ALGO_ADAM && h->has_weight_decay) ? 1 : (algo == ALGO_ADAMW && h->has_weight_decay) ? 2 : 0;
#define ADAM_CODED(l2, shrink, small)                                                                          \
    adam_coded_avx2(n, p, g, m.values, m.codes, m.map, m.absmax, v.values, v.codes, v.map, v.absmax, h, l2, shrink, \
                    small, largest)
        const int64_t done = small_codes ? (options == 1 ? ADAM_CODED(1, 0, 1) : options == 2 ? ADAM_CODED(0, 1, 1)
                                                                                            : ADAM_CODED(0, 0, 1))
                                         : (options == 1 ? ADAM_CODED(1, 0, 0) : options == 2 ? ADAM_CODED(0, 1, 0)
                                                                                            : ADAM_CODED(0, 0, 0));
#undef ADAM_CODED
        if (done < n) {
            const state_span m_rest = {m.values + done, m.codes + done, m.map, m.absmax};
            const state_span v_rest = {v.values + done, v.codes + done, v.map, v.absmax};
            update_span_values(algo, n - done, p + done, g + done, m_rest, v_rest, h, 1, new_absmax);
            for (int k = 0; k < 2; k++) {
                const uint32_t rest = float_bits(new_absmax[k]);
                largest[k] = rest > largest[k] ? rest : largest[k];
            }
        }
        new_absmax[0] = bits_float(largest[0]);
        new_absmax[1] = bits_float(largest[1]);
        return;
    }
#endif
    if (coded) update_span_values(algo, n, p, g, m, v, h, 1, new_absmax);
    else update_span_values(algo, n, p, g, m, v, h, 0, new_absmax);
}

typedef struct {
    int algo, bits;
    int64_t blocksize;
    const effllm_code_map *map1, *map2;
    const effllm_hyper *hyper;
} update_config;

/* Per-thread scratch, each [span]: a span's values stay in L1 between the passes. */
typedef struct {
    float *param, *grad, *state1, *state2; /* fp32 copies where the tensors hold something else */
    uint8_t *codes1, *codes2;              /* 4-bit codes, one per byte */
} scratch_buffers;
#define SCRATCH_FLOAT_BUFFERS 4
#define SCRATCH_CODE_BUFFERS 2

/* A state's old values over a span, as update_elements reads them: fp32 states in place; 8-bit codes in
 * place; 4-bit codes unpacked into `codes` first. */
static state_span open_state(const update_config *c, void *state, const float *absmax, const effllm_code_map *map,
                             int64_t first, int64_t n, int64_t block, float *values, uint8_t *codes) {
    state_span span = {NULL, NULL, NULL, 0.0f};
    if (state == NULL) return span;
    if (c->bits == 32) {
        span.values = (float *)state + first;
        return span;
    }
    span.values = values;
    span.map = map->values;
    span.absmax = absmax[block];
    if (c->bits == 8) {
        span.codes = (const uint8_t *)state + first;
    } else {
        unpack_codes4((const uint8_t *)state, first, n, codes);
        span.codes = codes;
    }
    return span;
}

/* Quantizes a block's new values with their absmax into the state's codes (fp32 states are already
 * written). */
static void close_state(const update_config *c, void *state, float *absmax, const effllm_code_map *map,
                        int64_t first, int64_t n, int64_t block, const float *values, float new_absmax,
                        uint8_t *codes) {
    if (state == NULL || c->bits == 32) return;
    absmax[block] = new_absmax;
    if (c->bits == 8) {
        quantize_scaled(map, values, n, new_absmax, (uint8_t *)state + first);
    } else {
        quantize_scaled(map, values, n, new_absmax, codes);
        pack_codes4(codes, first, n, (uint8_t *)state);
    }
}

/* Asks for part `part` of PREFETCH_PARTS of the memory of elements first .. first+n-1, ahead of use, into
 * L2 (prefetcht2: L1 stays for the code tables and the scratch). The hardware prefetchers restart at every
 * 4 KiB page, which five streams cross often; and the 40-odd lines of a block asked for at once fill the
 * miss buffers and stall, so each pass over a block asks for a quarter of a later block. Measured on the
 * shared 2-core EPYC, one thread, 16M parameters, 8-bit AdamW: 3.0-3.6 ns per parameter so, 4.2-5.0 asking
 * for a block at once, 4.9-5.2 without (distances of 6 to 12 blocks alike).
 * Always inlined: gcc deems a function that only prefetches free of side effects and drops its calls. */
INLINE void prefetch_part(const update_config *c, const effllm_param_slot *s, int64_t first, int64_t n, int part) {
    if (first + n > s->numel) return;
    const int64_t elem = dtype_size(s->dtype);
    const char *param = (const char *)s->param + first * elem, *grad = (const char *)s->grad + first * elem;
    const int64_t lines = (n * elem + CACHE_LINE - 1) / CACHE_LINE;
    for (int64_t line = lines * part / PREFETCH_PARTS; line < lines * (part + 1) / PREFETCH_PARTS; line++) {
        __builtin_prefetch(param + line * CACHE_LINE, PREFETCH_READ, PREFETCH_TO_L2);
        __builtin_prefetch(grad + line * CACHE_LINE, PREFETCH_READ, PREFETCH_TO_L2);
    }
    /* State bytes of the span: 4 per element at 32 bits, 1 at 8, 1/2 at 4. */
    const char *state1 = s->state1, *state2 = s->state2;
    const int64_t state_first = first * c->bits / 8, state_lines = (n * c->bits / 8 + CACHE_LINE - 1) / CACHE_LINE;
    for (int64_t line = state_lines * part / PREFETCH_PARTS; line < state_lines * (part + 1) / PREFETCH_PARTS; line++) {
        if (state1) __builtin_prefetch(state1 + state_first + line * CACHE_LINE, PREFETCH_READ, PREFETCH_TO_L2);
        if (state2) __builtin_prefetch(state2 + state_first + line * CACHE_LINE, PREFETCH_READ, PREFETCH_TO_L2);
    }
}

/* Updates elements first .. first+n-1 of one parameter; at 8/4 bits they are exactly block `block`.
 * Meanwhile asks for the memory of the span starting at `ahead`, `span` long (see prefetch_part). */
static void update_span(const update_config *c, const effllm_param_slot *s, int64_t first, int64_t n,
                        int64_t block, const scratch_buffers *scratch, int64_t ahead, int64_t span) {
    prefetch_part(c, s, ahead, span, 0);
    const int64_t elem = dtype_size(s->dtype);
    char *param = (char *)s->param + first * elem;
    const char *grad = (const char *)s->grad + first * elem;
    float *p = (float *)param;
    const float *g = (const float *)grad;
    if (s->dtype != EFFLLM_FLOAT32) {
        load_as_float(scratch->param, param, n, s->dtype);
        load_as_float(scratch->grad, grad, n, s->dtype);
        p = scratch->param;
        g = scratch->grad;
    }
    const state_span m = open_state(c, s->state1, s->absmax1, c->map1, first, n, block, scratch->state1,
                                    scratch->codes1);
    const state_span v = open_state(c, s->state2, s->absmax2, c->map2, first, n, block, scratch->state2,
                                    scratch->codes2);
    prefetch_part(c, s, ahead, span, 1);
    float new_absmax[2] = {0.0f, 0.0f};
    apply_update(c->algo, n, p, g, m, v, c->hyper, c->bits != 32, c->bits == 4, new_absmax);
    prefetch_part(c, s, ahead, span, 2);
    if (s->dtype != EFFLLM_FLOAT32) store_from_float(param, p, n, s->dtype);
    close_state(c, s->state1, s->absmax1, c->map1, first, n, block, m.values, new_absmax[0], scratch->codes1);
    prefetch_part(c, s, ahead, span, 3);
    close_state(c, s->state2, s->absmax2, c->map2, first, n, block, v.values, new_absmax[1], scratch->codes2);
}

static int64_t unit_elements(int bits, int64_t blocksize) {
    if (bits == 32) return CHUNK_32BIT;
    return (bits == 4 && blocksize % 2) ? 2 * blocksize : blocksize;
}

static void update_unit(const update_config *c, const effllm_param_slot *s, int64_t unit, int64_t unit_size,
                        const scratch_buffers *scratch) {
    const int64_t unit_first = unit * unit_size;
    const int64_t unit_end = unit_first + unit_size < s->numel ? unit_first + unit_size : s->numel;
    const int64_t span = c->bits == 32 ? CHUNK_32BIT : c->blocksize;
    for (int64_t first = unit_first; first < unit_end; first += span) {
        const int64_t n = unit_end - first < span ? unit_end - first : span;
        update_span(c, s, first, n, c->bits == 32 ? 0 : first / c->blocksize, scratch,
                    first + PREFETCH_SPANS_AHEAD * span, span);
    }
}

/* The slot holding global unit `unit`: units_before is non-decreasing, with num_slots + 1 entries. */
static int64_t slot_of_unit(const int64_t *units_before, int64_t num_slots, int64_t unit) {
    int64_t low = 0, high = num_slots - 1; /* answer in [low, high] */
    while (low < high) {
        const int64_t middle = (low + high + 1) / 2;
        if (units_before[middle] <= unit) low = middle;
        else high = middle - 1;
    }
    return low;
}

int effllm_optim_update(int32_t algo, int32_t bits, int64_t blocksize, int32_t num_threads,
                        const effllm_param_slot *slots, int64_t num_slots, const effllm_code_map *map1,
                        const effllm_code_map *map2, const effllm_hyper *hyper) {
    if (algo < ALGO_ADAM || algo > ALGO_RMSPROP || (bits != 32 && bits != 8 && bits != 4)) return EFFLLM_BAD_ARGUMENT;
    if (bits != 32 && blocksize < 1) return EFFLLM_BAD_ARGUMENT;
    const update_config config = {algo, bits, blocksize, map1, map2, hyper};
    const int64_t unit_size = unit_elements(bits, blocksize);
    const int64_t span = bits == 32 ? CHUNK_32BIT : blocksize;

    /* units_before[i]: units of the slots before slot i; the last entry is the total. */
    int64_t *units_before = malloc((size_t)(num_slots + 1) * sizeof(int64_t));
    if (units_before == NULL) return EFFLLM_OUT_OF_MEMORY;
    units_before[0] = 0;
    for (int64_t i = 0; i < num_slots; i++)
        units_before[i + 1] = units_before[i] + (slots[i].numel + unit_size - 1) / unit_size;
    const int64_t total_units = units_before[num_slots];

    int64_t chunk = total_units / ((int64_t)num_threads * CHUNKS_PER_THREAD);
    chunk = chunk < UNITS_PER_CHUNK_MIN ? UNITS_PER_CHUNK_MIN : chunk > UNITS_PER_CHUNK_MAX ? UNITS_PER_CHUNK_MAX : chunk;

    int failed = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        float *buffer = malloc((size_t)(SCRATCH_FLOAT_BUFFERS * span) * sizeof(float)
                               + (size_t)(SCRATCH_CODE_BUFFERS * span));
        failed = buffer == NULL;
        uint8_t *code_buffer = (uint8_t *)(buffer + SCRATCH_FLOAT_BUFFERS * span);
        const scratch_buffers scratch = {buffer, buffer + span, buffer + 2 * span, buffer + 3 * span,
                                         code_buffer, code_buffer + span};
        int64_t slot = 0;
        /* Dynamic chunks: a thread that the OS holds back (other processes, a busy core) does less of the
         * work instead of making the others wait for it. */
#pragma omp for schedule(dynamic, chunk)
        for (int64_t unit = 0; unit < total_units; unit++) {
            if (failed) continue;
            if (unit < units_before[slot] || unit >= units_before[slot + 1])
                slot = slot_of_unit(units_before, num_slots, unit);
            update_unit(&config, &slots[slot], unit - units_before[slot], unit_size, &scratch);
        }
        free(buffer);
    }
    free(units_before);
    return failed ? EFFLLM_OUT_OF_MEMORY : EFFLLM_OK;
}
