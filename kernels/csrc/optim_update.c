/* One fused optimizer update for CPU tensors: every parameter of a bucket in one call.
 * Spec: optim_update_ref in kernels/optim_update.py (same operations in the same order, each rounded to fp32
 * as torch rounds each elementwise op; compiled with -ffp-contract=off so nothing else is fused).
 *
 * Work is cut into units (a quantization block, two blocks when 4-bit blocks are odd-sized so that no byte
 * is shared between threads, or a chunk of elements at 32 bits) numbered across all parameters; each thread
 * takes one contiguous range of units. Per block: load param and grad as fp32, dequantize the states into
 * scratch that stays in L1, update, store the param, requantize the states with fresh absmaxes. */
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
#define PREFETCH_SPANS_AHEAD 4 /* software prefetch distance, in spans (blocks) */
#define CACHE_LINE 64

/* Must match the ParamSlot structure in kernels/_optim_update_cpu.py. */
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
 * Must match the Hyper structure in kernels/_optim_update_cpu.py. */
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
} effllm_hyper;

/* torch.lerp(start, end, weight) as torch's vectorised CPU kernel computes it: one fused multiply-add from
 * the nearer end. `weight_small` is |weight| < 0.5, `coefficient` weight or weight - 1 accordingly. */
static inline float lerp(float start, float end, float coefficient, int weight_small) {
    return fmaf(coefficient, end - start, weight_small ? start : end);
}

static inline float lerp_coefficient(float weight) { return fabsf(weight) < 0.5f ? weight : weight - 1.0f; }

static inline int is_finite(float x) { return fabsf(x) <= FLT_MAX; }

/* The updates on fp32 arrays [n]: inputs p, g, m, v; outputs p_out, m_out, v_out, which never alias an
 * input (written in place, gcc turns `x[i] = keep ? x[i] : y` into masked stores, which are slow).
 * An element with a non-finite gradient keeps its old values. Options that change which operations run
 * (l2, shrink, momentum) are compile-time constants of each always-inlined copy, so every loop is
 * branch-free and vectorises. m and v are NULL for an algorithm without that state. */
#define INLINE static inline __attribute__((always_inline))
#define UPDATE_ARGS                                                                                          \
    int64_t n, const float *restrict p, const float *restrict g, const float *restrict m,                    \
        const float *restrict v, float *restrict p_out, float *restrict m_out, float *restrict v_out,       \
        const effllm_hyper *h

INLINE void adam_loop(UPDATE_ARGS, const int l2, const int shrink) {
    const float coefficient1 = lerp_coefficient(h->one_minus_beta1);
    const int small1 = fabsf(h->one_minus_beta1) < 0.5f;
    const float beta2 = h->beta2, one_minus_beta2 = h->one_minus_beta2;
    const float bc2 = h->bias_correction2_sqrt, eps = h->eps, step_size = h->step_size;
    const float wd = h->weight_decay, decay = h->decay_factor;
    for (int64_t i = 0; i < n; i++) {
        const int finite = is_finite(g[i]);
        float grad = finite ? g[i] : 0.0f;
        if (l2) grad = grad + wd * p[i];
        const float param = shrink ? p[i] * decay : p[i];
        const float m_new = lerp(m[i], grad, coefficient1, small1);
        const float v_new = v[i] * beta2 + (one_minus_beta2 * grad) * grad;
        const float denom = sqrtf(v_new) / bc2 + eps;
        p_out[i] = finite ? param - step_size * (m_new / denom) : p[i];
        m_out[i] = finite ? m_new : m[i];
        v_out[i] = finite ? v_new : v[i];
    }
}

static void adam_update(UPDATE_ARGS, int decoupled) {
    if (!h->has_weight_decay) adam_loop(n, p, g, m, v, p_out, m_out, v_out, h, 0, 0);
    else if (decoupled) adam_loop(n, p, g, m, v, p_out, m_out, v_out, h, 0, 1);
    else adam_loop(n, p, g, m, v, p_out, m_out, v_out, h, 1, 0);
}

static void lion_update(UPDATE_ARGS) {
    (void)v, (void)v_out;
    const float beta1 = h->beta1, one_minus_beta1 = h->one_minus_beta1;
    const float coefficient2 = lerp_coefficient(h->one_minus_beta2);
    const int small2 = fabsf(h->one_minus_beta2) < 0.5f;
    const float lr = h->lr, decay = h->decay_factor;
    for (int64_t i = 0; i < n; i++) {
        const int finite = is_finite(g[i]);
        const float grad = finite ? g[i] : 0.0f;
        const float mix = m[i] * beta1 + grad * one_minus_beta1;
        const float direction = (float)((mix > 0.0f) - (mix < 0.0f)); /* torch.sign of a finite value */
        p_out[i] = finite ? p[i] * decay - lr * direction : p[i];
        m_out[i] = finite ? lerp(m[i], grad, coefficient2, small2) : m[i];
    }
}

