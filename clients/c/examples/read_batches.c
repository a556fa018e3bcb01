/*
 * read_batches: attach to a ring and print one line per batch, in the client-neutral digest
 * form every ringfeed client's conformance reader prints (tests/conformance/run.py):
 *
 *     epoch E index I count C ids SUM images HASH [redelivered]
 *
 * SUM is the wrapping i64 sum of the `sample_ids` tensor, HASH the FNV-1a 64 of the `images`
 * tensor's bytes read in place. Prints `end` and exits 0 at the end of a finite run; on an
 * error prints `error CODE: message` to stderr and exits 1.
 *
 * Usage: read_batches NAME [--lane N] [--wait S] [--trust-uid U] [--resume EPOCH:INDEX]
 *                          [--timeout S] [--batches N] [--hold N] [--pause-at-epoch-end S]
 *   --batches N   stop (releasing) after N batches, exit 0
 *   --hold N      take N batches without releasing them, print `holding`, then wait to be
 *                 killed (a consumer that dies holding batches)
 *   --pause-at-epoch-end S   hold the last batch of each epoch S seconds before releasing
 *                 it, and wait S seconds more before asking for the next batch
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "ringfeed.h"

static void pause_s(double s) {
    if (s <= 0) return;
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static uint64_t fnv1a64(const uint8_t *p, uint64_t n) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (uint64_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x00000100000001b3ULL;
    }
    return h;
}

static int die(const rf_error *err) {
    fprintf(stderr, "error %s: %s\n", err->code, err->message);
    return 1;
}

static int usage(void) {
    fprintf(stderr, "usage: read_batches NAME [--lane N] [--wait S] [--trust-uid U] "
                    "[--resume EPOCH:INDEX] [--timeout S] [--batches N] [--hold N] "
                    "[--pause-at-epoch-end S]\n");
    return 2;
}

int main(int argc, char **argv) {
    if (argc < 2 || argv[1][0] == '-') return usage();
    rf_attach_options o;
    rf_attach_options_init(&o, argv[1], 0);
    double timeout = -1.0, pause = 0.0;
    long long max_batches = -1, hold = -1;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        int more = i + 1 < argc;
        if (!strcmp(a, "--lane") && more) o.lane = (uint32_t)strtoul(argv[++i], NULL, 10);
        else if (!strcmp(a, "--wait") && more) o.wait_s = strtod(argv[++i], NULL);
        else if (!strcmp(a, "--trust-uid") && more) {
            o.has_trust_uid = 1;
            o.trust_uid = (uint32_t)strtoul(argv[++i], NULL, 10);
        } else if (!strcmp(a, "--resume") && more) {
            char *colon;
            o.resume = 1;
            o.resume_epoch = strtoull(argv[++i], &colon, 10);
            if (*colon != ':') return usage();
            o.resume_index = strtoull(colon + 1, NULL, 10);
        } else if (!strcmp(a, "--timeout") && more) timeout = strtod(argv[++i], NULL);
        else if (!strcmp(a, "--batches") && more) max_batches = strtoll(argv[++i], NULL, 10);
        else if (!strcmp(a, "--hold") && more) hold = strtoll(argv[++i], NULL, 10);
        else if (!strcmp(a, "--pause-at-epoch-end") && more) pause = strtod(argv[++i], NULL);
        else return usage();
    }
    rf_consumer *c;
    rf_error err;
    int rc = rf_attach(&o, &c, &err);
    if (rc == RF_E_FINISHED) {
        /* Not a failure: the run this reader would read is over. */
        fprintf(stderr, "%s\n", err.message);
        printf("end\n");
        return 0;
    }
    if (rc != RF_OK) return die(&err);
    long long taken = 0;
    rf_batch b;
    while (max_batches < 0 || taken < max_batches) {
        rc = rf_next(c, timeout, &b, &err);
        if (rc == RF_END) break;
        if (rc != RF_OK) {
            rf_detach(c);
            return die(&err);
        }
        taken++;
        rf_tensor ids, images;
        if (rf_tensor_view_typed(c, &b, "sample_ids", RF_I64, &ids, &err) ||
            rf_tensor_view(c, &b, "images", &images, &err)) {
            rf_detach(c);
            return die(&err);
        }
        int64_t sum = 0;
        const int64_t *id = ids.data;
        for (uint64_t k = 0; k < ids.shape[0]; k++) sum = (int64_t)((uint64_t)sum + (uint64_t)id[k]);
        printf("epoch %" PRIu64 " index %" PRIu64 " count %" PRIu32 " ids %" PRId64
               " images %016" PRIx64 "%s\n",
               b.epoch, b.index, b.count, sum, fnv1a64(images.data, images.bytes),
               b.redelivered ? " redelivered" : "");
        fflush(stdout);
        if (hold >= 0) {
            if (taken >= hold) {
                printf("holding\n");
                fflush(stdout);
                for (;;) pause_s(3600);
            }
            continue; /* keep it: never released */
        }
        if (b.last_of_epoch) pause_s(pause);
        rf_release(c, &b);
        if (b.last_of_epoch) pause_s(pause);
    }
    printf("end\n");
    rf_detach(c);
    return 0;
}
