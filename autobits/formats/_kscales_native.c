/*
 * The two hot scale searches of ggml's K-quants, in C: make_qkx2/qkx3_quants (scale + min,
 * Q4_K/Q5_K/Q2_K and Q4_1/Q5_1 with an imatrix) and make_qx_quants (symmetric; Q6_K, Q3_K
 * and Q4_0/Q5_0 with an imatrix); and IQ4_NL's search (quantize_row_iq4_nl_impl).
 *
 * They are ports of autobits.formats.kscales and .iq4nl (themselves ports of the static helpers in
 * llama.cpp's ggml/src/ggml-quants.c), each sub-block on its own lane, so the arithmetic is
 * ggml's scalar code again: float32 throughout, the same association order, sequential
 * sums.  Build with -ffp-contract=off (pyproject.toml): a fused multiply-add would change
 * the last bit of the sums and with it the chosen scale.
 *
 * Data layout: n sub-blocks of k values, either one per row ((n, k), C order) or, with
 * transposed=1, one per column ((k, n), C order: value i of sub-block r at x[i*n + r]).
 * 16 sub-blocks at a time are copied side by side into a (k, 16) buffer.  The levels
 * are written as int32 in the input's layout.  The GIL is released during the search.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GROUP_MAX_EPS 1e-15f
#define MAX_K 4096 /* the longest sub-block accepted (ggml's are 16 or 32 values) */

static inline int nearest_int(float fval) {
    /* ggml's rounding: exact round-half-even for |fval| < 2**22, ggml's garbage beyond */
    float val = fval + 12582912.f;
    int i;
    memcpy(&i, &val, sizeof(int));
    return (i & 0x007fffff) - 0x00400000;
}

static inline int clampi(int v, int lo, int hi) {
    v = v < lo ? lo : v; /* two selects, in this form the lane loops vectorise */
    return v > hi ? hi : v;
}

/* make_qkx2_quants / make_qkx3_quants on LANES sub-blocks side by side.
 *
 * x, w: (k, LANES), value i of lane r at [i*LANES + r]; L receives the levels in the same
 * layout.  Each lane runs ggml's search on its own sub-block; the loops run over the lanes
 * innermost so that the compiler vectorises them (every lane's running sums stay
 * sequential over i, as in ggml).  Instead of copying the levels of every better step,
 * the winning step's (iscale, min) is kept and the levels recomputed from it at the end:
 * the same floats give the same levels. */
#define LANES 16

/* The lane loops are compiled twice, for baseline x86-64 and for AVX2 (chosen at load
 * time); without FMA either way (-ffp-contract=off), so both give the same bits. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LANE_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LANE_CLONES
#endif

/* err[r] = sum_i w * |d| (use_mad) or w * d*d, d = scale*l + min - x, with the levels
 * l = clamp(nearest_int(isc*(x - lmin)), 0, nmax): ggml's error sums, lane by lane. */
LANE_CLONES static void lane_error(int k, int nmax, const float *x, const float *w, const float *isc,
                       const float *lmin, const float *scale, const float *min, int use_mad,
                       float *err) {
    float e[LANES] = {0}; /* local: no store/load through err */
    for (int i = 0; i < k; ++i) {
        const float *xi = x + i * LANES, *wi = w + i * LANES;
        if (use_mad) {
            for (int r = 0; r < LANES; ++r) {
                float l = (float)clampi(nearest_int(isc[r] * (xi[r] - lmin[r])), 0, nmax);
                float diff = scale[r] * l + min[r] - xi[r];
                e[r] += wi[r] * fabsf(diff);
            }
        } else {
            for (int r = 0; r < LANES; ++r) {
                float l = (float)clampi(nearest_int(isc[r] * (xi[r] - lmin[r])), 0, nmax);
                float diff = scale[r] * l + min[r] - xi[r];
                e[r] += wi[r] * (diff * diff);
            }
        }
    }
    memcpy(err, e, sizeof(e));
}

