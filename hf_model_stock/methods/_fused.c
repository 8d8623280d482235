/* Fused CPU kernels for the layer-wise Model Stock hot path on bf16 and float32 inputs.
 *
 * gram:   one pass over the inputs (base first, each row its own buffer). Each element is decoded to
 *         float32 (bf16 is the upper half of a float32: a 16-bit shift, exact) and the base
 *         subtracted; the pairwise dot products are accumulated in float32 lanes within a block
 *         and each block's sum is added into float64; the delta sum (d_1 + d_2 + ... in that
 *         order, as torch's sum over the model axis) is stored when asked. For 2 to 4 fine-tunes
 *         all of it happens in vector registers, 8 elements at a time (blocks of 1024 elements);
 *         for more, the N delta rows of a 2048-element block are formed in L1 first.
 * finish: out = float32(sum * scale) + w_0, two float32 roundings as in the torch kernel, then
 *         round-to-nearest-even to bf16 (NaN -> canonical quiet NaN), so both give the same bytes.
 *
 * Built with -ffp-contract=off: a fused multiply-add would round once and break that equality.
 * The GIL is released while the loops run; callers split a unit into one slice per thread.
 */
#if !defined(__GNUC__) && !defined(__clang__)
/* MSVC has no vector extensions: the build stops here, and as the extension is optional the install
 * goes on without it (the merge then runs on the torch kernels, with the same bytes). */
#error "the fused kernels need GCC or clang (vector extensions)"
#endif

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


/* Register-blocked path for 2 to FAST_MAX fine-tunes: for each group of VL elements, the N deltas are
 * formed in registers and every pairwise product and the delta sum are accumulated from them; no
 * intermediate rows. N, the input format and whether a Gram matrix is wanted are compile-time
 * constants in each instance (always_inline), so the loops unroll and the lanes vectorise. */
#define VL 8         /* lanes: one 256-bit vector of float32 */
#define FLUSH 1024   /* elements summed in float32 lanes before each float64 addition */
#define FAST_MAX 4
#define INLINE static inline __attribute__((always_inline))

typedef float vf __attribute__((vector_size(VL * sizeof(float))));
typedef uint32_t vu32 __attribute__((vector_size(VL * sizeof(uint32_t))));
typedef uint16_t vu16 __attribute__((vector_size(VL * sizeof(uint16_t))));

/* elements [t, t + VL) of a row as float32 lanes (through a pointer: vectors are not returned
 * by value, whose ABI depends on the target of each clone) */
INLINE void load_group(const void *row, const int bf16, Py_ssize_t t, vf *out)
{
    vf x;
    if (bf16) {
        vu16 h;
        memcpy(&h, (const uint16_t *)row + t, sizeof h);
        vu32 w = __builtin_convertvector(h, vu32) << 16;
        memcpy(&x, &w, sizeof x);
    } else {
        memcpy(&x, (const float *)row + t, sizeof x);
    }
    *out = x;
}

/* the first k < VL elements from t, the other lanes 0 in every row (their deltas add nothing) */
INLINE void load_tail(const void *row, const int bf16, Py_ssize_t t, int k, vf *out)
{
    uint32_t bits[VL] = {0};
    float vals[VL] = {0};
    vf x;
    if (bf16) {
        for (int l = 0; l < k; l++) bits[l] = (uint32_t)((const uint16_t *)row)[t + l] << 16;
        memcpy(&x, bits, sizeof x);
    } else {
        memcpy(vals, (const float *)row + t, (size_t)k * sizeof(float));
        memcpy(&x, vals, sizeof x);
    }
    *out = x;
}

INLINE void load(const void *row, const int bf16, Py_ssize_t t, int k, vf *out)
{
    if (k == VL)
        load_group(row, bf16, t, out);
    else
        load_tail(row, bf16, t, k, out);
}

INLINE void group(const int n, const int bf16, const int want_gram, const void *const *rows, Py_ssize_t t, int k,
                  vf *acc, float *sum)
{
    vf d[FAST_MAX], b;
    load(rows[0], bf16, t, k, &b);
    for (int i = 0; i < n; i++) {
        load(rows[i + 1], bf16, t, k, &d[i]);
        d[i] -= b;
    }
    if (want_gram) {
        int p = 0;
        for (int i = 0; i < n; i++)
            for (int j = 0; j <= i; j++, p++) acc[p] += d[i] * d[j];
    }
    if (sum != NULL) {
        vf s = d[0];
        for (int i = 1; i < n; i++) s += d[i];
        if (k == VL) {
            memcpy(sum + t, &s, sizeof s);
        } else {
            float lanes[VL];
            memcpy(lanes, &s, sizeof s);
            memcpy(sum + t, lanes, (size_t)k * sizeof(float));
        }
    }
}

INLINE void gram_fast(const int n, const int bf16, const int want_gram, const void *const *rows, Py_ssize_t start,
                      Py_ssize_t stop, double *gram, float *sum)
{
    for (Py_ssize_t s = start; s < stop; s += FLUSH) {
        Py_ssize_t e = stop - s < FLUSH ? stop : s + FLUSH, t = s;
        vf acc[FAST_MAX * (FAST_MAX + 1) / 2] = {0};
        for (; t + VL <= e; t += VL) group(n, bf16, want_gram, rows, t, VL, acc, sum);
        if (t < e) group(n, bf16, want_gram, rows, t, (int)(e - t), acc, sum);
        if (!want_gram) continue;
        int p = 0;
        for (int i = 0; i < n; i++)
            for (int j = 0; j <= i; j++, p++) {
                float a[VL];
                memcpy(a, &acc[p], sizeof a);
                for (int width = VL / 2; width > 0; width /= 2)
                    for (int l = 0; l < width; l++) a[l] += a[l + width];
                gram[i * n + j] += (double)a[0];
            }
    }
}

/* the instance for (n, bf16, gram wanted), n from 2 to FAST_MAX; the lower triangle of gram */
HOT static void gram_registers(const void *const *rows, int n, int bf16, Py_ssize_t start, Py_ssize_t stop,
                              double *gram, float *sum)
{
#define CASE(N)                                                                        \
    case N:                                                                            \
        if (bf16 && gram) gram_fast(N, 1, 1, rows, start, stop, gram, sum);            \
        else if (bf16) gram_fast(N, 1, 0, rows, start, stop, gram, sum);               \
        else if (gram) gram_fast(N, 0, 1, rows, start, stop, gram, sum);               \
        else gram_fast(N, 0, 0, rows, start, stop, gram, sum);                         \
        break;
    switch (n) {
        CASE(2)
        CASE(3)
        CASE(4)
    }
#undef CASE
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
    int registers = n >= 2 && n <= FAST_MAX;
    if (!registers && (scratch = malloc((size_t)(n + 1) * BLOCK * sizeof(float))) == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    if (registers)
        gram_registers(rows, n, bf16, start, stop, gram, sum);
    else
        gram_range(rows, n, bf16, start, stop, gram, sum, scratch);
    for (int i = 0; gram != NULL && i < n; i++) /* both kernels fill the lower triangle */
        for (int j = i + 1; j < n; j++) ((double *)gram)[i * n + j] = ((double *)gram)[j * n + i];
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
