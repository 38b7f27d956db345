/*
 * The raw limit of preallocation, for scripts/bench: map SIZE bytes (anonymous, a memfd, or a
 * memfd of 2 MiB huge pages), fault all of it in with MADV_POPULATE_WRITE from THREADS threads
 * (an even split, as hostmem's prealloc does), and exit. Nothing else: no options layer, no
 * monitor, so the time from exec to exit is what the kernel (and the host below it) costs.
 *
 *   populate-limit anon|memfd|hugetlb SIZE_MIB THREADS
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#ifndef MFD_HUGETLB
#define MFD_HUGETLB 4U
#endif

struct chunk {
    char *start;
    size_t len;
    int err;
};

static void *populate(void *arg)
{
    struct chunk *c = arg;
    if (c->len && madvise(c->start, c->len, MADV_POPULATE_WRITE) != 0) {
        c->err = errno;
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s anon|memfd|hugetlb SIZE_MIB THREADS\n", argv[0]);
        return 2;
    }
    const char *kind = argv[1];
    size_t size = strtoull(argv[2], NULL, 0) << 20;
    long threads = strtol(argv[3], NULL, 0);
    size_t page = strcmp(kind, "hugetlb") == 0 ? 2u << 20 : (size_t)sysconf(_SC_PAGESIZE);
    if (size == 0 || size % page != 0 || threads < 1 || threads > 64) {
        fprintf(stderr, "populate-limit: bad size or thread count\n");
        return 2;
    }
    int fd = -1;
    int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
    if (strcmp(kind, "anon") != 0) {
        unsigned mfd_flags = strcmp(kind, "hugetlb") == 0 ? MFD_HUGETLB : 0;
        fd = memfd_create("populate-limit", mfd_flags);
        if (fd < 0 || ftruncate(fd, (off_t)size) != 0) {
            perror("populate-limit: memfd");
            return 1;
        }
        flags = MAP_SHARED;
    }
    char *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, flags, fd, 0);
    if (mem == MAP_FAILED) {
        perror("populate-limit: mmap");
        return 1;
    }
    /* As hostmem and QEMU do for anonymous RAM: transparent huge pages where the host has
     * them, so the limit faults the same page sizes as the VMMs it is the limit of. */
    if (fd < 0) {
        madvise(mem, size, MADV_HUGEPAGE);
    }
    size_t pages = size / page;
    struct chunk chunks[64];
    pthread_t tids[64];
    size_t at = 0;
    for (long i = 0; i < threads; i++) {
        size_t n = pages / threads + ((size_t)i < pages % threads);
        chunks[i] = (struct chunk){ mem + at * page, n * page, 0 };
        at += n;
        if (pthread_create(&tids[i], NULL, populate, &chunks[i]) != 0) {
            perror("populate-limit: pthread_create");
            return 1;
        }
    }
    int failed = 0;
    for (long i = 0; i < threads; i++) {
        pthread_join(tids[i], NULL);
        if (chunks[i].err) {
            fprintf(stderr, "populate-limit: MADV_POPULATE_WRITE: %s\n", strerror(chunks[i].err));
            failed = 1;
        }
    }
    return failed;
}