LANE_CLONES static void qkx_lanes(int k, int nmax, const float *x, const float *w, int32_t *L,
                      float *scale_out, float *the_min_out, float rmin, float rdelta,
                      int nstep, int use_mad) {
    float mn[LANES], mx[LANES], sum_w[LANES], sum_x[LANES], scale[LANES], best[LANES];
    float use_isc[LANES], use_min[LANES], isc[LANES];
    float sl[LANES], sl2[LANES], sxl[LANES], tscale[LANES], tmin[LANES], cur[LANES];
    int ok[LANES], flat[LANES];
    for (int r = 0; r < LANES; ++r) {
        mn[r] = x[r];
        mx[r] = x[r];
        sum_w[r] = w[r];
        sum_x[r] = w[r] * x[r];
    }
    for (int i = 1; i < k; ++i) {
        const float *xi = x + i * LANES, *wi = w + i * LANES;
        for (int r = 0; r < LANES; ++r) {
            mn[r] = xi[r] < mn[r] ? xi[r] : mn[r];
            mx[r] = xi[r] > mx[r] ? xi[r] : mx[r];
            sum_w[r] += wi[r];
            sum_x[r] += wi[r] * xi[r];
        }
    }
    for (int r = 0; r < LANES; ++r) {
        mn[r] = mn[r] > 0 ? 0 : mn[r];
        flat[r] = mx[r] == mn[r]; /* ggml returns at once: levels 0, scale 0 */
        isc[r] = nmax / (mx[r] - mn[r]);
        scale[r] = 1 / isc[r];
        best[r] = 0;
        use_isc[r] = isc[r];
        use_min[r] = mn[r];
    }
    lane_error(k, nmax, x, w, isc, mn, scale, mn, use_mad, best);
    for (int is = 0; nstep >= 1 && is <= nstep; ++is) {
        for (int r = 0; r < LANES; ++r) {
            isc[r] = (rmin + rdelta * is + nmax) / (mx[r] - mn[r]);
            sl[r] = sl2[r] = sxl[r] = 0;
        }
        for (int i = 0; i < k; ++i) {
            const float *xi = x + i * LANES, *wi = w + i * LANES;
            for (int r = 0; r < LANES; ++r) {
                float l = (float)clampi(nearest_int(isc[r] * (xi[r] - mn[r])), 0, nmax);
                float wl = wi[r] * l;
                sl[r] += wl;
                sl2[r] += wl * l;
                sxl[r] += wl * xi[r];
            }
        }
        for (int r = 0; r < LANES; ++r) {
            float D = sum_w[r] * sl2[r] - sl[r] * sl[r];
            float ts = (sum_w[r] * sxl[r] - sum_x[r] * sl[r]) / D;
            float tm = (sl2[r] * sum_x[r] - sl[r] * sxl[r]) / D;
            int pos = tm > 0;
            tmin[r] = pos ? 0 : tm;
            tscale[r] = pos ? sxl[r] / sl2[r] : ts;
            ok[r] = D > 0 && !flat[r];
        }
        lane_error(k, nmax, x, w, isc, mn, tscale, tmin, use_mad, cur);
        for (int r = 0; r < LANES; ++r) {
            if (ok[r] && cur[r] < best[r]) {
                best[r] = cur[r];
                scale[r] = tscale[r];
                use_isc[r] = isc[r];
                use_min[r] = mn[r];
                mn[r] = tmin[r];
            }
        }
    }
    for (int i = 0; i < k; ++i) {
        const float *xi = x + i * LANES;
        int32_t *Li = L + i * LANES;
        for (int r = 0; r < LANES; ++r) {
            int l = clampi(nearest_int(use_isc[r] * (xi[r] - use_min[r])), 0, nmax);
            Li[r] = flat[r] ? 0 : l;
        }
    }
    for (int r = 0; r < LANES; ++r) {
        scale_out[r] = flat[r] ? 0.f : scale[r];
        the_min_out[r] = -mn[r];
    }
}

/* amax[r] = the largest |x| of lane r, mx[r] = the first value of that magnitude (ggml) */
LANE_CLONES static void lane_absmax(int k, const float *x, float *amax_out, float *mx_out) {
    float amax[LANES] = {0}, mx[LANES] = {0};
    for (int i = 0; i < k; ++i) {
        const float *xi = x + i * LANES;
        for (int r = 0; r < LANES; ++r) {
            float ax = fabsf(xi[r]);
            int up = ax > amax[r];
            amax[r] = up ? ax : amax[r];
            mx[r] = up ? xi[r] : mx[r];
        }
    }
    memcpy(amax_out, amax, sizeof(amax));
    memcpy(mx_out, mx, sizeof(mx));
}

