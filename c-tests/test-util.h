/*
 * What every C test of hostmem needs: sizes, a CHECK that counts failures instead of stopping
 * at the first, and the memory API's pending-error check.
 */
#ifndef HOSTMEM_TEST_UTIL_H
#define HOSTMEM_TEST_UTIL_H

#include <stdio.h>

#include "hostmem.h"

#ifndef MiB
#define MiB (1ULL << 20)
#define GiB (1ULL << 30)
#endif

static int failures;

#define CHECK(cond) do { \
    if (!(cond)) { \
        fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
        failures++; \
    } \
} while (0)

/* The memory API must have no pending error; prints and counts it if it has. */
static inline void expect_no_pending(const char *what)
{
    Error *err = NULL;

    if (!hm_memory_check(&err)) {
        fprintf(stderr, "%s: unexpected pending error: %s\n", what,
                error_get_pretty(err));
        error_free(err);
        failures++;
    }
}

#endif /* HOSTMEM_TEST_UTIL_H */
