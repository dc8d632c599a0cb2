/* The API-key Check decided in C, straight from the CheckRequest bytes (issue 19, item 3).
 *
 * sidecar/dataplane/fastcheck.py is its only caller and documents the contract. In short:
 * FastCheck(data) returns (response bytes, Decision, CheckInput, seconds) when it can decide
 * exactly as the pure-Python path would (Engine.check + ResponseEncoder), or None, and the
 * caller runs the pure-Python path: a fallback is always correct. A decision it also observed
 * itself (observe_in_c: metrics, the decision record, usage, a denial's log line) returns the
 * response bytes alone.
 * It decides a non-canonical path, a public route, a usable, unlimited API key or already
 * verified access token on a route (ok, no_route, operator_not_allowed, workspace_mismatch,
 * insufficient_scope), a well-formed API key the replica does not hold (unknown_credential)
 * and a key it holds but refuses (revoked_credential, suspended_credential, expired_credential
 * — a replaced key past its grace deadline, which the replica stores as its expiry; inside the
 * grace window it allows), the decisions with a side effect: the failure limiter's own
 * ``failed`` counts them (source, and the key id for a refused key), called from here once the
 * decision is certain (count_failures), and the 429 of a source that limiter blocked.
 * Everything else (tokens not verified yet, other credential failures, a blocked key id, client
 * networks, per-key rates, replica not ready, raw header_map, bytes protobuf might parse
 * differently, non-ASCII where Python would compare Unicode) returns None.
 *
 * Protobuf wire format: https://protobuf.dev/programming-guides/encoding/ . The walk follows the
 * schema of the messages on the way to the fields it needs and refuses (returns None for)
 * anything upb could read differently: a wire type that does not match a known field, groups,
 * a repeated singular message, varints over 10 bytes, invalid UTF-8 in a string field. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

/* ---------------------------------------------------------------- SHA-256 (FIPS 180-4) -- */

static const uint32_t K256[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
    0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
    0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
    0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
    0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
    0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
    0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha256_block(uint32_t h[8], const unsigned char *p) {
    uint32_t w[64], a, b, c, d, e, f, g, k, t1, t2;
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
               (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    a = h[0]; b = h[1]; c = h[2]; d = h[3]; e = h[4]; f = h[5]; g = h[6]; k = h[7];
    for (int i = 0; i < 64; i++) {
        t1 = k + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K256[i] + w[i];
        t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        k = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += k;
}

/* The same compression with the x86 SHA extensions (SHA-NI; AMD since Zen, Intel since Ice
 * Lake), chosen once at import by CPUID (sha_ni). Measured with perf in the loaded sidecar, a
 * cached token's SHA-256 through hashlib cost ≈ 3.7 µs per check, of which ≈ 1 µs was the
 * compression and the rest OpenSSL's EVP bookkeeping (context allocations, reference counts,
 * the copy digest() makes); here it is the compression alone, and no Python object is made.
 * The message schedule is FIPS 180-4 §6.2.2 four words at a time: sha256msg1 adds σ0(W[t-15])
 * to W[t-16], the W[t-7] words are added, sha256msg2 adds σ1(W[t-2]); each sha256rnds2 runs
 * two rounds on the state held as (ABEF, CDGH). */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>
#define HAVE_SHA_NI_CODE 1

__attribute__((target("sha,sse4.1,ssse3"))) static void
sha256_blocks_ni(uint32_t h[8], const unsigned char *p, size_t nblocks) {
    const __m128i swap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    __m128i tmp = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)&h[0]), 0xB1); /* CDAB */
    __m128i s1 = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)&h[4]), 0x1B);  /* EFGH */
    __m128i s0 = _mm_alignr_epi8(tmp, s1, 8);                                       /* ABEF */
    s1 = _mm_blend_epi16(s1, tmp, 0xF0);                                            /* CDGH */
    for (; nblocks; nblocks--, p += 64) {
        __m128i abef = s0, cdgh = s1, m[4];
        for (int i = 0; i < 16; i++) { /* rounds 4i .. 4i+3 */
            __m128i w;
            if (i < 4) {
                w = m[i] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(p + 16 * i)), swap);
            } else {
                __m128i x = _mm_sha256msg1_epu32(m[i & 3], m[(i - 3) & 3]);
                x = _mm_add_epi32(x, _mm_alignr_epi8(m[(i - 1) & 3], m[(i - 2) & 3], 4));
                w = m[i & 3] = _mm_sha256msg2_epu32(x, m[(i - 1) & 3]);
            }
            __m128i k = _mm_add_epi32(w, _mm_loadu_si128((const __m128i *)&K256[4 * i]));
            s1 = _mm_sha256rnds2_epu32(s1, s0, k);
            s0 = _mm_sha256rnds2_epu32(s0, s1, _mm_shuffle_epi32(k, 0x0E));
        }
        s0 = _mm_add_epi32(s0, abef);
        s1 = _mm_add_epi32(s1, cdgh);
    }
    tmp = _mm_shuffle_epi32(s0, 0x1B);                                  /* FEBA */
    s1 = _mm_shuffle_epi32(s1, 0xB1);                                   /* DCHG */
    _mm_storeu_si128((__m128i *)&h[0], _mm_blend_epi16(tmp, s1, 0xF0)); /* DCBA */
    _mm_storeu_si128((__m128i *)&h[4], _mm_alignr_epi8(s1, tmp, 8));    /* HGFE */
}

/* CPUID: SHA (leaf 7, EBX bit 29), SSSE3 and SSE4.1 (leaf 1, ECX bits 9 and 19). */
static int cpu_has_sha_ni(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 9)) || !(c & (1u << 19))) return 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    return (b >> 29) & 1;
}
#else
static int cpu_has_sha_ni(void) { return 0; }
#endif

static int sha_ni; /* set once at import: the CPU has the SHA extensions */

static void sha256_blocks(uint32_t h[8], const unsigned char *p, size_t nblocks, int ni) {
#ifdef HAVE_SHA_NI_CODE
    if (ni) { sha256_blocks_ni(h, p, nblocks); return; }
#endif
    for (; nblocks; nblocks--, p += 64) sha256_block(h, p);
}

/* SHA-256 of ``data``; ``ni``: with the SHA extensions (only when sha_ni says the CPU has them). */
static void sha256_with(const unsigned char *data, size_t n, unsigned char out[32], int ni) {
    uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                     0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    unsigned char tail[128];
    size_t full = n & ~(size_t)63, rest = n - full;
    sha256_blocks(h, data, full / 64, ni);
    memset(tail, 0, sizeof tail);
    memcpy(tail, data + full, rest);
    tail[rest] = 0x80;
    size_t end = rest < 56 ? 64 : 128;
    uint64_t bits = (uint64_t)n * 8;
    for (int i = 0; i < 8; i++) tail[end - 1 - i] = (unsigned char)(bits >> (8 * i));
    sha256_blocks(h, tail, end / 64, ni);
    for (int i = 0; i < 8; i++) {
        out[4 * i] = h[i] >> 24; out[4 * i + 1] = h[i] >> 16;
        out[4 * i + 2] = h[i] >> 8; out[4 * i + 3] = h[i];
    }
}

static void sha256(const unsigned char *data, size_t n, unsigned char out[32]) {
    sha256_with(data, n, out, sha_ni);
}

/* ------------------------------------------------------------------ the wire walk -------- */

typedef struct {
    const unsigned char *p;
    Py_ssize_t n;
} span;

#define MAX_ENTRIES 256 /* MAX_HEADERS: over it, Python refuses the request */

typedef struct {
    span key, value;
} entry;

typedef struct {
    span method, path, host, source;
    entry headers[MAX_ENTRIES];
    int nheaders;
    entry context[MAX_ENTRIES];
    int ncontext;
} request;

/* Field kinds of the schema walk. */
enum { K_VARINT, K_FIXED64, K_FIXED32, K_STRING, K_BYTES, K_EMPTY_ONLY, K_NEVER, K_MESSAGE };

typedef struct reader {
    const unsigned char *p, *end;
} reader;

static int read_varint(reader *r, uint64_t *out) {
    uint64_t v = 0;
    for (int i = 0; i < 10; i++) {
        if (r->p >= r->end) return -1;
        unsigned char b = *r->p++;
        v |= (uint64_t)(b & 0x7f) << (7 * i);
        if (!(b & 0x80)) {
            *out = v;
            return 0;
        }
    }
    return -1;
}

/* Eight bytes at a time (SWAR) for the ASCII fast paths below: a token request carries ~1.2 KB
 * of header text, walked for UTF-8, then its credential for printable ASCII and dots. */
#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL

static inline uint64_t load8(const unsigned char *p) {
    uint64_t w;
    memcpy(&w, p, 8);
    return w;
}

/* RFC 3629 UTF-8 (what upb requires of proto3 string fields): no overlongs, no surrogates,
 * nothing above U+10FFFF. */
