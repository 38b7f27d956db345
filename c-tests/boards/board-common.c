#define _GNU_SOURCE
/* Helpers every board file uses: registration, board state, the cleanup hook, fatal errors. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "boards.h"

bool board_register_classes(const MachineClass *classes, size_t n, Error **errp)
{
    size_t i;

    for (i = 0; i < n; i++) {
        if (!hm_machine_class_register(&classes[i], errp)) {
            return false;
        }
    }
    return true;
}

void board_machine_free(MachineState *ms)
{
    hm_machine_free(ms);
}

void board_cleanup(MachineState *ms)
{
    free(ms->opaque);
    ms->opaque = NULL;
}

void board_fatal(const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "%s: ", program_invocation_short_name);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(1);
}

void board_warn(const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "%s: warning: ", program_invocation_short_name);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

void *board_new0(size_t size)
{
    void *p = calloc(1, size);

    if (!p) {
        board_fatal("out of memory allocating %zu bytes", size);
    }
    return p;
}
