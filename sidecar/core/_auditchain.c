/* The compiled audit ingest step (sidecar/core/audit_native.py): one IngestAuditRecordsRequest's
 * bytes to checked, scrubbed records with their canonical form, then to linked rows.
 *
 * parse(data, latest) walks the protobuf wire format of the request and of each AuditRecord,
 * checks each record as sidecar/core/audit_batch.py's ``checked_decision`` does (same order,
 * same reasons), scrubs it as sidecar/core/audit.py's ``scrub`` does (the credential regex
 * written out as a matcher with the same Unicode classes as Python's re) and writes its
 * canonical form (sidecar/core/audit_chain.py ``canonical``) as three pieces around the two link
 * fields. link(records, heads) hashes each record into its workspace's chain (SHA-256, through
 * hashlib: no SHA-256 of its own) and returns the rows the store inserts.
 *
 * parse returns None for any input it does not reproduce exactly (anything a sidecar's protobuf
 * encoder does not write: unknown or repeated fields, other wire types, invalid UTF-8, times
 * outside 1970..2255, more than 32 or repeated metadata keys, metadata keys that collide once
 * redacted): the caller then takes the pure-Python path, the reference, for that message.
 * tests/test_audit_native.py runs both on generated, mutated and fuzzed messages.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* ------------------------------------------------------------------------- byte buffer -- */

typedef struct {
    char *p;
    Py_ssize_t n, cap;
} Buf;

static int buf_grow(Buf *b, Py_ssize_t more) {
    if (b->n + more <= b->cap) return 0;
    Py_ssize_t cap = b->cap ? b->cap : 1024;
    while (cap < b->n + more) cap *= 2;
    char *p = PyMem_Realloc(b->p, (size_t)cap);
    if (!p) { PyErr_NoMemory(); return -1; }
    b->p = p;
    b->cap = cap;
    return 0;
}

static int buf_put(Buf *b, const char *s, Py_ssize_t n) {
    if (buf_grow(b, n) < 0) return -1;
    memcpy(b->p + b->n, s, (size_t)n);
    b->n += n;
    return 0;
}

#define PUTS(b, lit) buf_put((b), (lit), (Py_ssize_t)sizeof(lit) - 1)

/* One character as json's encode_basestring_ascii writes it: ASCII only, \uXXXX in lower case,
 * a surrogate pair beyond the BMP (``o`` has room for 12 bytes). */
static inline char *json_char(char *o, Py_UCS4 c) {
    static const char hex[] = "0123456789abcdef";
    if (c >= ' ' && c <= '~' && c != '\\' && c != '"') { *o++ = (char)c; return o; }
    *o++ = '\\';
    switch (c) {
    case '\\': *o++ = '\\'; break;
    case '"': *o++ = '"'; break;
    case '\b': *o++ = 'b'; break;
    case '\f': *o++ = 'f'; break;
    case '\n': *o++ = 'n'; break;
    case '\r': *o++ = 'r'; break;
    case '\t': *o++ = 't'; break;
    default:
        if (c >= 0x10000) {
            Py_UCS4 v = c - 0x10000, hi = 0xd800 | ((v >> 10) & 0x3ff);
            *o++ = 'u';
            *o++ = hex[(hi >> 12) & 15]; *o++ = hex[(hi >> 8) & 15];
            *o++ = hex[(hi >> 4) & 15]; *o++ = hex[hi & 15];
            *o++ = '\\';
            c = 0xdc00 | (v & 0x3ff);
        }
        *o++ = 'u';
        *o++ = hex[(c >> 12) & 15]; *o++ = hex[(c >> 8) & 15];
        *o++ = hex[(c >> 4) & 15]; *o++ = hex[c & 15];
    }
    return o;
}

/* A string as json's encode_basestring_ascii writes it, quoted. */
static int buf_json(Buf *b, const Py_UCS4 *s, Py_ssize_t n) {
    if (buf_grow(b, 2 + 12 * n) < 0) return -1;
    char *o = b->p + b->n;
    *o++ = '"';
    for (Py_ssize_t i = 0; i < n; i++) o = json_char(o, s[i]);
    *o++ = '"';
    b->n = o - b->p;
    return 0;
}

/* The same for ASCII bytes (a code point each): runs that need no escape are copied whole. */
static int buf_json_ascii(Buf *b, const char *s, Py_ssize_t n) {
    if (buf_grow(b, 2 + 6 * n) < 0) return -1;
    char *o = b->p + b->n;
    *o++ = '"';
    for (Py_ssize_t i = 0; i < n;) {
        Py_ssize_t j = i;
        while (j < n && s[j] >= ' ' && s[j] <= '~' && s[j] != '\\' && s[j] != '"') j++;
        memcpy(o, s + i, (size_t)(j - i));
        o += j - i;
        if (j < n) o = json_char(o, (unsigned char)s[j++]);
        i = j;
    }
    *o++ = '"';
    b->n = o - b->p;
    return 0;
}

/* ``v`` in decimal into ``out`` (room for 21 bytes), as "%lld" writes it; returns the length. */
static int put_ll(char *out, long long v) {
    char tmp[24];
    int n = 0;
    unsigned long long u = v < 0 ? 0ull - (unsigned long long)v : (unsigned long long)v;
    do { tmp[n++] = (char)('0' + u % 10); u /= 10; } while (u);
    int len = 0;
    if (v < 0) out[len++] = '-';
    while (n) out[len++] = tmp[--n];
    return len;
}

/* -------------------------------------------------------------------------------- UTF-8 -- */

