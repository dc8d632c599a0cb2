/* The packed key table (sidecar/core/packed.py) in C: the control plane's first snapshot build,
 * its columns moved and sorted (sidecar/replication/packing.py is the caller and keeps the
 * pure-Python reference), and the check of a received table's id order (PackedKeys.check).
 *
 * columns(rows) takes the store's packing rows (digest, id, expiry, profile text) in any order,
 * one at a time (a row is dropped as soon as it is copied), and returns the packed table's
 * columns: the digests sorted, the ids NUL-padded to one width, the expiries and profile
 * numbers in digest order, the rows in ascending id order, and the distinct profile texts
 * numbered in order of first read. Both sorts are radix sorts over 8 bytes at a time (the
 * digest, then each id after the prefix all ids share), refined only where 8 bytes tie.
 *
 * It returns None for any row it does not pack exactly as the Python path would (not a 4-tuple,
 * a digest that is not 32 bytes, an id that is not 1 to 255 printable ASCII characters, an
 * expiry outside int64, a profile that is not a str, a digest or an id that appears twice):
 * the caller then reads the rows again and packs them in Python, which raises the PackError
 * those rows deserve. tests/test_replication_packing.py holds both paths to the same bytes.
 *
 * ids_ascending(ids, width, id_order) is PackedKeys.check's loop over the id order: each id
 * (``width`` bytes, NUL-padded) not empty, no NUL before its padding, each one greater than the
 * one before; None when the arguments are not what a table holds (the caller then runs its
 * loop). tests/test_replication_packing.py compares the two on valid and corrupted orders. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define DIGEST 32
#define MAX_WIDTH 255

typedef struct {
    uint64_t key;
    uint32_t row;
} Item;

typedef struct {
    const unsigned char *base; /* row r's bytes start at base + r * stride */
    Py_ssize_t stride, width;
} Strings;

/* Bytes [at, at + 8) of string ``row`` as a big-endian integer (so integers sort as bytes). */
static inline uint64_t key_at(const Strings *s, uint32_t row, Py_ssize_t at) {
    const unsigned char *p = s->base + (Py_ssize_t)row * s->stride + at;
    uint64_t k = 0;
    for (Py_ssize_t i = 0; i < 8; i++) k = (k << 8) | (at + i < s->width ? p[i] : 0);
    return k;
}

static inline int row_cmp(const Strings *s, uint32_t a, uint32_t b, Py_ssize_t at) {
    return memcmp(s->base + (Py_ssize_t)a * s->stride + at,
                  s->base + (Py_ssize_t)b * s->stride + at, (size_t)(s->width - at));
}

/* LSD radix sort of items[0..n) by key, a byte at a time (stable), skipping the bytes on which
 * all keys agree; ``tmp`` has room for n items. */
static void radix(Item *items, Item *tmp, Py_ssize_t n) {
    size_t count[8][256] = {{0}};
    for (Py_ssize_t i = 0; i < n; i++)
        for (int b = 0; b < 8; b++) count[b][(items[i].key >> (8 * b)) & 255]++;
    Item *src = items, *dst = tmp;
    for (int b = 0; b < 8; b++) {
        size_t sum = 0, *c = count[b];
        if (c[(src[0].key >> (8 * b)) & 255] == (size_t)n) continue; /* one value: no move */
        for (int v = 0; v < 256; v++) {
            size_t here = c[v];
            c[v] = sum;
            sum += here;
        }
        for (Py_ssize_t i = 0; i < n; i++) dst[c[(src[i].key >> (8 * b)) & 255]++] = src[i];
        Item *t = src;
        src = dst;
        dst = t;
    }
    if (src != items) memcpy(items, src, (size_t)n * sizeof(Item));
}

/* Sort items[0..n) (rows whose bytes before ``at`` are equal) by their bytes from ``at`` on.
 * Returns 0, or -1 when two rows are equal throughout. */
