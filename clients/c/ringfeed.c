/*
 * ringfeed.c: the C client (see ringfeed.h). Written from docs/ring-format.md (format 2.0);
 * section numbers (§) refer to it. Layout: runtime directory and name (§2), handshake and
 * reply parsing (§3), mapping and validation of the ring and the lane page (§4, §5.6), slot
 * protocol and waiting (§6).
 *
 * What this client writes (2.0): nothing in the ring, which it maps read-only from a
 * read-only descriptor; only its own lane page (taken_seq / released_seq per slot, its
 * counters) and 8 bytes to its doorbell eventfd after each release.
 */
#define _GNU_SOURCE
#include "ringfeed.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <poll.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#if ATOMIC_INT_LOCK_FREE != 2 || ATOMIC_LLONG_LOCK_FREE != 2
#error "ringfeed needs lock-free 32- and 64-bit atomics (ring format §6, 32-bit platforms)"
#endif
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the ring is little-endian and read in place: a big-endian host cannot view tensors"
#endif

/* ----- layout constants (§5) ---------------------------------------------------------- */

enum {
    HEADER_MIN = 512,
    H_MAGIC = 0, H_MAJOR = 8, H_MINOR = 10, H_HEADER_BYTES = 12, H_CONTROL_BYTES = 16,
    H_FILE_BYTES = 24, H_GENERATION = 32, H_PRODUCER_PID = 40, H_STATE = 44,
    H_HEARTBEAT = 56, H_LANE_COUNT = 64, H_SLOTS = 68, H_SLOT_STRIDE = 72,
    H_DATA_OFFSET = 80, H_TENSOR_COUNT = 88, H_TENSOR_TABLE = 92, H_LANE_TABLE = 96,
    H_SLOT_TABLE = 100, H_CONSUMER_TABLE = 104, H_CONSUMER_CAP = 108, H_BATCH_SIZE = 112,
    H_FLAGS = 116, H_BATCHES_PER_EPOCH = 120, H_EPOCHS = 128, H_SEED = 136,
    H_SAMPLES_PER_EPOCH = 144, H_WORLD_SIZE = 156, H_LAST_ERROR = 192,
    H_NAME = 480,

    TENSOR_ENTRY = 64, LANE_ENTRY = 128, SLOT_ENTRY = 64, CONSUMER_ENTRY = 64,
    MAX_TENSORS = 16,

    L_PUBLISH_SEQ = 0, L_RANK = 104, L_RANK_SAMPLES = 112,

    S_STATE = 0, S_SEQ = 8, S_EPOCH = 16, S_INDEX = 24, S_COUNT = 32, S_FLAGS = 36,

    /* The lane page (2.0): the consumer's own memory, one per attach. */
    P_MAGIC = 0, P_LANE = 8, P_SLOTS = 12, P_RELEASED = 16, P_CONSUMER_WAIT_NS = 24,
    P_HEARTBEAT = 32, P_TAKEN = 40, P_HEADER_BYTES = 64, P_SLOT_BYTES = 16, P_TAKEN_SEQ = 0,
    P_RELEASED_SEQ = 8,

    /* 2.0 has no HELD: holding a READY slot is the lane page's business. */
    SLOT_FREE = 0, SLOT_WRITING = 1, SLOT_READY = 2,
    ST_STARTING = 0, ST_SERVING = 1, ST_FINISHED = 2, ST_STOPPED = 3, ST_FAILED = 4,

    MAX_LINE = 4096,
    FRAME_BYTES = 24,

    /* Descriptors of a successful attach reply, in this order (§3). */
    FD_RING = 0, FD_LANE = 1, FD_DOORBELL = 2, REPLY_FDS = 3,
    /* Room for more than REPLY_FDS, so that extras are received (and closed), not cut off. */
    MAX_RECV_FDS = 16
};

#define PAGE_BYTES 4096ULL

#define MAX_CONTROL_BYTES ((uint64_t)64 << 20)
#define WAIT_SLICE_NS 100000000ULL         /* §6: futex timeout ≤ 100 ms */
#define HEARTBEAT_STALE_NS 3000000000ULL   /* §6: a heartbeat older than 3 s: frozen */
#define RETRY_PAUSE_NS 100000000ULL

typedef struct tensor_desc {
    char name[17];
    uint32_t dtype;
    uint32_t rank;
    uint64_t shape[4];
    uint64_t offset;
    uint64_t bytes;
} tensor_desc;

struct rf_consumer {
    char name[33];
    uint32_t lane;
    /* The attaching process: a forked child (another pid) neither takes nor releases. */
    uint32_t pid;
    int sock;
    /* The whole ring [0, file_bytes), mapped PROT_READ from a read-only descriptor. */
    const uint8_t *ring;
    uint64_t ring_len;
    uint64_t control_len; /* = data_offset */
    const uint8_t *data;  /* ring + data_offset */
    /* This attach's lane page, mapped read-write: the only memory the client writes. */
    uint8_t *page;
    uint64_t page_len;
    /* This attach's doorbell (eventfd): 8 bytes written after each release. */
    int doorbell;
    rf_ring_info info;
    uint64_t slot_stride;
    uint64_t lane_table, slot_table, consumer_table;
    tensor_desc tensors[MAX_TENSORS];
    /* Epoch of the last batch taken and whether it ended its epoch: EPOCH_DONE (§9). */
    int have_last;
    uint64_t last_epoch;
    int last_was_end;
    int epoch_done_sent;
    uint64_t epoch_done_epoch;
    /* Feedback frames the socket has not accepted yet. */
    uint8_t outbox[16 * FRAME_BYTES];
    size_t outbox_len;
};

/* ----- small helpers ------------------------------------------------------------------ */

static int fail(rf_error *err, int status, const char *code, int retryable, const char *fmt,
                ...) __attribute__((format(printf, 5, 6)));

static int fail(rf_error *err, int status, const char *code, int retryable, const char *fmt,
                ...) {
    if (err) {
        va_list ap;
        err->status = status;
        err->retryable = retryable;
        snprintf(err->code, sizeof err->code, "%s", code);
        va_start(ap, fmt);
        vsnprintf(err->message, sizeof err->message, fmt, ap);
        va_end(ap);
    }
    return status;
}

static void clear_error(rf_error *err) {
    if (err) {
        err->status = RF_OK;
        err->retryable = 0;
        err->code[0] = '\0';
        err->message[0] = '\0';
    }
}

static uint64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void sleep_ns(uint64_t ns) {
    struct timespec ts = {(time_t)(ns / 1000000000ULL), (long)(ns % 1000000000ULL)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static uint32_t rd32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}
static uint64_t rd64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}
static uint16_t rd16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

/* Shared words: every field another process writes is read atomically. The offsets are
 * multiples of their size inside a page-aligned mapping (§5.6), so these casts are aligned.
 * The ring's words are only ever loaded (its mapping is read-only: a store would fault). */
static const _Atomic uint32_t *a32(const rf_consumer *c, uint64_t off) {
    return (const _Atomic uint32_t *)(const void *)(c->ring + off);
}
static const _Atomic uint64_t *a64(const rf_consumer *c, uint64_t off) {
    return (const _Atomic uint64_t *)(const void *)(c->ring + off);
}
/* Words of this attach's lane page, which the client writes. */
static _Atomic uint64_t *p64(const rf_consumer *c, uint64_t off) {
    return (_Atomic uint64_t *)(void *)(c->page + off);
}
static _Atomic uint64_t *taken_seq(const rf_consumer *c, uint32_t s) {
    return p64(c, P_HEADER_BYTES + (uint64_t)s * P_SLOT_BYTES + P_TAKEN_SEQ);
}
static _Atomic uint64_t *released_seq(const rf_consumer *c, uint32_t s) {
    return p64(c, P_HEADER_BYTES + (uint64_t)s * P_SLOT_BYTES + P_RELEASED_SEQ);
}