static int valid_utf8(const unsigned char *s, Py_ssize_t n) {
    Py_ssize_t i = 0;
    while (i < n) {
        while (i + 8 <= n && !(load8(s + i) & HIGHS)) i += 8; /* ASCII: valid as it is */
        if (i >= n) break;
        unsigned char c = s[i];
        if (c < 0x80) { i++; continue; }
        int len;
        uint32_t cp;
        if (c >= 0xc2 && c <= 0xdf) { len = 2; cp = c & 0x1f; }
        else if (c >= 0xe0 && c <= 0xef) { len = 3; cp = c & 0x0f; }
        else if (c >= 0xf0 && c <= 0xf4) { len = 4; cp = c & 0x07; }
        else return 0;
        if (i + len > n) return 0;
        for (int k = 1; k < len; k++) {
            if ((s[i + k] & 0xc0) != 0x80) return 0;
            cp = cp << 6 | (s[i + k] & 0x3f);
        }
        if ((len == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
            (len == 4 && (cp < 0x10000 || cp > 0x10ffff)))
            return 0;
        i += len;
    }
    return 1;
}

/* One field: its number, wire type and (for length-delimited ones) payload. -1: malformed,
 * 0: end, 1: a field. Groups (wire types 3 and 4) count as malformed here: upb accepts them
 * as unknown fields, so the caller falls back. */
static int next_field(reader *r, uint32_t *number, int *wire, span *payload, uint64_t *value) {
    if (r->p >= r->end) return 0;
    uint64_t tag;
    if (read_varint(r, &tag) < 0) return -1;
    *number = (uint32_t)(tag >> 3);
    *wire = (int)(tag & 7);
    if (*number == 0 || tag >> 3 > 0x1fffffff) return -1;
    switch (*wire) {
    case 0:
        return read_varint(r, value) < 0 ? -1 : 1;
    case 1:
        if (r->end - r->p < 8) return -1;
        r->p += 8;
        return 1;
    case 5:
        if (r->end - r->p < 4) return -1;
        r->p += 4;
        return 1;
    case 2: {
        uint64_t n;
        if (read_varint(r, &n) < 0 || n > (uint64_t)(r->end - r->p)) return -1;
        payload->p = r->p;
        payload->n = (Py_ssize_t)n;
        r->p += n;
        return 1;
    }
    default:
        return -1;
    }
}

/* A field of a message walked for validity only: its kind, and for messages the sub-schema. */
typedef struct field_rule {
    uint32_t number;
    int kind;
    const struct field_rule *sub; /* K_MESSAGE: rules of the sub-message, ended by number 0 */
} field_rule;

static int check_kind(int kind, int wire) {
    switch (kind) {
    case K_VARINT: return wire == 0;
    case K_FIXED64: return wire == 1;
    case K_FIXED32: return wire == 5;
    default: return wire == 2;
    }
}

/* Whether ``s`` is a message protobuf reads exactly as the rules say (0 when in doubt). */
static int valid_message(span s, const field_rule *rules, int depth) {
    reader r = {s.p, s.p + s.n};
    uint32_t number;
    int wire, got;
    span payload;
    uint64_t value;
    if (depth > 8) return 0;
    while ((got = next_field(&r, &number, &wire, &payload, &value)) == 1) {
        const field_rule *rule = rules;
        while (rule->number && rule->number != number) rule++;
        if (!rule->number) continue; /* unknown field: kept by upb, no effect on reads */
        if (!check_kind(rule->kind, wire)) return 0;
        if (rule->kind == K_STRING && !valid_utf8(payload.p, payload.n)) return 0;
        if (rule->kind == K_EMPTY_ONLY && payload.n) return 0;
        if (rule->kind == K_NEVER) return 0;
        if (rule->kind == K_MESSAGE && !valid_message(payload, rule->sub, depth + 1)) return 0;
    }
    return got == 0;
}

static const field_rule MAP_STRING[] = {{1, K_STRING, NULL}, {2, K_STRING, NULL}, {0, 0, NULL}};
static const field_rule TIMESTAMP[] = {{1, K_VARINT, NULL}, {2, K_VARINT, NULL}, {0, 0, NULL}};
static const field_rule SOCKET_ADDRESS[] = {
    {1, K_VARINT, NULL}, {2, K_STRING, NULL}, {3, K_VARINT, NULL}, {4, K_STRING, NULL},
    {5, K_STRING, NULL}, {6, K_VARINT, NULL}, {7, K_STRING, NULL}, {0, 0, NULL}};
static const field_rule ADDRESS[] = {
    /* pipe and envoy_internal_address share a oneof with socket_address: not read here */
    {1, K_MESSAGE, SOCKET_ADDRESS}, {2, K_NEVER, NULL}, {3, K_NEVER, NULL},
    {0, 0, NULL}};
static const field_rule PEER[] = {
    {1, K_MESSAGE, ADDRESS}, {2, K_STRING, NULL}, {4, K_STRING, NULL}, {5, K_STRING, NULL},
    {3, K_MESSAGE, MAP_STRING}, {0, 0, NULL}};

/* Reads the fields the decision needs; 0 to fall back. */

static int read_entry(span s, entry *e) {
    reader r = {s.p, s.p + s.n};
    uint32_t number;
    int wire, got;
    span payload;
    uint64_t value;
    e->key.p = e->value.p = s.p;
    e->key.n = e->value.n = 0;
    while ((got = next_field(&r, &number, &wire, &payload, &value)) == 1) {
        /* upb moves a map entry with any other field (or a mismatched wire type) to the
         * parent's unknown fields: the entry is not in the map. Not modelled: fall back. */
        if ((number != 1 && number != 2) || wire != 2 || !valid_utf8(payload.p, payload.n))
            return 0;
        if (number == 1) e->key = payload;
        else e->value = payload;
    }
    return got == 0;
}

static int read_http(span s, request *q) {
    reader r = {s.p, s.p + s.n};
    uint32_t number;
    int wire, got;
    span payload;
    uint64_t value;
    while ((got = next_field(&r, &number, &wire, &payload, &value)) == 1) {
        switch (number) {
        case 2: case 4: case 5: /* method, path, host */
        case 1: case 6: case 7: case 8: case 10: case 11: /* id, scheme, query, ..., body */
            if (wire != 2 || !valid_utf8(payload.p, payload.n)) return 0;
            if (number == 2) q->method = payload;
            else if (number == 4) q->path = payload;
            else if (number == 5) q->host = payload;
            break;
        case 3: /* headers */
            if (wire != 2 || q->nheaders >= MAX_ENTRIES) return 0;
            if (!read_entry(payload, &q->headers[q->nheaders++])) return 0;
            break;
        case 9: /* size */
            if (wire != 0) return 0;
            break;
        case 12: /* raw_body */
            if (wire != 2) return 0;
            break;
        case 13: /* header_map: read by Python (merged duplicates, its own cap) */
            return 0;
        default:
            break;
        }
    }
    return got == 0;
}

static int read_source(span s, request *q) {
    /* Peer.address.socket_address.address; each level may appear once only (protobuf would
     * merge repeated occurrences). */
    reader r = {s.p, s.p + s.n};
    uint32_t number;
    int wire, got, seen_address = 0;
    span payload;
    uint64_t value;
    if (!valid_message(s, PEER, 0)) return 0;
    while ((got = next_field(&r, &number, &wire, &payload, &value)) == 1) {
        if (number != 1) continue;
        if (seen_address++) return 0;
        reader a = {payload.p, payload.p + payload.n};
        int seen_socket = 0;
        span sock;
        while ((got = next_field(&a, &number, &wire, &sock, &value)) == 1) {
            if (number != 1) continue;
            if (seen_socket++) return 0;
            reader t = {sock.p, sock.p + sock.n};
            span field;
            while ((got = next_field(&t, &number, &wire, &field, &value)) == 1)
                if (number == 2) q->source = field;
            if (got < 0) return 0;
        }
        if (got < 0) return 0;
    }
    return got == 0;
}

static int read_request(const unsigned char *data, Py_ssize_t n, request *q) {
    reader top = {data, data + n};
    uint32_t number;
    int wire, got, seen_attrs = 0;
    span attrs = {data, 0}, payload;
    uint64_t value;
    memset(q, 0, offsetof(request, headers));
    q->nheaders = q->ncontext = 0;
    q->method.p = q->path.p = q->host.p = q->source.p = data;
    while ((got = next_field(&top, &number, &wire, &payload, &value)) == 1) {
        if (number != 1) continue;
        if (wire != 2 || seen_attrs++) return 0;
        attrs = payload;
    }
    if (got < 0) return 0;
    if (!seen_attrs) return 0;
    reader r = {attrs.p, attrs.p + attrs.n};
    int seen_source = 0, seen_request = 0;
    while ((got = next_field(&r, &number, &wire, &payload, &value)) == 1) {
        switch (number) {
        case 1: /* source */
            if (wire != 2 || seen_source++ || !read_source(payload, q)) return 0;
            break;
        case 2: /* destination */
            if (wire != 2 || !valid_message(payload, PEER, 0)) return 0;
            break;
        case 4: { /* request: time = 1, http = 2 */
            if (wire != 2 || seen_request++) return 0;
            reader h = {payload.p, payload.p + payload.n};
            span sub;
            int seen_http = 0;
            while ((got = next_field(&h, &number, &wire, &sub, &value)) == 1) {
                if (number == 1 && (wire != 2 || !valid_message(sub, TIMESTAMP, 0))) return 0;
                if (number == 2 && (wire != 2 || seen_http++ || !read_http(sub, q))) return 0;
            }
            if (got < 0) return 0;
            break;
        }
        case 10: /* context_extensions */
            if (wire != 2 || q->ncontext >= MAX_ENTRIES) return 0;
            if (!read_entry(payload, &q->context[q->ncontext++])) return 0;
            break;
        case 11: case 12: case 13: /* metadata, TLS session, route metadata: only if empty */
            if (wire != 2 || payload.n) return 0;
            break;
        default:
            break;
        }
    }
    return got == 0;
}

/* ------------------------------------------------------------ paths and hosts ----------- */

static int span_eq(span s, const char *lit, Py_ssize_t n) {
    return s.n == n && memcmp(s.p, lit, (size_t)n) == 0;
}

static int printable_ascii(span s) {
    Py_ssize_t i = 0;
    /* A word passes when no byte has its high bit set, none is below 0x20 (the exact
     * "has a byte less than n" test) and none is 0x7f (adding 1 sets its high bit; a carry
     * out of a byte needs 0xff, refused by the first test already). */
    for (; i + 8 <= s.n; i += 8) {
        uint64_t w = load8(s.p + i);
        if ((w | ((w - ONES * 0x20) & ~w) | (w + ONES)) & HIGHS) return 0;
    }
    for (; i < s.n; i++)
        if (s.p[i] < 0x20 || s.p[i] > 0x7e) return 0;
    return 1;
}

/* sidecar.authz.paths.non_canonical on an ASCII path. */
static int non_canonical(span path) {
    const unsigned char *p = path.p;
    Py_ssize_t n = path.n;
    if (n == 0 || p[0] != '/') return 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (p[i] == ';' || p[i] == '\\') return 1;
        if (p[i] == '%') { /* %(25)*(2e|2f|5c), any case */
            Py_ssize_t j = i + 1;
            while (j + 1 < n && p[j] == '2' && p[j + 1] == '5') j += 2;
            if (j + 1 < n) {
                unsigned char a = p[j], b = p[j + 1] | 0x20;
                if ((a == '2' && (b == 'e' || b == 'f')) || (a == '5' && b == 'c')) return 1;
            }
        }
        if (p[i] == '/' && i + 1 < n && p[i + 1] == '.') { /* /.. or /. then / or end */
            Py_ssize_t j = i + 2;
            if (j < n && p[j] == '.') j++;
            if (j == n || p[j] == '/') return 1;
        }
    }
    return 0;
}

/* sidecar.authz.paths.canonical_host on an ASCII host, into buf (at most its length). */
static span canonical_host(span host, unsigned char *buf) {
    Py_ssize_t n = host.n;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = host.p[i];
        buf[i] = (c >= 'A' && c <= 'Z') ? c + 32 : c;
    }
    span out = {buf, n};
    if (n && buf[0] == '[') {
        for (Py_ssize_t i = 0; i < n; i++)
            if (buf[i] == ']') { out.n = i + 1; return out; }
        return out;
    }
    Py_ssize_t colon = -1;
    for (Py_ssize_t i = n - 1; i >= 0; i--)
        if (buf[i] == ':') { colon = i; break; }
    if (colon >= 0) {
        int digits = 1;
        for (Py_ssize_t i = colon + 1; i < n; i++)
            if (buf[i] < '0' || buf[i] > '9') { digits = 0; break; }
        if (digits) out.n = colon;
    }
    while (out.n && buf[out.n - 1] == '.') out.n--;
    return out;
}

/* ------------------------------------------------------------ the compiled policy ------- */

enum { T_LIT, T_ONE, T_WORKSPACE, T_REST };

typedef struct {
    int kind;
    PyObject *lit; /* bytes, T_LIT */
} token;

typedef struct {
    PyObject *methods; /* tuple of bytes, or None for any */
    PyObject *hosts;   /* tuple of bytes, or None for any */
    PyObject *context; /* tuple of (bytes, bytes) */
    token *tokens;
    int ntokens;
    int public_, binds, header_workspace;
    PyObject *scopes; /* tuple of str */
    PyObject *detail; /* str: ' '.join(scopes) */
    PyObject *scope_denial; /* cached pieces for insufficient_scope, or NULL */
} route;

static int bytes_eq(PyObject *b, span s) {
    return PyBytes_GET_SIZE(b) == s.n && memcmp(PyBytes_AS_STRING(b), s.p, (size_t)s.n) == 0;
}

static int in_tuple(PyObject *t, span s) {
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(t); i++)
        if (bytes_eq(PyTuple_GET_ITEM(t, i), s)) return 1;
    return 0;
}

/* The last entry named ``key`` (protobuf maps keep the last), or NULL. */
static const entry *lookup(const entry *entries, int n, const char *key, Py_ssize_t len) {
    for (int i = n - 1; i >= 0; i--)
        if (span_eq(entries[i].key, key, len)) return &entries[i];
    return NULL;
}

/* The route's path pattern (policy.compile_path's regex) on an ASCII path, no control
 * characters: each token after the first literal starts with '/', and [^/]+ stops at one, so
 * a left-to-right walk is the regex's fullmatch. */
static int path_matches(const route *rt, span path, span *workspace) {
    Py_ssize_t pos = 0, n = path.n;
    const unsigned char *p = path.p;
    for (int i = 0; i < rt->ntokens; i++) {
        const token *t = &rt->tokens[i];
        if (t->kind == T_LIT) {
            Py_ssize_t len = PyBytes_GET_SIZE(t->lit);
            if (n - pos < len || memcmp(p + pos, PyBytes_AS_STRING(t->lit), (size_t)len)) return 0;
            pos += len;
        } else if (t->kind == T_REST) {
            return pos == n || p[pos] == '/';
        } else {
            if (pos >= n || p[pos] != '/') return 0;
            Py_ssize_t start = ++pos;
            while (pos < n && p[pos] != '/') pos++;
            if (pos == start) return 0;
            if (t->kind == T_WORKSPACE) {
                workspace->p = p + start;
                workspace->n = pos - start;
            }
        }
    }
    return pos == n;
}

/* ------------------------------------------------------------ the object ---------------- */

/* D_UNKNOWN: a well-formed API key not in the replica (unknown_credential), counted by the
 * failure limiter from here (FastCheck.count_failures); D_BLOCKED: a check from a source the
 * limiter blocked (rate_limited, detail 'source'), which such failures lead to; D_REVOKED,
 * D_SUSPENDED, D_EXPIRED: a key the replica holds but refuses (revoked_credential,
 * suspended_credential, expired_credential: a replaced key past its grace deadline too),
 * counted against the source and the key id (refused_key). */
enum { D_OK, D_PUBLIC, D_NON_CANONICAL, D_NO_ROUTE, D_OPERATOR, D_WORKSPACE, D_SCOPE, D_UNKNOWN,
       D_BLOCKED, D_REVOKED, D_SUSPENDED, D_EXPIRED, D_COUNT };

/* A compiled policy: immutable once built, with its own response caches. A call holds a
 * reference to the one it started with, so a reload (set_policy, from another thread while
 * this one waits on Python code) never frees routes under it. */
typedef struct {
    PyObject_HEAD
    PyObject *policy; /* the Policy object it was compiled from */
    PyObject *header_names; /* tuple of bytes */
    PyObject *strip; /* the credential headers an allow removes upstream (template_fn's arg) */
    int allow_operator, any_hosts;
    route *routes;
    int nroutes;
    PyObject *allow_cache; /* id(identity) -> (identity, (id length, pieces)) */
    PyObject *denials[D_COUNT]; /* (id length, pieces) per reason without a per-route detail */
} Compiled;

typedef struct {
    PyObject_HEAD
    PyObject *engine, *replica, *clock, *blocked_sources, *blocked_keys;
    PyObject *decision_type, *input_type, *template_fn;
    PyObject *reasons[D_COUNT];
    PyObject *admin_full, *operator_ws, *api_key, *empty;
    int system_clock, system_random;
    double max_staleness;
    Compiled *compiled; /* NULL until set_policy */
    unsigned long long counts[2]; /* decided in C, fell back */
    struct observing *obs; /* the observers done here (observe_in_c), or NULL */
    PyObject *timer; /* what times a check (set_timer), NULL: the monotonic clock */
    /* count_failures: whether unknown keys are decided here, and the limiter's ``failed``
     * (None: no limiter) they are counted with. */
    int unknown_in_c;
    PyObject *failed;
    PyObject *source_detail; /* 'source': a blocked source's detail */
    /* verify_tokens, once: verify_fn(token, digest, now) -> the Identity of a token not cached,
     * verified as Engine._access_token does, or None (refused: the Python path answers);
     * build_fn(decision, strip) -> one allow's response, built once. NULL: an uncached token
     * falls back. Never changed once set: a check in flight may be inside either. */
    PyObject *verify_fn, *build_fn;
} FastCheck;

static PyObject *S_policy, *S_loaded, *S_last_contact, *S_now, *S_credential, *S_identity,
    *S_revoked, *S_suspended, *S_workspace, *S_scopes, *S_expires_at, *S_networks,
    *S_rate_limit, *S_kind, *S_next, *S_ids;

static void Compiled_dealloc(Compiled *self) {
    for (int i = 0; i < self->nroutes; i++) {
        route *rt = &self->routes[i];
        Py_XDECREF(rt->methods); Py_XDECREF(rt->hosts); Py_XDECREF(rt->context);
        Py_XDECREF(rt->scopes); Py_XDECREF(rt->detail); Py_XDECREF(rt->scope_denial);
        for (int k = 0; k < rt->ntokens; k++) Py_XDECREF(rt->tokens[k].lit);
        PyMem_Free(rt->tokens);
    }
    PyMem_Free(self->routes);
    Py_XDECREF(self->policy);
    Py_XDECREF(self->header_names);
    Py_XDECREF(self->strip);
    Py_XDECREF(self->allow_cache);
    for (int i = 0; i < D_COUNT; i++) Py_XDECREF(self->denials[i]);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject CompiledType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "sidecar.dataplane._fastcheck.Compiled",
    .tp_basicsize = sizeof(Compiled),
    .tp_dealloc = (destructor)Compiled_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A policy compiled for FastCheck.",
};

struct observing;
static void observing_free(struct observing *o);

