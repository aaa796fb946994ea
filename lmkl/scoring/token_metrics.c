/*
 * Every per-token metric of lmkl.scoring.divergence.token_metrics for float32 logit rows, in two
 * sweeps over the vocabulary per row (lmkl/scoring/native.py compiles and loads this file).
 *
 * Sweep 1, per model and per block of BLOCK entries (in L1): the block's maximum, then the sum
 * of exp(x - block max). The row's maximum, log-normaliser (lse) and first arg-max follow from
 * the per-block figures. Sweep 2 (the row is still in L2) accumulates every sum at once.
 *
 * Exact where float32 usually is not: with d = log p - log q = (x - y) - (lse_p - lse_q), KL is
 * the p-weighted mean of d, and an error in lse_p - lse_q enters KL whole (float32 sums of
 * exponentials are good to ~1e-7, as large as the KL of a good 8-bit quantization). So the
 * difference of the log-normalisers is refined in sweep 2 from the identity
 *     lse_p - lse_q = c - log(1 + sum_i p_i expm1(-(x_i - y_i - c)))     (any constant c)
 * with c its sweep-1 value and expm1 by its series where the argument is small, p and q
 * normalised by their sums as computed; KL and reverse KL then follow without cancellation. JSD takes the series of its
 * per-token term in d where |d| < 1/2 (where the usual form loses its digits to rounding).
 * Block sums are float32 over at most BLOCK terms, added in float64.
 *
 * exp and log are inline polynomials that the compiler vectorises (no libm call per element),
 * good to 1-2 ulp over the ranges used (probabilities below e^-87 count as e^-87: 1e-38). The
 * file is compiled without -ffast-math (which would assume no inf/NaN, and on older GCC would
 * set flush-to-zero for the whole process) and without reassociation (which may compute the
 * log-ratio w differently in its two uses and undo the refinement): the `#pragma omp simd`
 * reductions vectorise without it. A row with a non-finite logit gives NaN in every
 * output; the caller recomputes such rows with the exact reference code, which owns the
 * semantics of -inf (masked) and NaN logits.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 1024
#define N_OUT 13
#define LN2 0.69314718055994530942
#define LN2_HI 0.693359375f
#define LN2_LO -2.12194440e-4f

/* e^x for x <= 88: x = n ln2 + r (Cody-Waite), |r| <= ln2/2, e^r by its Taylor series to r^7
 * (error < 6e-9), 2^n from the exponent bits; below -87.3 gives e^-87.3 (no denormals). */
