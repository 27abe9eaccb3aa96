/* One adapted layer's routing and experts' delta for a few tokens on a CPU, in one call (fused_cpu.py builds and
 * calls it). For each token t, with x_t = x[t] and y_t = y[t] (the base layer's output, updated in place):
 *
 *     logits = G x_t                                   [E]
 *     ids    = top-k of logits (the first on a tie)    [k]
 *     w      = softmax(logits[ids] / temperature)      [k]
 *     y_t   += sum_j w_j * B_t[rows of ids_j]^T (A[rows of ids_j] x_t)
 *
 * Shapes and symbols as in meteora/model/experts.py: A [R + 1, d_in] and B_t [R + 1, d_out] hold every expert's rows
 * at its own rank (the scaling folded into B_t), expert e's rows start at offsets[e] and number ranks[e]. All
 * arithmetic is fp32; A and B_t are fp32 or bf16 (upcast as they are read). ids and weights are written out for
 * the routing trace. Rows are read four at a time (four dot products share each load of x; four rows of B_t
 * update y in one pass).
 */
#include <stdint.h>
#include <string.h>
#include <math.h>

#define PARALLEL_MIN_TOKENS 64

static inline float from_f32(const float *p, int64_t i) { return p[i]; }

static inline float from_bf16(const uint16_t *p, int64_t i) {
    uint32_t bits = (uint32_t)p[i] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* out[r] = rows[r] . x for n_rows rows of length n (row-major), and y += sum_r h[r] * rows[r], for rows of type T */
#define ROW_KERNELS(NAME, T, LOAD)                                                                              \
static void dots_##NAME(const T *rows, int64_t n_rows, const float *x, int64_t n, float *out) {                \
    int64_t r = 0;                                                                                              \
    for (; r + 4 <= n_rows; r += 4) {                                                                           \
        const T *a0 = rows + r * n, *a1 = a0 + n, *a2 = a1 + n, *a3 = a2 + n;                                   \
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;                                                       \
        _Pragma("omp simd reduction(+:s0,s1,s2,s3)")                                                            \
        for (int64_t i = 0; i < n; i++) {                                                                       \
            float xi = x[i];                                                                                    \
            s0 += LOAD(a0, i) * xi; s1 += LOAD(a1, i) * xi; s2 += LOAD(a2, i) * xi; s3 += LOAD(a3, i) * xi;     \
        }                                                                                                       \
        out[r] = s0; out[r + 1] = s1; out[r + 2] = s2; out[r + 3] = s3;                                         \
    }                                                                                                           \
    for (; r < n_rows; r++) {                                                                                   \
        const T *a = rows + r * n;                                                                              \
        float s = 0.0f;                                                                                         \
        _Pragma("omp simd reduction(+:s)")                                                                      \
        for (int64_t i = 0; i < n; i++) s += LOAD(a, i) * x[i];                                                 \
        out[r] = s;                                                                                             \
    }                                                                                                           \
}                                                                                                               \
static void axpys_##NAME(float *y, const T *rows, int64_t n_rows, const float *h, int64_t n) {                 \
    int64_t r = 0;                                                                                              \
    for (; r + 4 <= n_rows; r += 4) {                                                                           \
        const T *b0 = rows + r * n, *b1 = b0 + n, *b2 = b1 + n, *b3 = b2 + n;                                   \
        float h0 = h[r], h1 = h[r + 1], h2 = h[r + 2], h3 = h[r + 3];                                           \
        _Pragma("omp simd")                                                                                     \
        for (int64_t i = 0; i < n; i++)                                                                         \
            y[i] += h0 * LOAD(b0, i) + h1 * LOAD(b1, i) + h2 * LOAD(b2, i) + h3 * LOAD(b3, i);                  \
    }                                                                                                           \
    for (; r < n_rows; r++) {                                                                                   \
        const T *b = rows + r * n;                                                                              \
        float hr = h[r];                                                                                        \
        _Pragma("omp simd")                                                                                     \
        for (int64_t i = 0; i < n; i++) y[i] += hr * LOAD(b, i);                                                \
    }                                                                                                           \
}

