/* Fused CPU kernels for the layer-wise Model Stock hot path on bf16 and float32 inputs.
 *
 * gram:   one pass per block of 2048 elements. Each input row (base first, each its own buffer) is
 *         decoded to float32 (bf16 is the upper half of a float32: a 16-bit shift, exact) and the base
 *         subtracted, into N delta rows that stay in L1; the pairwise dot products are accumulated in
 *         float32 lanes within the block and each block's sum is added into float64; the delta sum
 *         (d_1 + d_2 + ... in that order, as torch's sum over the model axis) is stored when asked.
 * finish: out = float32(sum * scale) + w_0, two float32 roundings as in the torch kernel, then
 *         round-to-nearest-even to bf16 (NaN -> canonical quiet NaN), so both give the same bytes.
 *
 * Built with -ffp-contract=off: a fused multiply-add would round once and break that equality.
 * The GIL is released while the loops run; callers split a unit into one slice per thread.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 2048
#define LANES 16

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define HOT __attribute__((target_clones("avx2", "default")))
#else
#define HOT
#endif

static inline float bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0x7FC0 : (uint16_t)rounded;
}

/* dst[t] = row[s + t] - base[t] (base == NULL: the decoded row itself) */
static inline void decode_minus(const void *row, int bf16, Py_ssize_t s, Py_ssize_t k, const float *base,
                                float *dst)
{
    if (bf16) {
        const uint16_t *src = (const uint16_t *)row + s;
        if (base == NULL)
            for (Py_ssize_t t = 0; t < k; t++) dst[t] = bf16_to_f32(src[t]);
        else
            for (Py_ssize_t t = 0; t < k; t++) dst[t] = bf16_to_f32(src[t]) - base[t];
    } else {
        const float *src = (const float *)row + s;
        if (base == NULL)
            memcpy(dst, src, (size_t)k * sizeof(float));
        else
            for (Py_ssize_t t = 0; t < k; t++) dst[t] = src[t] - base[t];
    }
}