static void FastCheck_dealloc(FastCheck *self) {
    Py_XDECREF(self->compiled);
    Py_XDECREF(self->engine); Py_XDECREF(self->replica); Py_XDECREF(self->clock);
    Py_XDECREF(self->blocked_sources); Py_XDECREF(self->blocked_keys);
    Py_XDECREF(self->decision_type); Py_XDECREF(self->input_type); Py_XDECREF(self->template_fn);
    for (int i = 0; i < D_COUNT; i++) Py_XDECREF(self->reasons[i]);
    Py_XDECREF(self->admin_full); Py_XDECREF(self->operator_ws); Py_XDECREF(self->api_key);
    Py_XDECREF(self->empty);
    observing_free(self->obs);
    Py_XDECREF(self->timer);
    Py_XDECREF(self->failed);
    Py_XDECREF(self->source_detail);
    Py_XDECREF(self->verify_fn); Py_XDECREF(self->build_fn);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* FastCheck(engine, replica, clock, blocked_sources, blocked_keys, decision_type, input_type,
 *           template_fn, reasons, system_clock, system_random, max_staleness) */
static int FastCheck_init(FastCheck *self, PyObject *args, PyObject *kwds) {
    PyObject *reasons;
    if (!PyArg_ParseTuple(args, "OOOOOOOOO!ppd", &self->engine, &self->replica, &self->clock,
                          &self->blocked_sources, &self->blocked_keys, &self->decision_type,
                          &self->input_type, &self->template_fn, &PyTuple_Type, &reasons,
                          &self->system_clock, &self->system_random, &self->max_staleness))
        return -1;
    if (PyTuple_GET_SIZE(reasons) != D_COUNT) {
        PyErr_Format(PyExc_ValueError, "reasons: %d expected", D_COUNT);
        return -1;
    }
    Py_INCREF(self->engine); Py_INCREF(self->replica); Py_INCREF(self->clock);
    Py_INCREF(self->blocked_sources); Py_INCREF(self->blocked_keys);
    Py_INCREF(self->decision_type); Py_INCREF(self->input_type); Py_INCREF(self->template_fn);
    for (int i = 0; i < D_COUNT; i++) {
        self->reasons[i] = PyTuple_GET_ITEM(reasons, i);
        Py_INCREF(self->reasons[i]);
    }
    self->admin_full = PyUnicode_InternFromString("admin:full");
    self->operator_ws = PyUnicode_InternFromString("*");
    self->api_key = PyUnicode_InternFromString("api_key");
    self->empty = PyUnicode_InternFromString("");
    self->source_detail = PyUnicode_InternFromString("source");
    return 0;
}

static int compile_tokens(route *rt, PyObject *tokens) {
    Py_ssize_t n = PyTuple_GET_SIZE(tokens);
    rt->tokens = PyMem_Calloc((size_t)(n ? n : 1), sizeof(token));
    if (!rt->tokens) return -1;
    rt->ntokens = (int)n;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *t = PyTuple_GET_ITEM(tokens, i);
        int kind;
        PyObject *lit;
        if (!PyArg_ParseTuple(t, "iS", &kind, &lit)) return -1;
        rt->tokens[i].kind = kind;
        rt->tokens[i].lit = lit;
        Py_INCREF(lit);
    }
    return 0;
}

/* set_policy(policy, header_names, allow_operator, routes, strip): routes are tuples of
 * (methods|None, hosts|None, context, tokens, public, binds, header_workspace, scopes, detail). */
static PyObject *FastCheck_set_policy(FastCheck *self, PyObject *args) {
    PyObject *policy, *names, *routes, *strip;
    int allow_operator;
    if (!PyArg_ParseTuple(args, "OO!pO!O!", &policy, &PyTuple_Type, &names, &allow_operator,
                          &PyTuple_Type, &routes, &PyTuple_Type, &strip))
        return NULL;
    Compiled *c = PyObject_New(Compiled, &CompiledType);
    if (!c) return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(routes);
    c->nroutes = 0;
    c->any_hosts = 0;
    c->allow_operator = allow_operator;
    c->policy = policy; Py_INCREF(policy);
    c->header_names = names; Py_INCREF(names);
    c->strip = strip; Py_INCREF(strip);
    for (int i = 0; i < D_COUNT; i++) c->denials[i] = NULL;
    c->allow_cache = PyDict_New();
    c->routes = PyMem_Calloc((size_t)(n ? n : 1), sizeof(route));
    if (!c->routes || !c->allow_cache) {
        Py_DECREF(c);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        route *rt = &c->routes[i];
        PyObject *tokens;
        c->nroutes = (int)i + 1;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(routes, i), "OOO!O!pppO!U", &rt->methods,
                              &rt->hosts, &PyTuple_Type, &rt->context, &PyTuple_Type, &tokens,
                              &rt->public_, &rt->binds, &rt->header_workspace, &PyTuple_Type,
                              &rt->scopes, &rt->detail)) {
            rt->methods = rt->hosts = rt->context = rt->scopes = rt->detail = NULL;
            Py_DECREF(c);
            return NULL;
        }
        Py_INCREF(rt->methods); Py_INCREF(rt->hosts); Py_INCREF(rt->context);
        Py_INCREF(rt->scopes); Py_INCREF(rt->detail);
        if (rt->hosts != Py_None) c->any_hosts = 1;
        if (compile_tokens(rt, tokens) < 0) {
            Py_DECREF(c);
            return NULL;
        }
    }
    Py_XSETREF(self->compiled, c);
    Py_RETURN_NONE;
}

static PyObject *FastCheck_counts(FastCheck *self, PyObject *unused) {
    return Py_BuildValue("KK", self->counts[0], self->counts[1]);
}

static PyObject *str_of(span s) { return PyUnicode_DecodeUTF8((const char *)s.p, s.n, NULL); }

static PyObject *entries_dict(const entry *entries, int n) {
    PyObject *d = PyDict_New();
    for (int i = 0; d && i < n; i++) {
        PyObject *k = str_of(entries[i].key), *v = k ? str_of(entries[i].value) : NULL;
        if (!v || PyDict_SetItem(d, k, v) < 0) Py_CLEAR(d);
        Py_XDECREF(k);
        Py_XDECREF(v);
    }
    return d;
}

static const char HEX[] = "0123456789abcdef";

/* Decision ids as sidecar/authz/decision.py DecisionIds.next makes them: "dec_", the Unix time
 * in milliseconds as 12 hex digits (48 bits, big-endian: text order is time order) and 96
 * random bits as 24 hex digits.
 *
 * The random bits come from a buffer of getrandom(2) bytes, 12 per id (one getrandom per id
 * cost ~0.3 us on the cached-token path). Safe because:
 * - threads: it is only touched with the GIL held (every caller builds Python objects), and
 *   this module's single-phase init keeps it out of subinterpreters with a GIL of their own; a
 *   free-threaded build (Py_GIL_DISABLED) has no GIL to rely on, so there it draws per id;
 * - fork: a pthread_atfork child handler (registered at import) wipes the buffer, so a child
 *   (``spauth sidecar --workers N``, os.fork) draws its own bytes and never hands out the
 *   parent's unused ones (tests/test_decision_ids.py forks for real);
 * - bytes are wiped as they are handed out: the buffer keeps only bytes no id has used yet. */
#define ID_RANDOM 12
#define ID_TEXT (4 + 12 + 2 * ID_RANDOM)
#ifndef Py_GIL_DISABLED
#define ID_POOL 4092 /* 341 ids per getrandom(2) */
static unsigned char id_pool[ID_POOL];
static size_t id_pool_left; /* unused bytes at the end of id_pool */

static void id_pool_forget(void) { /* the pthread_atfork child handler: async-signal-safe */
    memset(id_pool, 0, sizeof id_pool);
    id_pool_left = 0;
}
#endif

static int id_random(unsigned char out[ID_RANDOM]) {
#ifdef Py_GIL_DISABLED
    if (getrandom(out, ID_RANDOM, 0) != ID_RANDOM) { PyErr_SetFromErrno(PyExc_OSError); return -1; }
#else
    while (id_pool_left < ID_RANDOM) { /* a signal can cut a read over 256 bytes short */
        ssize_t got = getrandom(id_pool, sizeof id_pool, 0);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) { PyErr_SetFromErrno(PyExc_OSError); return -1; }
        id_pool_left = (size_t)got - (size_t)got % ID_RANDOM;
    }
    unsigned char *p = id_pool + id_pool_left - ID_RANDOM;
    memcpy(out, p, ID_RANDOM);
    memset(p, 0, ID_RANDOM);
    id_pool_left -= ID_RANDOM;
#endif
    return 0;
}

static PyObject *system_decision_id(void) {
    unsigned char raw[ID_RANDOM];
    char text[ID_TEXT];
    struct timespec ts;
    if (id_random(raw) < 0) return NULL;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t ms = ((uint64_t)(int64_t)ts.tv_sec * 1000 + (uint64_t)(ts.tv_nsec / 1000000)) &
                  0xffffffffffffULL;
    memcpy(text, "dec_", 4);
    for (int i = 0; i < 12; i++) text[4 + i] = HEX[(ms >> (44 - 4 * i)) & 15];
    for (int i = 0; i < ID_RANDOM; i++) {
        text[16 + 2 * i] = HEX[raw[i] >> 4];
        text[17 + 2 * i] = HEX[raw[i] & 15];
    }
    return PyUnicode_FromStringAndSize(text, sizeof text);
}

static PyObject *decision_id(FastCheck *self) {
    if (!self->system_random) { /* an injected random source or clock: DecisionIds decides */
        PyObject *ids = PyObject_GetAttr(self->engine, S_ids);
        if (!ids) return NULL;
        PyObject *did = PyObject_CallMethodNoArgs(ids, S_next);
        Py_DECREF(ids);
        return did;
    }
    return system_decision_id();
}

/* Pieces for ``decision`` from ``*slot`` (built by template_fn on a miss or when the id's
 * length changed); a new reference to a list, or to bytes (a whole response: no template). */
static PyObject *pieces_for(FastCheck *self, Compiled *c, PyObject **slot, PyObject *decision,
                            Py_ssize_t id_len) {
    PyObject *cached = *slot;
    if (cached && PyTuple_GET_SIZE(cached) == 2 &&
        PyLong_AsSsize_t(PyTuple_GET_ITEM(cached, 0)) == id_len) {
        PyObject *p = PyTuple_GET_ITEM(cached, 1);
        Py_INCREF(p);
        return p;
    }
    PyObject *built = PyObject_CallFunctionObjArgs(self->template_fn, decision, c->strip, NULL);
    if (!built || !PyList_Check(built)) return built;
    PyObject *entry = Py_BuildValue("(nO)", id_len, built);
    if (!entry) { Py_DECREF(built); return NULL; }
    Py_XSETREF(*slot, entry);
    return built;
}

static PyObject *join(PyObject *pieces, PyObject *did) {
    if (PyBytes_Check(pieces)) { Py_INCREF(pieces); return pieces; }
    Py_ssize_t idn;
    const char *id = PyUnicode_AsUTF8AndSize(did, &idn);
    if (!id) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(pieces), total = idn * (n - 1);
    for (Py_ssize_t i = 0; i < n; i++) total += PyBytes_GET_SIZE(PyList_GET_ITEM(pieces, i));
    PyObject *out = PyBytes_FromStringAndSize(NULL, total);
    if (!out) return NULL;
    char *w = PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *piece = PyList_GET_ITEM(pieces, i);
        if (i) { memcpy(w, id, (size_t)idn); w += idn; }
        memcpy(w, PyBytes_AS_STRING(piece), (size_t)PyBytes_GET_SIZE(piece));
        w += PyBytes_GET_SIZE(piece);
    }
    return out;
}

