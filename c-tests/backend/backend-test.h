/*
 * Helpers shared by the backend C tests: checks that count failures, error
 * expectations, residency through mincore, and the hugetlbfs mount point.
 */
#ifndef BACKEND_TEST_H
#define BACKEND_TEST_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "hostmem.h"
#include "../test-util.h"


/* @err must be set with exactly @msg; it is freed and cleared. */
static inline void expect_error(int line, Error **err, const char *msg)
{
    if (!*err) {
        fprintf(stderr, "line %d: expected error '%s', got none\n", line, msg);
        failures++;
        return;
    }
    if (strcmp(error_get_pretty(*err), msg) != 0) {
        fprintf(stderr, "line %d: expected error '%s', got '%s'\n", line, msg,
                error_get_pretty(*err));
        failures++;
    }
    error_free(*err);
    *err = NULL;
}

/* @err must be unset; prints and frees it otherwise. */
static inline void expect_ok(int line, Error **err)
{
    if (*err) {
        fprintf(stderr, "line %d: unexpected error '%s'\n", line,
                error_get_pretty(*err));
        error_free(*err);
        *err = NULL;
        failures++;
    }
}

#define EXPECT_ERROR(errp, msg) expect_error(__LINE__, errp, msg)
#define EXPECT_OK(errp) expect_ok(__LINE__, errp)

/* Resident 4 KiB pages of [p, p + len). */
static inline size_t resident_pages(void *p, size_t len)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t n = (len + page - 1) / page, count = 0, i;
    unsigned char *vec = calloc(n, 1);

    if (!vec || mincore(p, len, vec) != 0) {
        free(vec);
        return (size_t)-1;
    }
    for (i = 0; i < n; i++) {
        count += vec[i] & 1;
    }
    free(vec);
    return count;
}

/*
 * Runs scripts/hugepages-setup (path in @script) and copies the hugetlbfs
 * mount point to @buf. Returns false if huge pages are unavailable; under
 * CI=true that counts as a failure, elsewhere the caller skips with a reason.
 */
static inline int hugetlbfs_path(const char *script, char *buf, size_t size)
{
    FILE *f;
    int ok;

    if (!script) {
        return 0;
    }
    f = popen(script, "r");
    if (!f) {
        return 0;
    }
    ok = fgets(buf, (int)size, f) != NULL;
    if (pclose(f) != 0) {
        ok = 0;
    }
    if (ok) {
        buf[strcspn(buf, "\n")] = '\0';
        return 1;
    }
    if (getenv("CI") && strcmp(getenv("CI"), "true") == 0) {
        fprintf(stderr, "hugepages-setup failed under CI\n");
        failures++;
    } else {
        fprintf(stderr, "skipped hugetlbfs tests: hugepages-setup failed\n");
    }
    return 0;
}

#endif
