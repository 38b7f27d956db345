/*
 * vmm: a small C VMM on hostmem. It takes QEMU's command line for machine RAM
 * (-M/-machine, -m, -mem-path, -mem-prealloc, -object memory-backend-*, -numa node,memdev=,
 * -S, -monitor stdio, -accel ...), builds the machine with one of the boards in boards/, and
 * with -monitor stdio answers HMP commands read line by line from stdin, printing what
 * QEMU 10 prints for them.
 *
 * The transcript on stdout is what a QEMU monitor shows on a terminal without the line
 * editor's escape sequences: the banner, then "(qemu) COMMAND" and the command's output for
 * every command read. A bad command line prints "vmm: <QEMU's message>" and exits 1;
 * -machine help (-M help, -M ?) prints QEMU's list of machine types and exits 0.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "boards/boards.h"

#define MONITOR_BANNER "QEMU 10.0.2 monitor - type 'help' for more information"

/*
 * QEMU starts the guest right away unless -S is given. With -accel kvm, vmm's guest is
 * hostmem's check payload: a vCPU writes a signature at the start and the end of every
 * memslot and halts, then every signature is read back through the RAMBlocks' host pointers.
 * A machine without -accel kvm has nothing to run, which is all a paused QEMU shows too.
 */
static bool vmm_run_guest(MachineState *ms, Error **errp)
{
#ifdef HOSTMEM_TEST_GUEST
    HmGuestCheck check;

    (void)ms; /* hm_kvm_* work on the current machine, which ms is */
    if (!hm_kvm_guest_check(&check, errp)) {
        return false;
    }
    printf("guest check: ok (%" PRIu64 " slots, %" PRIu64 " bytes verified)\n",
           check.slots, check.bytes_verified);
    fflush(stdout);
#else
    /* A library built without the test guest has no guest to run: stay paused. */
    (void)ms;
    (void)errp;
#endif
    return true;
}

/* Answers one monitor line; returns false on "quit". */
static bool monitor_handle(MachineState *ms, const char *line)
{
    Error *err = NULL;
    char *out;

    printf("(qemu) %s\n", line);
    if (strcmp(line, "quit") == 0 || strcmp(line, "q") == 0) {
        return false;
    }
    out = hm_hmp(ms, line, &err);
    if (!out) {
        /* QEMU's monitor prints command errors on the monitor itself, not on stderr. */
        const char *hint = hm_error_get_hint(err);

        printf("%s\n", error_get_pretty(err));
        if (hint) {
            size_t len = strlen(hint);

            printf("%s%s", hint, len && hint[len - 1] == '\n' ? "" : "\n");
        }
        error_free(err);
        return true;
    }
    fputs(out, stdout);
    hm_free(out);
    return true;
}

static void monitor_run(MachineState *ms)
{
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;

    printf("%s\n", MONITOR_BANNER);
    fflush(stdout);
    while ((len = getline(&line, &cap, stdin)) >= 0) {
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r')) {
            line[--len] = '\0';
        }
        if (!monitor_handle(ms, line)) {
            break;
        }
        fflush(stdout);
    }
    fflush(stdout);
    free(line);
}

int main(int argc, char **argv)
{
    Error *err = NULL;
    MachineState *ms;
    char *help;

    if (!boards_register_all(&err)) {
        error_report_err(err);
        return 1;
    }
    help = hm_machine_help_from_argv(argc, (const char *const *)argv, &err);
    if (err) {
        error_report_err(err);
        return 1;
    }
    if (help) {
        fputs(help, stdout);
        hm_free(help);
        return 0;
    }
    ms = hm_machine_new_from_argv(argc, (const char *const *)argv, &err);
    if (!ms) {
        error_report_err(err);
        return 1;
    }
    if (!ms->start_paused && ms->accel_kvm && !vmm_run_guest(ms, &err)) {
        error_report_err(err);
        board_machine_free(ms);
        return 1;
    }
    if (ms->monitor_stdio) {
        monitor_run(ms);
    }
    board_machine_free(ms);
    return 0;
}
