/* Weight-only GEMV for decode on the CPU: out[r, j] = sum_k x[r, k] * W[j, k], for a few rows r.
 *
 * W is int8 with bf16 scales per (output row, group of input columns), applied to each group's fp32
 * dot (the exact int8 x scale product, never a dequantized copy of W), or bf16 (widened to fp32 in
 * registers). Each weight byte is read once per call: a group's segment of a weight row is streamed
 * for two activation rows at a time and stays in L1 for the next two. Sums are fp32; the output is
 * fp32 or bf16 (rounded to nearest even). Output rows are split over OpenMP threads (torch's own
 * libgomp: the dynamic linker reuses the runtime torch has loaded).
 *
 * Built at first use by grok_torch.gemv (the system C compiler, -O3 -march=native) and called
 * through ctypes; GCC/Clang vector extensions keep it one source for x86 (AVX2/AVX-512) and Arm (NEON).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

typedef float v8f __attribute__((vector_size(32)));
typedef int8_t v8c __attribute__((vector_size(8)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));
typedef uint32_t v8u __attribute__((vector_size(32)));

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline v8f load_x(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline v8f load_w_int8(const int8_t *p) {
#ifdef __AVX2__ /* GCC widens a v8c element by element; vpmovsxbd does it in one instruction */
    return (v8f)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#endif
    v8c c;
    memcpy(&c, p, sizeof c);
    return __builtin_convertvector(__builtin_convertvector(c, v8i), v8f);
}