static int sort_rows(const Strings *s, Item *items, Item *tmp, Py_ssize_t n, Py_ssize_t at) {
    if (n < 2) return 0;
    if (n < 32) { /* insertion sort on the whole remaining bytes */
        for (Py_ssize_t i = 1; i < n; i++) {
            Item it = items[i];
            Py_ssize_t j = i;
            while (j > 0 && row_cmp(s, items[j - 1].row, it.row, at) > 0) {
                items[j] = items[j - 1];
                j--;
            }
            items[j] = it;
        }
        for (Py_ssize_t i = 1; i < n; i++)
            if (row_cmp(s, items[i - 1].row, items[i].row, at) == 0) return -1;
        return 0;
    }
    for (Py_ssize_t i = 0; i < n; i++) items[i].key = key_at(s, items[i].row, at);
    radix(items, tmp, n);
    for (Py_ssize_t lo = 0, hi; lo < n; lo = hi) { /* runs that tie on these 8 bytes */
        for (hi = lo + 1; hi < n && items[hi].key == items[lo].key; hi++) {}
        if (hi - lo > 1) {
            if (at + 8 >= s->width) return -1;
            if (sort_rows(s, items + lo, tmp, hi - lo, at + 8) < 0) return -1;
        }
    }
    return 0;
}

/* The rows of ``s`` in ascending byte order into ``order``; -1 when two are equal. */
static int sorted_rows(const Strings *s, Py_ssize_t n, uint32_t *order, Py_ssize_t skip) {
    Item *items = PyMem_RawMalloc((size_t)(n ? n : 1) * sizeof(Item) * 2);
    if (!items) return -2;
    for (Py_ssize_t i = 0; i < n; i++) items[i].row = (uint32_t)i;
    int rc = sort_rows(s, items, items + n, n, skip);
    for (Py_ssize_t i = 0; i < n; i++) order[i] = items[i].row;
    PyMem_RawFree(items);
    return rc;
}

/* How many leading bytes every row of ``s`` shares with the first. */
static Py_ssize_t shared_prefix(const Strings *s, Py_ssize_t n) {
    Py_ssize_t lcp = n ? s->width : 0;
    for (Py_ssize_t r = 1; r < n && lcp > 0; r++) {
        const unsigned char *a = s->base, *b = s->base + r * s->stride;
        Py_ssize_t i = 0;
        while (i < lcp && a[i] == b[i]) i++;
        lcp = i;
    }
    return lcp;
}

typedef struct {
    char *p;
    Py_ssize_t n, cap;
} Buf;

