/*
 * Every per-token metric of lmkl.scoring.divergence.token_metrics for float32 logit rows, in two
 * sweeps over the vocabulary per row (lmkl/scoring/native.py compiles and loads this file).
 *
 * Sweep 1, per model and per block of BLOCK entries: the block's maximum (and whether any value
 * is not finite), then exp(x - block max) into a scratch row and its sum. The row's maximum,
 * log-normaliser and first arg-max follow from the per-block figures. Sweep 2 turns the stored
 * exponentials into probabilities (one factor per block) and accumulates every sum at once.
 * Each block works in L1 and each row in L2, so a row is read from memory about twice.
 *
 * Precision: block sums are float32 over at most BLOCK terms and are added in float64; the
 * log-probability difference is (x - y) - (lse_p - lse_q), the latter in float64, so rounding
 * the two log-normalisers to float32 adds no error to KL; entropies are lse - sum p x.
 *
 * Compiled without -ffast-math (which would assume no inf/NaN, and on older GCC would set
 * flush-to-zero for the whole process): only reassociation, contraction and no errno, so that
 * `#pragma omp simd` reductions vectorise and expf/logf use glibc's vector variants (libmvec).
 * A row with any non-finite logit returns NaN in every output; the caller recomputes such rows
 * with the exact reference code, which owns the semantics of -inf (masked) and NaN logits.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#pragma omp declare simd notinbranch
float expf(float);
#pragma omp declare simd notinbranch
float logf(float);

#define BLOCK 1024
#define N_OUT 13
#define LN2 0.69314718055994530942

/* Blocks of a row of `vocab` entries. */
int64_t lmkl_blocks(int64_t vocab) { return (vocab + BLOCK - 1) / BLOCK; }

/* Sweep 1 over one model's row x (scaled by it): stores exp(x*it - block max) in e, the block
 * maxima and sums in block_max/block_sum; returns 1 if a scaled value is not finite. */
static int softmax_stats(const float *x, int64_t vocab, float it, float *e, double *block_max,
                         double *block_sum, double *lse, float *max_out, int64_t *argmax) {
    float m = -INFINITY;
    int64_t max_block = 0;
    int64_t nb = 0;
    for (int64_t s = 0; s < vocab; s += BLOCK, nb++) {
        const int64_t n = s + BLOCK < vocab ? BLOCK : vocab - s;
        const float *xs = x + s;
        float *es = e + s;
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
        for (int64_t j = 0; j < n; j++) {
            const float w = expf(xs[j] * it - bmax);
            es[j] = w;
            sum += w;
        }
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
                        int top_k, double *out, float *ea, float *eb, double *blocks) {
    const int64_t nb = lmkl_blocks(vocab);
    double *max_a = blocks, *sum_a = blocks + nb, *max_b = blocks + 2 * nb, *sum_b = blocks + 3 * nb;
    double lse_a, lse_b;
    float top_a, top_b;
    int64_t arg_a, arg_b;
    if (softmax_stats(a, vocab, it, ea, max_a, sum_a, &lse_a, &top_a, &arg_a) ||
        softmax_stats(b, vocab, it, eb, max_b, sum_b, &lse_b, &top_b, &arg_b)) {
        for (int k = 0; k < N_OUT; k++) out[k] = NAN;
        return;
    }
    const float lsa = (float)lse_a, lsb = (float)lse_b, dl = (float)(lse_a - lse_b);
    const float b_at_top_a = b[arg_a] * it;
    double kl = 0, rkl = 0, px = 0, qy = 0, js = 0;
    int64_t above = 0;
    for (int64_t s = 0, k = 0; s < vocab; s += BLOCK, k++) {
        const int64_t n = s + BLOCK < vocab ? BLOCK : vocab - s;
        const float fa = (float)exp(max_a[k] - lse_a), fb = (float)exp(max_b[k] - lse_b);
        const float *as = a + s, *bs = b + s, *eas = ea + s, *ebs = eb + s;
        float f_kl = 0, f_rkl = 0, f_px = 0, f_qy = 0, f_js = 0;
        int32_t f_above = 0;
#pragma omp simd reduction(+ : f_kl, f_rkl, f_px, f_qy, f_js, f_above)
        for (int64_t j = 0; j < n; j++) {
            const float x = as[j] * it, y = bs[j] * it;
            const float p = eas[j] * fa, q = ebs[j] * fb;
            const float d = (x - y) - dl;
            /* log m = log((p + q) / 2), floored where both probabilities underflow to 0 */
            float lm = logf(p + q);
            lm = (lm > -1e30f ? lm : -1e30f) - (float)LN2;
            f_kl += p * d;
            f_rkl -= q * d;
            f_px += p * x;
            f_qy += q * y;
            f_js += p * ((x - lsa) - lm) + q * ((y - lsb) - lm);
            f_above += y > b_at_top_a;
        }
        kl += f_kl;
        rkl += f_rkl;
        px += f_px;
        qy += f_qy;
        js += f_js;
        above += f_above;
    }
    const double lp_x = (double)(a[target] * it) - lse_a, lq_x = (double)(b[target] * it) - lse_b;
    const double jsd = 0.5 * js;
    out[0] = kl > 0 ? kl : 0;
    out[1] = rkl > 0 ? rkl : 0;
    out[2] = jsd < 0 ? 0 : (jsd > LN2 ? LN2 : jsd);
    out[3] = lse_a - px;
    out[4] = lse_b - qy;
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
 * scratch holds 2 * vocab floats, blocks 4 * lmkl_blocks(vocab) doubles (one set per thread).
 */
void lmkl_token_metrics(const float *ref, int64_t ref_stride, const float *cand, int64_t cand_stride,
                        int64_t rows, int64_t vocab, const int64_t *targets, float inv_temperature,
                        int32_t top_k, float *out, int64_t out_stride, float *scratch,
                        double *blocks) {
    double values[N_OUT];
    for (int64_t i = 0; i < rows; i++) {
        row_metrics(ref + i * ref_stride, cand + i * cand_stride, vocab, targets[i],
                    inv_temperature, top_k, values, scratch, scratch + vocab, blocks);
        for (int k = 0; k < N_OUT; k++) out[k * out_stride + i] = (float)values[k];
    }
}