/* Strict UTF-8 (no overlong forms, no surrogates, nothing past U+10FFFF), as protobuf checks
 * proto3 strings: its code points into ``out`` (when not NULL), their count, or -1. */
static Py_ssize_t utf8_decode(const unsigned char *p, Py_ssize_t n, Py_UCS4 *out) {
    Py_ssize_t count = 0;
    for (Py_ssize_t i = 0; i < n;) {
        unsigned char c = p[i];
        if (!out) { /* counting only (utf8_check): skip ASCII eight bytes at a time */
            uint64_t w;
            while (i + 8 <= n && (memcpy(&w, p + i, 8), !(w & 0x8080808080808080ull))) {
                i += 8;
                count += 8;
            }
            if (i == n) break;
            c = p[i];
        }
        Py_UCS4 cp;
        int more;
        if (c < 0x80) { cp = c; more = 0; }
        else if (c >= 0xc2 && c <= 0xdf) { cp = c & 0x1f; more = 1; }
        else if (c >= 0xe0 && c <= 0xef) { cp = c & 0x0f; more = 2; }
        else if (c >= 0xf0 && c <= 0xf4) { cp = c & 0x07; more = 3; }
        else return -1;
        if (i + more >= n) return -1;
        for (int k = 1; k <= more; k++) {
            unsigned char d = p[i + k];
            if ((d & 0xc0) != 0x80) return -1;
            cp = cp << 6 | (d & 0x3f);
        }
        if ((more == 2 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
            (more == 3 && (cp < 0x10000 || cp > 0x10ffff)))
            return -1;
        if (out) out[count] = cp;
        count++;
        i += 1 + more;
    }
    return count;
}

/* ------------------------------------------------------------------------- redaction -- */
/* audit._SECRET, alternative by alternative:
 *   \bsp[a-z]{1,3}_[0-9A-Za-z]{24,}
 *   \beyJ[\w-]{4,}\.[\w-]{4,}\.[\w-]*
 *   \b[Bb][Ee][Aa][Rr][Ee][Rr]\s+\S+
 * Each is deterministic (no class can also match what follows it: '_' is not in [a-z], '.' is
 * not in [\w-], \s and \S split every character), so the greedy match re.sub finds is the
 * maximal run of each part. \w, \s and \b are Python's for str patterns (sre: Py_UNICODE_ISALNUM
 * or '_', Py_UNICODE_ISSPACE). */

static const char REDACTED[] = "[redacted]";

static int is_ascii_alnum(Py_UCS4 c) {
    return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z');
}
/* Below U+0080 Python's alphanumerics are exactly [0-9A-Za-z]: no call into its tables. */
static int is_word(Py_UCS4 c) {
    return c == '_' || (c < 0x80 ? is_ascii_alnum(c) : Py_UNICODE_ISALNUM(c));
}
/* Only these start a credential (secret_at's first test, kept inline for the common case). */
static int may_start_secret(Py_UCS4 c) { return c == 's' || c == 'e' || c == 'b' || c == 'B'; }
static int is_word_dash(Py_UCS4 c) { return c == '-' || is_word(c); }

/* The end of a credential starting at ``p``, or -1. */
static Py_ssize_t secret_at(const Py_UCS4 *s, Py_ssize_t n, Py_ssize_t p) {
    Py_UCS4 c = s[p];
    if (!may_start_secret(c)) return -1;
    if (p > 0 && is_word(s[p - 1])) return -1; /* \b: s[p] is a word character */
    Py_ssize_t q, r;
    if (c == 's') {
        if (p + 1 >= n || s[p + 1] != 'p') return -1;
        q = p + 2;
        while (q < n && q - (p + 2) < 4 && s[q] >= 'a' && s[q] <= 'z') q++;
        if (q - (p + 2) < 1 || q - (p + 2) > 3 || q >= n || s[q] != '_') return -1;
        r = ++q;
        while (r < n && is_ascii_alnum(s[r])) r++;
        return r - q >= 24 ? r : -1;
    }
    if (c == 'e') {
        if (p + 2 >= n || s[p + 1] != 'y' || s[p + 2] != 'J') return -1;
        q = p + 3;
        for (int part = 0; part < 2; part++) {
            r = q;
            while (r < n && is_word_dash(s[r])) r++;
            if (r - q < 4 || r >= n || s[r] != '.') return -1;
            q = r + 1;
        }
        while (q < n && is_word_dash(s[q])) q++;
        return q;
    }
    static const char rest[] = "earer";
    if (p + 6 > n) return -1;
    for (int k = 0; k < 5; k++)
        if (s[p + 1 + k] != (Py_UCS4)rest[k] && s[p + 1 + k] != (Py_UCS4)(rest[k] - 32)) return -1;
    q = r = p + 6;
    while (r < n && Py_UNICODE_ISSPACE(s[r])) r++;
    if (r == q) return -1;
    q = r;
    while (r < n && !Py_UNICODE_ISSPACE(s[r])) r++;
    return r > q ? r : -1;
}

/* ``s`` redacted into ``out`` (room for 5 * n / 4 + 10 code points: every match is at least
 * 8 long, "bearer x", and becomes 10); returns the new length. The pool parse() decodes into
 * holds the largest record that passes the checks, raw and redacted (< 48k code points). */
static Py_ssize_t redact(const Py_UCS4 *s, Py_ssize_t n, Py_UCS4 *out) {
    Py_ssize_t o = 0;
    for (Py_ssize_t p = 0; p < n;) {
        if (!may_start_secret(s[p])) { out[o++] = s[p++]; continue; }
        Py_ssize_t end = secret_at(s, n, p);
        if (end < 0) { out[o++] = s[p++]; continue; }
        for (int k = 0; k < 10; k++) out[o++] = (Py_UCS4)REDACTED[k];
        p = end;
    }
    return o;
}

/* ----------------------------------------------------------------------------- wire -- */

typedef struct {
    const unsigned char *p;
    Py_ssize_t n;
    Py_ssize_t cps; /* code points, after a successful utf8_decode */
} Str;

static int varint(const unsigned char **pp, const unsigned char *end, uint64_t *v) {
    const unsigned char *p = *pp;
    uint64_t x = 0;
    for (int i = 0; i < 10; i++) {
        if (p >= end) return -1;
        unsigned char b = *p++;
        x |= (uint64_t)(b & 0x7f) << (7 * i);
        if (!(b & 0x80)) {
            if (i == 9 && b > 1) return -1;
            *pp = p;
            *v = x;
            return 0;
        }
    }
    return -1;
}

/* A tag or a length: protobuf reads at most 5 bytes for these (a longer one, even padded
 * with zeros, is a DecodeError there), so a longer one is not reproduced here. */
static int varint32(const unsigned char **pp, const unsigned char *end, uint64_t *v) {
    const unsigned char *start = *pp;
    if (varint(pp, end, v) < 0 || *pp - start > 5 || *v > 0x7fffffff) return -1;
    return 0;
}

static int lenfield(const unsigned char **pp, const unsigned char *end, Str *out) {
    uint64_t len;
    if (varint32(pp, end, &len) < 0 || len > (uint64_t)(end - *pp)) return -1;
    out->p = *pp;
    out->n = (Py_ssize_t)len;
    *pp += len;
    return 0;
}

#define MAX_META 32
#define MAX_FIELD 512

enum { F_ID = 1, F_TIME, F_ACTOR, F_ACTION, F_WORKSPACE, F_TARGET, F_OUTCOME, F_REASON, F_RID };

typedef struct {
    Str f[10];
    unsigned seen;
    int64_t us; /* seconds * 1e6 + nanos // 1000 */
    Str key[MAX_META], value[MAX_META];
    int nmeta;
} Rec;

/* -1: not reproduced here (the caller takes the Python path); 0: parsed. */
static int parse_time(Str t, int64_t *us) {
    const unsigned char *p = t.p, *end = t.p + t.n;
    uint64_t secs = 0, nanos = 0, v;
    unsigned seen = 0;
    while (p < end) {
        uint64_t tag;
        if (varint32(&p, end, &tag) < 0) return -1;
        unsigned field = (unsigned)(tag >> 3);
        if ((tag & 7) != 0 || (field != 1 && field != 2) || (seen & (1u << field))) return -1;
        seen |= 1u << field;
        if (varint(&p, end, &v) < 0) return -1;
        if (field == 1) secs = v; else nanos = v;
    }
    /* Python divides an integer count of microseconds by 1e6: exact in a double below 2**53. */
    if (secs > 9000000000ull || nanos > 999999999ull) return -1;
    *us = (int64_t)secs * 1000000 + (int64_t)(nanos / 1000);
    return 0;
}

static int parse_entry(Str e, Str *key, Str *value) {
    const unsigned char *p = e.p, *end = e.p + e.n;
    unsigned seen = 0;
    key->n = value->n = 0;
    key->p = value->p = e.p;
    while (p < end) {
        uint64_t tag;
        if (varint32(&p, end, &tag) < 0) return -1;
        unsigned field = (unsigned)(tag >> 3);
        if ((tag & 7) != 2 || (field != 1 && field != 2) || (seen & (1u << field))) return -1;
        seen |= 1u << field;
        if (lenfield(&p, end, field == 1 ? key : value) < 0) return -1;
    }
    return 0;
}

/* A NUL declines the message too: the Python path refuses that record (NUL_CHARACTER). */
static int utf8_check(Str *s) {
    if (s->n && memchr(s->p, 0, (size_t)s->n)) return -1;
    s->cps = utf8_decode(s->p, s->n, NULL);
    return s->cps < 0 ? -1 : 0;
}

static int parse_record(Str raw, Rec *r) {
    const unsigned char *p = raw.p, *end = raw.p + raw.n;
    memset(r->f, 0, sizeof r->f);
    r->seen = 0;
    r->us = 0;
    r->nmeta = 0;
    while (p < end) {
        uint64_t tag;
        Str s;
        if (varint32(&p, end, &tag) < 0) return -1;
        unsigned field = (unsigned)(tag >> 3);
        if ((tag & 7) != 2 || field < 1 || field > 10 || lenfield(&p, end, &s) < 0) return -1;
        if (field == 10) {
            if (r->nmeta == MAX_META) return -1;
            Str *k = &r->key[r->nmeta], *v = &r->value[r->nmeta];
            if (parse_entry(s, k, v) < 0 || utf8_check(k) < 0 || utf8_check(v) < 0) return -1;
            for (int i = 0; i < r->nmeta; i++)
                if (r->key[i].n == k->n && !memcmp(r->key[i].p, k->p, (size_t)k->n)) return -1;
            r->nmeta++;
            continue;
        }
        if (r->seen & (1u << field)) return -1;
        r->seen |= 1u << field;
        if (field == F_TIME) {
            if (parse_time(s, &r->us) < 0) return -1;
            continue;
        }
        if (utf8_check(&s) < 0) return -1;
        r->f[field] = s;
    }
    return 0;
}

/* ---------------------------------------------------------------------- validation -- */
/* In the order of audit_batch.checked_decision; the codes index audit_native.REFUSALS. */
enum { OK = 0, R_ACTION, R_ID, R_MISSING_TIME, R_FUTURE, R_TOO_LARGE, R_META_ENTRY, R_WORKSPACE };

static int str_is(Str s, const char *lit) {
    size_t n = strlen(lit);
    return (size_t)s.n == n && !memcmp(s.p, lit, n);
}

/* Whether an id (ASCII, checked above) is shaped like a credential: stored unredacted, it
 * would put a secret in the trail (audit_batch.checked_decision refuses it the same way). */
static int id_holds_secret(Str id) {
    Py_UCS4 s[64];
    for (Py_ssize_t i = 0; i < id.n; i++) s[i] = (unsigned char)id.p[i];
    for (Py_ssize_t p = 0; p < id.n; p++)
        if (may_start_secret(s[p]) && secret_at(s, id.n, p) >= 0) return 1;
    return 0;
}

static int check(const Rec *r, double t, double latest) {
    Str action = r->f[F_ACTION], id = r->f[F_ID], ws = r->f[F_WORKSPACE];
    if (!str_is(action, "authz.allow") && !str_is(action, "authz.deny")) return R_ACTION;
    if (id.n < 1 || id.n > 64) return R_ID;
    for (Py_ssize_t i = 0; i < id.n; i++) {
        unsigned char c = id.p[i];
        if (!(is_ascii_alnum(c) || c == '.' || c == '_' || c == ':' || c == '-')) return R_ID;
    }
    if (id_holds_secret(id)) return R_ID;
    if (t <= 0) return R_MISSING_TIME;
    if (t > latest) return R_FUTURE;
    static const int sized[] = {F_ACTOR, F_WORKSPACE, F_TARGET, F_OUTCOME, F_REASON, F_RID};
    for (int i = 0; i < 6; i++)
        if (r->f[sized[i]].cps > MAX_FIELD) return R_TOO_LARGE;
    for (int i = 0; i < r->nmeta; i++)
        if (r->key[i].cps > 64 || r->value[i].cps > MAX_FIELD) return R_META_ENTRY;
    if (ws.n == 0 || str_is(ws, "-") || str_is(ws, "*")) return OK;
    /* validation.workspace: [a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])? */
    if (ws.n > 63 || ws.p[0] == '-' || ws.p[ws.n - 1] == '-') return R_WORKSPACE;
    for (Py_ssize_t i = 0; i < ws.n; i++) {
        unsigned char c = ws.p[i];
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-')) return R_WORKSPACE;
    }
    return OK;
}

/* ---------------------------------------------------------------------------- output -- */

typedef struct {
    const Py_UCS4 *s; /* the redacted code points, or NULL: */
    const char *a;    /* the text is these ASCII bytes as sent (no credential in them) */
    Py_ssize_t n;
} U;

/* Whether ASCII ``p`` has a place where a credential could start: a superset of secret_at's
 * matches (each pattern's fixed start, ignoring \b and the runs that follow it). */
static int may_hold_secret_ascii(const char *p, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i + 2 < n; i++) {
        char c = p[i];
        if (c == 's' && p[i + 1] == 'p') { /* sp[a-z]{1,3}_ */
            Py_ssize_t q = i + 2;
            while (q < n && q - (i + 2) < 3 && p[q] >= 'a' && p[q] <= 'z') q++;
            if (q > i + 2 && q < n && p[q] == '_') return 1;
        } else if (c == 'e' && p[i + 1] == 'y' && p[i + 2] == 'J') { /* eyJ */
            return 1;
        } else if ((c | 0x20) == 'b' && i + 5 < n) { /* [Bb][Ee][Aa][Rr][Ee][Rr] */
            static const char rest[] = "earer";
            int k = 0;
            while (k < 5 && (p[i + 1 + k] | 0x20) == rest[k]) k++;
            if (k == 5) return 1;
        }
    }
    return 0;
}