static uint64_t lane_off(const rf_consumer *c) {
    return c->lane_table + (uint64_t)c->lane * LANE_ENTRY;
}
static uint64_t slot_off(const rf_consumer *c, uint32_t s) {
    return c->slot_table + ((uint64_t)c->lane * c->info.slots_per_lane + s) * SLOT_ENTRY;
}
/* The lane page's size for `slots` slots per lane: whole pages (§5 "Lane page"). */
static uint64_t lane_page_bytes(uint32_t slots) {
    uint64_t used = P_HEADER_BYTES + (uint64_t)slots * P_SLOT_BYTES;
    return (used + PAGE_BYTES - 1) / PAGE_BYTES * PAGE_BYTES;
}

static long futex_wait(const _Atomic uint32_t *word, uint32_t val, const struct timespec *ts) {
    /* Shared futex (no FUTEX_PRIVATE_FLAG): the word lives in memory shared between
     * processes (§6 "Futexes"). FUTEX_WAIT only reads the word, so a read-only mapping
     * serves. */
    return syscall(SYS_futex, (const uint32_t *)(const void *)word, FUTEX_WAIT, val, ts, NULL, 0);
}

static int valid_name(const char *name) {
    size_t n = name ? strlen(name) : 0;
    if (n < 1 || n > 32 || name[0] == '.') return 0;
    for (size_t i = 0; i < n; i++) {
        char ch = name[i];
        int ok = (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') ||
                 ch == '.' || ch == '_' || ch == '-';
        if (!ok) return 0;
    }
    return 1;
}

const char *rf_status_name(int status) {
    switch (status) {
    case RF_OK: return "RF_OK";
    case RF_END: return "RF_END";
    case RF_E_TIMEOUT: return "RF_E_TIMEOUT";
    case RF_E_NOT_RUNNING: return "RF_E_NOT_RUNNING";
    case RF_E_FINISHED: return "RF_E_FINISHED";
    case RF_E_REFUSED: return "RF_E_REFUSED";
    case RF_E_FOREIGN_PRODUCER: return "RF_E_FOREIGN_PRODUCER";
    case RF_E_RUNTIME_DIR: return "RF_E_RUNTIME_DIR";
    case RF_E_PROTOCOL: return "RF_E_PROTOCOL";
    case RF_E_FORMAT: return "RF_E_FORMAT";
    case RF_E_NOT_SEALED: return "RF_E_NOT_SEALED";
    case RF_E_IO: return "RF_E_IO";
    case RF_E_PRODUCER_GONE: return "RF_E_PRODUCER_GONE";
    case RF_E_INVALID: return "RF_E_INVALID";
    case RF_E_TENSOR: return "RF_E_TENSOR";
    case RF_E_NOMEM: return "RF_E_NOMEM";
    default: return "RF_E_UNKNOWN";
    }
}

void rf_attach_options_init(rf_attach_options *o, const char *name, uint32_t lane) {
    memset(o, 0, sizeof *o);
    o->name = name;
    o->lane = lane;
    o->reply_timeout_s = 30.0;
}

/* ----- §2: the runtime directory ------------------------------------------------------ */

static int resolve_dir(const rf_attach_options *o, char *out, size_t len) {
    const char *v;
    int n;
    if (o->runtime_dir && o->runtime_dir[0]) {
        n = snprintf(out, len, "%s", o->runtime_dir);
    } else if ((v = getenv("RINGFEED_RUNTIME_DIR")) && v[0]) {
        n = snprintf(out, len, "%s", v);
    } else if (o->has_trust_uid && o->trust_uid != getuid()) {
        /* Another user's daemon: its XDG_RUNTIME_DIR is private to it, so its fallback. */
        n = snprintf(out, len, "/tmp/ringfeed-%u", (unsigned)o->trust_uid);
    } else if ((v = getenv("XDG_RUNTIME_DIR")) && v[0]) {
        n = snprintf(out, len, "%s/ringfeed", v);
    } else {
        n = snprintf(out, len, "/tmp/ringfeed-%u", (unsigned)getuid());
    }
    return n > 0 && (size_t)n < len;
}

static int check_dir(const char *dir, const rf_attach_options *o, rf_error *err) {
    struct stat st;
    if (lstat(dir, &st) != 0) {
        if (errno == ENOENT)
            return fail(err, RF_E_NOT_RUNNING, "not_running", 1,
                        "runtime directory %s does not exist: no daemon serves there (start "
                        "`ringfeed serve`, or set RINGFEED_RUNTIME_DIR)", dir);
        return fail(err, RF_E_RUNTIME_DIR, "runtime_dir", 0, "runtime directory %s: %s", dir,
                    strerror(errno));
    }
    if (S_ISLNK(st.st_mode))
        return fail(err, RF_E_RUNTIME_DIR, "runtime_dir", 0,
                    "runtime directory %s is a symlink; refusing it", dir);
    if (!S_ISDIR(st.st_mode))
        return fail(err, RF_E_RUNTIME_DIR, "runtime_dir", 0,
                    "runtime directory %s is not a directory", dir);
    int trusted = o->has_trust_uid && st.st_uid == o->trust_uid;
    if (st.st_uid != getuid() && !trusted)
        return fail(err, RF_E_RUNTIME_DIR, "runtime_dir", 0,
                    "runtime directory %s is owned by uid %u, not by this user (uid %u)", dir,
                    (unsigned)st.st_uid, (unsigned)getuid());
    mode_t forbidden = o->has_trust_uid ? 027 : 077;
    if (st.st_mode & forbidden)
        return fail(err, RF_E_RUNTIME_DIR, "runtime_dir", 0,
                    "runtime directory %s has mode %o; it must grant nothing to others and, "
                    "unless trust_uid is given, nothing to its group", dir,
                    (unsigned)(st.st_mode & 07777));
    return RF_OK;
}

/* ----- §3: a minimal reader of the flat JSON reply object ----------------------------- */

typedef struct json_value {
    enum { J_NONE, J_STRING, J_NUMBER, J_TRUE, J_FALSE, J_NULL, J_OTHER } kind;
    char text[256]; /* string contents (unescaped) or the number's literal */
} json_value;

static const char *skip_ws(const char *p) {
    while (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n') p++;
    return p;
}

/* Reads a string at p (which is at '"'); writes at most len-1 bytes; returns past it. */
static const char *read_string(const char *p, char *out, size_t len) {
    size_t n = 0;
    p++;
    while (*p && *p != '"') {
        char ch = *p++;
        if (ch == '\\') {
            char e = *p ? *p++ : '\0';
            switch (e) {
            case 'n': ch = '\n'; break;
            case 't': ch = '\t'; break;
            case 'r': ch = '\r'; break;
            case 'b': ch = '\b'; break;
            case 'f': ch = '\f'; break;
            case 'u':
                for (int i = 0; i < 4 && *p; i++) p++;
                ch = '?';
                break;
            case '\0': return NULL;
            default: ch = e; break;
            }
        }
        if (out && n + 1 < len) out[n++] = ch;
    }
    if (*p != '"') return NULL;
    if (out && len) out[n] = '\0';
    return p + 1;
}

/* Skips any JSON value (nested objects and arrays included); NULL if malformed. */
static const char *skip_value(const char *p) {
    p = skip_ws(p);
    if (*p == '"') return read_string(p, NULL, 0);
    if (*p == '{' || *p == '[') {
        int depth = 0;
        while (*p) {
            if (*p == '"') {
                p = read_string(p, NULL, 0);
                if (!p) return NULL;
                continue;
            }
            if (*p == '{' || *p == '[') depth++;
            if (*p == '}' || *p == ']') {
                if (--depth == 0) return p + 1;
            }
            p++;
        }
        return NULL;
    }
    const char *start = p;
    while (*p && *p != ',' && *p != '}' && *p != ']' && *p != ' ' && *p != '\n') p++;
    return p == start ? NULL : p;
}

/* Finds the top-level member `key` of the object in `json`. 0 if malformed. */
static int json_get(const char *json, const char *key, json_value *v) {
    const char *p = skip_ws(json);
    v->kind = J_NONE;
    v->text[0] = '\0';
    if (*p++ != '{') return 0;
    p = skip_ws(p);
    if (*p == '}') return 1;
    for (;;) {
        char k[64];
        p = skip_ws(p);
        if (*p != '"' || !(p = read_string(p, k, sizeof k))) return 0;
        p = skip_ws(p);
        if (*p++ != ':') return 0;
        p = skip_ws(p);
        if (strcmp(k, key) == 0) {
            if (*p == '"') {
                v->kind = J_STRING;
                return read_string(p, v->text, sizeof v->text) != NULL;
            }
            const char *end = skip_value(p);
            if (!end) return 0;
            size_t n = (size_t)(end - p);
            if (n >= sizeof v->text) n = sizeof v->text - 1;
            memcpy(v->text, p, n);
            v->text[n] = '\0';
            if (strcmp(v->text, "true") == 0) v->kind = J_TRUE;
            else if (strcmp(v->text, "false") == 0) v->kind = J_FALSE;
            else if (strcmp(v->text, "null") == 0) v->kind = J_NULL;
            else if (*p == '-' || (*p >= '0' && *p <= '9')) v->kind = J_NUMBER;
            else v->kind = J_OTHER;
            return 1;
        }
        if (!(p = skip_value(p))) return 0;
        p = skip_ws(p);
        if (*p == ',') {
            p++;
            continue;
        }
        return *p == '}';
    }
}

/* An unsigned decimal integer, exactly (no doubles): 0 on failure. */
static int parse_u64(const char *s, uint64_t *out) {
    uint64_t v = 0;
    if (!*s) return 0;
    for (; *s; s++) {
        if (*s < '0' || *s > '9') return 0;
        unsigned d = (unsigned)(*s - '0');
        if (v > (UINT64_MAX - d) / 10) return 0;
        v = v * 10 + d;
    }
    *out = v;
    return 1;
}

/* ----- §3: the handshake --------------------------------------------------------------- */

/* Reads <dir>/<name>.finished (§7): 1 and its generation (0 if unreadable) when present. */
static int finished_marker(const char *dir, const char *name, uint64_t *generation) {
    char path[PATH_MAX], buf[1024];
    if (snprintf(path, sizeof path, "%s/%s.finished", dir, name) >= (int)sizeof path) return 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    *generation = 0;
    if (n > 0) {
        json_value v;
        buf[n] = '\0';
        if (json_get(buf, "generation_str", &v) && v.kind == J_STRING)
            parse_u64(v.text, generation);
    }
    return 1;
}

static int connect_socket(const char *dir, const rf_attach_options *o, rf_error *err) {
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    int n = snprintf(addr.sun_path, sizeof addr.sun_path, "%s/%s.sock", dir, o->name);
    if (n < 0 || (size_t)n >= sizeof addr.sun_path)
        return fail(err, RF_E_RUNTIME_DIR, "runtime_dir", 0, "socket path %s/%s.sock too long",
                    dir, o->name);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return fail(err, RF_E_IO, "io", 0, "socket: %s", strerror(errno));
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        int e = errno;
        close(fd);
        if (e == ENOENT || e == ECONNREFUSED)
            return fail(err, RF_E_NOT_RUNNING, "not_running", 1,
                        "ring \"%s\": cannot connect to %s: %s (no daemon serves this ring: "
                        "start `ringfeed serve --name %s`)", o->name, addr.sun_path,
                        strerror(e), o->name);
        return fail(err, RF_E_PROTOCOL, "connect", 0, "ring \"%s\": cannot connect to %s: %s",
                    o->name, addr.sun_path, strerror(e));
    }
    /* §3 step 1: the producer must run as us, or as the uid we were told to trust. */
    struct ucred cred;
    socklen_t len = sizeof cred;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || len != sizeof cred) {
        close(fd);
        return fail(err, RF_E_PROTOCOL, "protocol", 0, "SO_PEERCRED: %s", strerror(errno));
    }
    if (cred.uid != getuid() && !(o->has_trust_uid && cred.uid == o->trust_uid)) {
        close(fd);
        return fail(err, RF_E_FOREIGN_PRODUCER, "foreign_producer", 0,
                    "ring \"%s\": the producer runs as uid %u, not as this user (uid %u); "
                    "refusing it", o->name, (unsigned)cred.uid, (unsigned)getuid());
    }
    return fd;
}