static inline v8f load_w_bf16(const uint16_t *p) {
    v8h h;
    memcpy(&h, p, sizeof h);
    v8u u = __builtin_convertvector(h, v8u) << 16;
    v8f f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float hsum(v8f v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

#ifndef PREFETCH
#define PREFETCH 2048 /* bytes ahead of the weight read: the next lines arrive before they are needed */
#endif

/* Dots of one weight segment w[0:n] with `nr` (1..4, a constant once inlined) activation rows x[r],
 * left as vectors dv[r] plus scalar tails ds[r] (the caller scales and sums them): each weight vector
 * is widened once for all rows; one row keeps four accumulators and more rows two each, so the FMA
 * latency does not bound the loop. */
#define DEFINE_DOTS(NAME, WTYPE, LOADW, WIDEN)                                                        \
    static inline __attribute__((always_inline)) void NAME(const WTYPE *w, const float *const *x,    \
                                                           const int nr, int64_t n, v8f *dv,          \
                                                           float *ds) {                               \
        const int lanes = nr == 1 ? 4 : 2;                                                            \
        v8f acc[4][4] = {{{0}}};                                                                      \
        int64_t k = 0;                                                                                \
        for (; k + 8 * lanes <= n; k += 8 * lanes) {                                                  \
            __builtin_prefetch(w + k + PREFETCH / sizeof(WTYPE));                                     \
            for (int c = 0; c < lanes; c++) {                                                         \
                v8f wv = LOADW(w + k + 8 * c);                                                        \
                for (int r = 0; r < nr; r++) acc[r][c] += load_x(x[r] + k + 8 * c) * wv;              \
            }                                                                                         \
        }                                                                                             \
        for (; k + 8 <= n; k += 8) {                                                                  \
            v8f wv = LOADW(w + k);                                                                    \
            for (int r = 0; r < nr; r++) acc[r][0] += load_x(x[r] + k) * wv;                          \
        }                                                                                             \
        for (int r = 0; r < nr; r++) {                                                                \
            dv[r] = (acc[r][0] + acc[r][1]) + (acc[r][2] + acc[r][3]);                                \
            ds[r] = 0.0f;                                                                             \
        }                                                                                             \
        for (; k < n; k++) {                                                                          \
            float wk = WIDEN(w[k]);                                                                   \
            for (int r = 0; r < nr; r++) ds[r] += x[r][k] * wk;                                       \
        }                                                                                             \
    }

#define WIDEN_INT8(v) ((float)(v))
DEFINE_DOTS(dots_int8, int8_t, load_w_int8, WIDEN_INT8)
DEFINE_DOTS(dots_bf16, uint16_t, load_w_bf16, bf16_to_float)

/* All rows of x (row stride k) from column `col`, four at a time, against one weight segment. */
#define TILE(NAME, DOTS, WTYPE)                                                                       \
    static void NAME(const WTYPE *w, const float *x, int64_t k, int64_t col, int64_t rows, int64_t n, \
                     v8f *dv, float *ds) {                                                            \
        for (int64_t r0 = 0; r0 < rows; r0 += 4) {                                                    \
            const float *xs[4];                                                                       \
            const int64_t nr = rows - r0 < 4 ? rows - r0 : 4;                                         \
            for (int64_t r = 0; r < nr; r++) xs[r] = x + (r0 + r) * k + col;                          \
            switch (nr) {                                                                             \
            case 1: DOTS(w, xs, 1, n, dv + r0, ds + r0); break;                                       \
            case 2: DOTS(w, xs, 2, n, dv + r0, ds + r0); break;                                       \
            case 3: DOTS(w, xs, 3, n, dv + r0, ds + r0); break;                                       \
            default: DOTS(w, xs, 4, n, dv + r0, ds + r0); break;                                      \
            }                                                                                         \
        }                                                                                             \
    }

TILE(tile_int8, dots_int8, int8_t)
TILE(tile_bf16, dots_bf16, uint16_t)

#define MAX_ROWS 8

static inline void store(void *out, int64_t index, float value, int out_bf16) {
    if (out_bf16)
        ((uint16_t *)out)[index] = float_to_bf16(value);
    else
        ((float *)out)[index] = value;
}

/* The activations in fp32: x itself, or (x_bf16) x widened into a buffer kept for the next call (one
 * per calling thread; a few hundred KB at most), so that the weight loop reads fp32 and no call mallocs. */
static const float *activations(const void *x, int x_bf16, int64_t count) {
    static __thread float *buffer = NULL;
    static __thread int64_t capacity = 0;
    if (!x_bf16) return (const float *)x;
    if (count > capacity) {
        float *grown = realloc(buffer, (size_t)count * sizeof(float));
        if (!grown) return NULL;
        buffer = grown;
        capacity = count;
    }
    const uint16_t *h = (const uint16_t *)x;
    for (int64_t i = 0; i < count; i++) buffer[i] = bf16_to_float(h[i]);
    return buffer;
}

/* Output rows are computed in tiles of TILE_N. From 3 activation rows up the input is taken in chunks
 * of CHUNK columns, so that the activations' chunk (rows x CHUNK fp32) stays in L1 while the tile's
 * weight rows stream past it (at 8 rows and K = 32768 the whole x, 1 MB, would otherwise be re-read
 * from L3 for every weight row); with 1 or 2 rows each weight row is read straight through, which the
 * hardware prefetcher follows best (measured cold: 23 against 12 GB/s for 5464 x 1024 int8). */
#define TILE_N 8
#define CHUNK 512
#define SEQUENTIAL_ROWS 2

/* One activation row against four int8 weight rows at once: each fp32 x vector is loaded once for the four
 * (the loads, not the arithmetic, bound the loop: measured 12 G elements/s per core with one row at a
 * time on an AVX2 EPYC); two accumulators per weight row. out4[q] = sum_g s[q, g] * dot(x_g, w_q,g). */
static void four_rows_int8(const float *x, const int8_t *w, int64_t ldw, const uint16_t *scales, int64_t lds,
                           int64_t groups, int64_t width, float *out4) {
    v8f total[4] = {{0}};
    float tails[4] = {0};
    for (int64_t g = 0; g < groups; g++) {
        const float *xg = x + g * width;
        const int8_t *w0 = w + g * width, *w1 = w0 + ldw, *w2 = w1 + ldw, *w3 = w2 + ldw;
        v8f a[4][2] = {{{0}}};
        int64_t k = 0;
        for (; k + 16 <= width; k += 16) {
            __builtin_prefetch(w0 + k + PREFETCH);
            __builtin_prefetch(w1 + k + PREFETCH);
            __builtin_prefetch(w2 + k + PREFETCH);
            __builtin_prefetch(w3 + k + PREFETCH);
            const v8f x0 = load_x(xg + k), x1 = load_x(xg + k + 8);
            a[0][0] += x0 * load_w_int8(w0 + k); a[0][1] += x1 * load_w_int8(w0 + k + 8);
            a[1][0] += x0 * load_w_int8(w1 + k); a[1][1] += x1 * load_w_int8(w1 + k + 8);
            a[2][0] += x0 * load_w_int8(w2 + k); a[2][1] += x1 * load_w_int8(w2 + k + 8);
            a[3][0] += x0 * load_w_int8(w3 + k); a[3][1] += x1 * load_w_int8(w3 + k + 8);
        }
        float t[4] = {0};
        for (; k < width; k++) {
            t[0] += xg[k] * (float)w0[k]; t[1] += xg[k] * (float)w1[k];
            t[2] += xg[k] * (float)w2[k]; t[3] += xg[k] * (float)w3[k];
        }
        for (int q = 0; q < 4; q++) {
            const float sc = bf16_to_float(scales[q * lds + g]);
            total[q] += sc * (a[q][0] + a[q][1]);
            tails[q] += sc * t[q];
        }
    }
    for (int q = 0; q < 4; q++) out4[q] = hsum(total[q]) + tails[q];
}

/* x [rows, k] fp32 or (x_bf16) bf16, row stride k; w int8 [n, k] (row stride ldw); scales bf16 [n, groups]
 * (row stride lds; groups divides k); out [rows, n] (row stride ldo), fp32 or (out_bf16) bf16.
 * rows <= MAX_ROWS. Returns 0, or 1 for arguments out of range, 2 when out of memory. */
int grok_gemv_int8(int64_t rows, int64_t n, int64_t k, const void *xin, int x_bf16, const int8_t *w, int64_t ldw,
                   const uint16_t *scales, int64_t groups, int64_t lds, void *out, int64_t ldo, int out_bf16,
                   int threads) {
    if (rows < 1 || rows > MAX_ROWS || groups < 1 || k % groups) return 1;
    const float *x = activations(xin, x_bf16, rows * k);
    if (!x) return 2;
    const int64_t width = k / groups, tiles = (n + TILE_N - 1) / TILE_N;
    /* Batch-1 decode with grouped scales: four weight rows per pass over x (measured cold on an AVX2 EPYC,
     * 2 threads: 6144 x 32768 in 8 groups 22 -> 27 GB/s, 1024 x 5464 16 -> 19). With one group the rows are
     * read one at a time below: four short streams at once train the hardware prefetcher worse (5464 x
     * 1024: 16 against 22 GB/s). */
    if (rows == 1 && groups > 1) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
        for (int64_t t = 0; t < tiles; t++) {
            const int64_t j0 = t * TILE_N, nj = n - j0 < TILE_N ? n - j0 : TILE_N;
            float o[TILE_N];
            int64_t jj = 0;
            for (; jj + 4 <= nj; jj += 4)
                four_rows_int8(x, w + (j0 + jj) * ldw, ldw, scales + (j0 + jj) * lds, lds, groups, width, o + jj);
            for (; jj < nj; jj++) { /* the last rows of a ragged tile, one at a time */
                v8f dv;
                float ds, acc = 0.0f;
                for (int64_t g = 0; g < groups; g++) {
                    tile_int8(w + (j0 + jj) * ldw + g * width, x, k, g * width, 1, width, &dv, &ds);
                    acc += bf16_to_float(scales[(j0 + jj) * lds + g]) * (hsum(dv) + ds);
                }
                o[jj] = acc;
            }
            for (jj = 0; jj < nj; jj++) store(out, j0 + jj, o[jj], out_bf16);
        }
        return 0;
    }
    const int64_t chunk = rows <= SEQUENTIAL_ROWS ? width : CHUNK;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t j0 = t * TILE_N, nj = n - j0 < TILE_N ? n - j0 : TILE_N;
        v8f acc[TILE_N][MAX_ROWS], dv[MAX_ROWS];
        float accs[TILE_N][MAX_ROWS], ds[MAX_ROWS];
        memset(acc, 0, sizeof acc);
        memset(accs, 0, sizeof accs);
        for (int64_t g = 0; g < groups; g++) {
            for (int64_t c = 0; c < width; c += chunk) {
                const int64_t len = width - c < chunk ? width - c : chunk, col = g * width + c;
                for (int64_t jj = 0; jj < nj; jj++) { /* the group's scale on each fp32 dot of it */
                    const float s = bf16_to_float(scales[(j0 + jj) * lds + g]);
                    tile_int8(w + (j0 + jj) * ldw + col, x, k, col, rows, len, dv, ds);
                    for (int64_t r = 0; r < rows; r++) {
                        acc[jj][r] += s * dv[r];
                        accs[jj][r] += s * ds[r];
                    }
                }
            }
        }
        for (int64_t jj = 0; jj < nj; jj++)
            for (int64_t r = 0; r < rows; r++) store(out, r * ldo + j0 + jj, hsum(acc[jj][r]) + accs[jj][r], out_bf16);
    }
    return 0;
}