/* make_qx_quants' error weight of a value x: the importance, or one chosen by rmse_type */
static inline float qx_weight(float x, int rmse_type) {
    return rmse_type == 1 ? x * x
         : rmse_type == 2 ? 1
         : rmse_type == 3 ? fabsf(x)
                          : sqrtf(fabsf(x));
}

/* sumlx, suml2 of ggml's make_qx_quants for the levels of iscale, lane by lane */
LANE_CLONES static void qx_sums(int k, int nmax, const float *x, const float *w,
                                const float *isc, float *sumlx, float *suml2) {
    float slx[LANES] = {0}, sl2[LANES] = {0}; /* local: no store/load through the outputs */
    for (int i = 0; i < k; ++i) {
        const float *xi = x + i * LANES, *wi = w + i * LANES;
        for (int r = 0; r < LANES; ++r) {
            float l = (float)clampi(nearest_int(isc[r] * xi[r]), -nmax, nmax - 1);
            slx[r] += wi[r] * xi[r] * l;
            sl2[r] += wi[r] * l * l;
        }
    }
    memcpy(sumlx, slx, sizeof(slx));
    memcpy(suml2, sl2, sizeof(sl2));
}

/* make_qx_quants on LANES sub-blocks side by side (layout as qkx_lanes); the levels are
 * offset by +nmax.  w holds the error weights (ignored for rmse_type 0).  As in qkx_lanes
 * the winning step's iscale is kept and the levels recomputed from it at the end. */
LANE_CLONES static void qx_lanes(int k, int nmax, const float *x, const float *w, int32_t *L,
                                 float *scale_out, int rmse_type) {
    float mx[LANES], amax[LANES], isc[LANES], use_isc[LANES], scale[LANES], best[LANES];
    float slx[LANES], sl2[LANES], tisc[LANES];
    int zero[LANES];
    lane_absmax(k, x, amax, mx);
    for (int r = 0; r < LANES; ++r) {
        zero[r] = amax[r] < GROUP_MAX_EPS;
        isc[r] = -nmax / mx[r];
        use_isc[r] = isc[r];
    }
    if (rmse_type == 0) {
        for (int r = 0; r < LANES; ++r) scale[r] = 1 / isc[r];
    } else {
        int early = rmse_type < 0;
        qx_sums(k, nmax, x, w, isc, slx, sl2);
        for (int r = 0; r < LANES; ++r) {
            scale[r] = sl2[r] ? slx[r] / sl2[r] : 0.0f;
            if (early) scale[r] = sl2[r] > 0 ? 0.5f * (scale[r] + 1 / isc[r]) : 1 / isc[r];
            best[r] = scale[r] * slx[r];
        }
        for (int is = -9; !early && is <= 9; ++is) {
            if (is == 0) continue;
            for (int r = 0; r < LANES; ++r) tisc[r] = -(nmax + 0.1f * is) / mx[r];
            qx_sums(k, nmax, x, w, tisc, slx, sl2);
            for (int r = 0; r < LANES; ++r) {
                if (sl2[r] > 0 && slx[r] * slx[r] > best[r] * sl2[r]) {
                    use_isc[r] = tisc[r];
                    scale[r] = slx[r] / sl2[r];
                    best[r] = scale[r] * slx[r];
                }
            }
        }
    }
    for (int i = 0; i < k; ++i) {
        const float *xi = x + i * LANES;
        int32_t *Li = L + i * LANES;
        for (int r = 0; r < LANES; ++r) {
            int l = nmax + clampi(nearest_int(use_isc[r] * xi[r]), -nmax, nmax - 1);
            Li[r] = zero[r] ? 0 : l;
        }
    }
    for (int r = 0; r < LANES; ++r) scale_out[r] = zero[r] ? 0.f : scale[r];
}

/* ggml's kvalues_iq4nl: IQ4_NL's non-uniform grid */
static const float IQ4NL_VALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                       1,    13,   25,  38,  53,  69,  89,  113};
#define IQ4NL_NTRY 7