/* Descriptors received with a reply: the first MAX_RECV_FDS kept in order, all counted. */
typedef struct reply_fds {
    int fd[MAX_RECV_FDS];
    size_t kept;
    size_t count;
    int truncated; /* MSG_CTRUNC: the kernel dropped descriptors that did not fit */
} reply_fds;

static void close_fds(reply_fds *f) {
    for (size_t i = 0; i < f->kept; i++)
        if (f->fd[i] >= 0) close(f->fd[i]);
    f->kept = 0;
}

/* Receives the one reply line (§3 step 4) and every descriptor sent with it (2.0: three, in
 * one SCM_RIGHTS message with its first bytes; the caller refuses another count). */
static int recv_reply(int sock, char *line, size_t cap, reply_fds *fds, rf_error *err) {
    size_t got = 0;
    memset(fds, 0, sizeof *fds);
    for (;;) {
        union {
            struct cmsghdr hdr;
            char buf[CMSG_SPACE(MAX_RECV_FDS * sizeof(int))];
        } control;
        struct iovec iov = {line + got, cap - 1 - got};
        struct msghdr msg;
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.buf;
        msg.msg_controllen = sizeof control.buf;
        ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
        if (n < 0 && errno == EINTR) continue;
        if (n >= 0 && (msg.msg_flags & MSG_CTRUNC)) fds->truncated = 1;
        for (struct cmsghdr *h = CMSG_FIRSTHDR(&msg); n >= 0 && h; h = CMSG_NXTHDR(&msg, h)) {
            if (h->cmsg_level == SOL_SOCKET && h->cmsg_type == SCM_RIGHTS) {
                size_t count = (h->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                for (size_t i = 0; i < count; i++) {
                    int fd;
                    memcpy(&fd, CMSG_DATA(h) + i * sizeof(int), sizeof fd);
                    fds->count++;
                    if (fds->kept < MAX_RECV_FDS) fds->fd[fds->kept++] = fd;
                    else close(fd); /* counted, and refused by the caller */
                }
            }
        }
        if (n < 0)
            return fail(err, RF_E_PROTOCOL, "protocol", errno == EAGAIN || errno == EWOULDBLOCK,
                        "reading the reply: %s", errno == EAGAIN || errno == EWOULDBLOCK
                                                       ? "timed out" : strerror(errno));
        if (n == 0)
            return fail(err, RF_E_PROTOCOL, "protocol", 0,
                        "the producer closed the connection without a reply");
        got += (size_t)n;
        line[got] = '\0';
        char *nl = memchr(line, '\n', got);
        if (nl) {
            *nl = '\0';
            return RF_OK;
        }
        if (got >= cap - 1)
            return fail(err, RF_E_PROTOCOL, "protocol", 0, "reply longer than 4096 bytes");
    }
}

/* ----- §5.6: validation ----------------------------------------------------------------- */

#define FORMAT(...) fail(err, RF_E_FORMAT, "format", 0, __VA_ARGS__)

static int add_ok(uint64_t a, uint64_t b, uint64_t *r) { return !__builtin_add_overflow(a, b, r); }
static int mul_ok(uint64_t a, uint64_t b, uint64_t *r) { return !__builtin_mul_overflow(a, b, r); }

static size_t dtype_size(uint32_t d) {
    switch (d) {
    case RF_U8: return 1;
    case RF_I32: return 4;
    case RF_I64: return 8;
    case RF_F16: case RF_BF16: case RF_U16: return 2;
    case RF_F32: return 4;
    default: return 0;
    }
}

typedef struct span {
    const char *what;
    uint64_t start, end;
} span;

static int table(const uint8_t *h, uint32_t off_field, uint64_t entries, uint64_t size,
                 const char *what, uint64_t header_bytes, uint64_t data_offset, span *out,
                 rf_error *err) {
    uint64_t off = rd32(h + off_field), bytes, end;
    if (off % 8) return FORMAT("malformed ring: %s offset %llu is not a multiple of 8", what,
                               (unsigned long long)off);
    if (!mul_ok(entries, size, &bytes) || !add_ok(off, bytes, &end) || off < header_bytes ||
        end > data_offset)
        return FORMAT("malformed ring: %s at %llu lies outside [header_bytes, data_offset)", what,
                      (unsigned long long)off);
    out->what = what;
    out->start = off;
    out->end = end;
    return RF_OK;
}

/* Validates the control region `ctl` (length `len` = data_offset) against the file size. */
static int validate(rf_consumer *c, const uint8_t *h, uint64_t len, uint64_t st_size,
                    rf_error *err) {
    if (st_size < HEADER_MIN || len < HEADER_MIN)
        return FORMAT("malformed ring: file of %llu bytes is shorter than the header",
                      (unsigned long long)st_size);
    if (memcmp(h + H_MAGIC, "RINGFEED", 8) != 0) return FORMAT("malformed ring: magic: not RINGFEED");
    uint16_t major = rd16(h + H_MAJOR);
    if (major != RF_VERSION_MAJOR)
        return FORMAT("malformed ring: version_major: %u, this client implements %u",
                      (unsigned)major, (unsigned)RF_VERSION_MAJOR);
    uint64_t header_bytes = rd32(h + H_HEADER_BYTES);
    uint64_t control_bytes = rd64(h + H_CONTROL_BYTES), file_bytes = rd64(h + H_FILE_BYTES);
    uint64_t generation = rd64(h + H_GENERATION), data_offset = rd64(h + H_DATA_OFFSET);
    uint64_t stride = rd64(h + H_SLOT_STRIDE);
    uint32_t lanes = rd32(h + H_LANE_COUNT), slots = rd32(h + H_SLOTS);
    uint32_t tensors = rd32(h + H_TENSOR_COUNT), cap = rd32(h + H_CONSUMER_CAP);
    uint32_t batch = rd32(h + H_BATCH_SIZE);
    if (header_bytes < HEADER_MIN) return FORMAT("malformed ring: header_bytes < 512");
    if (generation == 0) return FORMAT("malformed ring: generation: is zero");
    if (file_bytes != st_size)
        return FORMAT("malformed ring: file_bytes %llu != the file's size %llu",
                      (unsigned long long)file_bytes, (unsigned long long)st_size);
    if (control_bytes != data_offset) return FORMAT("malformed ring: control_bytes != data_offset");
    if (data_offset % 4096 || data_offset > file_bytes || data_offset != len)
        return FORMAT("malformed ring: data_offset %llu", (unsigned long long)data_offset);
    if (lanes < 1) return FORMAT("malformed ring: lane_count: 0");
    if (slots < 1) return FORMAT("malformed ring: slots_per_lane: 0");
    if (tensors < 1 || tensors > MAX_TENSORS)
        return FORMAT("malformed ring: tensor_count: %u not in 1..16", (unsigned)tensors);
    if (cap < lanes) return FORMAT("malformed ring: consumer_capacity < lane_count");
    if (batch < 1) return FORMAT("malformed ring: batch_size: 0");
    if (stride < 4096 || stride % 4096) return FORMAT("malformed ring: slot_stride");
    span t[4];
    uint64_t all_slots;
    if (!mul_ok(lanes, slots, &all_slots)) return FORMAT("malformed ring: slot count overflows");
    int rc;
    if ((rc = table(h, H_TENSOR_TABLE, tensors, TENSOR_ENTRY, "tensor table", header_bytes,
                    data_offset, &t[0], err)) ||
        (rc = table(h, H_LANE_TABLE, lanes, LANE_ENTRY, "lane table", header_bytes, data_offset,
                    &t[1], err)) ||
        (rc = table(h, H_SLOT_TABLE, all_slots, SLOT_ENTRY, "slot table", header_bytes,
                    data_offset, &t[2], err)) ||
        (rc = table(h, H_CONSUMER_TABLE, cap, CONSUMER_ENTRY, "consumer table", header_bytes,
                    data_offset, &t[3], err)))
        return rc;
    for (int i = 0; i < 4; i++)
        for (int j = i + 1; j < 4; j++)
            if (t[i].start < t[j].end && t[j].start < t[i].end)
                return FORMAT("malformed ring: %s overlaps %s", t[i].what, t[j].what);
    /* (1.3) world_size: 0 = unknown; otherwise it covers every lane's rank. */
    uint64_t world = rd32(h + H_WORLD_SIZE), rank0 = rd32(h + t[1].start + L_RANK);
    if (world != 0 && world < rank0 + lanes)
        return FORMAT("malformed ring: world_size %llu is below lane 0's rank %llu + lane_count %u",
                      (unsigned long long)world, (unsigned long long)rank0, (unsigned)lanes);
    uint64_t data_bytes, data_end;
    if (!mul_ok(all_slots, stride, &data_bytes) || !add_ok(data_offset, data_bytes, &data_end) ||
        data_end > file_bytes)
        return FORMAT("malformed ring: the slots do not fit in file_bytes");
    for (uint32_t i = 0; i < tensors; i++) {
        const uint8_t *e = h + t[0].start + (uint64_t)i * TENSOR_ENTRY;
        tensor_desc *d = &c->tensors[i];
        /* Name: NUL-padded, non-empty, printable ASCII without spaces (§5.2, 1.3). */
        size_t n = 0;
        while (n < 16 && e[n]) n++;
        for (size_t k = n; k < 16; k++)
            if (e[k]) return FORMAT("malformed ring: tensor %u name: bytes after its NUL", i);
        if (n == 0) return FORMAT("malformed ring: tensor %u name: empty", i);
        for (size_t k = 0; k < n; k++)
            if (e[k] < 0x21 || e[k] > 0x7e)
                return FORMAT("malformed ring: tensor %u name: byte 0x%02x is not printable ASCII",
                              i, (unsigned)e[k]);
        memcpy(d->name, e, n);
        d->name[n] = '\0';
        for (uint32_t k = 0; k < i; k++)
            if (strcmp(c->tensors[k].name, d->name) == 0)
                return FORMAT("malformed ring: tensor %s: duplicate name", d->name);
        d->dtype = rd32(e + 16);
        d->rank = rd32(e + 20);
        size_t es = dtype_size(d->dtype);
        if (!es) return FORMAT("malformed ring: tensor %s dtype: unknown code %u", d->name,
                               (unsigned)d->dtype);
        if (d->rank < 1 || d->rank > 4)
            return FORMAT("malformed ring: tensor %s rank: %u not in 1..4", d->name,
                          (unsigned)d->rank);
        uint64_t elems = 1;
        for (uint32_t k = 0; k < 4; k++) {
            d->shape[k] = rd64(e + 24 + 8 * k);
            if (k < d->rank) {
                if (d->shape[k] < 1 || !mul_ok(elems, d->shape[k], &elems))
                    return FORMAT("malformed ring: tensor %s shape[%u]", d->name, (unsigned)k);
            } else if (d->shape[k]) {
                return FORMAT("malformed ring: tensor %s shape[%u] past rank is not 0", d->name,
                              (unsigned)k);
            }
        }
        if (d->shape[0] != batch)
            return FORMAT("malformed ring: tensor %s shape[0] != batch_size", d->name);
        d->offset = rd64(e + 56);
        uint64_t end;
        if (!mul_ok(elems, es, &d->bytes) || d->offset % 64 || !add_ok(d->offset, d->bytes, &end) ||
            end > stride)
            return FORMAT("malformed ring: tensor %s offset/size outside the slot", d->name);
        for (uint32_t k = 0; k < i; k++) {
            const tensor_desc *o = &c->tensors[k];
            if (d->offset < o->offset + o->bytes && o->offset < d->offset + d->bytes)
                return FORMAT("malformed ring: tensors %s and %s overlap", o->name, d->name);
        }
    }
    c->info.generation = generation;
    c->info.version_major = major;
    c->info.version_minor = rd16(h + H_MINOR);
    c->info.lane_count = lanes;
    c->info.slots_per_lane = slots;
    c->info.batch_size = batch;
    c->info.tensor_count = tensors;
    c->info.flags = rd32(h + H_FLAGS);
    c->info.batches_per_epoch = rd64(h + H_BATCHES_PER_EPOCH);
    c->info.epochs = rd64(h + H_EPOCHS);
    c->info.seed = rd64(h + H_SEED);
    c->info.samples_per_epoch = rd64(h + H_SAMPLES_PER_EPOCH);
    c->info.producer_pid = rd32(h + H_PRODUCER_PID);
    c->info.world_size = (uint32_t)world;
    memcpy(c->info.name, h + H_NAME, 32);
    c->info.name[32] = '\0';
    c->slot_stride = stride;
    c->lane_table = t[1].start;
    c->slot_table = t[2].start;
    c->consumer_table = t[3].start;
    c->control_len = data_offset;
    c->ring_len = file_bytes;
    return RF_OK;
}

/* ----- attaching ------------------------------------------------------------------------ */

/* §4: the ring descriptor is read-only (2.0: a consumer cannot write the ring, not even by
 * mapping it PROT_WRITE) and, for a memfd, sealed against shrinking. */
static int check_ring_fd(int fd, int named_file, const char *name, rf_error *err) {
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0)
        return fail(err, RF_E_IO, "io", 0, "fcntl(F_GETFL) of the ring descriptor: %s",
                    strerror(errno));
    if ((flags & O_ACCMODE) != O_RDONLY)
        return fail(err, RF_E_PROTOCOL, "protocol", 0,
                    "ring \"%s\": ring descriptor is writable (access mode %d, expected "
                    "O_RDONLY); refusing it", name, flags & O_ACCMODE);
    /* A named --shm-dir file cannot be sealed; a memfd must be. */
    if (!named_file) {
        int seals = fcntl(fd, F_GET_SEALS);
        if (seals < 0 || !(seals & F_SEAL_SHRINK))
            return fail(err, RF_E_NOT_SEALED, "not_sealed", 0,
                        "ring \"%s\": memfd is not sealed against shrinking; refusing to map it",
                        name);
    }
    return RF_OK;
}