static double wall_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Attribute as a double (float or int), -1 with an exception set on failure. */
static int get_double(PyObject *o, PyObject *name, double *out) {
    PyObject *v = PyObject_GetAttr(o, name);
    if (!v) return -1;
    *out = PyFloat_AsDouble(v);
    Py_DECREF(v);
    return (*out == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

/* The decision for an authenticated, usable API key on the matched route (Engine._route):
 * its reason index and, for insufficient_scope, the route's detail. */
static int route_reason(FastCheck *self, const Compiled *c, const route *rt, span ws, PyObject *ident_ws,
                        PyObject *scopes, PyObject **detail) {
    *detail = self->empty;
    if (!rt) return D_NO_ROUTE;
    int cmp = PyUnicode_Compare(ident_ws, self->operator_ws);
    if (cmp == -1 && PyErr_Occurred()) return -1;
    if (cmp == 0) {
        if (!c->allow_operator) return D_OPERATOR;
    } else if (rt->binds) {
        Py_ssize_t n;
        const char *w = PyUnicode_AsUTF8AndSize(ident_ws, &n);
        if (!w) return -1;
        if (n != ws.n || memcmp(w, ws.p, (size_t)n)) return D_WORKSPACE;
    }
    int admin = PySet_Contains(scopes, self->admin_full);
    if (admin < 0) return -1;
    if (!admin) {
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(rt->scopes); i++) {
            int held = PySet_Contains(scopes, PyTuple_GET_ITEM(rt->scopes, i));
            if (held < 0) return -1;
            if (!held) { *detail = rt->detail; return D_SCOPE; }
        }
    }
    return D_OK;
}

typedef struct {
    int reason;
    const route *rt;
    PyObject *identity; /* borrowed from cred (kept alive by the caller) */
    PyObject *detail;
    /* 1: a token verified for this check (verify_fn), answered once: no per-identity
     * template or observer entry is kept for it (the next check of the token may bring a new,
     * equal Identity: the cache off, or the token cached only from now on). */
    int fresh;
} outcome;

/* ---------------------------------------------- bearer access tokens (verified before) -- */

static PyObject *S_cached_token, *S_access_token, *S_digest;
static PyObject *hashlib_sha256; /* hashlib.sha256 (OpenSSL's) */

/* Engine._authenticate: a credential that is not an API key and has exactly two dots is an
 * access token (a JWS compact serialization). */
static int token_shaped(span token) {
    const unsigned char *p = token.p, *end = token.p + token.n;
    int dots = 0;
    while (dots < 3 && (p = memchr(p, '.', (size_t)(end - p)))) { dots++; p++; }
    return dots == 2;
}

/* SHA-256 of a token as bytes. An access token is ≈ 700 bytes, a dozen blocks: with the SHA
 * extensions the carried one hashes it (no Python object for the token); without them
 * hashlib's (OpenSSL) is several times faster than the portable loop on that length, calls
 * included, and hashes it, the token's bytes in a temporary object dropped at once. An API key
 * is one block: always the carried one. */
static PyObject *token_digest(span token) {
    if (sha_ni) {
        unsigned char digest[32];
        sha256(token.p, (size_t)token.n, digest);
        return PyBytes_FromStringAndSize((const char *)digest, 32);
    }
    PyObject *data = PyBytes_FromStringAndSize((const char *)token.p, token.n);
    if (!data) return NULL;
    PyObject *hash = PyObject_CallOneArg(hashlib_sha256, data);
    Py_DECREF(data);
    if (!hash) return NULL;
    PyObject *digest = PyObject_CallMethodNoArgs(hash, S_digest);
    Py_DECREF(hash);
    return digest;
}

/* Engine.cached_token(digest, now): the Identity of a token this sidecar verified before and
 * whose cached verification still holds (not expired, its signing key still in the replica,
 * neither its grant nor its jti revoked), or None: a miss, or anything the Python path must
 * refuse, count or verify again. The digest is the token cache's key (SHA-256 of the token's
 * ASCII bytes, as Engine._access_token computes it); the token itself never leaves the stack. */
static PyObject *cached_token(FastCheck *self, PyObject *digest, double now) {
    PyObject *when = PyFloat_FromDouble(now);
    if (!when) return NULL;
    PyObject *found = PyObject_CallMethodObjArgs(self->engine, S_cached_token, digest, when, NULL);
    Py_DECREF(when);
    return found;
}

/* verify_fn(token, digest, now) for a token the cache did not answer: its Identity when the
 * engine holds no entry for it and it verifies and is not revoked (Engine.fresh_token: the
 * engine's own rule, which caches it when the engine caches tokens), or None: a cached token
 * no longer usable, or a refusal, which the Python path answers (and counts). The token is a
 * str object only for that call, dropped at once; it is in no record, log line or answer. */
static PyObject *verified_token(FastCheck *self, span token, PyObject *digest, double now) {
    PyObject *verify = self->verify_fn;
    Py_INCREF(verify);
    PyObject *text = PyUnicode_DecodeASCII((const char *)token.p, token.n, NULL);
    PyObject *when = text ? PyFloat_FromDouble(now) : NULL;
    PyObject *found = when ? PyObject_CallFunctionObjArgs(verify, text, digest, when, NULL)
                           : NULL;
    Py_XDECREF(when);
    Py_XDECREF(text);
    Py_DECREF(verify);
    return found;
}

/* WindowRateLimiter.source_blocked, as Engine._decide asks it: 1 when the request's source is
 * in the blocked table with an ``until`` still ahead of ``now`` (answered 429 here once
 * count_failures is set up, else by Python), 0 when not, 2 in doubt (a source that is not
 * UTF-8: the check falls back), -1 on error. Only a blocked source's own checks are refused:
 * other sources stay on this path while one address is blocked. */
static int source_blocked(FastCheck *self, const request *q, double now) {
    if (!PyDict_GET_SIZE(self->blocked_sources) || !q->source.n) return 0;
    PyObject *name = str_of(q->source);
    if (!name) { PyErr_Clear(); return 2; }
    PyObject *until = PyDict_GetItemWithError(self->blocked_sources, name); /* borrowed */
    Py_DECREF(name);
    if (!until) return PyErr_Occurred() ? -1 : 0;
    Py_INCREF(until);
    double u = PyFloat_AsDouble(until);
    Py_DECREF(until);
    if (u == -1.0 && PyErr_Occurred()) return -1;
    return now < u;
}

/* WindowRateLimiter.key_blocked, as Engine._limited asks it for an authenticated identity: 1
 * when the identity's id is blocked with an ``until`` still ahead of ``now`` (the check falls
 * back: Python answers it 429), 0 when not, -1 on error. Only a blocked key's checks fall back,
 * not every key's while one is blocked. */
static int key_blocked(FastCheck *self, PyObject *ident, double now) {
    if (!PyDict_GET_SIZE(self->blocked_keys)) return 0;
    PyObject *id = PyObject_GetAttrString(ident, "id");
    if (!id) return -1;
    PyObject *until = PyDict_GetItemWithError(self->blocked_keys, id); /* borrowed */
    Py_XINCREF(until);
    Py_DECREF(id);
    if (!until) return PyErr_Occurred() ? -1 : 0;
    double u = PyFloat_AsDouble(until);
    Py_DECREF(until);
    if (u == -1.0 && PyErr_Occurred()) return -1;
    return now < u;
}

/* ------------------------------------------- unknown API keys, counted from here ------- */

/* sidecar.core.keyformat.is_well_formed on printable ASCII: 'spk_', 32 + 6 base62 characters,
 * the last six the base62 digits (most significant first) of the CRC-32 (zlib's) of the rest. */
#define KEY_LENGTH 42
#define KEY_BODY 36

static int base62_digit(unsigned char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'Z') return c - 'A' + 10;
    if (c >= 'a' && c <= 'z') return c - 'a' + 36;
    return -1;
}

static int well_formed_key(span token) {
    if (token.n != KEY_LENGTH || memcmp(token.p, "spk_", 4)) return 0;
    for (Py_ssize_t i = 4; i < KEY_LENGTH; i++)
        if (base62_digit(token.p[i]) < 0) return 0;
    uint32_t crc = 0xffffffffu;
    for (Py_ssize_t i = 0; i < KEY_BODY; i++) {
        crc ^= token.p[i];
        for (int k = 0; k < 8; k++) crc = (crc >> 1) ^ (0xedb88320u & (0u - (crc & 1)));
    }
    uint64_t sum = 0;
    for (Py_ssize_t i = KEY_BODY; i < KEY_LENGTH; i++)
        sum = sum * 62 + (uint64_t)base62_digit(token.p[i]);
    return sum == (uint64_t)(crc ^ 0xffffffffu);
}

/* Engine._failed's count: the limiter's own ``failed(source, key_id, now)`` (key_id: '' for a
 * key the replica does not hold), once. 0: counted (or no limiter), 1: fall back (a source that
 * is not UTF-8: Python decides and counts), -1: error. */
static int count_failure(FastCheck *self, const request *q, PyObject *key_id, double now) {
    PyObject *failed = Py_NewRef(self->failed); /* held: count_failures may replace it */
    int rc = 0;
    if (failed != Py_None) {
        PyObject *source = str_of(q->source);
        PyObject *when = source ? PyFloat_FromDouble(now) : NULL;
        PyObject *done =
            when ? PyObject_CallFunctionObjArgs(failed, source, key_id, when, NULL) : NULL;
        if (!source) { PyErr_Clear(); rc = 1; }
        else if (!done) rc = -1;
        Py_XDECREF(done);
        Py_XDECREF(when);
        Py_XDECREF(source);
    }
    Py_DECREF(failed);
    return rc;
}

/* Engine._api_key's miss and Engine._failed for it: a well-formed key not in the replica is
 * unknown_credential, counted against the request's source by the limiter's own ``failed``
 * (source, no key id, the check's ``now``), exactly once, after everything that could still
 * hand the check over (so a check handed to Python is never counted twice). 0: decided (*out),
 * 1: fall back (not set up, or malformed: Python decides and counts), -1: error. The block a
 * count may start applies from the next check on, as in Python (source_blocked above). */
static int unknown_key(FastCheck *self, const request *q, span token, double now,
                       outcome *out) {
    if (!self->unknown_in_c || !well_formed_key(token)) return 1;
    int counted = count_failure(self, q, self->empty, now);
    if (counted) return counted;
    out->reason = D_UNKNOWN;
    out->identity = NULL;
    out->detail = self->empty;
    return 0;
}

/* Engine._failed for a key the replica holds and Engine._api_key refuses (``reason``: revoked,
 * suspended or expired, in that order): unless the key id is blocked (then Python answers its
 * 429), the limiter's own ``failed`` counts it against the request's source and the key id
 * (source, identity.id, the check's ``now``), exactly once, after everything that could still
 * hand the check over; the denial carries the identity, as in Python. 0: decided (*out), 1:
 * fall back (not set up, not an API key's identity, a blocked key id), -1: error. */
static int refused_key(FastCheck *self, const request *q, PyObject *ident, int reason,
                       double now, outcome *out) {
    if (!self->unknown_in_c) return 1;
    PyObject *kind = PyObject_GetAttr(ident, S_kind);
    if (!kind) return -1;
    int is_key = PyUnicode_Check(kind) && PyUnicode_Compare(kind, self->api_key) == 0;
    Py_DECREF(kind);
    if (!is_key) return PyErr_Occurred() ? -1 : 1;
    if (self->failed != Py_None) {
        int key_is_blocked = key_blocked(self, ident, now);
        if (key_is_blocked) return key_is_blocked;
        PyObject *id = PyObject_GetAttrString(ident, "id");
        if (!id) return -1;
        int counted = PyUnicode_Check(id) ? count_failure(self, q, id, now) : 1;
        Py_DECREF(id);
        if (counted) return counted;
    }
    out->reason = reason;
    out->identity = ident;
    out->detail = self->empty;
    return 0;
}

/* count_failures(failed | None): decide unknown API keys here from now on, counting each with
 * ``failed(source, key_id, now)`` (WindowRateLimiter.failed; None: the engine has no limiter). */
static PyObject *FastCheck_count_failures(FastCheck *self, PyObject *failed) {
    if (failed != Py_None && !PyCallable_Check(failed)) {
        PyErr_SetString(PyExc_TypeError, "count_failures: a callable or None expected");
        return NULL;
    }
    Py_INCREF(failed);
    Py_XSETREF(self->failed, failed);
    self->unknown_in_c = 1;
    Py_RETURN_NONE;
}

/* Authenticate the API key or cached access token in ``value`` and decide the route;
 * 0: decided (in *out), 1: fall back, -1: error. ``*cred`` is a new reference when set. */
static int authenticate(FastCheck *self, const Compiled *c, const request *q, span value, const route *rt,
                        span ws, PyObject **cred, outcome *out) {
    /* Engine._credential: the first configured header present; 'authorization' must be
     * 'Bearer <token>'. Anything else (a malformed or missing credential) counts as a
     * failure in Python: fall back. */
    span token = value;
    if (!printable_ascii(value)) return 1;
    if (out->reason == -2) { /* the authorization header */
        Py_ssize_t sp = 0;
        while (sp < value.n && value.p[sp] != ' ') sp++;
        if (sp != 6 || sp == value.n) return 1;
        static const char bearer[] = "bearer";
        for (int i = 0; i < 6; i++)
            if ((value.p[i] | 0x20) != bearer[i]) return 1;
        token.p = value.p + 7;
        token.n = value.n - 7;
    }
    while (token.n && token.p[0] == ' ') { token.p++; token.n--; }
    while (token.n && token.p[token.n - 1] == ' ') token.n--;
    if (token.n < 4 || token.n > 8192) return 1;
    int bearer = memcmp(token.p, "spk_", 4) != 0; /* an access token, not an API key */
    if (bearer && !token_shaped(token)) return 1;
    /* Engine._decide: readiness, then the source's block. */
    PyObject *loaded = PyObject_GetAttr(self->replica, S_loaded);
    if (!loaded) return -1;
    int is_loaded = loaded == Py_True;
    Py_DECREF(loaded);
    if (!is_loaded) return 1;
    double now;
    if (self->system_clock) now = wall_now();
    else {
        PyObject *v = PyObject_CallMethodNoArgs(self->clock, S_now);
        if (!v) return -1;
        now = PyFloat_AsDouble(v);
        Py_DECREF(v);
        if (now == -1.0 && PyErr_Occurred()) return -1;
    }
    if (self->max_staleness) {
        double last;
        if (get_double(self->replica, S_last_contact, &last) < 0) return -1;
        if (now - last > self->max_staleness) return 1;
    }
    int blocked = source_blocked(self, q, now);
    if (blocked < 0) return -1;
    if (blocked == 1 && self->unknown_in_c) { /* Engine._decide: 429 before the key is read */
        out->reason = D_BLOCKED;
        out->identity = NULL;
        out->detail = self->source_detail;
        return 0;
    }
    if (blocked) return 1;
    unsigned char digest[32];
    PyObject *db;
    if (bearer) db = token_digest(token);
    else {
        sha256(token.p, (size_t)token.n, digest);
        db = PyBytes_FromStringAndSize((const char *)digest, 32);
    }
    if (!db) return -1;
    PyObject *found = bearer ? cached_token(self, db, now)
                             : PyObject_CallMethodOneArg(self->replica, S_credential, db);
    if (found == Py_None && bearer && self->verify_fn) {
        /* Not cached: verified here, by the engine's own rule. */
        Py_DECREF(found);
        found = verified_token(self, token, db, now);
        out->fresh = 1;
    }
    Py_DECREF(db);
    if (!found) return -1;
    if (found == Py_None) {
        Py_DECREF(found);
        return bearer ? 1 : unknown_key(self, q, token, now, out);
    }
    *cred = found;
    PyObject *ident = found; /* a token's lookup answers its Identity */
    if (!bearer) {
        /* Engine._api_key: revoked, suspended or expired keys are failures, counted against
         * the source and the key id (refused_key); client networks and a per-key rate (both
         * need the limiter or the source), and a blocked key id fall back. */
        PyObject *revoked = PyObject_GetAttr(found, S_revoked);
        if (!revoked) return -1;
        int r1 = PyObject_IsTrue(revoked);
        Py_DECREF(revoked);
        PyObject *suspended = PyObject_GetAttr(found, S_suspended);
        if (!suspended) return -1;
        int r2 = PyObject_IsTrue(suspended);
        Py_DECREF(suspended);
        if (r1 < 0 || r2 < 0) return -1;
        ident = PyObject_GetAttr(found, S_identity);
        if (!ident) return -1;
        Py_DECREF(ident); /* kept alive by the credential */
        if (r1 || r2) return refused_key(self, q, ident, r1 ? D_REVOKED : D_SUSPENDED, now, out);
    }
    double expires;
    if (get_double(ident, S_expires_at, &expires) < 0) return -1;
    if (expires <= now) return bearer ? 1 : refused_key(self, q, ident, D_EXPIRED, now, out);
    PyObject *networks = PyObject_GetAttr(ident, S_networks);
    if (!networks) return -1;
    int any_networks = PyObject_IsTrue(networks);
    Py_DECREF(networks);
    PyObject *rate = PyObject_GetAttr(ident, S_rate_limit);
    if (!rate) return -1;
    int any_rate = PyObject_IsTrue(rate);
    Py_DECREF(rate);
    if (any_networks < 0 || any_rate < 0) return -1;
    if (any_networks || any_rate) return 1;
    int key_is_blocked = key_blocked(self, ident, now);
    if (key_is_blocked) return key_is_blocked;
    PyObject *kind = PyObject_GetAttr(ident, S_kind);
    if (!kind) return -1;
    PyObject *expected = bearer ? S_access_token : self->api_key;
    int is_key = PyUnicode_Check(kind) && PyUnicode_Compare(kind, expected) == 0;
    Py_DECREF(kind);
    if (!is_key) return 1;
    PyObject *ws_obj = PyObject_GetAttr(ident, S_workspace);
    PyObject *scopes = ws_obj ? PyObject_GetAttr(ident, S_scopes) : NULL;
    if (!scopes || !PyUnicode_Check(ws_obj) || !PyAnySet_Check(scopes)) {
        Py_XDECREF(ws_obj);
        Py_XDECREF(scopes);
        return PyErr_Occurred() ? -1 : 1;
    }
    out->reason = route_reason(self, c, rt, ws, ws_obj, scopes, &out->detail);
    out->identity = ident;
    Py_DECREF(ws_obj);
    Py_DECREF(scopes);
    return out->reason < 0 ? -1 : 0;
}