/* best_index_int8(16, kvalues_iq4nl, v): ggml's binary search picks the upper of two
 * neighbouring grid values a < b when v - a < b - v fails, i.e. from their midpoint on
 * (the midpoints are half-integers and the two differences are exact there; the NumPy
 * port finds the same thresholds by bisection over float32).  Counting the midpoints at
 * or below v gives the index without branches, so the lane loops vectorise. */
static inline int iq4nl_index(float v) {
    int idx = 0;
    for (int j = 0; j < 15; ++j) idx += v >= 0.5f * (IQ4NL_VALUES[j] + IQ4NL_VALUES[j + 1]);
    return idx;
}

/* IQ4NL_VALUES[iq4nl_index(v)], summed up the grid's steps, which vectorises where the
 * table lookup would not; four partial sums keep the chain of dependent adds short (any
 * order is exact: small integers). */
#define IQ4NL_STEP(j) (v >= 0.5f * (IQ4NL_VALUES[j] + IQ4NL_VALUES[j + 1]) \
                           ? IQ4NL_VALUES[j + 1] - IQ4NL_VALUES[j] : 0.f)
static inline float iq4nl_value(float v) {
    float a = IQ4NL_STEP(0) + IQ4NL_STEP(1) + IQ4NL_STEP(2) + IQ4NL_STEP(3);
    float b = IQ4NL_STEP(4) + IQ4NL_STEP(5) + IQ4NL_STEP(6) + IQ4NL_STEP(7);
    float c = IQ4NL_STEP(8) + IQ4NL_STEP(9) + IQ4NL_STEP(10) + IQ4NL_STEP(11);
    float d = IQ4NL_STEP(12) + IQ4NL_STEP(13) + IQ4NL_STEP(14) + IQ4NL_VALUES[0];
    return (a + b) + (c + d);
}
#undef IQ4NL_STEP

/* sumqx, sumq2 of the grid fit of inverse scale id, lane by lane (ggml's float32 sums) */
LANE_CLONES static void iq4nl_sums(int k, const float *x, const float *w, const float *id,
                                   float *sumqx, float *sumq2) {
    float sqx[LANES] = {0}, sq2[LANES] = {0}; /* local: no store/load through the outputs */
    for (int i = 0; i < k; ++i) {
        const float *xi = x + i * LANES, *wi = w + i * LANES;
        for (int r = 0; r < LANES; ++r) {
            float q = iq4nl_value(id[r] * xi[r]);
            float wq = wi[r] * q;
            sqx[r] += wq * xi[r];
            sq2[r] += wq * q;
        }
    }
    memcpy(sumqx, sqx, sizeof(sqx));
    memcpy(sumq2, sq2, sizeof(sq2));
}

/* quantize_row_iq4_nl_impl(32, 32, ..., ntry=7) on LANES blocks side by side (layout as
 * qkx_lanes; w holds the error weights).  Writes the float32 scale (before fp16 rounding)
 * and the codes 0..15.  A block whose weighted fit is empty (sumq2 = 0) starts from d = 0
 * where ggml divides 0 by 0: the NumPy port's choice, kept bit for bit. */
LANE_CLONES static void iq4nl_lanes(int k, const float *x, const float *w, int32_t *L,
                                    float *d_out) {
    float mx[LANES], amax[LANES], id[LANES], d[LANES], best[LANES], sqx[LANES], sq2[LANES];
    int live[LANES];
    lane_absmax(k, x, amax, mx);
    for (int r = 0; r < LANES; ++r) {
        live[r] = amax[r] >= GROUP_MAX_EPS;
        mx[r] = live[r] ? mx[r] : 1.f; /* dead blocks: any finite search, d is 0 below */
        id[r] = 1.f / (-mx[r] / IQ4NL_VALUES[0]);
    }
    iq4nl_sums(k, x, w, id, sqx, sq2);
    for (int r = 0; r < LANES; ++r) {
        d[r] = sq2[r] > 0 ? sqx[r] / sq2[r] : 0.f;
        best[r] = d[r] * sqx[r];
    }
    for (int itry = -IQ4NL_NTRY; itry <= IQ4NL_NTRY; ++itry) {
        for (int r = 0; r < LANES; ++r) id[r] = (float)(itry + (int)IQ4NL_VALUES[0]) / mx[r];
        iq4nl_sums(k, x, w, id, sqx, sq2);
        for (int r = 0; r < LANES; ++r) {
            if (sq2[r] > 0 && sqx[r] * sqx[r] > best[r] * sq2[r]) {
                d[r] = sqx[r] / sq2[r];
                best[r] = d[r] * sqx[r];
            }
        }
    }
    for (int r = 0; r < LANES; ++r) {
        d[r] = live[r] ? d[r] : 0.f;
        id[r] = d[r] != 0 ? 1.f / d[r] : 0.f;
        d_out[r] = d[r];
    }
    for (int i = 0; i < k; ++i) {
        const float *xi = x + i * LANES;
        int32_t *Li = L + i * LANES;
        for (int r = 0; r < LANES; ++r) Li[r] = iq4nl_index(id[r] * xi[r]);
    }
}