/* The same with a bf16 weight [n, k] (row stride ldw) and no scales. */
int grok_gemv_bf16(int64_t rows, int64_t n, int64_t k, const void *xin, int x_bf16, const uint16_t *w,
                   int64_t ldw, void *out, int64_t ldo, int out_bf16, int threads) {
    if (rows < 1 || rows > MAX_ROWS) return 1;
    const float *x = activations(xin, x_bf16, rows * k);
    if (!x) return 2;
    const int64_t tiles = (n + TILE_N - 1) / TILE_N, chunk = rows <= SEQUENTIAL_ROWS ? k : CHUNK;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t j0 = t * TILE_N, nj = n - j0 < TILE_N ? n - j0 : TILE_N;
        v8f acc[TILE_N][MAX_ROWS], dv[MAX_ROWS];
        float accs[TILE_N][MAX_ROWS] = {{0}}, ds[MAX_ROWS];
        memset(acc, 0, sizeof acc);
        for (int64_t c = 0; c < k; c += chunk) {
            const int64_t len = k - c < chunk ? k - c : chunk;
            for (int64_t jj = 0; jj < nj; jj++) {
                tile_bf16(w + (j0 + jj) * ldw + c, x, k, c, rows, len, dv, ds);
                for (int64_t r = 0; r < rows; r++) {
                    acc[jj][r] += dv[r];
                    accs[jj][r] += ds[r];
                }
            }
        }
        for (int64_t jj = 0; jj < nj; jj++)
            for (int64_t r = 0; r < rows; r++) store(out, r * ldo + j0 + jj, hsum(acc[jj][r]) + accs[jj][r], out_bf16);
    }
    return 0;
}
