/*
 * fork_check: a forked child must not take or release its parent's batches (ringfeed.h,
 * "Thread safety"). The lane page is a MAP_SHARED mapping the child inherits, so a release
 * in the child would free a batch the parent is still reading.
 *
 * Usage: fork_check NAME   (the runtime directory from the environment, as read_batches)
 *
 * Attaches, takes one batch, forks. The child: rf_release and rf_next refuse with
 * RF_E_INVALID, rf_detach closes only its copies. The parent, once the child is gone: the
 * batch is still held, its bytes unchanged, and the rest of the run arrives to the end.
 * Prints `ok` and exits 0, or says what broke and exits 1.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ringfeed.h"

static int broke(const char *what, const rf_error *err) {
    fprintf(stderr, "fork_check: %s%s%s\n", what, err ? ": " : "", err ? err->message : "");
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: fork_check NAME\n");
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
    rf_tensor ids;
    if (rf_tensor_view(c, &b, "sample_ids", &ids, &err) != RF_OK) return broke("view", &err);
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