/* ``s`` decoded (already checked) and, when ``scrub``, redacted into ``pool``. ASCII that
 * redaction cannot change stays the bytes as sent (most fields: no decoding, no copy). */
static U text(Str s, int scrub, Py_UCS4 **pool) {
    U u;
    if (s.cps == s.n && !(scrub && may_hold_secret_ascii((const char *)s.p, s.n))) {
        u.s = NULL;
        u.a = s.n ? (const char *)s.p : ""; /* an absent field has no bytes to point at */
        u.n = s.n;
        return u;
    }
    u.a = NULL;
    Py_UCS4 *raw = *pool;
    Py_ssize_t n = utf8_decode(s.p, s.n, raw);
    if (!scrub) {
        u.s = raw;
        u.n = n;
        *pool += n;
        return u;
    }
    Py_UCS4 *out = raw + n;
    u.s = out;
    u.n = redact(raw, n, out);
    *pool = out + u.n;
    return u;
}

static PyObject *ustr(U u) {
    if (!u.a) return PyUnicode_FromKindAndData(PyUnicode_4BYTE_KIND, u.s, u.n);
    PyObject *str = PyUnicode_New(u.n, 127);
    if (str) memcpy(PyUnicode_DATA(str), u.a, (size_t)u.n);
    return str;
}

