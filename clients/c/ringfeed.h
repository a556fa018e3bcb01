/*
 * ringfeed.h: a C11 client of the ringfeed shared-memory ring (libc only, Linux).
 *
 * Written from docs/ring-format.md (the contract) alone: attach to one lane of a running
 * `ringfeed serve`, take its batches in order, read their tensors in place (zero copy) and
 * release them. See clients/c/README.md for a walk-through and a Python ctypes example.
 *
 *     rf_attach_options o;
 *     rf_attach_options_init(&o, "default", 0);
 *     rf_consumer *c;
 *     rf_error err;
 *     if (rf_attach(&o, &c, &err) != RF_OK) { fprintf(stderr, "%s\n", err.message); ... }
 *     rf_batch b;
 *     int rc;
 *     while ((rc = rf_next(c, -1.0, &b, &err)) == RF_OK) {
 *         rf_tensor images;
 *         rf_tensor_view(c, &b, "images", &images, &err);   // pointer into the ring
 *         ... use images.data, images.shape, images.strides ...
 *         rf_release(c, &b);
 *     }
 *     // rc == RF_END: the run has ended; otherwise err says why.
 *     rf_detach(c);
 *
 * Errors: every call that can fail returns an rf_status (RF_OK = 0, RF_END = 1, negative
 * values are errors) and, when given an rf_error, fills it with the same status, the
 * machine-readable `code` of the ring format (§3 "Refusal codes": the producer's refusal
 * code, or the client's own such as "not_running", "finished", "producer_gone"), whether
 * trying again later may help (`retryable`) and a message for humans.
 *
 * Thread safety: an rf_consumer is not thread-safe. Use it from one thread at a time (take,
 * release, tensor views and detach included), or guard every call with one mutex of your own;
 * rf_next may block (futex wait), so do not hold that mutex across it if other threads must
 * release meanwhile: hand batches to other threads and release them from the owning thread.
 * Distinct rf_consumer objects (other lanes, other rings) are independent. Tensor views stay
 * valid from rf_next until the batch's rf_release or rf_detach; reading them afterwards reads
 * memory the producer may be rewriting. After fork(), the child must not use the parent's
 * consumer (attach anew): in a child rf_next and rf_release refuse (RF_E_INVALID) rather than
 * take or release the parent's batches through the shared lane page, and rf_detach in the
 * child closes only the child's copies.
 *
 * Memory (format 2.0): the ring is mapped read-only; the only memory this client writes is
 * its own lane page (the batches it took and released, its counters), passed by the producer
 * with the attach, and it rings the lane's doorbell (an eventfd) after each release.
 */
#ifndef RINGFEED_H
#define RINGFEED_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** Ring format major version this client implements (§8). */
#define RF_VERSION_MAJOR 2
/** Ring format minor version this client was written against. */
#define RF_VERSION_MINOR 0

/** Results. RF_OK and RF_END are not errors; every error is negative. */
typedef enum rf_status {
    RF_OK = 0,
    /** The stream has ended: the producer finished its last epoch and nothing is left. */
    RF_END = 1,
    /** No batch within the timeout given to rf_next. */
    RF_E_TIMEOUT = -1,
    /** No producer serves the name (yet): no runtime directory, no socket, nobody
     * listening. Retryable. */
    RF_E_NOT_RUNNING = -2,
    /** The run of that name has finished and its producer exited (<name>.finished, §7). */
    RF_E_FINISHED = -3,
    /** The producer refused the attach; `code` and `retryable` say why. */
    RF_E_REFUSED = -4,
    /** The producer runs as another uid and trust_uid does not name it. */
    RF_E_FOREIGN_PRODUCER = -5,
    /** The runtime directory is unsafe (symlink, wrong owner, open mode) or unreadable. */
    RF_E_RUNTIME_DIR = -6,
    /** The handshake broke: I/O error, timeout, malformed reply, not exactly the three
     * descriptors (ring, lane page, doorbell), or a writable ring descriptor. */
    RF_E_PROTOCOL = -7,
    /** The ring's memory or the lane page does not follow the format (§5.6); the message
     * names the field. */
    RF_E_FORMAT = -8,
    /** The ring's memfd or the lane page is not sealed against shrinking (§4). */
    RF_E_NOT_SEALED = -9,
    /** A system call failed (mmap, fstat, ...). */
    RF_E_IO = -10,
    /** The producer died, stopped, failed or froze (detected within 1 s). */
    RF_E_PRODUCER_GONE = -11,
    /** A bad argument (NULL, bad ring name, a batch not taken from this consumer). */
    RF_E_INVALID = -12,
    /** No tensor of that name, or a dtype other than the one asked for. */
    RF_E_TENSOR = -13,
    /** Out of memory. */
    RF_E_NOMEM = -14
} rf_status;