/* §5 "Lane page": before it is mapped, the page's size is the reply's lane_page_bytes and
 * the formula's for the ring's slots_per_lane, it cannot shrink under the mapping, and it
 * carries the magic, the lane attached to and the ring's slot count. */
static int check_lane_page(int fd, uint64_t reply_bytes, uint32_t lane, uint32_t slots,
                           rf_error *err) {
    uint64_t want = lane_page_bytes(slots);
    struct stat st;
    if (fstat(fd, &st) != 0)
        return fail(err, RF_E_IO, "io", 0, "fstat of the lane page: %s", strerror(errno));
    uint64_t size = (uint64_t)st.st_size;
    if (size != reply_bytes || size != want)
        return FORMAT("malformed lane page: lane_page_bytes: the page has %llu bytes, the reply "
                      "says %llu, %u slots per lane need %llu", (unsigned long long)size,
                      (unsigned long long)reply_bytes, (unsigned)slots, (unsigned long long)want);
    int seals = fcntl(fd, F_GET_SEALS);
    if (seals < 0 || !(seals & F_SEAL_SHRINK))
        return fail(err, RF_E_NOT_SEALED, "not_sealed", 0,
                    "the lane page is not sealed against shrinking; refusing to map it");
    uint8_t head[P_HEADER_BYTES];
    if (pread(fd, head, sizeof head, 0) != (ssize_t)sizeof head)
        return FORMAT("malformed lane page: its first %d bytes are unreadable", P_HEADER_BYTES);
    if (memcmp(head + P_MAGIC, "RFLANE\0\0", 8) != 0)
        return FORMAT("malformed lane page: lane_page.magic: not RFLANE");
    if (rd32(head + P_LANE) != lane)
        return FORMAT("malformed lane page: lane_page.lane: %u, attached to lane %u",
                      (unsigned)rd32(head + P_LANE), (unsigned)lane);
    if (rd32(head + P_SLOTS) != slots)
        return FORMAT("malformed lane page: lane_page.slots: %u, slots_per_lane is %u",
                      (unsigned)rd32(head + P_SLOTS), (unsigned)slots);
    return RF_OK;
}

