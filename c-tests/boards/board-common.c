#define _GNU_SOURCE
/* Helpers every board file uses: registration of all boards, state, fatal errors. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "boards.h"

bool boards_register_all(Error **errp)
{
    return pc_i440fx_machine_register(errp) &&
           pc_q35_machine_register(errp) &&
           s390_ccw_machine_register(errp) &&
           none_machine_register(errp) &&
           sx1_machine_register(errp) &&
           legacy_machine_register(errp) &&
           microbit_machine_register(errp);
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

void *board_new0(size_t size)
{
    void *p = calloc(1, size);

    if (!p) {
        board_fatal("out of memory allocating %zu bytes", size);
    }
    return p;
}
