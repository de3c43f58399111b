/*
 * The inner loop of a float stand-in's error feedback (autobits.standin._feedback_loop) in
 * C: one lazy batch of GPTQ's column loop, the columns moved off their grids one by one and
 * each move's error fed back into the batch's later columns.
 *
 * It is a port of the NumPy loop and gives the same bits: float32 throughout, each value
 * computed with the same operations in the same order (build with -ffp-contract=off, no
 * fast-math: pyproject.toml), rintf rounding half to even as np.rint does.  The NumPy
 * loop runs a dozen small array operations per column, each holding the GIL; here a
 * whole batch runs with the GIL released, so the stand-in's tensor threads really run
 * side by side.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* standin._off_grid for one value: w moved to at least min_dist grid steps from the grid
 * a + safe * k (a zero step, `zero`, leaves w as it is) */
static inline float off_grid(float w, float a, float safe, uint8_t zero, float min_dist,
                             float sign) {
    float f = (w - a) / safe;
    float k = rintf(f);
    float d = f - k;
    float s = d == 0 ? sign : (d > 0 ? 1.f : -1.f);
    float ad = fabsf(d);
    float m = ad >= min_dist || ad != ad ? ad : min_dist; /* np.maximum: NaN propagates */
    float moved = a + safe * (k + s * m);
    return zero ? w : moved;
}

typedef struct {
    Py_buffer b;
    int taken;
} Buf;

static int take(Buf *out, PyObject *obj, int writable, Py_ssize_t want, const char *name) {
    int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, &out->b, flags) < 0) return -1;
    out->taken = 1;
    if (out->b.len != want) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, expected %zd", name, out->b.len,
                     want);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(feedback_batch_doc,
"feedback_batch(w, a, safe, zero, signs, u, err, n, rows, min_dist)\n\n"
"One batch of n columns (as rows of length rows, C order) of the stand-in's feedback loop:\n"
"w (float32, in place) moved off the grids a + safe * k (zero: uint8, 1 where the step is\n"
"0; signs: float32 +-1) column by column, each error e_j = (w_j - t_j) / u[j, j] subtracted\n"
"as u[j, i] * e_j from the later columns i, and written to err (float32, n x rows);\n"
"u is the batch's (n, n) float32 block of the inverse factor.");

static PyObject *py_feedback_batch(PyObject *self, PyObject *args) {
    PyObject *objs[7];
    Py_ssize_t n, rows;
    float min_dist;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOOOOnnf", &objs[0], &objs[1], &objs[2], &objs[3],
                          &objs[4], &objs[5], &objs[6], &n, &rows, &min_dist))
        return NULL;
    if (n < 0 || rows < 0) {
        PyErr_Format(PyExc_ValueError, "n and rows must be >= 0, got n=%zd, rows=%zd", n, rows);
        return NULL;
    }
    const char *names[7] = {"w", "a", "safe", "zero", "signs", "u", "err"};
    const int writable[7] = {1, 0, 0, 0, 0, 0, 1};
    const Py_ssize_t want[7] = {4 * n * rows, 4 * n * rows, 4 * n * rows, n * rows,
                                4 * n * rows, 4 * n * n,    4 * n * rows};
    Buf bufs[7];
    memset(bufs, 0, sizeof(bufs));
    PyObject *result = NULL;
    for (int i = 0; i < 7; ++i)
        if (take(&bufs[i], objs[i], writable[i], want[i], names[i]) < 0) goto done;
    float *w = bufs[0].b.buf, *err = bufs[6].b.buf;
    const float *a = bufs[1].b.buf, *safe = bufs[2].b.buf, *signs = bufs[4].b.buf;
    const float *u = bufs[5].b.buf;
    const uint8_t *zero = bufs[3].b.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t j = 0; j < n; ++j) {
        float *col = w + j * rows, *e = err + j * rows;
        const Py_ssize_t o = j * rows;
        const float ujj = u[j * n + j];
        for (Py_ssize_t r = 0; r < rows; ++r) {
            float t = off_grid(col[r], a[o + r], safe[o + r], zero[o + r], min_dist,
                               signs[o + r]);
            e[r] = (col[r] - t) / ujj;
            col[r] = t;
        }
        for (Py_ssize_t i = j + 1; i < n; ++i) {
            const float uji = u[j * n + i];
            float *rest = w + i * rows;
            for (Py_ssize_t r = 0; r < rows; ++r) rest[r] -= uji * e[r];
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    for (int i = 0; i < 7; ++i)
        if (bufs[i].taken) PyBuffer_Release(&bufs[i].b);
    return result;
}

static PyMethodDef methods[] = {
    {"feedback_batch", py_feedback_batch, METH_VARARGS, feedback_batch_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_standin_native",
    "The float stand-in's error-feedback batch in C (see autobits.standin).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__standin_native(void) { return PyModule_Create(&module); }