INLINE void sgd_loop(UPDATE_ARGS, const int l2, const int momentum_buffer) {
    (void)v, (void)v_out;
    const float lr = h->lr, wd = h->weight_decay, momentum = h->beta1, one_minus_dampening = h->one_minus_dampening;
    const int first = h->first_step, nesterov = h->nesterov;
    for (int64_t i = 0; i < n; i++) {
        const int finite = is_finite(g[i]);
        float grad = finite ? g[i] : 0.0f;
        if (l2) grad = grad + wd * p[i];
        if (momentum_buffer) {
            const float m_new = first ? grad : m[i] * momentum + one_minus_dampening * grad;
            grad = nesterov ? grad + momentum * m_new : m_new;
            m_out[i] = finite ? m_new : m[i];
        }
        p_out[i] = finite ? p[i] - lr * grad : p[i];
    }
}

/* m is NULL without momentum. */
static void sgd_update(UPDATE_ARGS) {
    if (m && h->has_weight_decay) sgd_loop(n, p, g, m, v, p_out, m_out, v_out, h, 1, 1);
    else if (m) sgd_loop(n, p, g, m, v, p_out, m_out, v_out, h, 0, 1);
    else if (h->has_weight_decay) sgd_loop(n, p, g, m, v, p_out, m_out, v_out, h, 1, 0);
    else sgd_loop(n, p, g, m, v, p_out, m_out, v_out, h, 0, 0);
}

INLINE void rmsprop_loop(UPDATE_ARGS, const int l2) {
    (void)m, (void)m_out;
    const float lr = h->lr, wd = h->weight_decay, alpha = h->beta2, one_minus_alpha = h->one_minus_beta2;
    const float eps = h->eps;
    for (int64_t i = 0; i < n; i++) {
        const int finite = is_finite(g[i]);
        float grad = finite ? g[i] : 0.0f;
        if (l2) grad = grad + wd * p[i];
        const float v_new = v[i] * alpha + (one_minus_alpha * grad) * grad;
        p_out[i] = finite ? p[i] - (lr * grad) / (sqrtf(v_new) + eps) : p[i];
        v_out[i] = finite ? v_new : v[i];
    }
}

static void rmsprop_update(UPDATE_ARGS) {
    if (h->has_weight_decay) rmsprop_loop(n, p, g, m, v, p_out, m_out, v_out, h, 1);
    else rmsprop_loop(n, p, g, m, v, p_out, m_out, v_out, h, 0);
}

static void apply_update(int algo, UPDATE_ARGS) {
    switch (algo) {
    case ALGO_ADAM: adam_update(n, p, g, m, v, p_out, m_out, v_out, h, 0); break;
    case ALGO_ADAMW: adam_update(n, p, g, m, v, p_out, m_out, v_out, h, 1); break;
    case ALGO_LION: lion_update(n, p, g, m, v, p_out, m_out, v_out, h); break;
    case ALGO_SGD: sgd_update(n, p, g, m, v, p_out, m_out, v_out, h); break;
    case ALGO_RMSPROP: rmsprop_update(n, p, g, m, v, p_out, m_out, v_out, h); break;
    }
}

typedef struct {
    int algo, bits;
    int64_t blocksize;
    const effllm_code_map *map1, *map2;
    const effllm_hyper *hyper;
} update_config;

/* Per-thread fp32 scratch, each [span]: a span's inputs and outputs stay in L1 between the passes. */
typedef struct {
    float *param, *grad, *state1, *state2;     /* inputs */
    float *param_out, *state1_out, *state2_out; /* outputs */
    uint8_t *codes;                            /* 4-bit codes before packing */
} scratch_buffers;
#define SCRATCH_FLOAT_BUFFERS 7

/* The fp32 values of one state over one span, copied or dequantized into `scratch`. */
static const float *read_state(const update_config *c, const void *state, const float *absmax,
                               const effllm_code_map *map, int64_t first, int64_t n, int64_t block, float *scratch) {
    if (state == NULL) return NULL;
    if (c->bits == 32)
        memcpy(scratch, (const float *)state + first, (size_t)n * sizeof(float));
    else if (c->bits == 8)
        dequantize_codes8(map->values, (const uint8_t *)state + first, n, absmax[block], scratch);
    else
        dequantize_codes4(map->values, (const uint8_t *)state, first, n, absmax[block], scratch);
    return scratch;
}

/* Where the update writes a state's new values: fp32 states directly, quantized ones into scratch. */
static float *state_output(const update_config *c, void *state, int64_t first, float *scratch) {
    if (state == NULL) return NULL;
    return c->bits == 32 ? (float *)state + first : scratch;
}