/* float32 dot product of one block in LANES independent lanes, reduced in a fixed order */
static inline float block_dot(const float *a, const float *b, Py_ssize_t k)
{
    float acc[LANES] = {0};
    Py_ssize_t t = 0;
    for (; t + LANES <= k; t += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[t + l] * b[t + l];
    for (int l = 0; t < k; t++, l++) acc[l] += a[t] * b[t];
    for (int width = LANES / 2; width > 0; width /= 2)
        for (int l = 0; l < width; l++) acc[l] += acc[l + width];
    return acc[0];
}

HOT static void gram_range(const void *const *rows, int n, int bf16, Py_ssize_t start, Py_ssize_t stop,
                           double *gram, float *sum, float *scratch)
{
    float *base = scratch, *d = scratch + BLOCK;
    for (Py_ssize_t s = start; s < stop; s += BLOCK) {
        Py_ssize_t k = stop - s < BLOCK ? stop - s : BLOCK;
        decode_minus(rows[0], bf16, s, k, NULL, base);
        for (int i = 0; i < n; i++) decode_minus(rows[i + 1], bf16, s, k, base, d + (size_t)i * BLOCK);
        for (int i = 0; gram != NULL && i < n; i++)
            for (int j = 0; j <= i; j++)
                gram[i * n + j] += (double)block_dot(d + (size_t)i * BLOCK, d + (size_t)j * BLOCK, k);
        if (sum != NULL) {
            float *out = sum + s;
            memcpy(out, d, (size_t)k * sizeof(float));
            for (int i = 1; i < n; i++) {
                const float *di = d + (size_t)i * BLOCK;
                for (Py_ssize_t t = 0; t < k; t++) out[t] += di[t];
            }
        }
    }
    for (int i = 0; gram != NULL && i < n; i++)
        for (int j = i + 1; j < n; j++) gram[i * n + j] = gram[j * n + i];
}

HOT static void finish_range(const void *base, const float *sum, float scale, void *out, int bf16, Py_ssize_t start,
                             Py_ssize_t stop)
{
    if (bf16) {
        const uint16_t *b = base;
        uint16_t *o = out;
        for (Py_ssize_t t = start; t < stop; t++) {
            float scaled = sum[t] * scale;
            o[t] = f32_to_bf16(scaled + bf16_to_f32(b[t]));
        }
    } else {
        const float *b = base;
        float *o = out;
        for (Py_ssize_t t = start; t < stop; t++) {
            float scaled = sum[t] * scale;
            o[t] = scaled + b[t];
        }
    }
}

/* Buffers of the Python arguments, released together. */
typedef struct {
    Py_buffer views[64];
    int count;
} Buffers;

static int take(Buffers *held, PyObject *obj, int writable, Py_ssize_t need, const char *what, void **data)
{
    if (held->count == (int)(sizeof held->views / sizeof held->views[0])) {
        PyErr_SetString(PyExc_ValueError, "too many models for the fused kernel (at most 63 fine-tunes)");
        return -1;
    }
    Py_buffer *view = &held->views[held->count];
    if (PyObject_GetBuffer(obj, view, writable ? (PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) : PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    held->count++;
    if (view->len < need) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, the kernel needs %zd", what, view->len, need);
        return -1;
    }
    *data = view->buf;
    return 0;
}

static void release(Buffers *held)
{
    for (int i = 0; i < held->count; i++) PyBuffer_Release(&held->views[i]);
}

static int check_range(Py_ssize_t start, Py_ssize_t stop)
{
    if (start < 0 || stop < start) {
        PyErr_Format(PyExc_ValueError, "bad element range [%zd, %zd)", start, stop);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(gram_doc,
             "gram(rows, bf16, start, stop, gram, delta_sum)\n--\n\n"
             "Add the Gram matrix of the deltas over elements [start, stop) into gram (N*N float64)\n"
             "unless it is None; rows: the base and N fine-tunes, bf16 bits or float32, one buffer\n"
             "each; when delta_sum (float32) is not None, store sum_i d_i into its elements [start, stop).");

static PyObject *py_gram(PyObject *self, PyObject *args)
{
    PyObject *rows_obj, *gram_obj, *sum_obj;
    int bf16;
    Py_ssize_t start, stop;
    if (!PyArg_ParseTuple(args, "OpnnOO", &rows_obj, &bf16, &start, &stop, &gram_obj, &sum_obj)) return NULL;
    if (check_range(start, stop) < 0) return NULL;
    PyObject *seq = PySequence_Fast(rows_obj, "rows must be a sequence of buffers");
    if (seq == NULL) return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    int n = (int)count - 1;
    Buffers held = {.count = 0};
    const void *rows[64];
    void *gram = NULL, *sum = NULL;
    Py_ssize_t width = bf16 ? 2 : 4;
    PyObject *result = NULL;
    float *scratch = NULL;
    if (count < 2 || count > 62) {
        PyErr_SetString(PyExc_ValueError, "rows must hold the base and 1 to 61 fine-tunes");
        goto done;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        void *data;
        if (take(&held, PySequence_Fast_GET_ITEM(seq, i), 0, stop * width, "an input row", &data) < 0) goto done;
        rows[i] = data;
    }
    if (gram_obj != Py_None &&
        take(&held, gram_obj, 1, (Py_ssize_t)n * n * (Py_ssize_t)sizeof(double), "gram", &gram) < 0)
        goto done;
    if (sum_obj != Py_None && take(&held, sum_obj, 1, stop * (Py_ssize_t)sizeof(float), "delta_sum", &sum) < 0)
        goto done;
    scratch = malloc((size_t)(n + 1) * BLOCK * sizeof(float));
    if (scratch == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    gram_range(rows, n, bf16, start, stop, gram, sum, scratch);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    free(scratch);
    release(&held);
    Py_DECREF(seq);
    return result;
}

PyDoc_STRVAR(finish_doc,
             "finish(base, delta_sum, scale, out, bf16, start, stop)\n--\n\n"
             "out = float32(delta_sum * scale) + base over elements [start, stop); base and out are\n"
             "bf16 bits or float32, delta_sum float32.");

static PyObject *py_finish(PyObject *self, PyObject *args)
{
    PyObject *base_obj, *sum_obj, *out_obj;
    float scale;
    int bf16;
    Py_ssize_t start, stop;
    if (!PyArg_ParseTuple(args, "OOfOpnn", &base_obj, &sum_obj, &scale, &out_obj, &bf16, &start, &stop))
        return NULL;
    if (check_range(start, stop) < 0) return NULL;
    Buffers held = {.count = 0};
    void *base, *sum, *out;
    Py_ssize_t width = bf16 ? 2 : 4;
    if (take(&held, base_obj, 0, stop * width, "base", &base) < 0 ||
        take(&held, sum_obj, 0, stop * (Py_ssize_t)sizeof(float), "delta_sum", &sum) < 0 ||
        take(&held, out_obj, 1, stop * width, "out", &out) < 0) {
        release(&held);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    finish_range(base, sum, scale, out, bf16, start, stop);
    Py_END_ALLOW_THREADS
    release(&held);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"gram", py_gram, METH_VARARGS, gram_doc},
    {"finish", py_finish, METH_VARARGS, finish_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fused", "Fused CPU kernels of the layer-wise Model Stock merge.", -1, methods,
};

PyMODINIT_FUNC PyInit__fused(void)
{
    return PyModule_Create(&module);
}
