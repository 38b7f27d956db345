/*
 * Migration through the C API, as a C VMM uses it: a `none` machine with a section of its own
 * (QEMU's section framing, hm_qemu_put_* / hm_qemu_get_*) migrates to a file with HMP
 * `migrate`; a destination built with -incoming loads it, RAM and section, and starts. Then the
 * same stream cut at every byte offset: each destination fails with an error, never starts,
 * and nothing crashes or leaks (the suite runs under valgrind too). Then the loader's checks,
 * each on an edited copy of the stream (magic, version, machine type, unknown block, size
 * mismatch, missing footer, illegal offset, unknown flags, CONTINUE first, a non-zero zero
 * page, an unknown section, a newer section version), each refused with QEMU's words and the
 * destination never started.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../boards/boards.h"
#include "../test-util.h"

#define STATE_LEN 24

typedef struct Device {
    uint8_t state[STATE_LEN];
    int loads;
    int starts;
} Device;

static int dev_save(HmQemuFile *f, int phase, void *opaque)
{
    Device *d = opaque;

    CHECK(phase == HM_SECTION_FULL);
    hm_qemu_put_be32(f, 0xfeedbeef);
    hm_qemu_put_buffer(f, d->state, STATE_LEN);
    return hm_qemu_file_get_error(f);
}

static int dev_load(HmQemuFile *f, int phase, uint32_t version_id, void *opaque)
{
    Device *d = opaque;
    uint8_t buf[STATE_LEN];

    (void)phase;
    (void)version_id;
    if (hm_qemu_get_be32(f) != 0xfeedbeef) {
        return hm_qemu_file_get_error(f) ? hm_qemu_file_get_error(f) : -EINVAL;
    }
    hm_qemu_get_buffer(f, buf, STATE_LEN);
    if (hm_qemu_file_get_error(f)) {
        return hm_qemu_file_get_error(f);
    }
    memcpy(d->state, buf, STATE_LEN);
    d->loads++;
    return 0;
}

static bool dev_stop(void *opaque, Error **errp)
{
    (void)opaque;
    (void)errp;
    return true;
}

static bool dev_start(void *opaque, Error **errp)
{
    Device *d = opaque;

    (void)errp;
    d->starts++;
    return true;
}

static const char *ram_size = "64K";

static MachineState *machine(const char *incoming, Device *d, uint32_t version)
{
    const char *argv[] = { "test", "-M", "none", "-m", ram_size, "-incoming", incoming, NULL };
    int argc = incoming ? 7 : 5;
    Error *err = NULL;
    MachineState *ms = hm_machine_new_from_argv(argc, argv, &err);

    if (!ms) {
        fprintf(stderr, "machine: %s\n", error_get_pretty(err));
        exit(1);
    }
    CHECK(hm_machine_set_guest_control(ms, dev_stop, dev_start, d, &err));
    CHECK(hm_migration_register_section(ms, "x-test-dev", 0, version, false, dev_save, dev_load,
                                        d, &err));
    return ms;
}

/* Loads `path` into a new destination; returns whether it completed, with the error's first
 * line in `why`. */
static bool load(const char *path, Device *d, uint32_t version, char *why, size_t cap)
{
    char uri[4096];
    Error *err = NULL;
    MachineState *ms;
    bool ok;

    snprintf(uri, sizeof(uri), "file:%s", path);
    ms = machine(uri, d, version);
    ok = hm_migration_start_incoming(ms, &err) && hm_migration_wait_incoming(ms, &err);
    if (!ok) {
        snprintf(why, cap, "%s", error_get_pretty(err));
        error_free(err);
    }
    board_machine_free(ms);
    return ok;
}

/* Where `needle` (`len` bytes) first occurs in `hay` at or after `from`, or -1. */
static long find(const char *hay, long size, long from, const char *needle, long len)
{
    for (long i = from; i + len <= size; i++) {
        if (memcmp(hay + i, needle, len) == 0) {
            return i;
        }
    }
    return -1;
}

static void put_be64(char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) {
        p[i] = (char)(v >> (56 - 8 * i));
    }
}

/*
 * Loads a copy of `stream` with `len` bytes at `at` replaced by `with` (nothing replaced when
 * `at` is negative); it must fail with `expected` in its message, and never start.
 */