/* The first route whose methods, hosts, context and path match (Policy.match), or NULL. */
static const route *match_route(const Compiled *c, const request *q, span path, span *ws,
                                int *too_long) {
    unsigned char hostbuf[1024] = {0};
    span host = {NULL, 0};
    *too_long = 0;
    if (c->any_hosts) {
        if (q->host.n > (Py_ssize_t)sizeof hostbuf) { *too_long = 1; return NULL; }
        host = canonical_host(q->host, hostbuf);
    }
    for (int i = 0; i < c->nroutes; i++) {
        const route *rt = &c->routes[i];
        if (rt->methods != Py_None && !in_tuple(rt->methods, q->method)) continue;
        if (rt->hosts != Py_None && !in_tuple(rt->hosts, host)) continue;
        int ok = 1;
        for (Py_ssize_t k = 0; ok && k < PyTuple_GET_SIZE(rt->context); k++) {
            PyObject *pair = PyTuple_GET_ITEM(rt->context, k);
            PyObject *key = PyTuple_GET_ITEM(pair, 0);
            const entry *e =
                lookup(q->context, q->ncontext, PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key));
            ok = e && bytes_eq(PyTuple_GET_ITEM(pair, 1), e->value);
        }
        if (ok && path_matches(rt, path, ws)) return rt;
    }
    return NULL;
}

/* Decide, or fall back: 0 decided (*out), 1 fall back, -1 error. ``*cred`` is a new
 * reference when set (it keeps out->identity alive). */
static int decide(FastCheck *self, Compiled *c, const request *q, outcome *out,
                  PyObject **cred) {
    span path = q->path, ws = {NULL, 0};
    for (Py_ssize_t i = 0; i < path.n; i++)
        if (path.p[i] == '?') { path.n = i; break; }
    if (non_canonical(path)) { out->reason = D_NON_CANONICAL; return 0; }
    int too_long;
    out->rt = match_route(c, q, path, &ws, &too_long);
    if (too_long || (out->rt && out->rt->header_workspace)) return 1;
    if (out->rt && out->rt->public_) { out->reason = D_PUBLIC; return 0; }
    const entry *e = NULL;
    for (Py_ssize_t i = 0; !e && i < PyTuple_GET_SIZE(c->header_names); i++) {
        PyObject *name = PyTuple_GET_ITEM(c->header_names, i);
        e = lookup(q->headers, q->nheaders, PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name));
        if (e && span_eq(e->key, "authorization", 13)) out->reason = -2;
    }
    if (!e) return 1; /* no credential: Python answers */
    return authenticate(self, c, q, e->value, out->rt, ws, cred, out);
}

/* The response for ``decision``: pieces from the compiled policy's caches, joined with the id. */
static PyObject *respond(FastCheck *self, Compiled *c, const outcome *out, PyObject *decision,
                         PyObject *did) {
    PyObject *pieces = NULL;
    Py_ssize_t id_len = PyUnicode_GET_LENGTH(did);
    if (out->reason == D_OK && out->fresh) { /* answered once: one build, nothing kept */
        PyObject *build = self->build_fn;
        Py_INCREF(build);
        PyObject *built = PyObject_CallFunctionObjArgs(build, decision, c->strip, NULL);
        Py_DECREF(build);
        if (built && !PyBytes_CheckExact(built)) {
            Py_DECREF(built);
            PyErr_SetString(PyExc_TypeError, "build_fn must return bytes");
            return NULL;
        }
        return built;
    } else if (out->reason == D_OK) {
        PyObject *ident = out->identity;
        PyObject *key = PyLong_FromVoidPtr(ident);
        if (!key) return NULL;
        PyObject *slot = PyDict_GetItemWithError(c->allow_cache, key);
        PyObject *entry = NULL; /* (id length, pieces) when built for this very identity */
        if (slot && PyTuple_GET_ITEM(slot, 0) == ident) entry = PyTuple_GET_ITEM(slot, 1);
        else if (PyErr_Occurred()) { Py_DECREF(key); return NULL; }
        Py_XINCREF(entry);
        PyObject *before = entry;
        pieces = pieces_for(self, c, &entry, decision, id_len);
        if (pieces && entry != before) {
            if (PyDict_GET_SIZE(c->allow_cache) >= 100000) PyDict_Clear(c->allow_cache);
            PyObject *value = PyTuple_Pack(2, ident, entry);
            if (!value || PyDict_SetItem(c->allow_cache, key, value) < 0) Py_CLEAR(pieces);
            Py_XDECREF(value);
        }
        Py_XDECREF(entry);
        Py_DECREF(key);
    } else if (out->reason == D_SCOPE) {
        pieces = pieces_for(self, c, &((route *)out->rt)->scope_denial, decision, id_len);
    } else {
        pieces = pieces_for(self, c, &c->denials[out->reason], decision, id_len);
    }
    if (!pieces) return NULL;
    PyObject *response = join(pieces, did);
    Py_DECREF(pieces);
    return response;
}

/* ------------------------------------------- decisions observed in C (issue 19) --------- */

/* AuditBuffer: the audit queue's storage (sidecar.auditship.queue.AuditQueue.use_store): the
 * records in the order accepted, under DequeStore's capacity and deny-headroom rules, the
 * decision records the C path encoded kept as bytes in an arena (no Python object until the
 * writer drains them). Each operation runs under the GIL and calls no Python code, so it needs
 * no lock of its own. */

typedef struct {
    PyObject *item; /* a queued Python object, or NULL: the arena's bytes [off, off + len) */
    Py_ssize_t off, len;
    char allowed, alive;
} qentry;

typedef struct {
    PyObject_HEAD
    Py_ssize_t capacity, deny_limit;
    qentry *entries;
    Py_ssize_t n, size, oldest_allow, allows, denies;
    char *arena;
    Py_ssize_t used, arena_size;
    unsigned long long accepted, dropped_allows, dropped_denials;
} AuditBuffer;

static void AuditBuffer_clear(AuditBuffer *b) {
    for (Py_ssize_t i = 0; i < b->n; i++) Py_CLEAR(b->entries[i].item);
    b->n = b->oldest_allow = b->allows = b->denies = b->used = 0;
}

static void AuditBuffer_dealloc(AuditBuffer *b) {
    AuditBuffer_clear(b);
    PyMem_Free(b->entries);
    PyMem_Free(b->arena);
    Py_TYPE(b)->tp_free((PyObject *)b);
}

static int AuditBuffer_init(AuditBuffer *b, PyObject *args, PyObject *kwds) {
    if (!PyArg_ParseTuple(args, "nn", &b->capacity, &b->deny_limit)) return -1;
    if (b->capacity < 1 || b->deny_limit < b->capacity) {
        PyErr_SetString(PyExc_ValueError, "capacity >= 1 and deny_limit >= capacity expected");
        return -1;
    }
    return 0;
}

/* Room for one more record (DequeStore._put_allow / _put_deny): 1 when it may be appended,
 * 0 when it is dropped (counted). A denial in a full queue pushes out the oldest allow, whose
 * object goes to *gone (released by the caller once the new record is in: no Python code
 * runs in between). */
static int buffer_admit(AuditBuffer *b, int allowed, PyObject **gone) {
    if (b->allows + b->denies < b->capacity) return 1;
    if (allowed) {
        b->dropped_allows++;
        return 0;
    }
    if (b->allows) {
        while (!(b->entries[b->oldest_allow].alive && b->entries[b->oldest_allow].allowed))
            b->oldest_allow++;
        qentry *e = &b->entries[b->oldest_allow++];
        *gone = e->item;
        e->item = NULL;
        e->alive = 0;
        b->allows--;
        b->dropped_allows++;
        b->accepted--;
        return 1;
    }
    if (b->denies >= b->deny_limit) {
        b->dropped_denials++;
        return 0;
    }
    return 1;
}

static qentry *buffer_append(AuditBuffer *b, int allowed) {
    if (b->n == b->size) {
        Py_ssize_t size = b->size ? 2 * b->size : 256;
        qentry *grown = PyMem_Realloc(b->entries, (size_t)size * sizeof(qentry));
        if (!grown) return (qentry *)PyErr_NoMemory();
        b->entries = grown;
        b->size = size;
    }
    qentry *e = &b->entries[b->n++];
    e->item = NULL;
    e->off = e->len = 0;
    e->allowed = (char)allowed;
    e->alive = 1;
    if (allowed) b->allows++;
    else b->denies++;
    b->accepted++;
    return e;
}

/* ``n`` bytes at the arena's end, or NULL (MemoryError set). */
static char *buffer_reserve(AuditBuffer *b, Py_ssize_t n) {
    if (b->used + n > b->arena_size) {
        Py_ssize_t size = b->arena_size ? b->arena_size : 1 << 16;
        while (size < b->used + n) size *= 2;
        char *grown = PyMem_Realloc(b->arena, (size_t)size);
        if (!grown) return (char *)PyErr_NoMemory();
        b->arena = grown;
        b->arena_size = size;
    }
    return b->arena + b->used;
}

static PyObject *AuditBuffer_put(AuditBuffer *b, PyObject *args) {
    PyObject *item;
    int allowed;
    PyObject *gone = NULL;
    if (!PyArg_ParseTuple(args, "Op", &item, &allowed)) return NULL;
    if (!buffer_admit(b, allowed, &gone)) Py_RETURN_FALSE;
    qentry *e = buffer_append(b, allowed);
    if (e) {
        e->item = item;
        Py_INCREF(item);
    }
    Py_XDECREF(gone);
    if (!e) return NULL;
    Py_RETURN_TRUE;
}

/* drain() -> [(item, allowed)...] in the order accepted; the C path's records as bytes. */
static PyObject *AuditBuffer_drain(AuditBuffer *b, PyObject *unused) {
    Py_ssize_t live = b->allows + b->denies, k = 0;
    PyObject *out = PyList_New(live);
    if (!out) return NULL;
    for (Py_ssize_t i = 0; i < b->n && k < live; i++) {
        qentry *e = &b->entries[i];
        if (!e->alive) continue;
        PyObject *item = e->item;
        e->item = NULL;
        if (!item) item = PyBytes_FromStringAndSize(b->arena + e->off, e->len);
        PyObject *pair = item ? PyTuple_New(2) : NULL;
        if (!pair) {
            Py_XDECREF(item);
            Py_DECREF(out);
            AuditBuffer_clear(b);
            return NULL;
        }
        PyObject *flag = e->allowed ? Py_True : Py_False;
        Py_INCREF(flag);
        PyTuple_SET_ITEM(pair, 0, item);
        PyTuple_SET_ITEM(pair, 1, flag);
        PyList_SET_ITEM(out, k++, pair);
    }
    AuditBuffer_clear(b);
    if (b->arena_size > (8 << 20)) { /* a burst grew it: give the memory back */
        PyMem_Free(b->arena);
        b->arena = NULL;
        b->arena_size = 0;
    }
    return out;
}

/* The spool's framing (sidecar/auditship/_frames.c ``frame_into``, zlib's CRC-32), looked up
 * once; NULL when that module is not built (drain_frames then answers None). */
typedef void (*frame_into_fn)(const unsigned char *, Py_ssize_t, unsigned char *);
static frame_into_fn frame_into;
static int frame_into_looked_up;

/* Below this many framed bytes drain_frames frames under the GIL (≈ 3 µs for a 10 ms tick's
 * ten records); from it on it answers None and the writer drains the records as objects,
 * sidecar/auditship/spool.py ``frames`` then copying them without the GIL. */
#define DRAIN_FRAMES_MAX (64 * 1024)

/* drain_frames() -> (bytes, count) | None: everything queued, framed as the spool stores it —
 * the bytes of spool.frames([payload of each drain() item]) — and how many records, when every
 * queued record is already its payload: one the C path encoded or a bytes object (no bytes
 * object, tuple or list per record: the audit writer's 10 ms tick, issue #19). None, leaving
 * the queue as it is, when an event or a PendingDecision is queued (the writer encodes those),
 * the frames would reach DRAIN_FRAMES_MAX, or the framing module is not built. */