static int attach_once(const rf_attach_options *o, const char *dir, rf_consumer **out,
                       rf_error *err) {
    int rc = check_dir(dir, o, err);
    if (rc) return rc;
    int sock = connect_socket(dir, o, err);
    if (sock < 0) return sock;
    reply_fds fds;
    memset(&fds, 0, sizeof fds);
    rf_consumer *c = NULL;
    char line[MAX_LINE + 1], request[256];
    int n;
    if (o->resume)
        n = snprintf(request, sizeof request,
                     "{\"op\":\"attach\",\"version\":%d,\"lane\":%u,\"pid\":%d,"
                     "\"resume\":{\"epoch\":%llu,\"index\":%llu}}\n",
                     RF_VERSION_MAJOR, (unsigned)o->lane, (int)getpid(),
                     (unsigned long long)o->resume_epoch, (unsigned long long)o->resume_index);
    else
        n = snprintf(request, sizeof request,
                     "{\"op\":\"attach\",\"version\":%d,\"lane\":%u,\"pid\":%d}\n",
                     RF_VERSION_MAJOR, (unsigned)o->lane, (int)getpid());
    /* §3 step 3: the whole line at once (the producer allows 2 s). */
    if (send(sock, request, (size_t)n, MSG_NOSIGNAL) != n) {
        rc = fail(err, RF_E_PROTOCOL, "protocol", 0, "sending the request: %s", strerror(errno));
        goto out;
    }
    double t = o->reply_timeout_s > 0 ? o->reply_timeout_s : 30.0;
    struct timeval tv = {(time_t)t, (suseconds_t)((t - (double)(time_t)t) * 1e6)};
    setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if ((rc = recv_reply(sock, line, sizeof line, &fds, err))) goto out;
    json_value ok, v;
    if (!json_get(line, "ok", &ok)) {
        rc = fail(err, RF_E_PROTOCOL, "protocol", 0, "malformed reply: %.200s", line);
        goto out;
    }
    if (ok.kind != J_TRUE) {
        json_value why, code, retry;
        json_get(line, "error", &why);
        json_get(line, "code", &code);
        json_get(line, "retry", &retry);
        /* A producer before 1.3 gives no code: treat it as retryable (§8). */
        int has_code = code.kind == J_STRING;
        rc = fail(err, RF_E_REFUSED, has_code ? code.text : "unknown",
                  has_code ? retry.kind == J_TRUE : 1, "ring \"%s\" lane %u: producer refused (%s): %s",
                  o->name, (unsigned)o->lane, has_code ? code.text : "unknown",
                  why.kind == J_STRING ? why.text : "no reason given");
        goto out;
    }
    /* §3: exactly ring, lane page, doorbell. Fewer leaves the client without memory it must
     * have; more is a producer this client does not understand. */
    if (fds.count != REPLY_FDS || fds.truncated) {
        rc = fail(err, RF_E_PROTOCOL, "protocol", 0,
                  "the reply carried %zu file descriptor(s)%s, expected %d (ring, lane, doorbell)",
                  fds.count, fds.truncated ? " and more the client could not receive" : "",
                  REPLY_FDS);
        goto out;
    }
    /* The generation, exactly, from its decimal string (no doubles). */
    uint64_t generation = 0;
    if (!(json_get(line, "generation_str", &v) && v.kind == J_STRING && parse_u64(v.text, &generation)) &&
        !(json_get(line, "generation", &v) && v.kind == J_NUMBER && parse_u64(v.text, &generation))) {
        rc = fail(err, RF_E_PROTOCOL, "protocol", 0, "reply without a readable generation");
        goto out;
    }
    uint64_t page_bytes = 0;
    if (!(json_get(line, "lane_page_bytes", &v) && v.kind == J_NUMBER &&
          parse_u64(v.text, &page_bytes))) {
        rc = fail(err, RF_E_PROTOCOL, "protocol", 0, "reply without a readable lane_page_bytes");
        goto out;
    }
    int named_file = json_get(line, "segment", &v) && v.kind == J_STRING && strcmp(v.text, "file") == 0;
    int ring_fd = fds.fd[FD_RING], lane_fd = fds.fd[FD_LANE];
    if ((rc = check_ring_fd(ring_fd, named_file, o->name, err))) goto out;
    struct stat st;
    if (fstat(ring_fd, &st) != 0) {
        rc = fail(err, RF_E_IO, "io", 0, "fstat of the ring: %s", strerror(errno));
        goto out;
    }
    uint64_t st_size = (uint64_t)st.st_size;
    /* §4 step 2: read the header, then the whole control region, and validate it before
     * any view is made. */
    uint8_t head[HEADER_MIN];
    if (st_size < HEADER_MIN || pread(ring_fd, head, HEADER_MIN, 0) != HEADER_MIN) {
        rc = FORMAT("malformed ring: file of %llu bytes is shorter than the header",
                    (unsigned long long)st_size);
        goto out;
    }
    uint64_t data_offset = rd64(head + H_DATA_OFFSET);
    if (data_offset < HEADER_MIN || data_offset > st_size || data_offset > MAX_CONTROL_BYTES) {
        rc = FORMAT("malformed ring: data_offset %llu beyond the file or too large",
                    (unsigned long long)data_offset);
        goto out;
    }
    c = calloc(1, sizeof *c);
    uint8_t *ctl = malloc((size_t)data_offset);
    if (!c || !ctl) {
        free(ctl);
        rc = fail(err, RF_E_NOMEM, "nomem", 0, "out of memory");
        goto out;
    }
    c->sock = -1;
    c->doorbell = -1;
    size_t got = 0;
    while (got < data_offset) {
        ssize_t r = pread(ring_fd, ctl + got, (size_t)data_offset - got, (off_t)got);
        if (r <= 0) break;
        got += (size_t)r;
    }
    rc = got == data_offset ? validate(c, ctl, data_offset, st_size, err)
                            : FORMAT("malformed ring: control region unreadable");
    free(ctl);
    if (rc) goto out;
    if (c->info.generation != generation) {
        rc = FORMAT("malformed ring: generation %llu differs from the attach reply's %llu",
                    (unsigned long long)c->info.generation, (unsigned long long)generation);
        goto out;
    }
    if (o->lane >= c->info.lane_count) {
        rc = fail(err, RF_E_PROTOCOL, "protocol", 0, "lane %u is beyond the header's lane_count %u",
                  (unsigned)o->lane, (unsigned)c->info.lane_count);
        goto out;
    }
    if ((rc = check_lane_page(lane_fd, page_bytes, o->lane, c->info.slots_per_lane, err)))
        goto out;
    /* §4 steps 3 and 4: the whole ring read-only (the descriptor allows nothing else), the
     * lane page read-write. */
    void *ring = mmap(NULL, (size_t)c->ring_len, PROT_READ, MAP_SHARED, ring_fd, 0);
    if (ring == MAP_FAILED) {
        rc = fail(err, RF_E_IO, "io", 0, "mapping the ring: %s", strerror(errno));
        goto out;
    }
    c->ring = ring;
    c->data = c->ring + c->control_len;
    void *page = mmap(NULL, (size_t)page_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, lane_fd, 0);
    if (page == MAP_FAILED) {
        rc = fail(err, RF_E_IO, "io", 0, "mapping the lane page: %s", strerror(errno));
        goto out;
    }
    c->page = page;
    c->page_len = page_bytes;
    snprintf(c->name, sizeof c->name, "%s", o->name);
    c->lane = o->lane;
    c->info.rank = atomic_load_explicit(a32(c, lane_off(c) + L_RANK), memory_order_relaxed);
    c->info.rank_samples =
        atomic_load_explicit(a64(c, lane_off(c) + L_RANK_SAMPLES), memory_order_relaxed);
    c->pid = (uint32_t)getpid();
    c->doorbell = fds.fd[FD_DOORBELL];
    fds.fd[FD_DOORBELL] = -1; /* kept: the consumer owns it now */
    c->sock = sock;
    sock = -1;
    /* The reply timeout applied to the handshake only. */
    struct timeval none = {0, 0};
    setsockopt(c->sock, SOL_SOCKET, SO_RCVTIMEO, &none, sizeof none);
    *out = c;
    c = NULL;
    rc = RF_OK;
out:
    if (c) {
        if (c->ring) munmap((void *)(uintptr_t)c->ring, (size_t)c->ring_len);
        if (c->page) munmap(c->page, (size_t)c->page_len);
        free(c);
    }
    close_fds(&fds); /* the mappings keep the memory */
    if (sock >= 0) close(sock);
    return rc;
}