static inline float exp_approx(float x) {
    x = x < -87.3f ? -87.3f : x;
    const float n = rintf(x * 1.44269504088896341f);
    float r = fmaf(-n, LN2_HI, x);
    r = fmaf(-n, LN2_LO, r);
    float y = 1.98412698e-4f;
    y = fmaf(y, r, 1.38888889e-3f);
    y = fmaf(y, r, 8.33333333e-3f);
    y = fmaf(y, r, 4.16666667e-2f);
    y = fmaf(y, r, 1.66666667e-1f);
    y = fmaf(y, r, 0.5f);
    y = fmaf(y, r, 1.0f);
    y = fmaf(y, r, 1.0f);
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

/* log s for s > 0 (below 1e-37 taken as 1e-37): s = 2^e m with m in [sqrt(1/2), sqrt(2)),
 * log m = x - x^2/2 + x^3 P(x) with x = m - 1 and P of degree 7, a Chebyshev fit of
 * (log1p(x) - x + x^2/2) / x^3 on that interval (error < 1e-8, below float32 rounding; the fit
 * is in tests/test_native.py). No division: it vectorises to FMAs. */
static inline float log_approx(float s) {
    s = s < 1e-37f ? 1e-37f : s;
    int32_t bits;
    memcpy(&bits, &s, sizeof bits);
    int32_t e = (bits >> 23) - 127;
    bits = (bits & 0x007fffff) | 0x3f800000;
    float m;
    memcpy(&m, &bits, sizeof m);
    const int big = m > 1.41421356f;
    m = big ? 0.5f * m : m;
    e += big;
    const float x = m - 1.0f, z = x * x;
    float y = -0.08101634670615289f;
    y = fmaf(y, x, 0.12712452006824784f);
    y = fmaf(y, x, -0.1297227274851448f);
    y = fmaf(y, x, 0.14202159397752365f);
    y = fmaf(y, x, -0.16642243993805464f);
    y = fmaf(y, x, 0.20001468916856982f);
    y = fmaf(y, x, -0.25000296610107187f);
    y = fmaf(y, x, 0.3333332859613281f);
    const float r = x + fmaf(y * x, z, -0.5f * z);
    return fmaf((float)e, LN2_HI, fmaf((float)e, LN2_LO, r));
}

/* expm1(-w) for |w| <= 1/2, by its Taylor series to w^9 (relative error < 1e-9). */
static inline float expm1_neg_series(float w) {
    float y = 2.75573192e-6f;
    y = fmaf(y, -w, 2.48015873e-5f);
    y = fmaf(y, -w, 1.98412698e-4f);
    y = fmaf(y, -w, 1.38888889e-3f);
    y = fmaf(y, -w, 8.33333333e-3f);
    y = fmaf(y, -w, 4.16666667e-2f);
    y = fmaf(y, -w, 1.66666667e-1f);
    y = fmaf(y, -w, 0.5f);
    y = fmaf(y, -w, 1.0f);
    return y * -w;
}

/* The JSD term over p, (p log(2p/(p+q)) + q log(2q/(p+q))) / (2p) with q = p e^-d, for
 * |d| < 1/2: its Taylor series to d^10 (relative error < 1e-8; tests/test_native.py derives the
 * coefficients). */
static inline float jsd_series(float d) {
    float y = -2.5834986772486774e-08f;
    y = fmaf(y, d, 2.5834986772486774e-07f);
    y = fmaf(y, d, 1.0850694444444445e-05f);
    y = fmaf(y, d, -8.680555555555556e-05f);
    y = fmaf(y, d, 0.00043402777777777775f);
    y = fmaf(y, d, -0.0026041666666666665f);
    y = fmaf(y, d, 0.015625f);
    y = fmaf(y, d, -0.0625f);
    y = fmaf(y, d, 0.125f);
    return y * d * d;
}

/* Blocks of a row of `vocab` entries. */
int64_t lmkl_blocks(int64_t vocab) { return (vocab + BLOCK - 1) / BLOCK; }

/* Sweep 1 over one model's row x (scaled by it): block maxima and sums of exp(x*it - block max)
 * into block_max/block_sum; the row's lse, maximum and first arg-max. Returns 1 (and nothing
 * else) if a scaled value is not finite. */
static int softmax_stats(const float *x, int64_t vocab, float it, double *block_max,
                          double *block_sum, double *lse, float *max_out, int64_t *argmax) {
    float m = -INFINITY;
    int64_t max_block = 0;
    int64_t nb = 0;
    for (int64_t s = 0; s < vocab; s += BLOCK, nb++) {
        const int64_t n = s + BLOCK < vocab ? BLOCK : vocab - s;
        const float *xs = x + s;
        float bmax = -INFINITY;
        uint32_t bad = 0;
#pragma omp simd reduction(max : bmax) reduction(| : bad)
        for (int64_t j = 0; j < n; j++) {
            const float v = xs[j] * it;
            uint32_t bits;
            memcpy(&bits, &v, sizeof bits);
            bad |= (bits & 0x7f800000u) == 0x7f800000u; /* inf or NaN: all exponent bits set */
            bmax = bmax > v ? bmax : v;
        }
        if (bad) return 1;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < n; j++) sum += exp_approx(xs[j] * it - bmax);
        block_max[nb] = bmax;
        block_sum[nb] = sum;
        if (bmax > m) { /* strictly: the first block holding the maximum */
            m = bmax;
            max_block = s;
        }
    }
    double total = 0.0;
    for (int64_t k = 0; k < nb; k++) total += block_sum[k] * exp(block_max[k] - (double)m);
    *lse = (double)m + log(total);
    int64_t j = max_block;
    const int64_t end = max_block + BLOCK < vocab ? max_block + BLOCK : vocab;
    while (j < end - 1 && x[j] * it != m) j++; /* the first index of the maximum */
    *max_out = m;
    *argmax = j;
    return 0;
}