static inline Py_UCS4 uat(const U *u, Py_ssize_t i) {
    return u->a ? (Py_UCS4)(unsigned char)u->a[i] : u->s[i];
}

static int ucmp(const U *a, const U *b) {
    Py_ssize_t n = a->n < b->n ? a->n : b->n;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS4 x = uat(a, i), y = uat(b, i);
        if (x != y) return x < y ? -1 : 1;
    }
    return a->n < b->n ? -1 : a->n > b->n;
}

static int buf_json_u(Buf *b, const U *u) {
    return u->a ? buf_json_ascii(b, u->a, u->n) : buf_json(b, u->s, u->n);
}

/* The refusal's id: the id as sent, cut to 64 characters and redacted. */
static PyObject *refused_id(Str id, Py_UCS4 *pool) {
    Py_ssize_t bytes = 0;
    for (int cps = 0; bytes < id.n; bytes++) /* stop at the 65th character's first byte */
        if ((id.p[bytes] & 0xc0) != 0x80 && cps++ == 64) break;
    Py_ssize_t n = utf8_decode(id.p, bytes, pool);
    Py_UCS4 *out = pool + n;
    return PyUnicode_FromKindAndData(PyUnicode_4BYTE_KIND, out, redact(pool, n, out));
}

/* The record's row without its link (id, time, actor, action, workspace, target, outcome,
 * reason, request_id, metadata) and its canonical form with a NUL where chain_seq and
 * prev_digest go; NULL with no exception set: not reproduced here. */