int rf_attach(const rf_attach_options *o, rf_consumer **out, rf_error *err) {
    char dir[PATH_MAX];
    clear_error(err);
    if (out) *out = NULL;
    if (!o || !out) return fail(err, RF_E_INVALID, "client", 0, "NULL options or out pointer");
    if (!valid_name(o->name))
        return fail(err, RF_E_INVALID, "client", 0,
                    "invalid ring name \"%s\": 1-32 characters from [A-Za-z0-9._-], not starting "
                    "with '.'", o->name ? o->name : "(null)");
    if (!resolve_dir(o, dir, sizeof dir))
        return fail(err, RF_E_RUNTIME_DIR, "runtime_dir", 0, "runtime directory path too long");
    uint64_t deadline = mono_ns() + (uint64_t)(o->wait_s > 0 ? o->wait_s * 1e9 : 0);
    for (;;) {
        rf_error local;
        rf_error *e = err ? err : &local;
        int rc = attach_once(o, dir, out, e);
        if (rc == RF_OK) return RF_OK;
        if (e->retryable && mono_ns() < deadline) {
            sleep_ns(RETRY_PAUSE_NS);
            continue;
        }
        uint64_t generation;
        /* No daemon, but its run finished (§7): say "finished", not "cannot connect". With a
         * wait, only now that it is over: a new run of the name may have been starting. */
        if (rc == RF_E_NOT_RUNNING && finished_marker(dir, o->name, &generation))
            return fail(err, RF_E_FINISHED, "finished", 0,
                        "ring \"%s\": the run has finished (generation %llu); its producer exited "
                        "after the last epoch", o->name, (unsigned long long)generation);
        return rc;
    }
}

