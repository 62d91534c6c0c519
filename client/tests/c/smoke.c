/* Links libquiver_client and does IO on a volume through the C ABI:
 * blocking reads and writes (aligned and not), 64 asynchronous writes and
 * reads in flight with completion callbacks, errors as negative errno.
 * Usage: smoke ENDPOINTS TOKEN VOLUME. Prints "ok" and exits 0 on success. */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "quiver.h"

#define CHECK(cond, ...)                                                     \
    do {                                                                     \
        if (!(cond)) {                                                       \
            fprintf(stderr, "FAILED %s:%d: ", __FILE__, __LINE__);           \
            fprintf(stderr, __VA_ARGS__);                                    \
            fprintf(stderr, " (last error: %s)\n", quiver_last_error());     \
            exit(1);                                                         \
        }                                                                    \
    } while (0)

enum { IN_FLIGHT = 64, BLOCK = 4096 };

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t all_done = PTHREAD_COND_INITIALIZER;
static int pending;
static int failures;

static void on_done(void *arg, int64_t result) {
    (void)arg;
    pthread_mutex_lock(&lock);
    if (result != 0) failures++;
    if (--pending == 0) pthread_cond_signal(&all_done);
    pthread_mutex_unlock(&lock);
}

static void wait_all(void) {
    pthread_mutex_lock(&lock);
    while (pending > 0) pthread_cond_wait(&all_done, &lock);
    pthread_mutex_unlock(&lock);
}

static void fill(unsigned char *buf, size_t len, unsigned seed) {
    for (size_t i = 0; i < len; i++) buf[i] = (unsigned char)(seed * 31 + i * 7);
}

int main(int argc, char **argv) {
    CHECK(argc == 4, "usage: %s ENDPOINTS TOKEN VOLUME", argv[0]);
    QuiverCluster *cluster = quiver_connect(argv[1], argv[2]);
    CHECK(cluster, "connect");
    CHECK(quiver_open(cluster, "no-such-volume", QUIVER_RDONLY) == NULL, "opening a missing volume");
    CHECK(strstr(quiver_last_error(), "does not exist"), "the error says why: %s", quiver_last_error());

    QuiverVolume *v = quiver_open(cluster, argv[3], QUIVER_RDWR);
    CHECK(v, "open");
    uint64_t size = quiver_size(v);
    CHECK(size == (1ull << 30), "size %llu", (unsigned long long)size);

    /* Blocking IO, one aligned and one not. */
    static unsigned char out[3 * BLOCK], in[3 * BLOCK];
    fill(out, sizeof out, 1);
    CHECK(quiver_pwrite(v, out, sizeof out, 16 << 20) == 0, "pwrite");
    CHECK(quiver_pread(v, in, sizeof in, 16 << 20) == 0, "pread");
    CHECK(memcmp(in, out, sizeof in) == 0, "read back");
    fill(out, 100, 2);
    CHECK(quiver_pwrite(v, out, 100, 12345) == 0, "unaligned pwrite");
    CHECK(quiver_pread(v, in, 100, 12345) == 0, "unaligned pread");
    CHECK(memcmp(in, out, 100) == 0, "unaligned read back");

    /* Errors. */
    CHECK(quiver_pread(v, in, BLOCK, size) == -EINVAL, "read past the end");
    CHECK(quiver_last_error()[0] != '\0', "an error message");

    /* Asynchronous: 64 writes in flight, then 64 reads. */
    static unsigned char wbuf[IN_FLIGHT][BLOCK], rbuf[IN_FLIGHT][BLOCK];
    pending = IN_FLIGHT;
    for (int i = 0; i < IN_FLIGHT; i++) {
        fill(wbuf[i], BLOCK, 100 + i);
        CHECK(quiver_aio_write(v, wbuf[i], BLOCK, (uint64_t)i * (1 << 20), on_done, NULL) == 0, "aio_write %d", i);
    }
    wait_all();
    CHECK(failures == 0, "%d async writes failed", failures);
    pending = IN_FLIGHT;
    for (int i = 0; i < IN_FLIGHT; i++)
        CHECK(quiver_aio_read(v, rbuf[i], BLOCK, (uint64_t)i * (1 << 20), on_done, NULL) == 0, "aio_read %d", i);
    wait_all();
    CHECK(failures == 0, "%d async reads failed", failures);
    for (int i = 0; i < IN_FLIGHT; i++) CHECK(memcmp(rbuf[i], wbuf[i], BLOCK) == 0, "async block %d", i);

    CHECK(quiver_flush(v) == 0, "flush");
    CHECK(quiver_close(v) == 0, "close");

    /* A reader may not write. */
    QuiverVolume *r = quiver_open(cluster, argv[3], QUIVER_RDONLY);
    CHECK(r, "open read-only");
    CHECK(quiver_pwrite(r, out, BLOCK, 0) == -EPERM, "write to a read-only volume");
    CHECK(quiver_pread(r, in, 3 * BLOCK, 16 << 20) == 0, "read-only pread");
    CHECK(quiver_close(r) == 0, "close the reader");
    quiver_disconnect(cluster);
    printf("ok\n");
    return 0;
}