static PyObject *accepted(const Rec *r, double t, Py_UCS4 *pool, Buf *b) {
    static const int order[] = {F_ID, F_ACTOR, F_ACTION, F_WORKSPACE, F_TARGET, F_OUTCOME,
                                F_REASON, F_RID};
    U f[10], k[MAX_META], v[MAX_META];
    int idx[MAX_META];

    for (int i = 0; i < 8; i++) {
        int field = order[i];
        /* Not scrubbed, as audit.scrub leaves them: the id and the outcome. */
        f[field] = text(r->f[field], field != F_ID && field != F_OUTCOME, &pool);
    }
    if (f[F_WORKSPACE].n == 0) {
        f[F_WORKSPACE].s = NULL;
        f[F_WORKSPACE].a = "-";
        f[F_WORKSPACE].n = 1;
    }
    for (int i = 0; i < r->nmeta; i++) {
        k[i] = text(r->key[i], 1, &pool);
        v[i] = text(r->value[i], 1, &pool);
        idx[i] = i;
    }
    for (int i = 1; i < r->nmeta; i++) { /* insertion sort by key, as sorted(items()) */
        int j = i, cur = idx[i];
        while (j > 0 && ucmp(&k[idx[j - 1]], &k[cur]) > 0) { idx[j] = idx[j - 1]; j--; }
        idx[j] = cur;
    }
    for (int i = 1; i < r->nmeta; i++)
        if (ucmp(&k[idx[i - 1]], &k[idx[i]]) == 0) return NULL; /* keys redacted into one */
    b->n = 0;
    Py_ssize_t meta_at, meta_end;
    if (PUTS(b, "{\"action\":") < 0 || buf_json_u(b, &f[F_ACTION]) < 0 ||
        PUTS(b, ",\"actor\":") < 0 || buf_json_u(b, &f[F_ACTOR]) < 0 ||
        PUTS(b, ",\"chain_seq\":\0,\"id\":") < 0 || buf_json_u(b, &f[F_ID]) < 0 ||
        PUTS(b, ",\"metadata\":{") < 0)
        return NULL;
    meta_at = b->n - 1;
    for (int i = 0; i < r->nmeta; i++) {
        int j = idx[i];
        if ((i && PUTS(b, ",") < 0) || buf_json_u(b, &k[j]) < 0 || PUTS(b, ":") < 0 ||
            buf_json_u(b, &v[j]) < 0)
            return NULL;
    }
    if (PUTS(b, "}") < 0) return NULL;
    meta_end = b->n;
    char us[32];
    /* audit_chain.time_us: round(seconds * 1_000_000), half to even */
    int usn = put_ll(us, (long long)nearbyint(t * 1000000.0));
    if (PUTS(b, ",\"outcome\":") < 0 || buf_json_u(b, &f[F_OUTCOME]) < 0 ||
        PUTS(b, ",\"prev_digest\":\0,\"reason\":") < 0 ||
        buf_json_u(b, &f[F_REASON]) < 0 || PUTS(b, ",\"request_id\":") < 0 ||
        buf_json_u(b, &f[F_RID]) < 0 || PUTS(b, ",\"target\":") < 0 ||
        buf_json_u(b, &f[F_TARGET]) < 0 || PUTS(b, ",\"time_us\":") < 0 ||
        buf_put(b, us, usn) < 0 || PUTS(b, ",\"v\":1,\"workspace\":") < 0 ||
        buf_json_u(b, &f[F_WORKSPACE]) < 0 || PUTS(b, "}") < 0)
        return NULL;
    PyObject *meta = PyUnicode_FromStringAndSize(b->p + meta_at, meta_end - meta_at);
    PyObject *canon = PyBytes_FromStringAndSize(b->p, b->n);
    PyObject *row = meta && canon ? PyTuple_New(10) : NULL;
    if (row) {
        PyTuple_SET_ITEM(row, 0, ustr(f[F_ID]));
        PyTuple_SET_ITEM(row, 1, PyFloat_FromDouble(t));
        PyTuple_SET_ITEM(row, 2, ustr(f[F_ACTOR]));
        PyTuple_SET_ITEM(row, 3, ustr(f[F_ACTION]));
        PyTuple_SET_ITEM(row, 4, ustr(f[F_WORKSPACE]));
        PyTuple_SET_ITEM(row, 5, ustr(f[F_TARGET]));
        PyTuple_SET_ITEM(row, 6, ustr(f[F_OUTCOME]));
        PyTuple_SET_ITEM(row, 7, ustr(f[F_REASON]));
        PyTuple_SET_ITEM(row, 8, ustr(f[F_RID]));
        PyTuple_SET_ITEM(row, 9, meta);
        meta = NULL;
        for (int i = 0; i < 9; i++)
            if (!PyTuple_GET_ITEM(row, i)) { Py_CLEAR(row); break; }
    }
    Py_XDECREF(meta);
    PyObject *out = row && canon ? PyTuple_Pack(2, row, canon) : NULL;
    Py_XDECREF(row);
    Py_XDECREF(canon);
    if (!out && !PyErr_Occurred()) PyErr_NoMemory();
    return out;
}