static void refused(const char *dir, const char *stream, long size, long at, const char *with,
                    long len, const char *expected)
{
    char path[4200], why[2048];
    char *copy = malloc(size);
    Device d = { 0 };
    FILE *f;

    CHECK(copy != NULL);
    memcpy(copy, stream, size);
    if (at >= 0) {
        CHECK(at + len <= size);
        memcpy(copy + at, with, len);
    }
    snprintf(path, sizeof(path), "%s/edited.mig", dir);
    f = fopen(path, "wb");
    CHECK(f && fwrite(copy, 1, size, f) == (size_t)size);
    fclose(f);
    free(copy);
    why[0] = '\0';
    if (load(path, &d, 1, why, sizeof(why))) {
        fprintf(stderr, "an edited stream loaded (expected \"%s\")\n", expected);
        failures++;
    } else if (!strstr(why, expected)) {
        fprintf(stderr, "expected \"%s\", got \"%s\"\n", expected, why);
        failures++;
    }
    CHECK(d.starts == 0);
    unlink(path);
}

/* The loader's checks on the stream of the one-page machine (16 pages, page 2 holds 0xa5). */
static void loader_checks(const char *dir, const char *s, long size)
{
    static const char data[16] = { [0 ... 15] = (char)0xa5 };
    char u64[8];
    long block, first_page, page;

    /* Header: magic, then the version. */
    refused(dir, s, size, 0, "QEVX", 4, "Not a migration stream");
    refused(dir, s, size, 7, "\x02", 1, "SaveVM v2 format is obsolete");
    refused(dir, s, size, 7, "\x09", 1, "Unsupported migration stream version");
    /* CONFIGURATION: the machine type's name. */
    refused(dir, s, size, find(s, size, 8, "none", 4), "nonf", 4,
            "Machine type received is 'nonf' and local is 'none'");
    /* The ram section's block list ("ram", 0x10000 bytes), then its EOS and footer. */
    block = find(s, size, 0, "\x03ram\0\0\0\0\0\x01\0\0", 12);
    CHECK(block > 0);
    refused(dir, s, size, block + 1, "rbm", 3,
            "Unknown ramblock \"rbm\", cannot accept migration");
    CHECK(s[block + 4 + 8 + 8] == 0x7e);
    refused(dir, s, size, block + 4 + 8 + 8, "\x00", 1, "Missing section footer for ram");
    ram_size = "128K";
    refused(dir, s, size, -1, NULL, 0, "Size mismatch: ram: 0x10000 != 0x20000");
    ram_size = "64K";
    /* The first page record (page 0, ZERO, with the block's name) and page 2's (PAGE). */
    first_page = find(s, size, block + 12, "\x03ram", 4) - 8;
    CHECK(first_page > block && s[first_page + 7] == 0x02);
    refused(dir, s, size, first_page + 7, "\x22", 1, "Ack, bad migration stream!");
    refused(dir, s, size, first_page + 12, "\x01", 1, "Found a zero page with value 1");
    page = find(s, size, first_page, data, sizeof(data)) - 8;
    CHECK(page > first_page && s[page + 6] == 0x20 && s[page + 7] == 0x28);
    put_be64(u64, 0x100000 | 0x28);
    refused(dir, s, size, page, u64, 8, "Illegal RAM offset 100000");
    put_be64(u64, 0x2000 | 0x20 | 0x40);
    refused(dir, s, size, page, u64, 8, "Unknown combination of migration flags: 0x60");
    /* The VMM's section under a name this destination does not know. */
    refused(dir, s, size, find(s, size, 0, "x-test-dev", 10), "x-test-dex", 10,
            "Unknown savevm section or instance 'x-test-dex' 0");
}

