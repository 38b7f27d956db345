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
 *
 * When stderr is a terminal, long work (prealloc, migration) shows a progress line there,
 * redrawn in place and erased when the work ends (QEMU shows none); otherwise nothing extra.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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

#ifdef HOSTMEM_TEST_GUEST
/*
 * -device x-hm-dirtier,start=SIZE,end=SIZE (vmm's own device): the test guest that keeps
 * incrementing byte 0 of every page of [start, end), modelled on QEMU's migration test guest.
 * Its vCPU stops and resumes with the machine (stop, cont, a migration's switchover) and its
 * registers travel in the migration stream as the section "x-hm-vcpu".
 */
typedef struct VmmDirtier {
    MachineState *ms;
    bool on;
    uint64_t start;
    uint64_t end;
} VmmDirtier;

static VmmDirtier dirtier;

/* A size as QEMU writes one: a number with an optional K, M, G or T suffix (binary units). */
static bool parse_size(const char *s, uint64_t *out)
{
    char *end;
    unsigned long long v;

    errno = 0;
    v = strtoull(s, &end, 0);
    if (errno || end == s) {
        return false;
    }
    switch (*end) {
    case 'T': case 't': v <<= 10; /* fall through */
    case 'G': case 'g': v <<= 10; /* fall through */
    case 'M': case 'm': v <<= 10; /* fall through */
    case 'K': case 'k': v <<= 10; end++; break;
    default: break;
    }
    *out = v;
    return *end == '\0';
}

static bool parse_dirtier(const char *opts)
{
    char *copy = strdup(opts), *save = NULL, *tok;
    bool ok = copy && strncmp(copy, "x-hm-dirtier", 12) == 0 &&
              (copy[12] == ',' || copy[12] == '\0');

    dirtier.start = 1 * MiB;
    dirtier.end = 100 * MiB;
    for (tok = ok ? strtok_r(copy + 12, ",", &save) : NULL; tok;
         tok = strtok_r(NULL, ",", &save)) {
        if (strncmp(tok, "start=", 6) == 0) {
            ok = ok && parse_size(tok + 6, &dirtier.start);
        } else if (strncmp(tok, "end=", 4) == 0) {
            ok = ok && parse_size(tok + 4, &dirtier.end);
        } else {
            ok = false;
        }
    }
    free(copy);
    dirtier.on = ok;
    return ok;
}

static bool dirtier_stop(void *opaque, Error **errp)
{
    VmmDirtier *d = opaque;

    return !d->on || hm_test_dirtier_pause(d->ms, errp);
}

static bool dirtier_resume(void *opaque, Error **errp)
{
    VmmDirtier *d = opaque;

    return !d->on || hm_test_dirtier_run(d->ms, d->start, d->end, errp);
}

static int vcpu_save(HmQemuFile *f, int phase, void *opaque)
{
    VmmDirtier *d = opaque;
    size_t cap = hm_test_dirtier_state_size(), len = 0;
    uint8_t *buf = malloc(cap);
    Error *err = NULL;

    (void)phase;
    if (!buf || !hm_test_dirtier_save_state(d->ms, buf, cap, &len, &err)) {
        if (err) {
            error_report_err(err);
        }
        free(buf);
        return -EINVAL;
    }
    hm_qemu_put_be32(f, (uint32_t)len);
    hm_qemu_put_buffer(f, buf, len);
    free(buf);
    return hm_qemu_file_get_error(f);
}

static int vcpu_load(HmQemuFile *f, int phase, uint32_t version_id, void *opaque)
{
    VmmDirtier *d = opaque;
    size_t cap = hm_test_dirtier_state_size();
    uint32_t len = hm_qemu_get_be32(f);
    uint8_t *buf;
    Error *err = NULL;
    int ret;

    (void)phase;
    (void)version_id;
    if (len > cap) {
        return -EINVAL;
    }
    buf = malloc(cap);
    if (!buf) {
        return -ENOMEM;
    }
    hm_qemu_get_buffer(f, buf, len);
    ret = hm_qemu_file_get_error(f);
    if (!ret && len && !hm_test_dirtier_load_state(d->ms, buf, len, &err)) {
        error_report_err(err);
        ret = -EINVAL;
    }
    free(buf);
    return ret;
}
#endif

/* Set once the monitor is done: an incoming migration cut short then is no failure. */
static volatile sig_atomic_t quitting;