/* parse(data, latest) -> None | (report_refused, count, refused, accepted, records)
 *   refused: [(index, code, id)]; accepted: [(index, id)]; records: {index: (row, canonical)} */
static PyObject *py_parse(PyObject *mod, PyObject *args) {
    Py_buffer view;
    double latest;
    if (!PyArg_ParseTuple(args, "y*d", &view, &latest)) return NULL;
    const unsigned char *p = view.buf, *end = p + view.len;
    PyObject *refused = PyList_New(0), *ok = PyList_New(0), *records = PyDict_New();
    PyObject *result = NULL;
    Py_UCS4 *pool = PyMem_Malloc(sizeof(Py_UCS4) * 64 * 1024);
    Rec *rec = PyMem_Malloc(sizeof(Rec));
    Buf b = {0};
    int report = 0, seen_report = 0, declined = 0;
    Py_ssize_t index = 0;
    if (!refused || !ok || !records || !pool || !rec) { PyErr_NoMemory(); goto done; }
    while (p < end) {
        uint64_t tag, v;
        Str raw;
        if (varint32(&p, end, &tag) < 0) { declined = 1; break; }
        if (tag == (2 << 3 | 0) && !seen_report) {
            if (varint(&p, end, &v) < 0) { declined = 1; break; }
            report = v != 0;
            seen_report = 1;
            continue;
        }
        if (tag != (1 << 3 | 2) || lenfield(&p, end, &raw) < 0 || parse_record(raw, rec) < 0) {
            declined = 1;
            break;
        }
        double t = (double)rec->us / 1000000.0;
        int code = check(rec, t, latest);
        PyObject *item;
        if (code != OK) {
            PyObject *id = refused_id(rec->f[F_ID], pool);
            item = id ? Py_BuildValue("(niN)", index, code, id) : NULL;
            if (!item || PyList_Append(refused, item) < 0) { Py_XDECREF(item); goto done; }
        } else {
            PyObject *got = accepted(rec, t, pool, &b);
            if (!got) {
                if (PyErr_Occurred()) goto done;
                declined = 1;
                break;
            }
            PyObject *key = PyLong_FromSsize_t(index);
            item = key ? PyTuple_Pack(2, key, PyTuple_GET_ITEM(PyTuple_GET_ITEM(got, 0), 0)) : NULL;
            int rc = item ? PyDict_SetItem(records, key, got) : -1;
            Py_XDECREF(key);
            Py_DECREF(got);
            if (rc < 0 || PyList_Append(ok, item) < 0) { Py_XDECREF(item); goto done; }
        }
        Py_DECREF(item);
        index++;
    }
    if (declined) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    result = Py_BuildValue("(OnOOO)", report ? Py_True : Py_False, index, refused, ok, records);
done:
    PyBuffer_Release(&view);
    Py_XDECREF(refused);
    Py_XDECREF(ok);
    Py_XDECREF(records);
    PyMem_Free(pool);
    PyMem_Free(rec);
    PyMem_Free(b.p);
    return result;
}

/* ------------------------------------------------------------------------------ link -- */

static const char GENESIS[] = "0000000000000000000000000000000000000000000000000000000000000000";

/* hashlib.sha256: OpenSSL's (with the CPU's SHA extensions where it has them), 2-3 times
 * faster than a portable C SHA-256 such as sidecar/dataplane/_fastcheck.c's on ~450 bytes.
 * Each record's hash starts as a copy of one empty hash object: OpenSSL 3 pays more to set a
 * context up (``sha256(data)``) than to copy one: 0.93 -> 0.69 us per hash and hex digest from
 * Python, 1.57-1.67 -> 1.50-1.55 us per record for all of link() (best of 9, two rounds). */
static PyObject *sha256_empty, *S_copy, *S_update, *S_hexdigest;

/* The prev_digest as json writes it (a stored digest is hex; escape whatever is there). */
static int put_json_str(Buf *b, PyObject *str) {
    if (PyUnicode_IS_ASCII(str)) {
        const char *a = (const char *)PyUnicode_DATA(str);
        Py_ssize_t n = PyUnicode_GET_LENGTH(str), i = 0;
        while (i < n && a[i] >= ' ' && a[i] <= '~' && a[i] != '"' && a[i] != '\\') i++;
        if (i == n) {
            if (buf_grow(b, n + 2) < 0) return -1;
            b->p[b->n++] = '"';
            memcpy(b->p + b->n, a, (size_t)n);
            b->n += n;
            b->p[b->n++] = '"';
            return 0;
        }
    }
    Py_UCS4 *u = PyUnicode_AsUCS4Copy(str);
    if (!u) return -1;
    int rc = buf_json(b, u, PyUnicode_GET_LENGTH(str));
    PyMem_Free(u);
    return rc;
}

