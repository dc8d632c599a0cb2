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

static void frame_all(PyObject *const *items, Py_ssize_t n, unsigned char *o) {
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t len = PyBytes_GET_SIZE(items[i]);
        frame_into((const unsigned char *)PyBytes_AS_STRING(items[i]), len, o);
        o += 8 + len;
    }
}

static PyObject *py_frames(PyObject *mod, PyObject *arg) {
    /* A tuple of the payloads: our own references, whatever happens to the caller's list. */
    PyObject *items = PySequence_Tuple(arg);
    if (!items) return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(items), total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *p = PyTuple_GET_ITEM(items, i);
        if (!PyBytes_Check(p)) {
            PyErr_Format(PyExc_TypeError, "frames: payload %zd is %.100s, not bytes", i,
                         Py_TYPE(p)->tp_name);
            Py_DECREF(items);
            return NULL;
        }
        Py_ssize_t len = PyBytes_GET_SIZE(p);
        if ((uint64_t)len > UINT32_MAX || total > PY_SSIZE_T_MAX - 8 - len) {
            PyErr_SetString(PyExc_OverflowError, "frames: a payload or the whole is too long");
            Py_DECREF(items);
            return NULL;
        }
        total += 8 + len;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, total);
    if (!out) {
        Py_DECREF(items);
        return NULL;
    }
    unsigned char *o = (unsigned char *)PyBytes_AS_STRING(out);
    PyObject *const *refs = &PyTuple_GET_ITEM(items, 0);
    if (total >= RELEASE_BYTES) {
        Py_BEGIN_ALLOW_THREADS frame_all(refs, n, o);
        Py_END_ALLOW_THREADS
    } else {
        frame_all(refs, n, o);
    }
    Py_DECREF(items);
    return out;
}

static PyMethodDef module_methods[] = {
    {"frames", py_frames, METH_O,
     "frames(payloads) -> bytes: b''.join(frame(p) for p in payloads), framed in C."},
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