static void row_metrics(const float *a, const float *b, int64_t vocab, int64_t target, float it,
                        int top_k, double *out, double *blocks) {
    const int64_t nb = lmkl_blocks(vocab);
    double lse_a, lse_b;
    float top_a, top_b;
    int64_t arg_a, arg_b;
    if (softmax_stats(a, vocab, it, blocks, blocks + nb, &lse_a, &top_a, &arg_a) ||
        softmax_stats(b, vocab, it, blocks + 2 * nb, blocks + 3 * nb, &lse_b, &top_b, &arg_b)) {
        for (int k = 0; k < N_OUT; k++) out[k] = NAN;
        return;
    }
    const float lsa = (float)lse_a, lsb = (float)lse_b;
    /* exp(x - lsa) * ca = exp(x - lse_a): the rounding of lse_a to float32 corrected once */
    const float ca = (float)exp((double)lsa - lse_a), cb = (float)exp((double)lsb - lse_b);
    const float c = (float)(lse_a - lse_b); /* the sweep-1 difference, refined below */
    /* p expm1(-w) = q K - p where the series does not apply, K = exp(c - (lse_a - lse_b)) */
    const float k_q = (float)exp((double)c - (lse_a - lse_b));
    const float b_at_top_a = b[arg_a] * it;
    double pw = 0, qw = 0, s_em = 0, sum_p = 0, sum_q = 0, px = 0, qy = 0, js = 0;
    int64_t above = 0;
    /* Two loops per block (it is in L1): fewer live values per loop, so no register spills. */
    float p_block[BLOCK], q_block[BLOCK];
    for (int64_t s = 0; s < vocab; s += BLOCK) {
        const int64_t n = s + BLOCK < vocab ? BLOCK : vocab - s;
        const float *as = a + s, *bs = b + s;
        float f_pw = 0, f_qw = 0, f_em = 0, f_p = 0, f_q = 0, f_px = 0, f_qy = 0, f_js = 0;
        int32_t f_above = 0;
#pragma omp simd reduction(+ : f_pw, f_qw, f_em, f_p, f_q, f_px, f_qy, f_above)
        for (int64_t j = 0; j < n; j++) {
            const float x = as[j] * it, y = bs[j] * it;
            const float p = exp_approx(x - lsa) * ca, q = exp_approx(y - lsb) * cb;
            const float w = (x - y) - c; /* log p - log q, up to the refinement of c */
            p_block[j] = p;
            q_block[j] = q;
            f_pw += p * w;
            f_qw += q * w;
            f_em += fabsf(w) < 0.5f ? p * expm1_neg_series(w) : fmaf(q, k_q, -p);
            f_p += p;
            f_q += q;
            f_px += p * x;
            f_qy += q * y;
            f_above += y > b_at_top_a;
        }
#pragma omp simd reduction(+ : f_js)
        for (int64_t j = 0; j < n; j++) {
            const float x = as[j] * it, y = bs[j] * it, p = p_block[j], q = q_block[j];
            const float w = (x - y) - c;
            /* log m = log((p + q) / 2), floored where both probabilities underflow */
            const float lm = log_approx(p + q) - (float)LN2;
            const float js_direct = 0.5f * (p * ((x - lsa) - lm) + q * ((y - lsb) - lm));
            f_js += fabsf(w) < 0.5f ? p * jsd_series(w) : js_direct;
        }
        pw += f_pw;
        qw += f_qw;
        s_em += f_em;
        sum_p += f_p;
        sum_q += f_q;
        px += f_px;
        qy += f_qy;
        js += f_js;
        above += f_above;
    }
    /* With p, q normalised by their sums as computed: c - (lse_a - lse_b) = log(sum p e^-w)
     * = log1p(S / sum p), so KL = sum p (w + c - dl) and RKL = -sum q (w + c - dl). */
    const double shift = log1p(s_em / sum_p);
    const double kl = pw / sum_p + shift, rkl = -(qw / sum_q + shift);
    const double lp_x = (double)(a[target] * it) - lse_a, lq_x = (double)(b[target] * it) - lse_b;
    out[0] = kl < 0 ? 0 : kl;
    out[1] = rkl < 0 ? 0 : rkl;
    out[2] = js < 0 ? 0 : (js > LN2 ? LN2 : js);
    out[3] = lse_a - px / sum_p;
    out[4] = lse_b - qy / sum_q;
    out[5] = -lp_x;
    out[6] = -lq_x;
    out[7] = exp(lq_x) - exp(lp_x);
    out[8] = arg_a == arg_b;
    out[9] = above < top_k;
    out[10] = exp((double)top_a - lse_a);
    out[11] = lse_a;
    out[12] = lse_b;
}

/*
 * rows x vocab metrics: ref/cand are row-major float32 with row strides (in elements, >= vocab);
 * targets are in [0, vocab); out is [N_OUT, out_stride] float32, row i written at column i.
 * blocks holds 4 * lmkl_blocks(vocab) doubles (one set per thread).
 */
void lmkl_token_metrics(const float *ref, int64_t ref_stride, const float *cand, int64_t cand_stride,
                        int64_t rows, int64_t vocab, const int64_t *targets, float inv_temperature,
                        int32_t top_k, float *out, int64_t out_stride, double *blocks) {
    double values[N_OUT];
    for (int64_t i = 0; i < rows; i++) {
        row_metrics(ref + i * ref_stride, cand + i * cand_stride, vocab, targets[i],
                    inv_temperature, top_k, values, blocks);
        for (int k = 0; k < N_OUT; k++) out[k * out_stride + i] = (float)values[k];
    }
}