/* ----- §9: EPOCH_DONE frames ------------------------------------------------------------- */

/* Sends what the outbox holds without blocking; 0 when the connection is broken. */
static int flush_outbox(rf_consumer *c) {
    while (c->outbox_len) {
        ssize_t n = send(c->sock, c->outbox, c->outbox_len, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            return errno == EAGAIN || errno == EWOULDBLOCK;
        }
        memmove(c->outbox, c->outbox + n, c->outbox_len - (size_t)n);
        c->outbox_len -= (size_t)n;
    }
    return 1;
}

static void queue_epoch_done(rf_consumer *c, uint64_t epoch) {
    if (c->epoch_done_sent && c->epoch_done_epoch >= epoch) return;
    if (c->outbox_len + FRAME_BYTES > sizeof c->outbox) return; /* the producer is not reading */
    uint8_t *f = c->outbox + c->outbox_len;
    uint16_t kind = 2;
    memset(f, 0, FRAME_BYTES);
    memcpy(f, "RFBK", 4);
    memcpy(f + 4, &kind, 2);
    memcpy(f + 16, &epoch, 8);
    c->outbox_len += FRAME_BYTES;
    c->epoch_done_sent = 1;
    c->epoch_done_epoch = epoch;
}

/* ----- §6: taking, waiting, releasing ------------------------------------------------------ */

/* Whether the producer's end of the connection is closed (EOF or error), without blocking. */
static int peer_closed(const rf_consumer *c) {
    char byte;
    ssize_t n = recv(c->sock, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n == 0) return 1;
    if (n < 0) return errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR;
    return 0; /* the producer never sends after the reply; bytes are not a hang-up */
}

/* Takes the lane's READY slot with the smallest seq that this attach has neither taken nor
 * released (§6 "Consumer takes"): 1 if one was taken, 0 if none is ready, RF_E_FORMAT for a
 * state outside 0..2. Writes only the lane page. */
static int try_take(rf_consumer *c, rf_batch *b, rf_error *err) {
    uint32_t best = UINT32_MAX;
    uint64_t best_seq = 0;
    for (uint32_t s = 0; s < c->info.slots_per_lane; s++) {
        uint64_t e = slot_off(c, s);
        /* SYNC POINT with the producer's store-release of READY after writing the payload. */
        uint32_t state = atomic_load_explicit(a32(c, e + S_STATE), memory_order_acquire);
        if (state > SLOT_READY)
            return FORMAT("malformed ring: lane %u slot %u state: %u not in 0..2 (format 2.0 has "
                          "no HELD)", (unsigned)c->lane, (unsigned)s, (unsigned)state);
        if (state != SLOT_READY) continue;
        uint64_t seq = atomic_load_explicit(a64(c, e + S_SEQ), memory_order_acquire);
        /* Our own page: only this process writes it, relaxed loads see our last stores. */
        if (seq == 0 || atomic_load_explicit(taken_seq(c, s), memory_order_relaxed) == seq ||
            atomic_load_explicit(released_seq(c, s), memory_order_relaxed) == seq)
            continue;
        if (best == UINT32_MAX || seq < best_seq) {
            best = s;
            best_seq = seq;
        }
    }
    if (best == UINT32_MAX) return 0;
    uint64_t e = slot_off(c, best);
    /* Read by the producer only at reclaim, after this attach's connection has ended. */
    atomic_store_explicit(taken_seq(c, best), best_seq, memory_order_relaxed);
    /* The producer may have claimed the slot (a batch this attach released) and begun to
     * rewrite it between the scan's loads: then undo the take (§6) and let the caller scan
     * again. SYNC POINT with the producer's store-release of READY, as above. */
    if (atomic_load_explicit(a32(c, e + S_STATE), memory_order_acquire) != SLOT_READY ||
        atomic_load_explicit(a64(c, e + S_SEQ), memory_order_relaxed) != best_seq) {
        atomic_store_explicit(taken_seq(c, best), 0, memory_order_relaxed);
        return 0;
    }
    b->slot = best;
    b->seq = best_seq;
    b->epoch = atomic_load_explicit(a64(c, e + S_EPOCH), memory_order_relaxed);
    b->index = atomic_load_explicit(a64(c, e + S_INDEX), memory_order_relaxed);
    b->count = atomic_load_explicit(a32(c, e + S_COUNT), memory_order_relaxed);
    b->flags = atomic_load_explicit(a32(c, e + S_FLAGS), memory_order_relaxed);
    b->last_of_epoch = (b->flags & 1) != 0;
    b->redelivered = (b->flags & 2) != 0;
    c->have_last = 1;
    c->last_epoch = b->epoch;
    c->last_was_end = b->last_of_epoch;
    /* The consumer's own counters: it is their only writer; relaxed suffices (statistics the
     * producer copies for `stat`, never used for a decision). */
    atomic_fetch_add_explicit(p64(c, P_TAKEN), 1, memory_order_relaxed);
    return 1;
}

/* The process that attached: a forked child must not take or release through the lane page,
 * which it shares with its parent. */
static int in_attaching_process(const rf_consumer *c) { return (uint32_t)getpid() == c->pid; }

static void last_error(const rf_consumer *c, char *out, size_t len) {
    size_t n = 0;
    while (n < 255 && n + 1 < len && c->ring[H_LAST_ERROR + n]) {
        out[n] = (char)c->ring[H_LAST_ERROR + n];
        n++;
    }
    out[n] = '\0';
}