/*
 * Waits for the incoming migration; a failure is fatal, as in QEMU: its lines on stderr, exit 1,
 * the guest never started.
 */
static void *incoming_watch(void *opaque)
{
    MachineState *ms = opaque;
    Error *err = NULL;

    if (!hm_migration_wait_incoming(ms, &err) && !quitting) {
        const char *msg = error_get_pretty(err);

        while (msg && *msg) {
            const char *nl = strchr(msg, '\n');
            int len = nl ? (int)(nl - msg) : (int)strlen(msg);

            fprintf(stderr, "%s: %.*s\n", program_invocation_short_name, len, msg);
            msg = nl ? nl + 1 : NULL;
        }
        fflush(stdout);
        _exit(1);
    }
    error_free(err);
    return NULL;
}

#ifdef HOSTMEM_TEST_GUEST
/*
 * x-hm-dirtier-check (vmm's own command, for its own device): QEMU's migration-test invariant
 * over the dirtier's range. Stop the machine first.
 */
static bool dirtier_check(MachineState *ms, Error **errp)
{
    HmDirtierCheck c;

    if (!dirtier.on) {
        printf("no x-hm-dirtier device\n");
        return true;
    }
    if (!hm_test_dirtier_check(ms, dirtier.start, dirtier.end, &c, errp)) {
        return false;
    }
    if (c.bad_pages == 0) {
        printf("dirtier: %" PRIu64 " pages, %" PRIu64 " passes, consistent\n", c.pages,
               c.passes);
    } else {
        printf("dirtier: %" PRIu64 " pages, %" PRIu64 " passes, %" PRIu64
               " bad pages, the first at page %" PRIu64 "\n",
               c.pages, c.passes, c.bad_pages, c.first_bad_page);
    }
    return true;
}
#endif

#ifdef HOSTMEM_TEST_GUEST
/*
 * x-hm-fill GPA SIZE SEED and x-hm-checksum GPA SIZE (vmm's own commands, for the migration
 * tests of guests too large to compare with pmemsave): write a pattern over guest-physical RAM,
 * and sum it page by page reading only what was ever populated. Sizes take K/M/G/T suffixes.
 * Returns false when `line` is neither command.
 */
static bool memory_command(MachineState *ms, const char *line, Error **errp, bool *ok)
{
    char a[32], b[32], c[32], extra;
    uint64_t gpa, size, seed;
    int n;

    if (strncmp(line, "x-hm-fill ", 10) == 0) {
        uint64_t written = 0;

        n = sscanf(line + 10, "%31s %31s %31s %c", a, b, c, &extra);
        if (n != 3 || !parse_size(a, &gpa) || !parse_size(b, &size) || !parse_size(c, &seed)) {
            printf("usage: x-hm-fill GPA SIZE SEED\n");
            *ok = true;
            return true;
        }
        *ok = hm_test_memory_fill(ms, gpa, size, seed, &written, errp);
        if (*ok) {
            printf("filled %" PRIu64 " bytes\n", written);
        }
        return true;
    }
    if (strncmp(line, "x-hm-checksum ", 14) == 0) {
        HmMemoryChecksum sum;

        n = sscanf(line + 14, "%31s %31s %c", a, b, &extra);
        if (n != 2 || !parse_size(a, &gpa) || !parse_size(b, &size)) {
            printf("usage: x-hm-checksum GPA SIZE\n");
            *ok = true;
            return true;
        }
        *ok = hm_test_memory_checksum(ms, gpa, size, &sum, errp);
        if (*ok) {
            printf("checksum %016" PRIx64 ", %" PRIu64 " non-zero pages, %" PRIu64
                   " pages read\n", sum.digest, sum.nonzero_pages, sum.pages_read);
        }
        return true;
    }
    return false;
}
#endif

