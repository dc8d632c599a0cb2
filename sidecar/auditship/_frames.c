/* The audit spool's framing in C (sidecar/auditship/spool.py ``frames``; issue #19).
 *
 * frames(payloads) -> bytes: every payload as the spool stores it, ``<u32 length><u32 crc32>
 * <payload>`` (little endian, zlib's CRC-32, linked from zlib), concatenated in order: the bytes of
 * ``b"".join(frame(p) for p in payloads)``. The audit writer frames every 10 ms tick's records
 * with it in one call instead of a struct.pack, a zlib.crc32 and a concatenation per record in
 * Python, all holding the GIL. A large backlog (at least RELEASE_BYTES) is checksummed and
 * copied with the GIL released: the payloads are immutable bytes whose references this call
 * holds, and the result is not visible to any other thread until it returns. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <zlib.h>

#define RELEASE_BYTES (64 * 1024)

/* zlib's own CRC-32, the one Python's zlib.crc32 calls: the same checksum by construction. */
static uint32_t crc32_of(const unsigned char *p, Py_ssize_t n) {
    uLong c = crc32(0L, Z_NULL, 0);
    while (n > 0) {
        uInt chunk = n > (Py_ssize_t)0x40000000 ? 0x40000000u : (uInt)n;
        c = crc32(c, p, chunk);
        p += chunk;
        n -= chunk;
    }
    return (uint32_t)c;
}

static void put_u32(unsigned char *o, uint32_t v) {
    o[0] = (unsigned char)v;
    o[1] = (unsigned char)(v >> 8);
    o[2] = (unsigned char)(v >> 16);
    o[3] = (unsigned char)(v >> 24);
}

static void frame_into(const unsigned char *p, Py_ssize_t len, unsigned char *o);

/* Each payload's encoded size (-1: too long for its encoding) and its encoding at ``o``. */
typedef Py_ssize_t (*size_fn)(Py_ssize_t len);
typedef void (*put_fn)(const unsigned char *p, Py_ssize_t len, unsigned char *o);

static void put_all(PyObject *const *items, Py_ssize_t n, unsigned char *o, size_fn size,
                    put_fn put) {
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t len = PyBytes_GET_SIZE(items[i]);
        put((const unsigned char *)PyBytes_AS_STRING(items[i]), len, o);
        o += size(len);
    }
}

/* Every payload of ``arg`` (a sequence of bytes) encoded by ``put``, concatenated in order.
 * A tuple of the payloads holds our own references, whatever happens to the caller's list;
 * from RELEASE_BYTES on the encoding runs without the GIL (the payloads are immutable bytes
 * and the result is not visible to any other thread until this returns). */
static PyObject *encode_each(PyObject *arg, const char *name, size_fn size, put_fn put) {
    PyObject *items = PySequence_Tuple(arg);
    if (!items) return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(items), total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *p = PyTuple_GET_ITEM(items, i);
        if (!PyBytes_Check(p)) {
            PyErr_Format(PyExc_TypeError, "%s: payload %zd is %.100s, not bytes", name, i,
                         Py_TYPE(p)->tp_name);
            Py_DECREF(items);
            return NULL;
        }
        Py_ssize_t one = size(PyBytes_GET_SIZE(p));
        if (one < 0 || total > PY_SSIZE_T_MAX - one) {
            PyErr_Format(PyExc_OverflowError, "%s: a payload or the whole is too long", name);
            Py_DECREF(items);
            return NULL;
        }
        total += one;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, total);
    if (!out) {
        Py_DECREF(items);
        return NULL;
    }
    unsigned char *o = (unsigned char *)PyBytes_AS_STRING(out);
    PyObject *const *refs = &PyTuple_GET_ITEM(items, 0);
    if (total >= RELEASE_BYTES) {
        Py_BEGIN_ALLOW_THREADS put_all(refs, n, o, size, put);
        Py_END_ALLOW_THREADS
    } else {
        put_all(refs, n, o, size, put);
    }
    Py_DECREF(items);
    return out;
}

static Py_ssize_t frame_size(Py_ssize_t len) {
    return (uint64_t)len > UINT32_MAX || len > PY_SSIZE_T_MAX - 8 ? -1 : 8 + len;
}

static PyObject *py_frames(PyObject *mod, PyObject *arg) {
    return encode_each(arg, "frames", frame_size, frame_into);
}

/* One frame's checks at ``offset`` of ``d`` (``n`` bytes): the offset after it, or -1 where
 * parse_frames stops (a partial frame, one longer than ``max_frame``, a CRC that does not
 * match). No Python object: runs without the GIL. */
static Py_ssize_t next_frame(const unsigned char *d, Py_ssize_t n, Py_ssize_t offset,
                             Py_ssize_t max_frame) {
    if (n - offset < 8) return -1;
    const unsigned char *h = d + offset;
    uint32_t length = (uint32_t)h[0] | (uint32_t)h[1] << 8 | (uint32_t)h[2] << 16 |
                      (uint32_t)h[3] << 24;
    uint32_t crc = (uint32_t)h[4] | (uint32_t)h[5] << 8 | (uint32_t)h[6] << 16 |
                   (uint32_t)h[7] << 24;
    if ((Py_ssize_t)length > max_frame || (Py_ssize_t)length > n - offset - 8) return -1;
    if (crc32_of(h + 8, (Py_ssize_t)length) != crc) return -1;
    return offset + 8 + (Py_ssize_t)length;
}