static PyObject *AuditBuffer_drain_frames(AuditBuffer *b, PyObject *unused) {
    if (!frame_into_looked_up) {
        frame_into_looked_up = 1;
        frame_into = (frame_into_fn)PyCapsule_Import("sidecar.auditship._frames.frame_into", 0);
        if (!frame_into) PyErr_Clear();
    }
    if (!frame_into) Py_RETURN_NONE;
    Py_ssize_t live = b->allows + b->denies, k = 0, total = 0;
    for (Py_ssize_t i = 0; i < b->n && k < live; i++) {
        qentry *e = &b->entries[i];
        if (!e->alive) continue;
        if (e->item && !PyBytes_Check(e->item)) Py_RETURN_NONE; /* the writer encodes it */
        total += 8 + (e->item ? PyBytes_GET_SIZE(e->item) : e->len);
        k++;
    }
    if (total >= DRAIN_FRAMES_MAX) Py_RETURN_NONE;
    PyObject *data = PyBytes_FromStringAndSize(NULL, total);
    if (!data) return NULL;
    unsigned char *o = (unsigned char *)PyBytes_AS_STRING(data);
    k = 0;
    for (Py_ssize_t i = 0; i < b->n && k < live; i++) {
        qentry *e = &b->entries[i];
        if (!e->alive) continue;
        const char *p = e->item ? PyBytes_AS_STRING(e->item) : b->arena + e->off;
        Py_ssize_t len = e->item ? PyBytes_GET_SIZE(e->item) : e->len;
        frame_into((const unsigned char *)p, len, o);
        o += 8 + len;
        k++;
    }
    PyObject *out = Py_BuildValue("(Nn)", data, live);
    if (out) AuditBuffer_clear(b); /* releases the queued bytes objects */
    return out;
}

static PyObject *AuditBuffer_counts(AuditBuffer *b, PyObject *unused) {
    return Py_BuildValue("nKKK", b->allows + b->denies, b->accepted, b->dropped_allows,
                         b->dropped_denials);
}

static PyMethodDef AuditBuffer_methods[] = {
    {"put", (PyCFunction)AuditBuffer_put, METH_VARARGS,
     "put(item, allowed) -> bool: queue a record, False when dropped."},
    {"drain", (PyCFunction)AuditBuffer_drain, METH_NOARGS,
     "Every queued (record, allowed), in the order accepted."},
    {"drain_frames", (PyCFunction)AuditBuffer_drain_frames, METH_NOARGS,
     "drain_frames() -> (spool frames, count) | None: every queued record framed, when all are "
     "encoded records (bytes) and under 64 KiB in all; None (nothing drained) otherwise."},
    {"counts", (PyCFunction)AuditBuffer_counts, METH_NOARGS,
     "(depth, accepted, dropped allows, dropped denials) since start."},
    {NULL, NULL, 0, NULL}};

static PyTypeObject AuditBufferType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "sidecar.dataplane._fastcheck.AuditBuffer",
    .tp_basicsize = sizeof(AuditBuffer),
    .tp_dealloc = (destructor)AuditBuffer_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "AuditBuffer(capacity, deny_limit): the audit queue's storage.",
    .tp_methods = AuditBuffer_methods,
    .tp_init = (initproc)AuditBuffer_init,
    .tp_new = PyType_GenericNew,
};

/* The usage tally's counts (sidecar.usage.tally.UsageTally.use_store) for the Python observer
 * and the C path alike, so both share one bound: at most max_entries distinct credentials per
 * interval (between harvests), further credentials' uses counted as dropped — what one thread's
 * dict does in the pure-Python tally. Under the GIL: a count is never lost or split. */
typedef struct {
    PyObject_HEAD
    Py_ssize_t max_entries, n, size;
    unsigned long long *uses, dropped;
    PyObject *keys;  /* this interval's credentials, by index */
    PyObject *index; /* credential -> index in keys and uses */
} UsageCounts;

static void UsageCounts_dealloc(UsageCounts *u) {
    Py_XDECREF(u->keys);
    Py_XDECREF(u->index);
    PyMem_Free(u->uses);
    Py_TYPE(u)->tp_free((PyObject *)u);
}

static int UsageCounts_init(UsageCounts *u, PyObject *args, PyObject *kwds) {
    if (!PyArg_ParseTuple(args, "n", &u->max_entries)) return -1;
    if (u->keys) return 0; /* __init__ called again: keep the counts */
    if (!(u->keys = PyList_New(0)) || !(u->index = PyDict_New())) return -1;
    return 0;
}

/* One use of ``key`` (a str): 0 counted or dropped, -1 error. */
static int usage_count(UsageCounts *u, PyObject *key) {
    if (!u->index) {
        PyErr_SetString(PyExc_RuntimeError, "UsageCounts not initialised");
        return -1;
    }
    PyObject *at = PyDict_GetItemWithError(u->index, key);
    if (at) {
        u->uses[PyLong_AsSsize_t(at)]++;
        return 0;
    }
    if (PyErr_Occurred()) return -1;
    if (u->n >= u->max_entries) {
        u->dropped++;
        return 0;
    }
    if (u->n >= u->size) {
        Py_ssize_t size = u->size ? 2 * u->size : 64;
        unsigned long long *grown = PyMem_Realloc(u->uses, (size_t)size * sizeof *grown);
        if (!grown) { PyErr_NoMemory(); return -1; }
        u->uses = grown;
        u->size = size;
    }
    PyObject *i = PyLong_FromSsize_t(u->n);
    if (!i) return -1;
    if (PyList_Append(u->keys, key) < 0) { Py_DECREF(i); return -1; }
    if (PyDict_SetItem(u->index, key, i) < 0) {
        Py_DECREF(i);
        PyList_SetSlice(u->keys, u->n, u->n + 1, NULL);
        return -1;
    }
    Py_DECREF(i);
    u->uses[u->n++] = 1;
    return 0;
}

static PyObject *UsageCounts_count(UsageCounts *u, PyObject *key) {
    if (!PyUnicode_Check(key)) {
        PyErr_SetString(PyExc_TypeError, "count(key): a str expected");
        return NULL;
    }
    /* A str subclass is counted as the plain str it equals: no Python __hash__ or __eq__ runs
     * inside the count. */
    PyObject *plain = PyUnicode_CheckExact(key) ? Py_NewRef(key) : PyUnicode_FromObject(key);
    if (!plain) return NULL;
    int failed = usage_count(u, plain);
    Py_DECREF(plain);
    if (failed) return NULL;
    Py_RETURN_NONE;
}

/* harvest() -> ({credential: uses}, dropped) since the last harvest, and a new interval. The
 * interval's state is swapped out before anything is built from it: building can run the
 * garbage collector, hence Python code, hence another thread's count, which lands in the new
 * interval. */
static PyObject *UsageCounts_harvest(UsageCounts *u, PyObject *unused) {
    PyObject *keys = PyList_New(0), *index = PyDict_New();
    if (!keys || !index || !u->keys) {
        Py_XDECREF(keys);
        Py_XDECREF(index);
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_RuntimeError, "UsageCounts not initialised");
        return NULL;
    }
    PyObject *old_keys = u->keys, *old_index = u->index;
    unsigned long long *uses = u->uses, dropped = u->dropped;
    Py_ssize_t n = u->n;
    u->keys = keys;
    u->index = index;
    u->uses = NULL;
    u->n = u->size = 0;
    u->dropped = 0;
    Py_DECREF(old_index);
    PyObject *counts = PyDict_New();
    for (Py_ssize_t i = 0; counts && i < n; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(uses[i]);
        if (!v || PyDict_SetItem(counts, PyList_GET_ITEM(old_keys, i), v) < 0) Py_CLEAR(counts);
        Py_XDECREF(v);
    }
    Py_DECREF(old_keys);
    PyMem_Free(uses);
    return counts ? Py_BuildValue("(NK)", counts, dropped) : NULL;
}

static PyObject *UsageCounts_get_dropped(UsageCounts *u, void *unused) {
    return PyLong_FromUnsignedLongLong(u->dropped);
}

static PyObject *UsageCounts_get_max_entries(UsageCounts *u, void *unused) {
    return PyLong_FromSsize_t(u->max_entries);
}

static PyGetSetDef UsageCounts_getset[] = {
    {"dropped", (getter)UsageCounts_get_dropped, NULL, "Uses dropped since the last harvest.",
     NULL},
    {"max_entries", (getter)UsageCounts_get_max_entries, NULL,
     "Distinct credentials counted per interval.", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static PyMethodDef UsageCounts_methods[] = {
    {"count", (PyCFunction)UsageCounts_count, METH_O,
     "count(key): one use of the credential ``key`` (dropped over the bound)."},
    {"harvest", (PyCFunction)UsageCounts_harvest, METH_NOARGS,
     "({credential: uses}, dropped) since the last harvest; starts a new interval."},
    {NULL, NULL, 0, NULL}};

static PyTypeObject UsageCountsType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "sidecar.dataplane._fastcheck.UsageCounts",
    .tp_basicsize = sizeof(UsageCounts),
    .tp_dealloc = (destructor)UsageCounts_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "UsageCounts(max_entries): the usage tally's counts, shared with the C path.",
    .tp_methods = UsageCounts_methods,
    .tp_getset = UsageCounts_getset,
    .tp_init = (initproc)UsageCounts_init,
    .tp_new = PyType_GenericNew,
};

/* What FastCheck.observe_in_c set up: the Check observers (metrics, audit recorder, usage
 * tally, denial log) done here for every decision the C path takes — allows, a route's
 * denials, unknown and refused keys, blocked sources, non-canonical paths — while the
 * handler's observer list is the one it was set up for. */
#define MAX_BOUNDS 32

/* Entries kept per reason (cleared when full): an allow's up to ALLOW_ENTRIES, a denial's up to
 * DENIAL_ENTRIES per reason. A token's identity is ≈ 0.9 KB that an entry keeps alive after the
 * token cache let it go, and a tenant chooses which of its denials it is refused: seven denial
 * tables of the allows' bound would be seven times the memory. A miss costs one entry_fn call. */
#define ALLOW_ENTRIES 100000
#define DENIAL_ENTRIES 4096

typedef struct observing {
    PyObject *owner, *expected; /* owner.observers must hold exactly ``expected`` */
    PyObject *entry_fn; /* entry_fn(decision) -> (record part | None, usage key) | None */
    /* per reason decided with an identity (an allow, a route's denial, a refused key):
     * identity id -> (identity, record part | None, usage key); one table per reason, as the
     * record part names the reason and one identity can allow, then be refused its route or
     * expire. NULL for the reasons decided without an identity. */
    PyObject *entries[D_COUNT];
    /* record part of a decision without an identity (public_route, unknown_credential, a
     * blocked source's rate_limited), per reason, once built */
    PyObject *anonymous[D_COUNT];
    PyObject *denials;   /* the DenialLog (its ``deny``), or NULL: none among the observers */
    /* metrics: sidecar.ops.check_tally's layout */
    int metrics;
    Py_ssize_t slots[D_COUNT], width, nlabels; /* the tally slot of each reason */
    int nbounds;
    double bounds[MAX_BOUNDS], *tally;
    /* decision records */
    AuditBuffer *buffer;
    PyObject *queue, *clock;
    int sample_all, system_clock;
    /* usage: the UsageTally's store, and the reasons that count as a use (tally.USED) */
    UsageCounts *usage;
    int used[D_COUNT];
    unsigned long long observed; /* checks observed here */
} observing;

static void observing_free(observing *o) {
    if (!o) return;
    Py_XDECREF(o->owner); Py_XDECREF(o->expected); Py_XDECREF(o->entry_fn);
    Py_XDECREF(o->buffer); Py_XDECREF(o->denials);
    for (int i = 0; i < D_COUNT; i++) Py_XDECREF(o->entries[i]);
    for (int i = 0; i < D_COUNT; i++) Py_XDECREF(o->anonymous[i]);
    Py_XDECREF(o->queue); Py_XDECREF(o->clock);
    Py_XDECREF(o->usage);
    PyMem_Free(o->tally);
    PyMem_Free(o);
}

static PyObject *S_observers, *S_keep_allow, *S_id, *S_deny;

/* observe_in_c(owner, expected, entry_fn, metrics, audit, usage, denials), once:
 *   metrics: None | (the tally slot of each reason, in D_* order, bounds, width)
 *   audit:   None | (buffer, queue, sample_all, clock, system_clock)
 *   usage:   None | (UsageCounts (the UsageTally's store), whether each reason, in D_* order,
 *            is a use: sidecar.usage.tally.USED)
 *   denials: None | the DenialLog (``deny(decision, method, path, source)``)
 * Once only: a check in flight may be inside Python code (entry_fn, the clock) holding it. */
static PyObject *FastCheck_observe_in_c(FastCheck *self, PyObject *args) {
    PyObject *owner, *expected, *entry_fn, *metrics, *audit, *usage, *denials;
    if (!PyArg_ParseTuple(args, "OO!OOOOO", &owner, &PyTuple_Type, &expected, &entry_fn,
                          &metrics, &audit, &usage, &denials))
        return NULL;
    if (self->obs) {
        PyErr_SetString(PyExc_RuntimeError, "observe_in_c: already set up");
        return NULL;
    }
    observing *o = PyMem_Calloc(1, sizeof(observing));
    if (!o) return PyErr_NoMemory();
    o->owner = owner; Py_INCREF(owner);
    o->expected = expected; Py_INCREF(expected);
    o->entry_fn = entry_fn; Py_INCREF(entry_fn);
    static const int with_identity[] = {D_OK, D_NO_ROUTE, D_OPERATOR, D_WORKSPACE, D_SCOPE,
                                        D_REVOKED, D_SUSPENDED, D_EXPIRED};
    for (size_t i = 0; i < sizeof with_identity / sizeof with_identity[0]; i++)
        if (!(o->entries[with_identity[i]] = PyDict_New())) goto fail;
    if (metrics != Py_None) {
        PyObject *bounds, *slots;
        if (!PyArg_ParseTuple(metrics, "O!O!n", &PyTuple_Type, &slots, &PyTuple_Type, &bounds,
                              &o->width))
            goto fail;
        o->nbounds = (int)PyTuple_GET_SIZE(bounds);
        o->nlabels = o->width - o->nbounds - 2;
        int bad = o->nbounds > MAX_BOUNDS || PyTuple_GET_SIZE(slots) != D_COUNT;
        for (int i = 0; !bad && i < D_COUNT; i++) {
            o->slots[i] = PyLong_AsSsize_t(PyTuple_GET_ITEM(slots, i));
            if (o->slots[i] == -1 && PyErr_Occurred()) goto fail;
            bad |= o->slots[i] < 0 || o->nlabels <= o->slots[i];
        }
        if (bad) {
            PyErr_SetString(PyExc_ValueError, "observe_in_c: bad tally layout");
            goto fail;
        }
        for (int i = 0; i < o->nbounds; i++) {
            o->bounds[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(bounds, i));
            if (o->bounds[i] == -1.0 && PyErr_Occurred()) goto fail;
        }
        if (!(o->tally = PyMem_Calloc((size_t)o->width, sizeof(double)))) {
            PyErr_NoMemory();
            goto fail;
        }
        o->metrics = 1;
    }
    if (audit != Py_None) {
        if (!PyArg_ParseTuple(audit, "O!OpOp", &AuditBufferType, &o->buffer, &o->queue,
                              &o->sample_all, &o->clock, &o->system_clock)) {
            o->buffer = NULL;
            o->queue = o->clock = NULL;
            goto fail;
        }
        Py_INCREF(o->buffer); Py_INCREF(o->queue); Py_INCREF(o->clock);
    }
    if (usage != Py_None) {
        PyObject *counts, *used;
        if (!PyArg_ParseTuple(usage, "O!O!", &UsageCountsType, &counts, &PyTuple_Type, &used))
            goto fail;
        if (PyTuple_GET_SIZE(used) != D_COUNT) {
            PyErr_SetString(PyExc_ValueError, "observe_in_c: one use flag per reason");
            goto fail;
        }
        for (int i = 0; i < D_COUNT; i++) {
            o->used[i] = PyObject_IsTrue(PyTuple_GET_ITEM(used, i));
            if (o->used[i] < 0) goto fail;
        }
        o->usage = (UsageCounts *)counts;
        Py_INCREF(counts);
    }
    if (denials != Py_None) {
        o->denials = denials;
        Py_INCREF(denials);
    }
    self->obs = o;
    Py_RETURN_NONE;
fail:
    observing_free(o);
    return NULL;
}

/* entry_counts() -> the entries kept per reason, in D_* order (0 where none are kept). */
static PyObject *FastCheck_entry_counts(FastCheck *self, PyObject *unused) {
    PyObject *counts = PyTuple_New(D_COUNT);
    if (!counts) return NULL;
    for (int i = 0; i < D_COUNT; i++) {
        PyObject *table = self->obs ? self->obs->entries[i] : NULL;
        PyObject *n = PyLong_FromSsize_t(table ? PyDict_GET_SIZE(table) : 0);
        if (!n) { Py_DECREF(counts); return NULL; }
        PyTuple_SET_ITEM(counts, i, n);
    }
    return counts;
}

/* observed() -> how many checks were observed here (not by the Python observers). */
static PyObject *FastCheck_observed(FastCheck *self, PyObject *unused) {
    return PyLong_FromUnsignedLongLong(self->obs ? self->obs->observed : 0);
}

/* tally() -> the metrics counted here, in CheckTally's layout (None when not counting). */
static PyObject *FastCheck_tally(FastCheck *self, PyObject *unused) {
    observing *o = self->obs;
    if (!o || !o->metrics) Py_RETURN_NONE;
    PyObject *out = PyList_New(o->width);
    for (Py_ssize_t i = 0; out && i < o->width; i++) {
        PyObject *v = PyFloat_FromDouble(o->tally[i]);
        if (!v) Py_CLEAR(out);
        else PyList_SET_ITEM(out, i, v);
    }
    return out;
}

/* sidecar.core.audit._could_hold_secret on ASCII text. */
static int could_hold_secret(const unsigned char *t, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i + 2 < n; i++) {
        if (t[i] == 'e' && t[i + 1] == 'y' && t[i + 2] == 'J') return 1;
        if (i + 5 < n) {
            static const char bearer[] = "bearer";
            int k = 0;
            while (k < 6 && (t[i + k] | 0x20) == bearer[k] &&
                   ((t[i + k] >= 'a' && t[i + k] <= 'z') || (t[i + k] >= 'A' && t[i + k] <= 'Z')))
                k++;
            if (k == 6) return 1;
        }
    }
    for (Py_ssize_t at = 0; at + 1 < n; at++) {
        if (t[at] != 's' || t[at + 1] != 'p') continue;
        for (Py_ssize_t j = at + 3; j < at + 6 && j < n; j++)
            if (t[j] == '_') return 1;
    }
    return 0;
}

