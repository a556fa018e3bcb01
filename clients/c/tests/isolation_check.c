/*
 * isolation_check: what format 2.0 promises about this client's memory, checked from inside
 * a consumer process (run by tests/conformance/run.py against its fake producer).
 *
 * Usage: isolation_check NAME   (the runtime directory from the environment, as read_batches)
 *
 * Attaches and takes one batch, then:
 * 1. /proc/self/maps: every mapping of the ring (memfd "ringfeed:NAME") is read-only and
 *    shared (r--s); the lane page ("ringfeed-lane:NAME:0") is the one writable mapping (rw-s).
 * 2. The ring cannot be made writable: mprotect(PROT_WRITE) of a tensor's page fails with
 *    EACCES (the descriptor was read-only), and a store into the batch, in a forked child,
 *    dies of SIGSEGV.
 * 3. A forked child can neither take nor release the parent's batches (the lane page is a
 *    MAP_SHARED mapping it inherits): rf_release and rf_next refuse with RF_E_INVALID and
 *    rf_detach closes only the child's copies. Once the child is gone the parent still holds
 *    the batch, its bytes unchanged, and the rest of the run arrives to the end.
 * Prints `ok` and exits 0, or says what broke and exits 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ringfeed.h"

static int broke(const char *what, const rf_error *err) {
    fprintf(stderr, "isolation_check: %s%s%s\n", what, err ? ": " : "", err ? err->message : "");
    return 1;
}

/* Step 1: the permissions of the ring's and the lane page's mappings. */
static int check_maps(const char *name) {
    char ring[64], lane[64], line[1024];
    snprintf(ring, sizeof ring, "/memfd:ringfeed:%s ", name);
    snprintf(lane, sizeof lane, "/memfd:ringfeed-lane:%s:0 ", name);
    FILE *f = fopen("/proc/self/maps", "r");
    if (!f) return broke("cannot read /proc/self/maps", NULL);
    int rings = 0, lanes = 0, bad = 0;
    while (fgets(line, sizeof line, f)) {
        char perms[5] = {0};
        if (sscanf(line, "%*s %4s", perms) != 1) continue;
        if (strstr(line, ring)) {
            rings++;
            if (strcmp(perms, "r--s") != 0) {
                fprintf(stderr, "isolation_check: a ring mapping is %s: %s", perms, line);
                bad = 1;
            }
        } else if (strstr(line, lane)) {
            lanes++;
            if (strcmp(perms, "rw-s") != 0) {
                fprintf(stderr, "isolation_check: the lane page mapping is %s: %s", perms, line);
                bad = 1;
            }
        }
    }
    fclose(f);
    if (bad) return 1;
    if (rings < 1) return broke("no mapping of the ring in /proc/self/maps", NULL);
    if (lanes != 1) return broke("not exactly one mapping of the lane page", NULL);
    return 0;
}

/* Step 2: the ring stays read-only whatever the consumer tries. */
static int check_read_only(const rf_tensor *images) {
    long page = sysconf(_SC_PAGESIZE);
    void *at = (void *)((uintptr_t)images->data & ~(uintptr_t)(page - 1));
    if (mprotect(at, (size_t)page, PROT_READ | PROT_WRITE) == 0)
        return broke("mprotect made the ring writable", NULL);
    if (errno != EACCES) return broke("mprotect(PROT_WRITE) of the ring: not EACCES", NULL);
    fflush(stderr);
    pid_t child = fork();
    if (child < 0) return broke("fork", NULL);
    if (child == 0) {
        struct rlimit none = {0, 0};
        setrlimit(RLIMIT_CORE, &none); /* the expected fault leaves no core file */
        volatile uint8_t *p = (volatile uint8_t *)(uintptr_t)images->data;
        p[0] = (uint8_t)(p[0] + 1);
        _exit(0); /* the store went through */
    }
    int status;
    if (waitpid(child, &status, 0) != child) return broke("waitpid", NULL);
    if (!WIFSIGNALED(status) || WTERMSIG(status) != SIGSEGV)
        return broke("a store into the ring did not fault", NULL);
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: isolation_check NAME\n");
        return 2;
    }
    rf_attach_options o;
    rf_attach_options_init(&o, argv[1], 0);
    o.wait_s = 30;
    rf_consumer *c;
    rf_error err;
    if (rf_attach(&o, &c, &err) != RF_OK) return broke("attach", &err);
    rf_batch b;
    if (rf_next(c, 30.0, &b, &err) != RF_OK) return broke("first batch", &err);
    rf_tensor ids, images;
    if (rf_tensor_view(c, &b, "sample_ids", &ids, &err) != RF_OK ||
        rf_tensor_view(c, &b, "images", &images, &err) != RF_OK)
        return broke("view", &err);
    if (check_maps(argv[1]) || check_read_only(&images)) return 1;
    unsigned char before[256];
    size_t n = ids.bytes < sizeof before ? (size_t)ids.bytes : sizeof before;
    memcpy(before, ids.data, n);
    fflush(stdout);
    pid_t child = fork();
    if (child < 0) return broke("fork", NULL);
    if (child == 0) {
        rf_batch other;
        int release = rf_release(c, &b);
        int next = rf_next(c, 0.0, &other, &err);
        rf_detach(c);
        _exit(release == RF_E_INVALID && next == RF_E_INVALID ? 0 : 3);
    }
    int status;
    if (waitpid(child, &status, 0) != child) return broke("waitpid", NULL);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        return broke("the child was allowed to release or take the parent's batches", NULL);
    if (!rf_still_held(c, &b)) return broke("the parent's batch was released by the child", NULL);
    if (memcmp(before, ids.data, n) != 0)
        return broke("the parent's batch changed under it after the child left", NULL);
    if (rf_release(c, &b) != RF_OK) return broke("release in the parent", NULL);
    if (rf_still_held(c, &b)) return broke("the batch is still held after its release", NULL);
    int rc;
    while ((rc = rf_next(c, 30.0, &b, &err)) == RF_OK) rf_release(c, &b);
    if (rc != RF_END) return broke("the rest of the run", &err);
    rf_detach(c);
    printf("ok\n");
    return 0;
}
