/* Does the GPU update kernel's division by a shared divisor (kernels/_optim_update_triton.py, _exact_quotient and
 * _normalized) round as IEEE division? Same operations with the CPU's fused multiply-add, compared bit for bit with
 * x / c, for every significand of x over many exponents and many divisors.
 *
 *   gcc -O2 -march=native -ffp-contract=off exact_quotient_exhaustive.c -lm -o check && ./check WIDE TINY
 *
 * WIDE divisors in [2^-40, 2^20) (x in the 32 binades where x / c lies in [2^-30, 4]); TINY divisors in
 * [2^-149, 2^-38) through _normalized's rescaling (x <= c, down to 2^-30 c, denormals included). Prints the
 * pairs tested and those that differ; exits 1 if any quotient of 2^-24 or more differs. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static float from_bits(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
static uint32_t to_bits(float f) { uint32_t b; memcpy(&b, &f, 4); return b; }

/* _exact_quotient: a product, then one correction by fused multiply-add; the product alone where the residual
 * is not finite. */
static float exact_quotient(float x, float c, float r) {
    const float q0 = x * r, e = fmaf(-q0, c, x);
    return fabsf(e) <= 0x1.fffffep127f ? fmaf(e, r, q0) : q0;
}

/* _normalized: rows below 2^-60 scaled up by 2^64 first. */
static float normalized(float x, float c) {
    const float k = c < 0x1p-60f ? 0x1p64f : 1.0f, d = c * k;
    return exact_quotient(x * k, d, 1.0f / d);
}

static uint64_t state = 88172645463325252ull;
static uint32_t next_random(void) { state ^= state << 13; state ^= state >> 7; state ^= state << 17; return (uint32_t)state; }

/* A divisor significand: the awkward ones first (all ones, all zeros, one bit), then random ones. */
static uint32_t divisor_significand(int d) {
    static const uint32_t awkward[] = {0x7FFFFF, 0x7FFFFE, 0x000000, 0x400000, 0x000001};
    return d < 5 ? awkward[d] : (next_random() & 0x7FFFFF);
}

int main(int argc, char **argv) {
    const int wide = argc > 1 ? atoi(argv[1]) : 8, tiny = argc > 2 ? atoi(argv[2]) : 8;
    long tested = 0, differ = 0, differ_tiny_quotient = 0;
    for (int d = 0; d < wide + tiny; d++) {
        const int is_tiny = d >= wide;
        const int exponent = is_tiny ? (int)(next_random() % 90) : 87 + (int)(next_random() % 60);
        uint32_t significand = divisor_significand(is_tiny ? d - wide : d);
        if (exponent == 0 && significand == 0) significand = 1;
        const float c = from_bits(((uint32_t)exponent << 23) | significand), r = 1.0f / c;
        for (int xe = exponent - 30; xe <= exponent + (is_tiny ? 0 : 1); xe++) {
            if (xe > 254 || (!is_tiny && xe < 1) || xe < -23) continue;
            for (uint32_t m = 0; m < (1u << 23); m++) {
                const uint32_t bits = xe >= 1 ? (((uint32_t)xe << 23) | m) : ((m | (1u << 23)) >> (1 - xe));
                const float x = from_bits(bits);
                if (is_tiny && x > c) continue;
                const float want = x / c, got = is_tiny ? normalized(x, c) : exact_quotient(x, c, r);
                tested++;
                if (to_bits(want) != to_bits(got)) {
                    if (fabsf(want) >= 0x1p-24f) {
                        if (differ++ < 5) printf("x=%a c=%a want=%a got=%a\n", x, c, want, got);
                    } else {
                        differ_tiny_quotient++;
                    }
                }
            }
        }
    }
    printf("tested %ld pairs: %ld differ (and %ld quotients below 2^-24)\n", tested, differ, differ_tiny_quotient);
    return differ != 0;
}
