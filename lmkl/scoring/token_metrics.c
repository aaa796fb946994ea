/*
 * Every per-token metric of lmkl.scoring.divergence.token_metrics for float32 logit rows, in two
 * sweeps over the vocabulary per row (lmkl/scoring/native.py compiles and loads this file).
 *
 * Sweep 1, per model and per block of BLOCK entries (in L1): the block's maximum, then the sum
 * of exp(x - block max). The row's maximum, log-normaliser (lse) and first arg-max follow from
 * the per-block figures. Sweep 2 (the row is still in L2) accumulates every sum at once.
 *
 * Exact where float32 usually is not (lmkl/scoring/accuracy.py states the contract). With
 * w = (x - (y - o)) * it - c (o a whole number, c the log-normalisers' difference as computed),
 * KL is a p-weighted sum of log-ratios that cancels down to a second-order quantity, and an
 * error in c enters it whole. So
 * sweep 2 sums second-order terms only: with p normalised by its computed sum,
 *     KL = sum p phi(w) - psi(S),   phi(w) = w + expm1(-w) >= 0,   S = sum p expm1(-w),
 *     psi(s) = s - log1p(s)
 * holds exactly for any c (reverse KL likewise with q and -w), phi by its series where |w| < 1/2
 * and from p e^-w = q K elsewhere. JSD takes the series of its per-token term in the refined
 * log-ratio w + (c - gap), known in float64, where |w| < 1/2. Entropies
 * and log-probabilities use the mass outside each row's maximum, summed without the maximum's
 * own exact 1 (a peaked row's entropy lives below float32's resolution of 1 + rest).
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
/* The order of the outputs, which lmkl/scoring/native.py checks against OUTPUT_NAMES on load. */
static const char OUTPUT_NAMES[] =
    "kl,reverse_kl,jsd,entropy_reference,entropy_candidate,nll_reference,nll_candidate,delta_p,"
    "top1_agree,top1_in_top5,reference_top1_prob,lse_reference,lse_candidate";
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

/* phi(w) = w + expm1(-w) and phi(-w) for |w| < 1/2: w^2 (E(w^2) -+ w O(w^2)), E and O the even
 * and odd Taylor coefficients 1/(2k)! and 1/(2k+1)! to w^11 (relative error < 1e-11). */
static inline float phi_even(float w2) {
    float y = fmaf(w2, 2.75573192e-7f, 2.48015873e-5f);
    y = fmaf(y, w2, 1.38888889e-3f);
    y = fmaf(y, w2, 4.16666667e-2f);
    return fmaf(y, w2, 0.5f);
}

static inline float phi_odd(float w2) {
    float y = fmaf(w2, 2.50521084e-8f, 2.75573192e-6f);
    y = fmaf(y, w2, 1.98412698e-4f);
    y = fmaf(y, w2, 8.33333333e-3f);
    return fmaf(y, w2, 1.66666667e-1f);
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

/* Outputs per row, and their names in order (comma-separated). */
int32_t lmkl_outputs(void) { return N_OUT; }
const char *lmkl_output_names(void) { return OUTPUT_NAMES; }

/* s - log1p(s), about s^2 / 2, without cancellation. */
static double psi(double s) {
    if (fabs(s) < 1e-3) return s * s * (0.5 - s * (1.0 / 3 - s * (0.25 - s * 0.2)));
    return s - log1p(s);
}

/* Sweep 1 over one model's row x: block maxima (of the raw logits: scaling by it > 0 keeps the
 * order) and sums of exp((x - block max) * it) into block_max/block_sum, each block's maximum
 * entries counted apart (exactly 1 each); the row's raw maximum, first arg-max and
 * log1p(rest) = lse - max * it, rest being the mass outside the first maximum. Every scaled
 * value is taken from a raw difference, exact for nearby logits, so the maximum's is exactly 0
 * however the compiler contracts. Returns 1 (and nothing else) if a value is not finite. */
static int softmax_stats(const float *x, int64_t vocab, float it, double *block_max,
                          double *block_sum, double *log1p_rest, float *max_out,
                          int64_t *argmax) {
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
            const float v = xs[j];
            uint32_t bits;
            memcpy(&bits, &v, sizeof bits);
            bad |= (bits & 0x7f800000u) == 0x7f800000u; /* inf or NaN: all exponent bits set */
            bmax = bmax > v ? bmax : v;
        }
        if (bad || !isfinite(bmax * it)) return 1;
        float sum = 0.0f;
        int32_t ties = 0;
#pragma omp simd reduction(+ : sum, ties)
        for (int64_t j = 0; j < n; j++) {
            sum += xs[j] == bmax ? 0.0f : exp_approx((xs[j] - bmax) * it);
            ties += xs[j] == bmax;
        }
        block_max[nb] = bmax;
        block_sum[nb] = (double)sum + ties;
        if (bmax > m) { /* strictly: the first block holding the maximum */
            m = bmax;
            max_block = s;
        }
    }
    double rest = -1.0; /* the first maximum's own exp(0) = 1 is not part of the rest */
    for (int64_t k = 0; k < nb; k++)
        rest += block_sum[k] * exp((block_max[k] - (double)m) * (double)it);
    *log1p_rest = log1p(rest);
    int64_t j = max_block;
    const int64_t end = max_block + BLOCK < vocab ? max_block + BLOCK : vocab;
    while (j < end - 1 && x[j] != m) j++; /* the first index of the maximum */
    *max_out = m;
    *argmax = j;
    return 0;
}