/* Answers one monitor line (its prompt is out already); returns false on "quit". */
static bool monitor_handle(MachineState *ms, const char *line)
{
    Error *err = NULL;
    char *out = NULL;

    printf("%s\n", line);
    if (strcmp(line, "quit") == 0 || strcmp(line, "q") == 0) {
        return false;
    }
#ifdef HOSTMEM_TEST_GUEST
    if (strcmp(line, "x-hm-dirtier-check") == 0) {
        if (!dirtier_check(ms, &err)) {
            printf("%s\n", error_get_pretty(err));
            error_free(err);
        }
        return true;
    }
    {
        bool ok;

        if (memory_command(ms, line, &err, &ok)) {
            if (!ok) {
                printf("%s\n", error_get_pretty(err));
                error_free(err);
            }
            return true;
        }
    }
#endif
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

/* QEMU's readline keeps at most this many bytes of a line; the rest is dropped. */
#define READLINE_MAX 4095

/*
 * What QEMU's readline makes of the bytes of one line typed at the monitor, in place: bytes
 * from 32 up are kept as they are (invalid UTF-8 too) up to READLINE_MAX, backspace (8, 127)
 * and ^U edit, and the other control bytes (NUL among them) are dropped. Readline's keys that
 * move the cursor, recall history or complete (^A ^E ^D ^W ^N ^P, tab, escape sequences,
 * 0x9b) are dropped too rather than modelled: vmm reads lines from a pipe, not keystrokes.
 * Returns the new length.
 */
static size_t monitor_readline_edit(char *line, size_t len)
{
    size_t in, out = 0;

    for (in = 0; in < len; in++) {
        unsigned char ch = (unsigned char)line[in];

        if (ch == 8 || ch == 127) {
            out -= out > 0;
        } else if (ch == 21) {
            out = 0;
        } else if (ch >= 32 && out < READLINE_MAX) {
            line[out++] = (char)ch;
        }
    }
    line[out] = '\0';
    return out;
}

static void monitor_run(MachineState *ms)
{
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;

    printf("%s\n", MONITOR_BANNER);
    /* The prompt goes out before each read, as QEMU's does: a peer waits for it. */
    printf("(qemu) ");
    fflush(stdout);
    while ((len = getline(&line, &cap, stdin)) >= 0) {
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r')) {
            line[--len] = '\0';
        }
        monitor_readline_edit(line, (size_t)len);
        if (!monitor_handle(ms, line)) {
            break;
        }
        printf("(qemu) ");
        fflush(stdout);
    }
    fflush(stdout);
    free(line);
}

/*
 * Takes vmm's own options out of argv (the rest is QEMU's command line for hostmem):
 * -device x-hm-dirtier,... Returns the new argc, or -1 after printing an error.
 */
static int take_vmm_options(int argc, char **argv)
{
    int i, out = 1;

    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-device") == 0 && i + 1 < argc &&
            strncmp(argv[i + 1], "x-hm-dirtier", 12) == 0) {
#ifdef HOSTMEM_TEST_GUEST
            if (!parse_dirtier(argv[i + 1])) {
                fprintf(stderr, "%s: -device %s: bad x-hm-dirtier options (start=SIZE,end=SIZE)\n",
                        program_invocation_short_name, argv[i + 1]);
                return -1;
            }
            i++;
            continue;
#else
            fprintf(stderr, "%s: -device %s: this vmm was built without the test guest\n",
                    program_invocation_short_name, argv[i + 1]);
            return -1;
#endif
        }
        argv[out++] = argv[i];
    }
    argv[out] = NULL;
    return out;
}

/* The VMM's side of migration: its vCPU hooks and, with the dirtier, its vCPU section. */
static bool vmm_migration_setup(MachineState *ms, Error **errp)
{
#ifdef HOSTMEM_TEST_GUEST
    dirtier.ms = ms;
    if (dirtier.on && !ms->accel_kvm) {
        fprintf(stderr, "%s: -device x-hm-dirtier needs -accel kvm\n",
                program_invocation_short_name);
        return false;
    }
    if (!hm_machine_set_guest_control(ms, dirtier_stop, dirtier_resume, &dirtier, errp)) {
        return false;
    }
    if (dirtier.on &&
        !hm_migration_register_section(ms, "x-hm-vcpu", 0, 1, false, vcpu_save, vcpu_load,
                                       &dirtier, errp)) {
        return false;
    }
#else
    (void)ms;
    (void)errp;
#endif
    return true;
}

/*
 * vmm -x-hm-migration-check SOURCE-OPTIONS... -x-hm-to DESTINATION-OPTIONS...: would a guest
 * started with the first command line migrate to a vmm started with the second? Prints
 * hm_migration_check's JSON on stdout; exits 0 when it would, 2 when it would not, 1 when a
 * command line cannot be built into a machine.
 */