static int buf_put(Buf *b, const void *s, Py_ssize_t n) {
    if (b->n + n > b->cap) {
        Py_ssize_t cap = b->cap ? b->cap : 1 << 16;
        while (cap < b->n + n) cap *= 2;
        char *p = PyMem_Realloc(b->p, (size_t)cap);
        if (!p) {
            PyErr_NoMemory();
            return -1;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, (size_t)n);
    b->n += n;
    return 0;
}

/* The rows read, in read order. */
typedef struct {
    Buf digests, ids, ends, expires, profiles; /* ends: each id's end in ids (Py_ssize_t) */
    PyObject *texts;                            /* profile text -> its number */
    PyObject *names;                            /* the texts in order of number */
    Py_ssize_t rows, width;
} Read;

/* 1: taken; 0: a row the Python path must pack; -1: an error raised. */
static int take(Read *r, PyObject *row) {
    if (!PyTuple_CheckExact(row) || PyTuple_GET_SIZE(row) != 4) return 0;
    PyObject *digest = PyTuple_GET_ITEM(row, 0), *id = PyTuple_GET_ITEM(row, 1);
    PyObject *expires = PyTuple_GET_ITEM(row, 2), *text = PyTuple_GET_ITEM(row, 3);
    if (!PyBytes_CheckExact(digest) || PyBytes_GET_SIZE(digest) != DIGEST) return 0;
    if (!PyUnicode_CheckExact(id) || !PyUnicode_IS_ASCII(id)) return 0;
    Py_ssize_t len = PyUnicode_GET_LENGTH(id);
    const char *chars = (const char *)PyUnicode_1BYTE_DATA(id);
    if (len < 1 || len > MAX_WIDTH) return 0;
    for (Py_ssize_t i = 0; i < len; i++)
        if (chars[i] < 0x20 || chars[i] > 0x7e) return 0; /* str.isprintable, for ASCII */
    if (!PyLong_CheckExact(expires) || !PyUnicode_CheckExact(text)) return 0;
    int overflow = 0;
    long long when = PyLong_AsLongLongAndOverflow(expires, &overflow);
    if (overflow) return 0;
    if (when == -1 && PyErr_Occurred()) return -1;
    PyObject *number = PyDict_GetItemWithError(r->texts, text);
    if (!number) {
        if (PyErr_Occurred()) return -1;
        number = PyLong_FromSsize_t(PyList_GET_SIZE(r->names));
        if (!number) return -1;
        int bad = PyDict_SetItem(r->texts, text, number) < 0 || PyList_Append(r->names, text) < 0;
        Py_DECREF(number); /* the dict holds it */
        if (bad) return -1;
    }
    if (r->rows >= UINT32_MAX) return 0;
    uint32_t profile = (uint32_t)PyLong_AsUnsignedLong(number);
    int64_t expiry = (int64_t)when;
    Py_ssize_t end = r->ids.n + len;
    if (buf_put(&r->digests, PyBytes_AS_STRING(digest), DIGEST) < 0 ||
        buf_put(&r->ids, chars, len) < 0 || buf_put(&r->ends, &end, sizeof end) < 0 ||
        buf_put(&r->expires, &expiry, sizeof expiry) < 0 ||
        buf_put(&r->profiles, &profile, sizeof profile) < 0)
        return -1;
    if (len > r->width) r->width = len;
    r->rows++;
    return 1;
}

static void read_free(Read *r) {
    PyMem_Free(r->digests.p);
    PyMem_Free(r->ids.p);
    PyMem_Free(r->ends.p);
    PyMem_Free(r->expires.p);
    PyMem_Free(r->profiles.p);
    Py_XDECREF(r->texts);
    Py_XDECREF(r->names);
}

/* The output columns (filled without the GIL). */
typedef struct {
    unsigned char *digests, *ids;
    int64_t *expires;
    uint32_t *profiles, *id_order, *by_digest;
} Out;

/* 0, -1 (a digest or id twice), -2 (out of memory). */
static int fill(const Read *r, Out *o) {
    Py_ssize_t n = r->rows, w = r->width;
    const Py_ssize_t *ends = (const Py_ssize_t *)r->ends.p;
    const int64_t *expires = (const int64_t *)r->expires.p;
    const uint32_t *profiles = (const uint32_t *)r->profiles.p;
    Strings digests = {(const unsigned char *)r->digests.p, DIGEST, DIGEST};
    int rc = sorted_rows(&digests, n, o->by_digest, 0);
    if (rc < 0) return rc;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t from = o->by_digest[i];
        Py_ssize_t start = from ? ends[from - 1] : 0, len = ends[from] - start;
        memcpy(o->digests + i * DIGEST, r->digests.p + (Py_ssize_t)from * DIGEST, DIGEST);
        memcpy(o->ids + i * w, r->ids.p + start, (size_t)len);
        memset(o->ids + i * w + len, 0, (size_t)(w - len));
        o->expires[i] = expires[from];
        o->profiles[i] = profiles[from];
    }
    Strings ids = {o->ids, w, w};
    return sorted_rows(&ids, n, o->id_order, shared_prefix(&ids, n));
}

static PyObject *py_columns(PyObject *self, PyObject *rows) {
    Read r = {0};
    PyObject *digests = NULL, *ids = NULL, *expires = NULL, *profiles = NULL, *order = NULL;
    PyObject *it = PyObject_GetIter(rows), *result = NULL;
    if (!it) return NULL;
    r.texts = PyDict_New();
    r.names = PyList_New(0);
    if (!r.texts || !r.names) goto done;
    int taken = 1;
    PyObject *row;
    while ((row = PyIter_Next(it))) {
        taken = take(&r, row);
        Py_DECREF(row);
        if (taken <= 0) break;
    }
    if (PyErr_Occurred() || taken < 0) goto done;
    if (taken == 0) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    Py_ssize_t n = r.rows, w = r.width ? r.width : 1;
    r.width = w;
    digests = PyBytes_FromStringAndSize(NULL, n * DIGEST);
    ids = PyBytes_FromStringAndSize(NULL, n * w);
    expires = PyBytes_FromStringAndSize(NULL, n * 8);
    profiles = PyBytes_FromStringAndSize(NULL, n * 4);
    order = PyBytes_FromStringAndSize(NULL, n * 4);
    uint32_t *by_digest = PyMem_RawMalloc((size_t)(n ? n : 1) * sizeof(uint32_t));
    if (!digests || !ids || !expires || !profiles || !order || !by_digest) {
        PyMem_RawFree(by_digest);
        if (!PyErr_Occurred()) PyErr_NoMemory();
        goto done;
    }
    Out o = {(unsigned char *)PyBytes_AS_STRING(digests),
             (unsigned char *)PyBytes_AS_STRING(ids),
             (int64_t *)PyBytes_AS_STRING(expires),
             (uint32_t *)PyBytes_AS_STRING(profiles),
             (uint32_t *)PyBytes_AS_STRING(order),
             by_digest};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fill(&r, &o);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(by_digest);
    if (rc == -2) {
        PyErr_NoMemory();
        goto done;
    }
    if (rc == -1) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    result = Py_BuildValue("(NNnNNNO)", digests, ids, w, expires, profiles, order, r.names);
    digests = ids = expires = profiles = order = NULL; /* stolen by "N" */
done:
    Py_DECREF(it);
    Py_XDECREF(digests);
    Py_XDECREF(ids);
    Py_XDECREF(expires);
    Py_XDECREF(profiles);
    Py_XDECREF(order);
    read_free(&r);
    return result;
}