/* Quantizes a block's new values into the state's codes and absmax (fp32 states are already written). */
static void write_state(const update_config *c, void *state, float *absmax, const effllm_code_map *map,
                        int64_t first, int64_t n, int64_t block, const float *values, uint8_t *codes) {
    if (state == NULL || c->bits == 32) return;
    if (c->bits == 8) {
        absmax[block] = quantize_block(map, values, n, (uint8_t *)state + first);
    } else {
        absmax[block] = quantize_block(map, values, n, codes);
        pack_codes4(codes, first, n, (uint8_t *)state);
    }
}

/* Asks for the memory of elements first .. first+n-1 ahead of use. The hardware prefetchers lose a stream at
 * every 4 KiB page, which with five streams costs more than the prefetch instructions. */
static void prefetch_span(const update_config *c, const effllm_param_slot *s, int64_t first, int64_t n) {
    if (first + n > s->numel) return;
    const int64_t elem = dtype_size(s->dtype);
    const char *param = (const char *)s->param + first * elem, *grad = (const char *)s->grad + first * elem;
    for (int64_t offset = 0; offset < n * elem; offset += CACHE_LINE) {
        __builtin_prefetch(param + offset, 1);
        __builtin_prefetch(grad + offset, 0);
    }
    /* State bytes of the span: 4 per element at 32 bits, 1 at 8, 1/2 at 4. */
    const int64_t state_first = first * c->bits / 8, state_bytes = n * c->bits / 8;
    for (int64_t offset = 0; offset < state_bytes; offset += CACHE_LINE) {
        if (s->state1) __builtin_prefetch((const char *)s->state1 + state_first + offset, 1);
        if (s->state2) __builtin_prefetch((const char *)s->state2 + state_first + offset, 1);
    }
}

/* Updates elements first .. first+n-1 of one parameter; at 8/4 bits they are exactly block `block`. */
static void update_span(const update_config *c, const effllm_param_slot *s, int64_t first, int64_t n,
                        int64_t block, const scratch_buffers *scratch) {
    const int64_t elem = dtype_size(s->dtype);
    char *param = (char *)s->param + first * elem;
    const char *grad = (const char *)s->grad + first * elem;
    load_as_float(scratch->param, param, n, s->dtype);
    const float *g = (const float *)grad;
    if (s->dtype != EFFLLM_FLOAT32) {
        load_as_float(scratch->grad, grad, n, s->dtype);
        g = scratch->grad;
    }
    float *p_out = s->dtype == EFFLLM_FLOAT32 ? (float *)param : scratch->param_out;
    const float *m = read_state(c, s->state1, s->absmax1, c->map1, first, n, block, scratch->state1);
    const float *v = read_state(c, s->state2, s->absmax2, c->map2, first, n, block, scratch->state2);
    float *m_out = state_output(c, s->state1, first, scratch->state1_out);
    float *v_out = state_output(c, s->state2, first, scratch->state2_out);
    apply_update(c->algo, n, scratch->param, g, m, v, p_out, m_out, v_out, c->hyper);
    if (s->dtype != EFFLLM_FLOAT32) store_from_float(param, p_out, n, s->dtype);
    write_state(c, s->state1, s->absmax1, c->map1, first, n, block, m_out, scratch->codes);
    write_state(c, s->state2, s->absmax2, c->map2, first, n, block, v_out, scratch->codes);
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
        prefetch_span(c, s, first + PREFETCH_SPANS_AHEAD * span, span);
        update_span(c, s, first, n, c->bits == 32 ? 0 : first / c->blocksize, scratch);
    }
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

    int failed = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        const int64_t threads = omp_get_num_threads(), thread = omp_get_thread_num();
        const int64_t unit_begin = total_units * thread / threads, unit_end = total_units * (thread + 1) / threads;
        float *buffer = malloc((size_t)(SCRATCH_FLOAT_BUFFERS * span) * sizeof(float) + (size_t)span);
        if (buffer == NULL) {
            failed = 1;
        } else if (unit_begin < unit_end) {
            const scratch_buffers scratch = {buffer,           buffer + span,     buffer + 2 * span,
                                             buffer + 3 * span, buffer + 4 * span, buffer + 5 * span,
                                             buffer + 6 * span, (uint8_t *)(buffer + SCRATCH_FLOAT_BUFFERS * span)};
            int64_t slot = 0;
            while (units_before[slot + 1] <= unit_begin) slot++;
            for (int64_t unit = unit_begin; unit < unit_end; unit++) {
                while (units_before[slot + 1] <= unit) slot++;
                update_unit(&config, &slots[slot], unit - units_before[slot], unit_size, &scratch);
            }
        }
        free(buffer);
    }
    free(units_before);
    return failed ? EFFLLM_OUT_OF_MEMORY : EFFLLM_OK;
}