int rf_next(rf_consumer *c, double timeout_s, rf_batch *b, rf_error *err) {
    clear_error(err);
    if (!c || !b) return fail(err, RF_E_INVALID, "client", 0, "NULL consumer or batch");
    if (!in_attaching_process(c))
        return fail(err, RF_E_INVALID, "client", 0,
                    "ring \"%s\": this consumer was attached by pid %u; a forked child must "
                    "attach anew", c->name, (unsigned)c->pid);
    if (c->have_last && c->last_was_end) queue_epoch_done(c, c->last_epoch);
    flush_outbox(c);
    const _Atomic uint32_t *publish_seq = a32(c, lane_off(c) + L_PUBLISH_SEQ);
    uint64_t start = mono_ns(), waited = 0;
    uint64_t deadline = timeout_s < 0 ? UINT64_MAX : start + (uint64_t)(timeout_s * 1e9);
    int rc;
    for (;;) {
        /* Read the word before scanning: a publish after the scan changes it, so the wait
         * below returns at once (SYNC POINT with the producer's bump after publishing). */
        uint32_t v = atomic_load_explicit(publish_seq, memory_order_acquire);
        if ((rc = try_take(c, b, err)) != 0) break;
        uint32_t state = atomic_load_explicit(a32(c, H_STATE), memory_order_acquire);
        if (state == ST_FINISHED) {
            /* Publishes happen-before FINISHED: one more scan sees them all. A finished ring
             * whose producer has exited is still finished (§7): the end, not a crash. */
            rc = try_take(c, b, err);
            if (rc == 0) rc = RF_END + 1; /* marker: end of stream */
            break;
        }
        if (state == ST_STOPPED || state == ST_FAILED || state > ST_FAILED) {
            char why[256];
            last_error(c, why, sizeof why);
            if (state > ST_FAILED) {
                rc = FORMAT("malformed ring: producer_state %u not in 0..4", (unsigned)state);
                break;
            }
            rc = fail(err, RF_E_PRODUCER_GONE, "producer_gone", 1,
                      "ring \"%s\": producer (pid %u) gone: %s%s", c->name,
                      (unsigned)c->info.producer_pid, state == ST_STOPPED ? "it stopped" : "it failed: ",
                      state == ST_STOPPED ? "" : why);
            break;
        }
        if (peer_closed(c)) {
            rc = fail(err, RF_E_PRODUCER_GONE, "producer_gone", 1,
                      "ring \"%s\": producer (pid %u) gone: its socket closed (process exited or "
                      "was killed)", c->name, (unsigned)c->info.producer_pid);
            break;
        }
        /* Heartbeat: same CLOCK_MONOTONIC as the producer (same time namespace, §6). */
        uint64_t beat = atomic_load_explicit(a64(c, H_HEARTBEAT), memory_order_acquire);
        uint64_t now = mono_ns();
        if (now > beat && now - beat > HEARTBEAT_STALE_NS) {
            rc = fail(err, RF_E_PRODUCER_GONE, "producer_gone", 1,
                      "ring \"%s\": producer (pid %u) gone: its heartbeat is older than 3 s (frozen)",
                      c->name, (unsigned)c->info.producer_pid);
            break;
        }
        if (now >= deadline) {
            rc = fail(err, RF_E_TIMEOUT, "timeout", 1, "ring \"%s\" lane %u: no batch within %.3f s",
                      c->name, (unsigned)c->lane, timeout_s);
            break;
        }
        uint64_t slice = deadline - now < WAIT_SLICE_NS ? deadline - now : WAIT_SLICE_NS;
        struct timespec ts = {0, (long)slice};
        uint64_t t0 = mono_ns();
        futex_wait(publish_seq, v, &ts); /* any wake-up is a hint: scan again */
        waited += mono_ns() - t0;
    }
    if (waited)
        atomic_fetch_add_explicit(p64(c, P_CONSUMER_WAIT_NS), waited, memory_order_relaxed);
    atomic_store_explicit(p64(c, P_HEARTBEAT), mono_ns(), memory_order_relaxed);
    if (rc == 1) return RF_OK;
    if (rc == RF_END + 1) return RF_END;
    return rc;
}

/* Whether this attach holds `b`: the slot is READY with b's batch, which the lane page says
 * was taken and not yet released. */
static int ours(const rf_consumer *c, const rf_batch *b) {
    uint64_t e = slot_off(c, b->slot);
    return b->seq != 0 &&
           atomic_load_explicit(a32(c, e + S_STATE), memory_order_acquire) == SLOT_READY &&
           atomic_load_explicit(a64(c, e + S_SEQ), memory_order_relaxed) == b->seq &&
           atomic_load_explicit(taken_seq(c, b->slot), memory_order_relaxed) == b->seq &&
           atomic_load_explicit(released_seq(c, b->slot), memory_order_relaxed) != b->seq;
}

int rf_still_held(const rf_consumer *c, const rf_batch *b) {
    return c && b && b->slot < c->info.slots_per_lane && ours(c, b);
}

/* Wakes the producer if it waits for a slot of this lane: 8 bytes to the eventfd. EAGAIN
 * means the counter is saturated, which wakes the producer already. */
static void ring_doorbell(const rf_consumer *c) {
    uint64_t one = 1;
    while (write(c->doorbell, &one, sizeof one) < 0 && errno == EINTR) {
    }
}

int rf_release(rf_consumer *c, const rf_batch *b) {
    if (!c || !b || b->slot >= c->info.slots_per_lane) return RF_E_INVALID;
    if (!in_attaching_process(c)) return RF_E_INVALID; /* the parent's batch, not ours */
    /* Only a batch this attach took and has not released (§6): a second release of the same
     * batch, or of one never taken, changes nothing. No "still ours" check against the ring:
     * once the producer has reclaimed this attach, nobody reads its page any more. */
    if (b->seq == 0 ||
        atomic_load_explicit(taken_seq(c, b->slot), memory_order_relaxed) != b->seq ||
        atomic_load_explicit(released_seq(c, b->slot), memory_order_relaxed) == b->seq)
        return RF_OK;
    /* SYNC POINT with the producer's load-acquire of released_seq before it claims the slot:
     * our reads of the payload happen-before its rewrite. */
    atomic_store_explicit(released_seq(c, b->slot), b->seq, memory_order_release);
    atomic_fetch_add_explicit(p64(c, P_RELEASED), 1, memory_order_relaxed);
    atomic_store_explicit(p64(c, P_HEARTBEAT), mono_ns(), memory_order_relaxed);
    ring_doorbell(c);
    return RF_OK;
}

/* ----- tensors ----------------------------------------------------------------------------- */

int rf_tensor_view(const rf_consumer *c, const rf_batch *b, const char *name, rf_tensor *t,
                   rf_error *err) {
    clear_error(err);
    if (!c || !b || !name || !t || b->slot >= c->info.slots_per_lane)
        return fail(err, RF_E_INVALID, "client", 0, "bad arguments to rf_tensor_view");
    for (uint32_t i = 0; i < c->info.tensor_count; i++) {
        const tensor_desc *d = &c->tensors[i];
        if (strcmp(d->name, name) != 0) continue;
        memset(t, 0, sizeof *t);
        t->name = d->name;
        t->dtype = (rf_dtype)d->dtype;
        t->elem_size = dtype_size(d->dtype);
        t->rank = d->rank;
        uint64_t stride = t->elem_size;
        for (int k = (int)d->rank - 1; k >= 0; k--) {
            t->shape[k] = d->shape[k];
            t->strides[k] = stride;
            stride *= d->shape[k];
        }
        uint64_t off = ((uint64_t)c->lane * c->info.slots_per_lane + b->slot) * c->slot_stride + d->offset;
        t->data = c->data + off;
        t->bytes = d->bytes;
        return RF_OK;
    }
    return fail(err, RF_E_TENSOR, "no_such_tensor", 0, "no tensor named \"%s\" in the batch schema",
                name);
}

int rf_tensor_view_typed(const rf_consumer *c, const rf_batch *b, const char *name,
                         rf_dtype dtype, rf_tensor *t, rf_error *err) {
    int rc = rf_tensor_view(c, b, name, t, err);
    if (rc) return rc;
    if (t->dtype != dtype)
        return fail(err, RF_E_TENSOR, "dtype_mismatch", 0, "tensor \"%s\" holds dtype %d, not %d",
                    name, (int)t->dtype, (int)dtype);
    return RF_OK;
}

void rf_ring_info_get(const rf_consumer *c, rf_ring_info *info) {
    if (c && info) *info = c->info;
}

void rf_detach(rf_consumer *c) {
    if (!c) return;
    /* Release what this attach still holds (its lane page says which), then say goodbye by
     * closing the connection: the producer reclaims anything left (§3). A forked child only
     * closes its copies: the page and the connection are its parent's. */
    if (in_attaching_process(c)) {
        for (uint32_t s = 0; s < c->info.slots_per_lane; s++) {
            rf_batch b;
            memset(&b, 0, sizeof b);
            b.slot = s;
            b.seq = atomic_load_explicit(taken_seq(c, s), memory_order_relaxed);
            rf_release(c, &b);
        }
        if (c->have_last && c->last_was_end) queue_epoch_done(c, c->last_epoch);
        flush_outbox(c);
    }
    close(c->sock);
    close(c->doorbell);
    munmap(c->page, (size_t)c->page_len);
    munmap((void *)(uintptr_t)c->ring, (size_t)c->ring_len);
    free(c);
}