static int varint_len(uint64_t v) {
    int n = 1;
    while (v >= 0x80) { v >>= 7; n++; }
    return n;
}

static char *put_varint(char *w, uint64_t v) {
    while (v >= 0x80) { *w++ = (char)((v & 0x7f) | 0x80); v >>= 7; }
    *w++ = (char)v;
    return w;
}

/* protowire.ld: a length-delimited field numbered 1-15. */
static char *put_ld(char *w, int field, const void *p, Py_ssize_t n) {
    *w++ = (char)(field << 3 | 2);
    w = put_varint(w, (uint64_t)n);
    memcpy(w, p, (size_t)n);
    return w + n;
}

static Py_ssize_t ld_len(Py_ssize_t n) { return 1 + varint_len((uint64_t)n) + n; }

/* records._entry: a metadata map entry (AuditRecord field 10), the value omitted when empty. */
static char *put_entry(char *w, const char *k, Py_ssize_t kn, const void *v, Py_ssize_t vn) {
    Py_ssize_t inner = ld_len(kn) + (vn ? ld_len(vn) : 0);
    *w++ = (char)(10 << 3 | 2);
    w = put_varint(w, (uint64_t)inner);
    w = put_ld(w, 1, k, kn);
    return vn ? put_ld(w, 2, v, vn) : w;
}

/* Python's round() of a float (half to even) in the default rounding mode, for |x| < 2**52. */
static double round_half_even(double x) {
    if (!(__builtin_fabs(x) < 0x1p52)) return x;
    return x >= 0 ? (x + 0x1p52) - 0x1p52 : -((-x + 0x1p52) - 0x1p52);
}

static double timer_now(FastCheck *self) {
    if (!self->timer) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)((int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec) / 1e9;
    }
    PyObject *v = PyObject_CallNoArgs(self->timer);
    if (!v) return -1.0;
    double t = PyFloat_AsDouble(v);
    Py_DECREF(v);
    return t;
}

/* The record part of this decision (records.fixed_part) and its usage key, built once per
 * identity by entry_fn, as a new reference to (identity | None, part, key | None) in *entry;
 * 0 with *entry NULL: hand the check to the Python observers. */
static int observed_entry(observing *o, const outcome *out, PyObject *decision,
                          PyObject **entry) {
    *entry = NULL;
    if (!out->identity) { /* a public route, an unknown key, a blocked source */
        PyObject **slot = &o->anonymous[out->reason];
        if (!*slot) {
            PyObject *got = PyObject_CallOneArg(o->entry_fn, decision);
            if (!got) return -1;
            if (got == Py_None || !PyTuple_Check(got) || PyTuple_GET_SIZE(got) != 2 ||
                !PyBytes_Check(PyTuple_GET_ITEM(got, 0))) {
                Py_DECREF(got);
                return 0;
            }
            PyObject *built = Py_BuildValue("(OOO)", Py_None, PyTuple_GET_ITEM(got, 0), Py_None);
            Py_DECREF(got);
            if (!built) return -1;
            Py_XSETREF(*slot, built); /* entry_fn may have run another thread's fill */
        }
        *entry = *slot;
        Py_INCREF(*entry);
        return 0;
    }
    if (out->fresh) { /* a token verified for this check: its entry is built, not kept */
        PyObject *got = PyObject_CallOneArg(o->entry_fn, decision);
        if (!got) return -1;
        if (got != Py_None && PyTuple_Check(got) && PyTuple_GET_SIZE(got) == 2 &&
            PyBytes_Check(PyTuple_GET_ITEM(got, 0)) &&
            PyUnicode_CheckExact(PyTuple_GET_ITEM(got, 1)))
            *entry = Py_BuildValue("(OOO)", out->identity, PyTuple_GET_ITEM(got, 0),
                                   PyTuple_GET_ITEM(got, 1));
        Py_DECREF(got);
        return *entry || !PyErr_Occurred() ? 0 : -1;
    }
    PyObject *table = o->entries[out->reason];
    if (!table) return 0; /* not a reason decided with an identity: Python observes it */
    PyObject *id = PyObject_GetAttr(out->identity, S_id);
    if (!id) return -1;
    PyObject *cached = PyDict_GetItemWithError(table, id);
    if (!cached && PyErr_Occurred()) { Py_DECREF(id); return -1; }
    if (cached && PyTuple_GET_ITEM(cached, 0) == out->identity) {
        Py_DECREF(id);
        *entry = cached;
        Py_INCREF(cached);
        return 0;
    }
    PyObject *got = PyObject_CallOneArg(o->entry_fn, decision);
    if (!got) { Py_DECREF(id); return -1; }
    if (got == Py_None || !PyTuple_Check(got) || PyTuple_GET_SIZE(got) != 2 ||
        !PyBytes_Check(PyTuple_GET_ITEM(got, 0)) ||
        !PyUnicode_CheckExact(PyTuple_GET_ITEM(got, 1))) {
        Py_DECREF(got);
        Py_DECREF(id);
        return 0;
    }
    PyObject *fresh = Py_BuildValue("(OOO)", out->identity, PyTuple_GET_ITEM(got, 0),
                                    PyTuple_GET_ITEM(got, 1));
    Py_DECREF(got);
    if (!fresh) { Py_DECREF(id); return -1; }
    if (PyDict_GET_SIZE(table) >= (out->reason == D_OK ? ALLOW_ENTRIES : DENIAL_ENTRIES))
        PyDict_Clear(table);
    int failed = PyDict_SetItem(table, id, fresh);
    Py_DECREF(id);
    if (failed) { Py_DECREF(fresh); return -1; }
    *entry = fresh;
    return 0;
}

/* The decision record (records.PendingDecision.payload, byte for byte) into the buffer. */
static int record(observing *o, const request *q, PyObject *did, PyObject *part, double when,
                  double elapsed, int allowed) {
    Py_ssize_t idn, pn = PyBytes_GET_SIZE(part);
    const char *id = PyUnicode_AsUTF8AndSize(did, &idn);
    if (!id) return -1;
    span target = q->path;
    for (Py_ssize_t i = 0; i < target.n; i++)
        if (target.p[i] == '?' || target.p[i] == '#') { target.n = i; break; }
    if (target.n > 512) target.n = 512;
    long long us = (long long)round_half_even(when * 1e6);
    uint64_t secs = (uint64_t)(us / 1000000), nanos = (uint64_t)(us % 1000000 * 1000);
    char latency[32];
    int ln = snprintf(latency, sizeof latency, "%lld", (long long)round_half_even(elapsed * 1e6));
    Py_ssize_t stamp = (secs ? 1 + varint_len(secs) : 0) + (nanos ? 1 + varint_len(nanos) : 0);
    Py_ssize_t room = 2 * ld_len(idn) + ld_len(stamp) + ld_len(target.n) +
                      3 * 24 + q->method.n + q->source.n + ln + pn;
    /* A denial may push the oldest allow out (DequeStore._put_deny): ``gone`` is released once
     * the new record is in. Room first, so a failed allocation changes nothing. */
    PyObject *gone = NULL;
    char *start = buffer_reserve(o->buffer, room);
    if (!start) return -1;
    if (!buffer_admit(o->buffer, allowed, &gone)) return 0;
    qentry *e = buffer_append(o->buffer, allowed);
    if (!e) { Py_XDECREF(gone); return -1; }
    char *w = put_ld(start, 1, id, idn);
    w = put_ld(w, 9, id, idn);
    *w++ = 2 << 3 | 2;
    w = put_varint(w, (uint64_t)stamp);
    if (secs) { *w++ = 1 << 3; w = put_varint(w, secs); }
    if (nanos) { *w++ = 2 << 3; w = put_varint(w, nanos); }
    if (target.n) w = put_ld(w, 6, target.p, target.n);
    w = put_entry(w, "method", 6, q->method.p, q->method.n);
    w = put_entry(w, "source", 6, q->source.p, q->source.n);
    w = put_entry(w, "latency_us", 10, latency, ln);
    memcpy(w, PyBytes_AS_STRING(part), (size_t)pn);
    w += pn;
    e->off = o->buffer->used;
    e->len = w - start;
    o->buffer->used += e->len;
    Py_XDECREF(gone);
    return 0;
}

/* DenialLog.deny(decision, method, path, source): what DenialLog.__call__ does with a denial
 * (its rate limit, its line written by its writer thread). 0, or -1 on error. */
static int deny_line(observing *o, const request *q, PyObject *decision) {
    PyObject *method = str_of(q->method), *path = method ? str_of(q->path) : NULL;
    PyObject *source = path ? str_of(q->source) : NULL;
    PyObject *done = source ? PyObject_CallMethodObjArgs(o->denials, S_deny, decision, method,
                                                         path, source, NULL)
                            : NULL;
    Py_XDECREF(method); Py_XDECREF(path); Py_XDECREF(source);
    if (!done) return -1;
    Py_DECREF(done);
    return 0;
}