/* Hex SHA-256 of the record's canonical form at chain position ``seq`` after ``prev``. */
static PyObject *digest(Buf *b, const char *c, Py_ssize_t cn, long long seq, PyObject *prev) {
    const char *z1 = memchr(c, 0, (size_t)cn);
    const char *z2 = z1 ? memchr(z1 + 1, 0, (size_t)(c + cn - z1 - 1)) : NULL;
    if (!z2) {
        PyErr_SetString(PyExc_ValueError, "not a canonical form from parse()");
        return NULL;
    }
    char num[24];
    int numn = put_ll(num, seq);
    b->n = 0;
    if (buf_put(b, c, z1 - c) < 0 || buf_put(b, num, numn) < 0 ||
        buf_put(b, z1 + 1, z2 - z1 - 1) < 0 || put_json_str(b, prev) < 0 ||
        buf_put(b, z2 + 1, c + cn - z2 - 1) < 0)
        return NULL;
    PyObject *bytes = PyBytes_FromStringAndSize(b->p, b->n);
    PyObject *h = bytes ? PyObject_CallMethodNoArgs(sha256_empty, S_copy) : NULL;
    PyObject *updated = h ? PyObject_CallMethodOneArg(h, S_update, bytes) : NULL;
    Py_XDECREF(bytes);
    PyObject *hex = updated ? PyObject_CallMethodNoArgs(h, S_hexdigest) : NULL;
    Py_XDECREF(updated);
    Py_XDECREF(h);
    return hex;
}

/* link(records, heads) -> rows: ``records`` [(row, canonical)] in chain order, ``heads``
 * {workspace: Link | None} read from the store (the dict is updated with each new head as
 * (chain_seq, None, digest)). */
static PyObject *py_link(PyObject *mod, PyObject *args) {
    PyObject *records, *heads;
    if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &records, &PyDict_Type, &heads))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(records);
    PyObject *rows = PyList_New(n);
    Buf b = {0};
    if (!rows) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(records, i), *row, *canon;
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2 ||
            !PyTuple_Check(row = PyTuple_GET_ITEM(item, 0)) || PyTuple_GET_SIZE(row) != 10 ||
            !PyBytes_Check(canon = PyTuple_GET_ITEM(item, 1))) {
            PyErr_SetString(PyExc_TypeError, "records are (row, canonical) pairs from parse()");
            goto fail;
        }
        PyObject *ws = PyTuple_GET_ITEM(row, 4);
        PyObject *head = PyDict_GetItemWithError(heads, ws);
        if (!head && PyErr_Occurred()) goto fail;
        long long seq = 1;
        PyObject *prev = NULL;
        if (head && head != Py_None) {
            PyObject *hseq = PySequence_GetItem(head, 0);
            prev = hseq ? PySequence_GetItem(head, 2) : NULL;
            seq = hseq ? PyLong_AsLongLong(hseq) + 1 : -1;
            Py_XDECREF(hseq);
            if (!prev || PyErr_Occurred()) { Py_XDECREF(prev); goto fail; }
            if (!PyUnicode_Check(prev)) {
                Py_DECREF(prev);
                PyErr_SetString(PyExc_TypeError, "a head's digest must be a str");
                goto fail;
            }
        } else {
            prev = PyUnicode_FromStringAndSize(GENESIS, 64);
            if (!prev) goto fail;
        }
        PyObject *hex = digest(&b, PyBytes_AS_STRING(canon), PyBytes_GET_SIZE(canon), seq, prev);
        PyObject *out = hex ? PyTuple_New(13) : NULL, *pyseq = PyLong_FromLongLong(seq);
        PyObject *newhead = out && pyseq ? PyTuple_Pack(3, pyseq, Py_None, hex) : NULL;
        if (!newhead || PyDict_SetItem(heads, ws, newhead) < 0) {
            Py_XDECREF(out); Py_XDECREF(pyseq); Py_XDECREF(hex); Py_XDECREF(newhead);
            Py_DECREF(prev);
            goto fail;
        }
        Py_DECREF(newhead);
        for (int k = 0; k < 10; k++) {
            PyObject *v = PyTuple_GET_ITEM(row, k);
            Py_INCREF(v);
            PyTuple_SET_ITEM(out, k, v);
        }
        PyTuple_SET_ITEM(out, 10, pyseq);
        PyTuple_SET_ITEM(out, 11, prev);
        PyTuple_SET_ITEM(out, 12, hex);
        PyList_SET_ITEM(rows, i, out);
    }
    PyMem_Free(b.p);
    return rows;
fail:
    PyMem_Free(b.p);
    Py_DECREF(rows);
    return NULL;
}

/* ------------------------------------------------------------------------ COPY rows -- */

/* One value in PostgreSQL's COPY text format (backslash escapes as psycopg writes them);
 * 1: not written here (a NUL, which text cannot hold, or a type other than str, float, int). */