/* ------------------------------------------------------------------ argument handling */
typedef struct {
    Py_buffer x, w, scale, min, L;
    int has_w, has_min;
    Py_ssize_t n;
    int k, transposed;
} Args;

static void release(Args *a) {
    PyBuffer_Release(&a->x);
    if (a->has_w) PyBuffer_Release(&a->w);
    PyBuffer_Release(&a->scale);
    if (a->has_min) PyBuffer_Release(&a->min);
    PyBuffer_Release(&a->L);
}

/* Fill *a from Python objects and check every size; on error a Python exception is set,
 * every buffer taken is released, and -1 returned. */
static int take(Args *a, PyObject *x, PyObject *w, PyObject *scale, PyObject *min,
                PyObject *L, int k, int transposed) {
    memset(a, 0, sizeof(*a));
    a->k = k;
    a->transposed = transposed;
    if (k < 1 || k > MAX_K) {
        PyErr_Format(PyExc_ValueError, "sub-block length must be in [1, %d], got k=%d", MAX_K, k);
        return -1;
    }
    if (PyObject_GetBuffer(x, &a->x, PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (a->x.len % ((Py_ssize_t)k * 4) != 0) {
        PyErr_Format(PyExc_ValueError, "x holds %zd bytes, not a multiple of k*4=%d",
                     a->x.len, k * 4);
        PyBuffer_Release(&a->x);
        return -1;
    }
    a->n = a->x.len / ((Py_ssize_t)k * 4);
    Py_ssize_t want[4] = {a->x.len, a->n * 4, a->n * 4, a->x.len};
    PyObject *objs[4] = {w, scale, min, L};
    Py_buffer *bufs[4] = {&a->w, &a->scale, &a->min, &a->L};
    const char *names[4] = {"weights", "scale", "min", "levels"};
    for (int j = 0; j < 4; ++j) {
        if (objs[j] == Py_None && (j == 0 || j == 2)) continue;
        int flags = j == 0 ? PyBUF_C_CONTIGUOUS : (PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE);
        if (PyObject_GetBuffer(objs[j], bufs[j], flags) < 0) goto fail;
        if (j == 0) a->has_w = 1;
        if (j == 2) a->has_min = 1;
        if (bufs[j]->len != want[j]) {
            PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, expected %zd", names[j],
                         bufs[j]->len, want[j]);
            goto fail;
        }
    }
    return 0;
fail:
    PyBuffer_Release(&a->x);
    for (int j = 0; j < 4; ++j)
        if (bufs[j]->obj != NULL) PyBuffer_Release(bufs[j]);
    return -1;
}

/* Copy lanes r0 .. r0+m-1 of src (x's layout) into dst (k, LANES); lanes past m are 0. */
static void gather_lanes(const Args *a, const float *src, Py_ssize_t r0, int m, float *dst) {
    for (int i = 0; i < a->k; ++i) {
        for (int r = 0; r < LANES; ++r) {
            Py_ssize_t at = a->transposed ? (Py_ssize_t)i * a->n + r0 + r : (r0 + r) * a->k + i;
            dst[i * LANES + r] = r < m ? src[at] : 0.f; /* padding lanes are all-zero, dropped */
        }
    }
}

/* Copy the first m lanes of src (k, LANES) back into dst (x's layout). */
static void scatter_lanes(const Args *a, const int32_t *src, Py_ssize_t r0, int m, int32_t *dst) {
    for (int i = 0; i < a->k; ++i) {
        for (int r = 0; r < m; ++r) {
            Py_ssize_t at = a->transposed ? (Py_ssize_t)i * a->n + r0 + r : (r0 + r) * a->k + i;
            dst[at] = src[i * LANES + r];
        }
    }
}

/* Scratch for one call: x, w (k, LANES) and the levels. */
typedef struct {
    float *x, *w;
    int32_t *L;
} Lanes;

static int lanes_alloc(Lanes *b, int k) {
    b->x = malloc(sizeof(float) * (size_t)k * LANES * 2);
    b->L = malloc(sizeof(int32_t) * (size_t)k * LANES);
    b->w = b->x == NULL ? NULL : b->x + (size_t)k * LANES;
    if (b->x == NULL || b->L == NULL) {
        free(b->x);
        free(b->L);
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void lanes_free(Lanes *b) {
    free(b->x);
    free(b->L);
}

/* One search on the 16 lanes gathered at sub-block r0 (m of them real): fill b->w where no
 * weights were given, run, write the per-sub-block outputs at r0 (levels: by the driver). */
typedef void (*LaneSearch)(const Args *a, Lanes *b, Py_ssize_t r0, int m, int has_w,
                           const void *params);

/* Take the buffers, run `search` on every group of LANES sub-blocks with the GIL released,
 * release everything; NULL with a Python exception on bad buffers. */
static PyObject *run_lanes(PyObject *x, PyObject *w, PyObject *scale, PyObject *min,
                           PyObject *L, int k, int transposed, LaneSearch search,
                           const void *params) {
    Args a;
    Lanes b;
    if (take(&a, x, w, scale, min, L, k, transposed) < 0) return NULL;
    if (lanes_alloc(&b, k) < 0) {
        release(&a);
        return NULL;
    }
    const float *xs = (const float *)a.x.buf;
    const float *ws = a.has_w ? (const float *)a.w.buf : NULL;
    int32_t *Ls = (int32_t *)a.L.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r0 = 0; r0 < a.n; r0 += LANES) {
        int m = a.n - r0 < LANES ? (int)(a.n - r0) : LANES;
        gather_lanes(&a, xs, r0, m, b.x);
        if (ws) gather_lanes(&a, ws, r0, m, b.w);
        search(&a, &b, r0, m, ws != NULL, params);
        scatter_lanes(&a, b.L, r0, m, Ls);
    }
    Py_END_ALLOW_THREADS
    lanes_free(&b);
    release(&a);
    Py_RETURN_NONE;
}

typedef struct {
    int nmax, nstep, use_mad;
    float rmin, rdelta;
} QkxParams;

static void qkx_search(const Args *a, Lanes *b, Py_ssize_t r0, int m, int has_w,
                       const void *params) {
    const QkxParams *p = params;
    float s_out[LANES], m_out[LANES];
    if (!has_w)
        for (int j = 0; j < a->k * LANES; ++j) b->w[j] = b->x[j] * b->x[j]; /* qkx3's default */
    qkx_lanes(a->k, p->nmax, b->x, b->w, b->L, s_out, m_out, p->rmin, p->rdelta, p->nstep,
              p->use_mad);
    float *sc = (float *)a->scale.buf, *mn = (float *)a->min.buf;
    for (int r = 0; r < m; ++r) {
        sc[r0 + r] = s_out[r];
        mn[r0 + r] = m_out[r];
    }
}

PyDoc_STRVAR(qkx_doc,
"qkx(x, w, scale, the_min, L, k, transposed, nmax, rmin, rdelta, nstep, use_mad)\n\n"
"ggml make_qkx2_quants (w given) / make_qkx3_quants (w None: x*x) on every sub-block of\n"
"x (float32), writing scale and -min (float32, one per sub-block) and the levels L\n"
"(int32, x's layout).");

static PyObject *py_qkx(PyObject *self, PyObject *args) {
    PyObject *x, *w, *scale, *min, *L;
    int k, transposed;
    QkxParams p;
    if (!PyArg_ParseTuple(args, "OOOOOiiiffip", &x, &w, &scale, &min, &L, &k, &transposed,
                          &p.nmax, &p.rmin, &p.rdelta, &p.nstep, &p.use_mad))
        return NULL;
    if (min == Py_None) {
        PyErr_SetString(PyExc_TypeError, "qkx needs a the_min buffer");
        return NULL;
    }
    return run_lanes(x, w, scale, min, L, k, transposed, qkx_search, &p);
}

typedef struct {
    int nmax, rmse_type;
} QxParams;

static void qx_search(const Args *a, Lanes *b, Py_ssize_t r0, int m, int has_w,
                      const void *params) {
    const QxParams *p = params;
    int rtype = p->rmse_type < 0 ? -p->rmse_type : p->rmse_type;
    float s_out[LANES];
    if (!has_w && rtype != 0)
        for (int j = 0; j < a->k * LANES; ++j) b->w[j] = qx_weight(b->x[j], rtype);
    qx_lanes(a->k, p->nmax, b->x, b->w, b->L, s_out, p->rmse_type);
    float *sc = (float *)a->scale.buf;
    for (int r = 0; r < m; ++r) sc[r0 + r] = s_out[r];
}

PyDoc_STRVAR(qx_doc,
"qx(x, w, scale, L, k, transposed, nmax, rmse_type)\n\n"
"ggml make_qx_quants on every sub-block of x (float32), weights w or None, writing the\n"
"scales (float32) and the levels + nmax (int32, x's layout).");

static PyObject *py_qx(PyObject *self, PyObject *args) {
    PyObject *x, *w, *scale, *L;
    int k, transposed;
    QxParams p;
    if (!PyArg_ParseTuple(args, "OOOOiiii", &x, &w, &scale, &L, &k, &transposed, &p.nmax,
                          &p.rmse_type))
        return NULL;
    return run_lanes(x, w, scale, Py_None, L, k, transposed, qx_search, &p);
}

static void iq4nl_search(const Args *a, Lanes *b, Py_ssize_t r0, int m, int has_w,
                         const void *params) {
    const int k = a->k;
    float d_out[LANES], sigma2[LANES] = {0};
    (void)params;
    if (has_w) { /* importance * sqrt(sigma2 + x^2), sigma2 = 2 * sum(x^2) / 32 */
        for (int i = 0; i < k; ++i)
            for (int r = 0; r < LANES; ++r) sigma2[r] += b->x[i * LANES + r] * b->x[i * LANES + r];
        for (int r = 0; r < LANES; ++r) sigma2[r] *= 2.f / k;
        for (int i = 0; i < k; ++i) {
            for (int r = 0; r < LANES; ++r) {
                float xv = b->x[i * LANES + r];
                b->w[i * LANES + r] *= sqrtf(sigma2[r] + xv * xv);
            }
        }
    } else {
        for (int j = 0; j < k * LANES; ++j) b->w[j] = b->x[j] * b->x[j];
    }
    iq4nl_lanes(k, b->x, b->w, b->L, d_out);
    float *sc = (float *)a->scale.buf;
    for (int r = 0; r < m; ++r) sc[r0 + r] = d_out[r];
}

PyDoc_STRVAR(iq4nl_doc,
"iq4nl(x, importance, d, L, transposed)\n\n"
"ggml quantize_row_iq4_nl_impl (ntry 7) on every 32-value block of x (float32), with the\n"
"importance (float32, x's shape) or None, writing the scale d (float32, one per block,\n"
"not yet rounded to fp16) and the codes 0..15 L (int32, x's layout).");

static PyObject *py_iq4nl(PyObject *self, PyObject *args) {
    PyObject *x, *w, *scale, *L;
    int transposed;
    if (!PyArg_ParseTuple(args, "OOOOi", &x, &w, &scale, &L, &transposed)) return NULL;
    return run_lanes(x, w, scale, Py_None, L, 32, transposed, iq4nl_search, NULL);
}

static PyMethodDef methods[] = {
    {"qkx", py_qkx, METH_VARARGS, qkx_doc},
    {"qx", py_qx, METH_VARARGS, qx_doc},
    {"iq4nl", py_iq4nl, METH_VARARGS, iq4nl_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kscales_native",
    "ggml's make_qkx2/qkx3_quants, make_qx_quants (see autobits.formats.kscales) and IQ4_NL's\n"
    "search (autobits.formats.iq4nl) in C.",
    -1, methods,
};

PyMODINIT_FUNC PyInit__kscales_native(void) { return PyModule_Create(&module); }