/** What went wrong, for machines (`status`, `code`, `retryable`) and humans (`message`). */
typedef struct rf_error {
    /** The rf_status returned with it. */
    int status;
    /** Machine-readable code (ring format §3): e.g. "lane_held", "version", "not_running". */
    char code[32];
    /** Non-zero when the same call may succeed later (not running yet, lane held, ...). */
    int retryable;
    /** Human-readable, NUL-terminated. */
    char message[512];
} rf_error;

/** Element types (§5.2 dtype codes). */
typedef enum rf_dtype {
    RF_U8 = 1,
    RF_I32 = 2,
    RF_I64 = 3,
    RF_F16 = 4,
    RF_BF16 = 5,
    RF_F32 = 6,
    RF_U16 = 7
} rf_dtype;

/** How to attach. Initialise with rf_attach_options_init, then change what you need. */
typedef struct rf_attach_options {
    /** Ring name: 1-32 characters from [A-Za-z0-9._-], not starting with '.'. */
    const char *name;
    /** Lane to attach to. */
    uint32_t lane;
    /** Runtime directory; NULL resolves it as §2 says ($RINGFEED_RUNTIME_DIR, else
     * $XDG_RUNTIME_DIR/ringfeed, else /tmp/ringfeed-<uid>, where <uid> is trust_uid when
     * one is given and $RINGFEED_RUNTIME_DIR is not set). */
    const char *runtime_dir;
    /** Non-zero: also accept a producer running as `trust_uid` (a daemon started with
     * --allow-group for a group of ours); its directory may then grant its group 0750. */
    int has_trust_uid;
    uint32_t trust_uid;
    /** Non-zero: resume at (resume_epoch, resume_index), the next batch wanted (§7). */
    int resume;
    uint64_t resume_epoch;
    uint64_t resume_index;
    /** Seconds to keep retrying while the error is retryable (no daemon yet, lane held),
     * every 100 ms. 0: one try. */
    double wait_s;
    /** Seconds to wait for the producer's reply (a resume waits for a seek). Default 30. */
    double reply_timeout_s;
} rf_attach_options;

/** A consumer attached to one lane (opaque). */
typedef struct rf_consumer rf_consumer;

/** A batch taken from the ring: its metadata, and the slot it lies in. */
typedef struct rf_batch {
    uint64_t seq;
    uint64_t epoch;
    /** Batch index within the epoch for this lane. */
    uint64_t index;
    /** Samples in the batch (= batch_size). */
    uint32_t count;
    /** Slot flags: bit 0 last of its epoch, bit 1 redelivered. */
    uint32_t flags;
    /** Non-zero for the lane's last batch of its epoch (the end of an epoch). */
    int last_of_epoch;
    /** Non-zero when a consumer that died holding it had taken it before. */
    int redelivered;
    /** The slot (internal; used by rf_release and rf_tensor_view). */
    uint32_t slot;
} rf_batch;