static PyObject *py_ids_ascending(PyObject *self, PyObject *args) {
    Py_buffer ids, order;
    Py_ssize_t w;
    if (!PyArg_ParseTuple(args, "y*ny*", &ids, &w, &order)) return NULL;
    PyObject *result = Py_None;
    Py_ssize_t n = order.len / 4;
    if (w >= 1 && w <= MAX_WIDTH && order.len % 4 == 0 && order.itemsize == 4 &&
        ids.len == n * w) {
        const unsigned char *block = ids.buf;
        const uint32_t *rows = order.buf;
        const unsigned char *previous = NULL;
        result = Py_True;
        for (Py_ssize_t i = 0; i < n && result == Py_True; i++) {
            if (rows[i] >= (uint32_t)n) {
                result = Py_None; /* not a permutation: checked before, by the caller */
                break;
            }
            const unsigned char *id = block + (Py_ssize_t)rows[i] * w;
            Py_ssize_t len = w;
            while (len > 0 && id[len - 1] == 0) len--;
            if (len == 0 || memchr(id, 0, (size_t)len) != NULL ||
                (previous && memcmp(id, previous, (size_t)w) <= 0))
                result = Py_False;
            previous = id;
        }
    }
    PyBuffer_Release(&ids);
    PyBuffer_Release(&order);
    return Py_NewRef(result);
}

/* bucket_starts(digests, bits): for each of the 2**bits buckets (a digest's top ``bits`` bits),
 * the first row whose digest is in it or a later one, then the row count: KeyTable's index,
 * in one pass over the sorted digests instead of a bisection per bucket (0.4 s at 1M keys). */
static PyObject *py_bucket_starts(PyObject *self, PyObject *args) {
    Py_buffer digests;
    int bits;
    if (!PyArg_ParseTuple(args, "y*i", &digests, &bits)) return NULL;
    if (bits < 0 || bits > 24 || digests.len % DIGEST != 0 || digests.len / DIGEST > UINT32_MAX) {
        PyBuffer_Release(&digests);
        Py_RETURN_NONE;
    }
    Py_ssize_t n = digests.len / DIGEST, buckets = (Py_ssize_t)1 << bits;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (buckets + 1) * 4);
    if (!out) {
        PyBuffer_Release(&digests);
        return NULL;
    }
    uint32_t *starts = (uint32_t *)PyBytes_AS_STRING(out);
    const unsigned char *d = digests.buf;
    Py_ssize_t b = 0;
    for (Py_ssize_t row = 0; row < n; row++) {
        const unsigned char *p = d + row * DIGEST;
        Py_ssize_t bucket = (Py_ssize_t)(((uint32_t)p[0] << 16 | (uint32_t)p[1] << 8 | p[2]) >>
                                         (24 - bits));
        while (b <= bucket) starts[b++] = (uint32_t)row; /* buckets up to this row's start here */
    }
    while (b <= buckets) starts[b++] = (uint32_t)n;
    PyBuffer_Release(&digests);
    return out;
}

static PyMethodDef methods[] = {
    {"bucket_starts", py_bucket_starts, METH_VARARGS,
     "bucket_starts(digests, bits) -> bytes | None: KeyTable's bucket index (uint32s)."},
    {"ids_ascending", py_ids_ascending, METH_VARARGS,
     "ids_ascending(ids, width, id_order) -> bool | None: PackedKeys.check's id-order loop."},
    {"columns", py_columns, METH_O,
     "columns(rows) -> (digests, ids, width, expires, profiles, id_order, texts) | None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_packing",
                                    "The packed key table's columns built, and its id order checked, in C.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__packing(void) { return PyModule_Create(&module); }