ROW_KERNELS(f32, float, from_f32)
ROW_KERNELS(bf16, uint16_t, from_bf16)

/* Top-k of logits[E] into ids[k] (descending; the lower index first on a tie) and their softmax at temperature. */
static void route(const float *logits, int64_t E, int64_t k, float temperature, int64_t *ids, float *weights) {
    for (int64_t j = 0; j < k; j++) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++) {
            int taken = 0;
            for (int64_t i = 0; i < j; i++) taken |= ids[i] == e;
            if (!taken && (best < 0 || logits[e] > logits[best])) best = e;
        }
        ids[j] = best;
    }
    float top = logits[ids[0]] / temperature, total = 0.0f;
    for (int64_t j = 0; j < k; j++) total += weights[j] = expf(logits[ids[j]] / temperature - top);
    for (int64_t j = 0; j < k; j++) weights[j] /= total;
}

/* One adapted layer as the call reads it: pointers into its tensors, kept alive by the caller (fused_cpu.py). */
typedef struct {
    const float *gate;          /* [E, d_in] fp32 */
    const void *A, *B_t;        /* [R + 1, d_in], [R + 1, d_out]: fp32, or bf16 when experts_bf16 */
    const int64_t *offsets, *ranks;  /* [E] */
    int64_t E, k, d_in, d_out, r_max;
    float temperature;
    int32_t experts_bf16;
} meteora_layer;

/* One token: y_t [d_out] += its delta; its ids and weights [k] written when not NULL. */
static void token(const meteora_layer *layer, const float *x_t, float *y_t, int64_t *ids, float *weights) {
    const int64_t E = layer->E, k = layer->k, d_in = layer->d_in, d_out = layer->d_out;
    float logits[E], h[layer->r_max > 0 ? layer->r_max : 1], token_weights[k];
    int64_t token_ids[k];
    dots_f32(layer->gate, E, x_t, d_in, logits);
    route(logits, E, k, layer->temperature, token_ids, token_weights);
    for (int64_t j = 0; j < k; j++) {
        int64_t first = layer->offsets[token_ids[j]], rank = layer->ranks[token_ids[j]];
        if (layer->experts_bf16) dots_bf16((const uint16_t *)layer->A + first * d_in, rank, x_t, d_in, h);
        else dots_f32((const float *)layer->A + first * d_in, rank, x_t, d_in, h);
        for (int64_t c = 0; c < rank; c++) h[c] *= token_weights[j];
        if (layer->experts_bf16) axpys_bf16(y_t, (const uint16_t *)layer->B_t + first * d_out, rank, h, d_out);
        else axpys_f32(y_t, (const float *)layer->B_t + first * d_out, rank, h, d_out);
    }
    if (ids) memcpy(ids, token_ids, k * sizeof *ids);
    if (weights) memcpy(weights, token_weights, k * sizeof *weights);
}

/* y [T, d_out] += the delta of x [T, d_in]; ids [T, k] and weights [T, k] are written when not NULL. From
 * PARALLEL_MIN_TOKENS tokens on, the tokens are shared among the OpenMP threads: torch's own (the process has one
 * libgomp.so.1, loaded by torch), so they do not contend with its ops. */
void meteora_route_and_add(const meteora_layer *layer, const float *x, int64_t T, float *y, int64_t *ids,
                           float *weights) {
    const int64_t k = layer->k;
#pragma omp parallel for schedule(static) if (T >= PARALLEL_MIN_TOKENS)
    for (int64_t t = 0; t < T; t++)
        token(layer, x + t * layer->d_in, y + t * layer->d_out, ids ? ids + t * k : NULL, weights ? weights + t * k : NULL);
}