/** A typed view of one tensor of a batch: a pointer into the ring, never a copy. */
typedef struct rf_tensor {
    /** Tensor name (NUL-terminated, owned by the consumer). */
    const char *name;
    rf_dtype dtype;
    /** Bytes per element. */
    size_t elem_size;
    /** Dimensions used: 1 to 4. */
    uint32_t rank;
    /** Shape; entries past `rank` are 0. shape[0] is the batch size. */
    uint64_t shape[4];
    /** Strides in bytes (C order); entries past `rank` are 0. */
    uint64_t strides[4];
    /** First byte (read-only mapping; 64-byte aligned). */
    const void *data;
    /** Total bytes. */
    uint64_t bytes;
} rf_tensor;

/** Ring facts from the validated header (§5.1). */
typedef struct rf_ring_info {
    uint64_t generation;
    uint16_t version_major;
    uint16_t version_minor;
    uint32_t lane_count;
    uint32_t slots_per_lane;
    uint32_t batch_size;
    uint32_t tensor_count;
    uint32_t flags;
    uint64_t batches_per_epoch;
    uint64_t epochs;
    uint64_t seed;
    uint64_t samples_per_epoch;
    uint32_t producer_pid;
    /** (1.3) Ranks in the whole job; 0 = unknown (a producer before 1.3). */
    uint32_t world_size;
    /** (1.3) The global rank the attached lane serves (meaningful when world_size != 0). */
    uint32_t rank;
    /** (1.3) Distinct samples this rank receives in an epoch that keeps every sample; 0 =
     * unknown. */
    uint64_t rank_samples;
    char name[33];
} rf_ring_info;

/** Fills `o` with the defaults for `name`, `lane`: directory from the environment, no trust
 * uid, no resume, no wait, a 30 s reply timeout. */
void rf_attach_options_init(rf_attach_options *o, const char *name, uint32_t lane);

/** Attaches (handshake §3, checks §4, validation §5.6, mappings). On RF_OK `*out` is the
 * consumer; on error `*out` is NULL and `err` (may be NULL) says why. */
int rf_attach(const rf_attach_options *o, rf_consumer **out, rf_error *err);

/** Waits for the lane's next batch (in seq order) for at most `timeout_s` seconds (< 0:
 * forever): RF_OK with `*b` filled, RF_END at the end of the stream, RF_E_TIMEOUT, or an
 * error (RF_E_PRODUCER_GONE within 1 s of the producer's death). Waits on the futex, never
 * spins. A consumer may hold several batches at once (at most slots_per_lane - 1 is wise). */
int rf_next(rf_consumer *c, double timeout_s, rf_batch *b, rf_error *err);

/** Releases a batch taken by rf_next: its views become invalid. Records the release in the
 * lane page and rings the doorbell (§6). Does nothing (and returns RF_OK) for a batch this
 * attach does not hold (released already). RF_E_INVALID for a slot out of range, and in a
 * forked child (the parent holds the batch, not the child). */
int rf_release(rf_consumer *c, const rf_batch *b);

/** Whether the slot still holds `b`, taken and not yet released by this attach (non-zero). */
int rf_still_held(const rf_consumer *c, const rf_batch *b);

/** The view of tensor `name` of batch `b`. RF_E_TENSOR if there is none. */
int rf_tensor_view(const rf_consumer *c, const rf_batch *b, const char *name, rf_tensor *t,
                   rf_error *err);

/** Like rf_tensor_view, refusing (RF_E_TENSOR) a tensor whose dtype is not `dtype`. */
int rf_tensor_view_typed(const rf_consumer *c, const rf_batch *b, const char *name,
                         rf_dtype dtype, rf_tensor *t, rf_error *err);

/** The ring's header facts. */
void rf_ring_info_get(const rf_consumer *c, rf_ring_info *info);

/** Detaches: releases every batch still held, closes the connection, unmaps the ring and
 * frees `c`. NULL is allowed. */
void rf_detach(rf_consumer *c);

/** A static name for a status ("RF_E_TIMEOUT", ...). */
const char *rf_status_name(int status);

#ifdef __cplusplus
}
#endif

#endif /* RINGFEED_H */