static int migration_check_main(int argc, char **argv)
{
    Error *err = NULL;
    char *json;
    int i, to = -1;

    for (i = 2; i < argc; i++) {
        if (strcmp(argv[i], "-x-hm-to") == 0) {
            to = i;
            break;
        }
    }
    if (to < 0) {
        fprintf(stderr, "usage: %s -x-hm-migration-check SOURCE-OPTIONS... -x-hm-to "
                "DESTINATION-OPTIONS...\n", program_invocation_short_name);
        return 1;
    }
    /* Each command line keeps a program name in front: argv[1] before the source's options,
     * the -x-hm-to before the destination's. */
    json = hm_migration_check(to - 1, (const char *const *)argv + 1, argc - to,
                              (const char *const *)argv + to, &err);
    if (!json) {
        error_report_err(err);
        return 1;
    }
    printf("%s\n", json);
    i = strstr(json, "\"compatible\": true") == json + 1 ? 0 : 2;
    hm_free(json);
    return i;
}

/* "1.5 GiB", "512.0 MiB": the unit that keeps the figure below 1024. */
static void format_bytes(char *buf, size_t len, uint64_t bytes)
{
    static const char *const units[] = { "B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB" };
    double v = (double)bytes;
    int u = 0;

    while (v >= 1024.0 && u < 6) {
        v /= 1024.0;
        u++;
    }
    snprintf(buf, len, u ? "%.1f %s" : "%.0f %s", v, units[u]);
}

static void progress_line(const HmProgress *p, void *opaque)
{
    char what[300], done[32], total[32], rate[32], left[96] = "";

    (void)opaque;
    if (p->finished) {
        fputs("\r\033[K", stderr);
        return;
    }
    switch (p->activity) {
    case HM_PROGRESS_ACTIVITY_PREALLOC:
        snprintf(what, sizeof(what), "prealloc %s", p->subject);
        break;
    case HM_PROGRESS_ACTIVITY_MIGRATION_INCOMING:
        snprintf(what, sizeof(what), "incoming migration");
        break;
    default:
        snprintf(what, sizeof(what), "migrate");
        break;
    }
    format_bytes(done, sizeof(done), p->done);
    format_bytes(total, sizeof(total), p->total);
    format_bytes(rate, sizeof(rate), p->bytes_per_second);
    if (p->ms_left >= 0) {
        /* No rate, no estimate: nothing done yet. */
        snprintf(left, sizeof(left), ", %s/s, %" PRId64 " s left", rate,
                 (p->ms_left + 999) / 1000);
    }
    fprintf(stderr, "\r\033[K%s: %s of %s (%u%%)%s", what, done, total,
            p->total ? (unsigned)(p->done * 100 / p->total) : 0u, left);
}

int main(int argc, char **argv)
{
    Error *err = NULL;
    MachineState *ms;
    pthread_t watcher;
    bool incoming;
    char *help;

    argc = take_vmm_options(argc, argv);
    if (argc < 0) {
        return 1;
    }
    if (isatty(STDERR_FILENO)) {
        hm_progress_set_handler(progress_line, NULL);
    }
    if (!boards_register_all(&err)) {
        error_report_err(err);
        return 1;
    }
    if (argc > 1 && strcmp(argv[1], "-x-hm-migration-check") == 0) {
        return migration_check_main(argc, argv);
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
    if (!vmm_migration_setup(ms, &err) || !hm_migration_start_incoming(ms, &err)) {
        if (err) {
            error_report_err(err);
        }
        board_machine_free(ms);
        return 1;
    }
    incoming = hm_machine_is_incoming(ms);
    if (incoming) {
        if (pthread_create(&watcher, NULL, incoming_watch, ms) != 0) {
            fprintf(stderr, "%s: cannot start a thread\n", program_invocation_short_name);
            board_machine_free(ms);
            return 1;
        }
    } else if (!ms->start_paused && ms->accel_kvm) {
        bool ok;
#ifdef HOSTMEM_TEST_GUEST
        ok = dirtier.on ? dirtier_resume(&dirtier, &err) : vmm_run_guest(ms, &err);
#else
        ok = vmm_run_guest(ms, &err);
#endif
        if (!ok) {
            error_report_err(err);
            board_machine_free(ms);
            return 1;
        }
    }
    if (ms->monitor_stdio) {
        monitor_run(ms);
        if (incoming) {
            /* It may still wait for a peer that never comes; it must not outlive quit. */
            quitting = 1;
            pthread_detach(watcher);
        }
    } else if (incoming) {
        pthread_join(watcher, NULL);
    }
    quitting = 1;
    board_machine_free(ms);
    return 0;
}