static int copy_value(Buf *b, PyObject *v) {
    if (PyUnicode_Check(v)) {
        Py_ssize_t n;
        const char *u = PyUnicode_AsUTF8AndSize(v, &n);
        if (!u) { PyErr_Clear(); return 1; }
        if (buf_grow(b, 2 * n) < 0) return -1;
        char *o = b->p + b->n;
        for (Py_ssize_t i = 0; i < n; i++) {
            char c = u[i], e = 0;
            switch (c) {
            case '\0': return 1;
            case '\b': e = 'b'; break;
            case '\t': e = 't'; break;
            case '\n': e = 'n'; break;
            case '\v': e = 'v'; break;
            case '\f': e = 'f'; break;
            case '\r': e = 'r'; break;
            case '\\': e = '\\'; break;
            }
            if (e) { *o++ = '\\'; *o++ = e; } else *o++ = c;
        }
        b->n = o - b->p;
        return 0;
    }
    if (PyFloat_CheckExact(v)) { /* repr: the shortest text that reads back as this double */
        char *r = PyOS_double_to_string(PyFloat_AS_DOUBLE(v), 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
        if (!r) return -1;
        int rc = buf_put(b, r, (Py_ssize_t)strlen(r));
        PyMem_Free(r);
        return rc;
    }
    if (PyLong_CheckExact(v)) {
        long long x = PyLong_AsLongLong(v);
        if (x == -1 && PyErr_Occurred()) { PyErr_Clear(); return 1; }
        char num[24];
        return buf_put(b, num, put_ll(num, x));
    }
    return 1;
}

/* copy_text(rows) -> bytes | None: the rows as one COPY ... FROM STDIN (text format) payload,
 * what psycopg's write_row would send row by row; None when a value is not written here. */
static PyObject *py_copy_text(PyObject *mod, PyObject *rows) {
    if (!PyList_Check(rows)) {
        PyErr_SetString(PyExc_TypeError, "copy_text() takes a list of tuples");
        return NULL;
    }
    Buf b = {0};
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(rows); i++) {
        PyObject *row = PyList_GET_ITEM(rows, i);
        if (!PyTuple_Check(row)) goto decline;
        for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(row); k++) {
            int rc = (k ? buf_put(&b, "\t", 1) : 0);
            if (rc == 0) rc = copy_value(&b, PyTuple_GET_ITEM(row, k));
            if (rc < 0) { PyMem_Free(b.p); return NULL; }
            if (rc > 0) goto decline;
        }
        if (buf_put(&b, "\n", 1) < 0) { PyMem_Free(b.p); return NULL; }
    }
    PyObject *out = PyBytes_FromStringAndSize(b.p ? b.p : "", b.n);
    PyMem_Free(b.p);
    return out;
decline:
    PyMem_Free(b.p);
    Py_RETURN_NONE;
}

static PyObject *py_redact(PyObject *mod, PyObject *arg) {
    if (!PyUnicode_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "redact() takes a str");
        return NULL;
    }
    Py_ssize_t n = PyUnicode_GET_LENGTH(arg);
    Py_UCS4 *s = PyUnicode_AsUCS4Copy(arg);
    Py_UCS4 *out = s ? PyMem_Malloc(sizeof(Py_UCS4) * (size_t)(n + 4 * n / 3 + 10)) : NULL;
    PyObject *res = NULL;
    if (out) res = PyUnicode_FromKindAndData(PyUnicode_4BYTE_KIND, out, redact(s, n, out));
    else if (s) PyErr_NoMemory();
    PyMem_Free(s);
    PyMem_Free(out);
    return res;
}

/* ------------------------------------------------------------------- INSERT params -- */

/* flat(rows, size) -> [tuple]: ``rows`` (tuples of one length) as the parameters of multi-row
 * INSERTs, ``size`` rows to a tuple, in order; len(rows) must be a multiple of ``size``. What
 * ``tuple(itertools.chain.from_iterable(rows[i:i + size]))`` per statement builds, without
 * an iterator and a resized tuple per statement (≈ 0.4 us per row in Python). */
static PyObject *py_flat(PyObject *mod, PyObject *args) {
    PyObject *rows;
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "O!n", &PyList_Type, &rows, &size)) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(rows), width = 0;
    if (size < 1 || n % size) {
        PyErr_SetString(PyExc_ValueError, "flat() needs a positive size dividing len(rows)");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *row = PyList_GET_ITEM(rows, i);
        if (!PyTuple_Check(row) || (i && PyTuple_GET_SIZE(row) != width)) {
            PyErr_SetString(PyExc_TypeError, "flat() takes a list of tuples of one length");
            return NULL;
        }
        width = PyTuple_GET_SIZE(row);
    }
    PyObject *out = PyList_New(n / size);
    if (!out) return NULL;
    for (Py_ssize_t s = 0; s < n / size; s++) {
        PyObject *params = PyTuple_New(size * width);
        if (!params) { Py_DECREF(out); return NULL; }
        for (Py_ssize_t r = 0; r < size; r++) {
            PyObject *row = PyList_GET_ITEM(rows, s * size + r);
            for (Py_ssize_t k = 0; k < width; k++) {
                PyObject *v = PyTuple_GET_ITEM(row, k);
                Py_INCREF(v);
                PyTuple_SET_ITEM(params, r * width + k, v);
            }
        }
        PyList_SET_ITEM(out, s, params);
    }
    return out;
}

static PyMethodDef module_methods[] = {
    {"parse", py_parse, METH_VARARGS,
     "parse(request_bytes, latest) -> None | (report_refused, count, refused, accepted, records)."},
    {"link", py_link, METH_VARARGS, "link(accepted_records, heads) -> rows to insert."},
    {"copy_text", py_copy_text, METH_O, "copy_text(rows) -> COPY text payload | None."},
    {"flat", py_flat, METH_VARARGS, "flat(rows, size) -> rows' values, size rows per tuple."},
    {"redact", py_redact, METH_O, "audit.redact, compiled (for the differential tests)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_auditchain",
                                    "The compiled audit ingest step.", -1, module_methods};

PyMODINIT_FUNC PyInit__auditchain(void) {
    PyObject *hashlib = PyImport_ImportModule("hashlib");
    if (!hashlib) return NULL;
    sha256_empty = PyObject_CallMethod(hashlib, "sha256", NULL);
    Py_DECREF(hashlib);
    if (!sha256_empty || !(S_copy = PyUnicode_InternFromString("copy")) ||
        !(S_update = PyUnicode_InternFromString("update")) ||
        !(S_hexdigest = PyUnicode_InternFromString("hexdigest")))
        return NULL;
    return PyModule_Create(&module);
}