int main(void)
{
    char dir[] = "/tmp/hm-mig-c.XXXXXX";
    char path[4200], cut[4200], why[1024], line[4300];
    Device src = { .state = "registers of the device" }, dst = { 0 };
    Error *err = NULL;
    MachineState *ms;
    FILE *f;
    long size, n, eof_end;
    char *stream;
    char *out;

    CHECK(boards_register_all(&err));
    CHECK(mkdtemp(dir) != NULL);
    snprintf(path, sizeof(path), "%s/full.mig", dir);
    snprintf(cut, sizeof(cut), "%s/cut.mig", dir);

    ms = machine(NULL, &src, 1);
    /* One page of data, the other 15 zero. */
    memset((char *)memory_region_get_ram_ptr(ms->ram) + 8192, 0xa5, 4096);
    snprintf(line, sizeof(line), "migrate file:%s", path);
    out = hm_hmp(ms, line, &err);
    CHECK(out != NULL);
    hm_free(out);
    out = hm_hmp(ms, "info status", &err);
    CHECK(out && strcmp(out, "VM status: paused (postmigrate)\n") == 0);
    hm_free(out);
    board_machine_free(ms);

    CHECK(load(path, &dst, 1, why, sizeof(why)));
    CHECK(dst.loads == 1 && dst.starts == 1);
    CHECK(memcmp(dst.state, src.state, STATE_LEN) == 0);

    f = fopen(path, "rb");
    CHECK(f != NULL);
    fseek(f, 0, SEEK_END);
    size = ftell(f);
    rewind(f);
    stream = malloc(size);
    CHECK(stream && fread(stream, 1, size, f) == (size_t)size);
    fclose(f);
    loader_checks(dir, stream, size);
    free(stream);

    /* Cut the stream of an all-zero machine (a smaller stream: every cut is a machine). */
    memset(&src.state, 0x3c, STATE_LEN);
    ms = machine(NULL, &src, 1);
    snprintf(line, sizeof(line), "migrate file:%s", path);
    out = hm_hmp(ms, line, &err);
    CHECK(out != NULL);
    hm_free(out);
    board_machine_free(ms);

    f = fopen(path, "rb");
    CHECK(f != NULL);
    fseek(f, 0, SEEK_END);
    size = ftell(f);
    rewind(f);
    stream = malloc(size);
    CHECK(stream && fread(stream, 1, size, f) == (size_t)size);
    fclose(f);
    /*
     * What follows the EOF byte is the VMDESCRIPTION, which loaders read for information only:
     * a stream cut inside it has everything and loads, in QEMU as here.
     */
    for (eof_end = size - 5; eof_end > 0; eof_end--) {
        uint32_t len = ((uint32_t)(uint8_t)stream[eof_end + 1] << 24) |
                       ((uint32_t)(uint8_t)stream[eof_end + 2] << 16) |
                       ((uint32_t)(uint8_t)stream[eof_end + 3] << 8) |
                       (uint32_t)(uint8_t)stream[eof_end + 4];

        if (stream[eof_end] == 0x06 && len == (uint32_t)(size - eof_end - 5)) {
            break;
        }
    }
    CHECK(eof_end > 0 && stream[eof_end - 1] == 0x00);
    for (n = 0; n < eof_end; n++) {
        Device d = { 0 };

        f = fopen(cut, "wb");
        CHECK(f && fwrite(stream, 1, n, f) == (size_t)n);
        fclose(f);
        if (load(cut, &d, 1, why, sizeof(why))) {
            fprintf(stderr, "a stream cut at %ld of %ld bytes loaded\n", n, size);
            failures++;
        }
        CHECK(d.starts == 0);
    }

    /* The source's section is version 1; a destination that only knows version 0 refuses. */
    {
        Device d = { 0 };

        CHECK(!load(path, &d, 0, why, sizeof(why)));
        CHECK(strstr(why, "savevm: unsupported version 1 for 'x-test-dev' v0") != NULL);
        CHECK(d.starts == 0);
    }
    free(stream);
    unlink(cut);
    unlink(path);
    rmdir(dir);

    /*
     * hm_migration_check: two command lines in, every break out as JSON; the machines it
     * builds are gone afterwards, and the current machine (none here) is unchanged.
     */
    {
        const char *src41[] = { "vmm", "-M", "s390-ccw-virtio-4.1,x-ram-chunk-size=256M",
                                "-m", "512M", "-global", "migration.send-configuration=off" };
        const char *dst10[] = { "vmm", "-M", "s390-ccw-virtio-10.0", "-m", "512M",
                                "-global", "migration.send-configuration=off" };
        const char *bad[] = { "vmm", "-m", "12x" };
        char *json = hm_migration_check(7, src41, 7, src41, &err);

        CHECK(json && strcmp(json, "{\"compatible\": true, \"breaks\": [], \"notes\": []}") == 0);
        hm_free(json);
        json = hm_migration_check(7, src41, 7, dst10, &err);
        CHECK(json && strcmp(json,
              "{\"compatible\": false, \"breaks\": ["
              "{\"side\": \"destination\", \"message\": \"Size mismatch: s390.ram: "
              "0x10000000 != 0x20000000: Invalid argument\"}, "
              "{\"side\": \"destination\", \"message\": "
              "\"Unknown ramblock \\\"s390.ram.1\\\", cannot accept migration\"}], "
              "\"notes\": []}") == 0);
        hm_free(json);
        CHECK(hm_migration_check(3, bad, 7, dst10, &err) == NULL);
        CHECK(err && strncmp(error_get_pretty(err), "source: -m 12x: ", 16) == 0);
        error_free(err);
        err = NULL;
        CHECK(hm_migration_check(7, src41, 3, bad, &err) == NULL);
        CHECK(err && strncmp(error_get_pretty(err), "destination: -m 12x: ", 21) == 0);
        error_free(err);
        err = NULL;
    }
    if (!failures) {
        printf("C migration: ok (%ld truncations refused)\n", eof_end);
    }
    return failures ? 1 : 0;
}