/* observe's effects for the cached entry's record ``part`` and usage ``key``. */
static int observe_entry(observing *o, const request *q, const outcome *out, PyObject *decision,
                         PyObject *did, double elapsed, PyObject *part, PyObject *key) {
    if (o->buffer) {
        unsigned char text[600 + 2 * 256];
        span target = q->path;
        for (Py_ssize_t i = 0; i < target.n; i++)
            if (target.p[i] == '?' || target.p[i] == '#') { target.n = i; break; }
        if (target.n > 512) target.n = 512;
        if (q->method.n > 256 || q->source.n > 256) return 0;
        Py_ssize_t n = 0;
        memcpy(text, q->method.p, (size_t)q->method.n); n += q->method.n;
        text[n++] = '\n';
        memcpy(text + n, target.p, (size_t)target.n); n += target.n;
        text[n++] = '\n';
        memcpy(text + n, q->source.p, (size_t)q->source.n); n += q->source.n;
        if (could_hold_secret(text, n)) return 0;
    }
    /* Committed from here: every observer's effect happens below. */
    double when = 0.0;
    if (o->buffer) {
        if (o->system_clock) when = wall_now();
        else {
            PyObject *v = PyObject_CallMethodNoArgs(o->clock, S_now);
            if (!v) return -1;
            when = PyFloat_AsDouble(v);
            Py_DECREF(v);
            if (when == -1.0 && PyErr_Occurred()) return -1;
        }
    }
    int keep = 1, allowed = out->reason == D_OK || out->reason == D_PUBLIC;
    if (o->buffer && !o->sample_all && allowed) { /* AuditQueue.keep_allow: draws and counts */
        PyObject *v = PyObject_CallMethodNoArgs(o->queue, S_keep_allow);
        if (!v) return -1;
        keep = PyObject_IsTrue(v);
        Py_DECREF(v);
        if (keep < 0) return -1;
    }
    if (o->metrics) {
        o->tally[o->slots[out->reason]] += 1;
        if (elapsed > 0.0) {
            int i = 0;
            while (i < o->nbounds && o->bounds[i] < elapsed) i++;
            o->tally[o->nlabels + i] += 1;
            o->tally[o->width - 1] += elapsed;
        }
    }
    /* UsageTally: an authenticated identity's use (tally.USED), its route refused or not */
    if (o->usage && o->used[out->reason] && key != Py_None && usage_count(o->usage, key) < 0)
        return -1;
    if (o->buffer && keep && record(o, q, did, part, when, elapsed, allowed) < 0) return -1;
    if (!allowed && o->denials && deny_line(o, q, decision) < 0) return -1;
    return 1;
}

/* The observers of a decision the C path took (an allow, a route's denial — no_route,
 * operator_not_allowed, workspace_mismatch, insufficient_scope —, an unknown, revoked,
 * suspended or expired key, a blocked source, a non-canonical path), here: 1 observed, 0 hand
 * over to the Python observers (nothing was counted), -1 error. */
static int observe(FastCheck *self, const request *q, const outcome *out, PyObject *decision,
                   PyObject *did, double elapsed) {
    observing *o = self->obs;
    if (!o) return 0;
    PyObject *list = PyObject_GetAttr(o->owner, S_observers);
    if (!list) return -1;
    int same = PyList_Check(list) && PyList_GET_SIZE(list) == PyTuple_GET_SIZE(o->expected);
    for (Py_ssize_t i = 0; same && i < PyList_GET_SIZE(list); i++)
        same = PyList_GET_ITEM(list, i) == PyTuple_GET_ITEM(o->expected, i);
    Py_DECREF(list);
    if (!same) return 0;
    /* The record's request fields must be ASCII without anything credential-shaped: else
     * the Python recorder redacts them (records.PendingDecision.payload). */
    if (!printable_ascii(q->source)) return 0;
    PyObject *entry; /* held: the calls into Python below can switch threads */
    if (observed_entry(o, out, decision, &entry) < 0) return -1;
    if (!entry) return 0;
    int seen = observe_entry(o, q, out, decision, did, elapsed, PyTuple_GET_ITEM(entry, 1),
                             PyTuple_GET_ITEM(entry, 2));
    Py_DECREF(entry);
    if (seen > 0) o->observed++;
    return seen;
}

/* CheckInput(method, path, host, headers, context, source), as request_view makes it. */
static PyObject *view_of(FastCheck *self, const request *q) {
    PyTypeObject *it = (PyTypeObject *)self->input_type;
    PyObject *view = it->tp_alloc(it, 6);
    if (!view) return NULL;
    PyObject *fields[6] = {str_of(q->method), str_of(q->path), str_of(q->host),
                           entries_dict(q->headers, q->nheaders),
                           entries_dict(q->context, q->ncontext), str_of(q->source)};
    int failed = 0;
    for (int i = 0; i < 6; i++) {
        if (!fields[i]) { failed = 1; fields[i] = Py_None; Py_INCREF(Py_None); }
        PyTuple_SET_ITEM(view, i, fields[i]);
    }
    if (failed) Py_CLEAR(view);
    return view;
}

static PyObject *FastCheck_call(FastCheck *self, PyObject *args, PyObject *kwds) {
    Py_buffer buf;
    double started = timer_now(self);
    if (started == -1.0 && PyErr_Occurred()) return NULL;
    if (!PyArg_ParseTuple(args, "y*", &buf)) return NULL;
    /* On the stack: the calls into Python below (the replica, templates) can switch threads. */
    request q;
    Compiled *c = self->compiled;
    PyObject *result = NULL, *cred = NULL, *did = NULL, *decision = NULL, *response = NULL;
    PyObject *view = NULL;
    int got = 1;
    Py_XINCREF(c);
    if (c && buf.len <= 256 * 1024 && read_request(buf.buf, buf.len, &q) &&
        printable_ascii(q.path) && printable_ascii(q.method) && printable_ascii(q.host)) {
        PyObject *policy = PyObject_GetAttr(self->engine, S_policy);
        if (!policy) goto done;
        Py_DECREF(policy);
        if (policy == c->policy) {
            outcome out = {-1, NULL, NULL, self->empty, 0};
            got = decide(self, c, &q, &out, &cred);
            if (got < 0) goto done;
            if (got == 0) {
                if (!(did = decision_id(self))) goto done;
                /* Decision(reason, decision_id, identity, detail), as tuple.__new__ makes it. */
                PyTypeObject *dt = (PyTypeObject *)self->decision_type;
                if (!(decision = dt->tp_alloc(dt, 4))) goto done;
                PyObject *items[4] = {self->reasons[out.reason], did,
                                      out.identity ? out.identity : Py_None, out.detail};
                for (int i = 0; i < 4; i++) {
                    Py_INCREF(items[i]);
                    PyTuple_SET_ITEM(decision, i, items[i]);
                }
                if (!(response = respond(self, c, &out, decision, did))) goto done;
                double ended = timer_now(self);
                if (ended == -1.0 && PyErr_Occurred()) goto done;
                int seen = observe(self, &q, &out, decision, did, ended - started);
                if (seen < 0) goto done;
                if (seen) { /* observed here: grpc needs only the answer */
                    result = response;
                    Py_INCREF(result);
                } else {
                    if (!(view = view_of(self, &q))) goto done;
                    result = Py_BuildValue("(OOOd)", response, decision, view, ended - started);
                }
            }
        }
    }
    if (got) { /* fall back */
        self->counts[1]++;
        result = Py_None;
        Py_INCREF(result);
    } else if (result) {
        self->counts[0]++;
    }
done:
    PyBuffer_Release(&buf);
    Py_XDECREF(c);
    Py_XDECREF(cred); Py_XDECREF(did); Py_XDECREF(decision);
    Py_XDECREF(response); Py_XDECREF(view);
    return result;
}

/* verify_tokens(verify_fn, build_fn), once: verify the tokens the cache does not answer here,
 * through verify_fn, and answer their allows with build_fn (see the FastCheck fields). */
static PyObject *FastCheck_verify_tokens(FastCheck *self, PyObject *args) {
    PyObject *verify_fn, *build_fn;
    if (!PyArg_ParseTuple(args, "OO", &verify_fn, &build_fn)) return NULL;
    if (self->verify_fn) {
        PyErr_SetString(PyExc_RuntimeError, "verify_tokens: already set up");
        return NULL;
    }
    if (!PyCallable_Check(verify_fn) || !PyCallable_Check(build_fn)) {
        PyErr_SetString(PyExc_TypeError, "verify_tokens: two callables expected");
        return NULL;
    }
    Py_INCREF(build_fn);
    self->build_fn = build_fn; /* first: a check that sees verify_fn may need it */
    Py_INCREF(verify_fn);
    self->verify_fn = verify_fn;
    Py_RETURN_NONE;
}

/* set_timer(timer | None): what times a check for its observers (None: the monotonic clock,
 * which is what time.perf_counter reads). */
static PyObject *FastCheck_set_timer(FastCheck *self, PyObject *timer) {
    if (timer == Py_None) timer = NULL;
    Py_XINCREF(timer);
    Py_XSETREF(self->timer, timer);
    Py_RETURN_NONE;
}

static PyMethodDef FastCheck_methods[] = {
    {"observe_in_c", (PyCFunction)FastCheck_observe_in_c, METH_VARARGS,
     "Observe the decisions taken here in C (see fastcheck.FastCheckHandler)."},
    {"observed", (PyCFunction)FastCheck_observed, METH_NOARGS,
     "How many checks were observed here in C since start."},
    {"entry_counts", (PyCFunction)FastCheck_entry_counts, METH_NOARGS,
     "The observer entries kept per reason, in D_* order."},
    {"tally", (PyCFunction)FastCheck_tally, METH_NOARGS,
     "The check metrics counted here, in CheckTally's layout, or None."},
    {"verify_tokens", (PyCFunction)FastCheck_verify_tokens, METH_VARARGS,
     "Verify uncached tokens here with verify_fn(token, digest, now), answers by build_fn."},
    {"set_timer", (PyCFunction)FastCheck_set_timer, METH_O,
     "What times a check (None: the monotonic clock)."},
    {"set_policy", (PyCFunction)FastCheck_set_policy, METH_VARARGS,
     "Compile a policy (the tuples fastcheck.compile_policy makes)."},
    {"counts", (PyCFunction)FastCheck_counts, METH_NOARGS,
     "(decided here, fell back) since start."},
    {"count_failures", (PyCFunction)FastCheck_count_failures, METH_O,
     "Decide unknown API keys here, counted with failed(source, key_id, now) (None: no limiter)."},
    {NULL, NULL, 0, NULL}};

static PyTypeObject FastCheckType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "sidecar.dataplane._fastcheck.FastCheck",
    .tp_basicsize = sizeof(FastCheck),
    .tp_dealloc = (destructor)FastCheck_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The compiled API-key Check (see sidecar/dataplane/fastcheck.py).",
    .tp_methods = FastCheck_methods,
    .tp_init = (initproc)FastCheck_init,
    .tp_new = PyType_GenericNew,
    .tp_call = (ternaryfunc)FastCheck_call,
};

/* sha256(data, portable=False): the carried SHA-256, for tests; ``portable`` without the SHA
 * extensions whatever the CPU has. */
static PyObject *py_sha256(PyObject *mod, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"data", "portable", NULL};
    Py_buffer b;
    int portable = 0;
    unsigned char out[32];
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*|p", kwlist, &b, &portable)) return NULL;
    sha256_with(b.buf, (size_t)b.len, out, sha_ni && !portable);
    PyBuffer_Release(&b);
    return PyBytes_FromStringAndSize((const char *)out, 32);
}

/* The text tests of the header walk, for tests: (printable ASCII, UTF-8, two dots). */
static PyObject *py_text_tests(PyObject *mod, PyObject *arg) {
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0) return NULL;
    span s = {b.buf, b.len};
    PyObject *out = Py_BuildValue("(OOO)", printable_ascii(s) ? Py_True : Py_False,
                                  valid_utf8(s.p, s.n) ? Py_True : Py_False,
                                  token_shaped(s) ? Py_True : Py_False);
    PyBuffer_Release(&b);
    return out;
}

static PyObject *py_decision_id(PyObject *mod, PyObject *unused) { return system_decision_id(); }

static PyMethodDef module_methods[] = {
    {"decision_id", py_decision_id, METH_NOARGS,
     "A decision id as the check path makes one from the system's sources (for tests)."},
    {"sha256", (PyCFunction)(void (*)(void))py_sha256, METH_VARARGS | METH_KEYWORDS,
     "SHA-256 digest (the carried implementation, for tests; portable=True without SHA-NI)."},
    {"text_tests", py_text_tests, METH_O,
     "(printable ASCII, valid UTF-8, exactly two dots) of bytes, as the walk tests them."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastcheck",
                                    "The compiled API-key Check.", -1, module_methods};

#define INTERN(var, text) if (!(var = PyUnicode_InternFromString(text))) return NULL

PyMODINIT_FUNC PyInit__fastcheck(void) {
    INTERN(S_policy, "policy"); INTERN(S_loaded, "loaded"); INTERN(S_last_contact, "last_contact");
    INTERN(S_now, "now"); INTERN(S_credential, "credential"); INTERN(S_identity, "identity");
    INTERN(S_revoked, "revoked"); INTERN(S_suspended, "suspended");
    INTERN(S_workspace, "workspace"); INTERN(S_scopes, "scopes");
    INTERN(S_expires_at, "expires_at"); INTERN(S_networks, "networks");
    INTERN(S_rate_limit, "rate_limit"); INTERN(S_kind, "kind"); INTERN(S_next, "next");
    INTERN(S_ids, "ids");
#ifndef Py_GIL_DISABLED
    if ((errno = pthread_atfork(NULL, NULL, id_pool_forget)) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
#endif
    INTERN(S_cached_token, "cached_token"); INTERN(S_access_token, "access_token");
    INTERN(S_digest, "digest");
    INTERN(S_observers, "observers"); INTERN(S_keep_allow, "keep_allow"); INTERN(S_id, "id");
    INTERN(S_deny, "deny");
    PyObject *hashlib = PyImport_ImportModule("hashlib");
    if (!hashlib) return NULL;
    hashlib_sha256 = PyObject_GetAttrString(hashlib, "sha256");
    Py_DECREF(hashlib);
    if (!hashlib_sha256) return NULL;
    if (PyType_Ready(&FastCheckType) < 0 || PyType_Ready(&CompiledType) < 0 ||
        PyType_Ready(&AuditBufferType) < 0 || PyType_Ready(&UsageCountsType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&FastCheckType);
    if (PyModule_AddObject(m, "FastCheck", (PyObject *)&FastCheckType) < 0) {
        Py_DECREF(&FastCheckType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&AuditBufferType);
    if (PyModule_AddObject(m, "AuditBuffer", (PyObject *)&AuditBufferType) < 0) {
        Py_DECREF(&AuditBufferType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&UsageCountsType);
    if (PyModule_AddObject(m, "UsageCounts", (PyObject *)&UsageCountsType) < 0) {
        Py_DECREF(&UsageCountsType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "T_LIT", T_LIT);
    PyModule_AddIntConstant(m, "T_ONE", T_ONE);
    PyModule_AddIntConstant(m, "T_WORKSPACE", T_WORKSPACE);
    PyModule_AddIntConstant(m, "T_REST", T_REST);
    sha_ni = cpu_has_sha_ni();
    PyModule_AddIntConstant(m, "SHA_NI", sha_ni); /* whether the SHA extensions hash here */
    return m;
}