static void row_metrics(const float *a, const float *b, int64_t vocab, int64_t target, float it,
                        int top_k, double *out, double *blocks) {
    const int64_t nb = lmkl_blocks(vocab);
    double l1p_a, l1p_b;
    float top_a, top_b;
    int64_t arg_a, arg_b;
    if (softmax_stats(a, vocab, it, blocks, blocks + nb, &l1p_a, &top_a, &arg_a) ||
        softmax_stats(b, vocab, it, blocks + 2 * nb, blocks + 3 * nb, &l1p_b, &top_b, &arg_b)) {
        for (int k = 0; k < N_OUT; k++) out[k] = NAN;
        return;
    }
    const double lse_a = (double)top_a * it + l1p_a, lse_b = (double)top_b * it + l1p_b;
    /* log p = z - log1p(rest) with z = (x - max) * it; exp(z - la) * ca = exp(z - l1p_a): the
     * rounding of l1p to float32 corrected once */
    const float la = (float)l1p_a, lb = (float)l1p_b;
    const float ca = (float)exp((double)la - l1p_a), cb = (float)exp((double)lb - l1p_b);
    /* The candidate's row moved by the whole number o nearest the gap of the maxima (exact: a
     * whole number is a multiple of its spacing), so that x - (y - o) is a difference of nearby
     * values even for heads offset by a constant. */
    const float o = rintf(top_b - top_a);
    const double gap = (lse_a - lse_b) + (double)o * it; /* what c stands for */
    const float c = (float)gap;                          /* rounded: w's error is c - gap */
    /* p e^-w = q K and q e^w = p / K where the series does not apply: K = exp(c - gap) */
    const float k_q = (float)exp((double)c - gap), k_p = 1.0f / k_q;
    const float refine = (float)((double)c - gap); /* log p - log q = w + refine */
    const float b_at_top_a = b[arg_a];
    double f_sum = 0, s_sum = 0, g_sum = 0, t_sum = 0, sum_p = 0, sum_q = 0, pz = 0, qz = 0;
    double js = 0;
    int64_t above = 0;
    /* Two loops per block (it is in L1): fewer live values per loop, so no register spills. */
    float p_block[BLOCK], q_block[BLOCK];
    for (int64_t s = 0; s < vocab; s += BLOCK) {
        const int64_t n = s + BLOCK < vocab ? BLOCK : vocab - s;
        const float *as = a + s, *bs = b + s;
        float f_f = 0, f_s = 0, f_g = 0, f_t = 0, f_p = 0, f_q = 0, f_pz = 0, f_qz = 0, f_js = 0;
        int32_t f_above = 0;
#pragma omp simd reduction(+ : f_f, f_s, f_g, f_t, f_p, f_q, f_pz, f_qz, f_above)
        for (int64_t j = 0; j < n; j++) {
            const float za = (as[j] - top_a) * it, zb = (bs[j] - top_b) * it;
            const float p = exp_approx(za - la) * ca, q = exp_approx(zb - lb) * cb;
            /* log p - log q up to c's error, from the raw difference: exact for nearby logits,
             * and exactly 0 for identical ones */
            const float w = (as[j] - (bs[j] - o)) * it - c;
            const float w2 = w * w, even = phi_even(w2), odd = w * phi_odd(w2);
            const float phi_pos = w2 * (even - odd), phi_neg = w2 * (even + odd);
            const int small = fabsf(w) < 0.5f;
            const float qk = fmaf(q, k_q, -p), pk = fmaf(p, k_p, -q);
            p_block[j] = p;
            q_block[j] = q;
            f_f += small ? p * phi_pos : fmaf(p, w, qk);
            f_s += small ? p * (phi_pos - w) : qk;
            f_g += small ? q * phi_neg : fmaf(-q, w, pk);
            f_t += small ? q * (phi_neg + w) : pk;
            f_p += p;
            f_q += q;
            f_pz += p * za;
            f_qz += q * zb;
            f_above += bs[j] > b_at_top_a;
        }
#pragma omp simd reduction(+ : f_js)
        for (int64_t j = 0; j < n; j++) {
            const float za = (as[j] - top_a) * it, zb = (bs[j] - top_b) * it;
            const float p = p_block[j], q = q_block[j];
            const float w = (as[j] - (bs[j] - o)) * it - c + refine; /* the refined ratio */
            /* log m = log((p + q) / 2), floored where both probabilities underflow */
            const float lm = log_approx(p + q) - (float)LN2;
            const float js_direct = 0.5f * (p * ((za - la) - lm) + q * ((zb - lb) - lm));
            f_js += fabsf(w) < 0.5f ? p * jsd_series(w) : js_direct;
        }
        f_sum += f_f;
        s_sum += f_s;
        g_sum += f_g;
        t_sum += f_t;
        sum_p += f_p;
        sum_q += f_q;
        pz += f_pz;
        qz += f_qz;
        js += f_js;
        above += f_above;
    }
    const double kl = f_sum / sum_p - psi(s_sum / sum_p);
    const double rkl = g_sum / sum_q - psi(t_sum / sum_q);
    const double lp_x = ((double)a[target] - top_a) * it - l1p_a;
    const double lq_x = ((double)b[target] - top_b) * it - l1p_b;
    out[0] = kl < 0 ? 0 : kl;
    out[1] = rkl < 0 ? 0 : rkl;
    out[2] = js < 0 ? 0 : (js > LN2 ? LN2 : js);
    out[3] = l1p_a - pz / sum_p;
    out[4] = l1p_b - qz / sum_q;
    out[5] = -lp_x;
    out[6] = -lq_x;
    out[7] = exp(lq_x) - exp(lp_x);
    out[8] = arg_a == arg_b;
    out[9] = above < top_k;
    out[10] = exp(-l1p_a);
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