/* parse_frames(data, limit, max_frame) -> (list of payloads, offset): spool.py ``parse_frames``
 * (the reference), up to ``limit`` whole frames at the start of ``data`` (bytes) and the
 * offset after the last; stops at a partial or corrupt frame. The shipper's batches (hundreds
 * of frames) are checked first without the GIL (``data`` is immutable and this call holds a
 * reference); the payloads' bytes objects are then made with it. */
static PyObject *py_parse_frames(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t limit, max_frame;
    if (nargs != 3 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "parse_frames(data: bytes, limit: int, max_frame: int)");
        return NULL;
    }
    limit = PyLong_AsSsize_t(args[1]);
    if (limit == -1 && PyErr_Occurred()) return NULL;
    max_frame = PyLong_AsSsize_t(args[2]);
    if (max_frame == -1 && PyErr_Occurred()) return NULL;
    const unsigned char *d = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    /* At most one frame per 8 bytes: the ends array never needs more. */
    Py_ssize_t cap = n / 8 < limit ? n / 8 : limit;
    if (cap < 0) cap = 0;
    Py_ssize_t *ends = PyMem_Malloc((size_t)(cap + 1) * sizeof(Py_ssize_t));
    if (!ends) return PyErr_NoMemory();
    Py_ssize_t count = 0, offset = 0;
    if (n >= RELEASE_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        while (count < cap) {
            Py_ssize_t end = next_frame(d, n, offset, max_frame);
            if (end < 0) break;
            ends[count++] = offset = end;
        }
        Py_END_ALLOW_THREADS
    } else {
        while (count < cap) {
            Py_ssize_t end = next_frame(d, n, offset, max_frame);
            if (end < 0) break;
            ends[count++] = offset = end;
        }
    }
    PyObject *list = PyList_New(count);
    if (!list) {
        PyMem_Free(ends);
        return NULL;
    }
    Py_ssize_t start = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *payload =
            PyBytes_FromStringAndSize((const char *)d + start + 8, ends[i] - start - 8);
        if (!payload) {
            Py_DECREF(list);
            PyMem_Free(ends);
            return NULL;
        }
        PyList_SET_ITEM(list, i, payload);
        start = ends[i];
    }
    PyMem_Free(ends);
    return Py_BuildValue("(Nn)", list, offset);
}

static Py_ssize_t varint_size(uint64_t v) {
    Py_ssize_t k = 1;
    while (v >= 0x80) {
        v >>= 7;
        k++;
    }
    return k;
}

static unsigned char *put_varint(unsigned char *o, uint64_t v) {
    while (v >= 0x80) {
        *o++ = (unsigned char)(v | 0x80);
        v >>= 7;
    }
    *o++ = (unsigned char)v;
    return o;
}

/* One repeated ``records`` entry (field 1, length-delimited): tag, length, bytes. */
static Py_ssize_t record_size(Py_ssize_t len) {
    Py_ssize_t head = 1 + varint_size((uint64_t)len);
    return len > PY_SSIZE_T_MAX - head ? -1 : head + len;
}

static void record_into(const unsigned char *p, Py_ssize_t len, unsigned char *o) {
    *o++ = 0x0a;
    o = put_varint(o, (uint64_t)len);
    memcpy(o, p, (size_t)len);
}

/* ingest_request(payloads) -> bytes: codec.py ``ingest_request`` (the reference), a serialized
 * IngestAuditRecordsRequest whose ``records`` (field 1) are ``payloads`` in order. */
static PyObject *py_ingest_request(PyObject *mod, PyObject *arg) {
    return encode_each(arg, "ingest_request", record_size, record_into);
}

static PyMethodDef module_methods[] = {
    {"frames", py_frames, METH_O,
     "frames(payloads) -> bytes: b''.join(frame(p) for p in payloads), framed in C."},
    {"parse_frames", (PyCFunction)(void (*)(void))py_parse_frames, METH_FASTCALL,
     "parse_frames(data, limit, max_frame) -> (payloads, offset): spool.parse_frames in C."},
    {"ingest_request", py_ingest_request, METH_O,
     "ingest_request(payloads) -> bytes: codec.ingest_request in C."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_frames",
                                    "The audit spool's framing in C.", -1, module_methods};

/* For the compiled Check path's AuditBuffer.drain_frames (sidecar/dataplane/_fastcheck.c),
 * which frames the records it encoded straight from its arena: frame_into(payload, length,
 * out) writes one frame (8 + length bytes) at ``out``; no Python object, no GIL needed. */
static void frame_into(const unsigned char *p, Py_ssize_t len, unsigned char *o) {
    put_u32(o, (uint32_t)len);
    put_u32(o + 4, crc32_of(p, len));
    memcpy(o + 8, p, (size_t)len);
}

PyMODINIT_FUNC PyInit__frames(void) {
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    PyObject *api = PyCapsule_New((void *)frame_into, "sidecar.auditship._frames.frame_into", NULL);
    if (!api || PyModule_AddObject(m, "frame_into", api) < 0) {
        Py_XDECREF(api);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
