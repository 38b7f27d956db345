/*
 * Two machines in one process (what the migration tests need): each built by
 * hm_machine_new_from_argv from its own command line, each with its own RAM, RAMBlock names
 * and backend ids, and each answering HMP about itself only.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "boards/boards.h"
#include "test-util.h"


static MachineState *machine_new(const char *const *args)
{
    const char *argv[32] = { "test-two-machines" };
    Error *err = NULL;
    MachineState *ms;
    int argc = 1;

    while (*args) {
        argv[argc++] = *args++;
    }
    argv[argc] = NULL;
    ms = hm_machine_new_from_argv(argc, argv, &err);
    if (!ms) {
        fprintf(stderr, "machine_new: %s\n", error_get_pretty(err));
        error_free(err);
        failures++;
    }
    return ms;
}

/* True when the output of @cmd on @ms contains @needle. */
static bool hmp_contains(MachineState *ms, const char *cmd, const char *needle)
{
    Error *err = NULL;
    char *out = hm_hmp(ms, cmd, &err);
    bool found;

    if (!out) {
        fprintf(stderr, "hm_hmp(%s): %s\n", cmd, error_get_pretty(err));
        error_free(err);
        failures++;
        return false;
    }
    found = strstr(out, needle) != NULL;
    hm_free(out);
    return found;
}

#define RAMBLOCK_ROW(name, size)                                                   \
    name "    4 KiB  0x0000000000000000 " size " " size

static void test_two_pcs_have_their_own_ram(void)
{
    static const char *const a_args[] = { "-M", "pc", "-m", "64M", NULL };
    static const char *const b_args[] = { "-M", "pc", "-m", "128M", NULL };
    MachineState *a = machine_new(a_args);
    MachineState *b = machine_new(b_args);

    if (!a || !b) {
        board_machine_free(a);
        board_machine_free(b);
        return;
    }
    CHECK(a->context != b->context);
    CHECK(a->ram_size == 64 * MiB && b->ram_size == 128 * MiB);
    CHECK(memory_region_size(a->ram) == 64 * MiB);
    CHECK(memory_region_size(b->ram) == 128 * MiB);
    /* Both name their RAMBlock "pc.ram": no clash across machines. */
    CHECK(hmp_contains(a, "info ramblock", RAMBLOCK_ROW("pc.ram", "0x0000000004000000")));
    CHECK(!hmp_contains(a, "info ramblock", "0x0000000008000000"));
    CHECK(hmp_contains(b, "info ramblock", RAMBLOCK_ROW("pc.ram", "0x0000000008000000")));
    CHECK(!hmp_contains(b, "info ramblock", "0x0000000004000000"));
    CHECK(hmp_contains(a, "info mtree",
                       "alias ram-below-4g @pc.ram 0000000000000000-0000000003ffffff"));
    CHECK(hmp_contains(b, "info mtree",
                       "alias ram-below-4g @pc.ram 0000000000000000-0000000007ffffff"));

    /* The first machine outlives the second, and still answers about itself. */
    board_machine_free(b);
    CHECK(hmp_contains(a, "info ramblock", RAMBLOCK_ROW("pc.ram", "0x0000000004000000")));
    CHECK(hmp_contains(a, "info memdev", "memory backend: pc.ram\n  size:  67108864\n"));
    board_machine_free(a);
}

static void test_same_backend_id_in_two_machines(void)
{
    static const char *const a_args[] = {
        "-object", "memory-backend-ram,id=mem,size=32M", "-M", "none,memory-backend=mem", NULL
    };
    static const char *const b_args[] = {
        "-object", "memory-backend-memfd,id=mem,size=16M", "-M", "s390-ccw-virtio",
        "-M", "memory-backend=mem", NULL
    };
    MachineState *a = machine_new(a_args);
    MachineState *b = machine_new(b_args);

    if (a && b) {
        CHECK(a->ram_size == 32 * MiB && b->ram_size == 16 * MiB);
        CHECK(a->memdev && b->memdev && a->memdev != b->memdev);
        CHECK(hmp_contains(a, "info mtree", "0000000000000000-0000000001ffffff (prio 0, ram): mem"));
        CHECK(hmp_contains(b, "info mtree", "0000000000000000-0000000000ffffff (prio 0, ram): mem"));
        CHECK(hmp_contains(a, "info memdev", "  share: false\n"));
        CHECK(hmp_contains(b, "info memdev", "  share: true\n"));
    }
    board_machine_free(b);
    board_machine_free(a);
}

/* QEMU-style globals (get_system_memory(), RAM registration) follow the current machine. */
static void test_globals_follow_the_current_machine(void)
{
    static const char *const a_args[] = { "-M", "none", "-m", "8M", NULL };
    static const char *const b_args[] = { "-M", "none", "-m", "8M", NULL };
    MachineState *a = machine_new(a_args);
    MachineState *b = machine_new(b_args);
    /* Region storage of the boards' kind, one per machine. */
    MemoryRegion *extra = calloc(2, sizeof(*extra));
    Error *err = NULL;

    if (a && b && extra) {
        CHECK(hm_machine_make_current(a, &err));
        hm_error_clear(&err);
        CHECK(memory_region_init_ram(extra, NULL, "extra.ram", 1 * MiB, &err));
        hm_error_clear(&err);
        memory_region_add_subregion(get_system_memory(), 0x10000000, extra);
        CHECK(hm_memory_check(&err));
        hm_error_clear(&err);
        CHECK(hmp_contains(a, "info ramblock", "extra.ram"));
        CHECK(hmp_contains(a, "info mtree",
                           "0000000010000000-00000000100fffff (prio 0, ram): extra.ram"));
        CHECK(!hmp_contains(b, "info ramblock", "extra.ram"));
        CHECK(!hmp_contains(b, "info mtree", "extra.ram"));

        /* The same name in the other machine is no duplicate. */
        CHECK(hm_machine_make_current(b, &err));
        hm_error_clear(&err);
        CHECK(memory_region_init_ram(&extra[1], NULL, "extra.ram", 2 * MiB, &err));
        hm_error_clear(&err);
        CHECK(hmp_contains(b, "info ramblock", "extra.ram"));
    }
    free(extra);
    board_machine_free(b);
    board_machine_free(a);
}

static void test_errors_leave_other_machines_alone(void)
{
    static const char *const good[] = { "-M", "q35", "-m", "4G", NULL };
    static const char *const bad[] = { "-M", "q35", "-m", "64M", "-M", "memory-backend=x", NULL };
    const char *argv[8] = { "test-two-machines" };
    MachineState *a = machine_new(good);
    MachineState *b;
    Error *err = NULL;
    int argc = 1;

    for (const char *const *p = bad; *p; p++) {
        argv[argc++] = *p;
    }
    b = hm_machine_new_from_argv(argc, argv, &err);
    CHECK(b == NULL);
    CHECK(err && strcmp(error_get_pretty(err), "Memory backend 'x' not found") == 0);
    error_free(err);
    if (a) {
        CHECK(hmp_contains(a, "info mtree",
                           "alias ram-above-4g @pc.ram 0000000080000000-00000000ffffffff"));
    }
    board_machine_free(a);
}

/*
 * A MemoryRegion copied out of a freed machine names nothing: not a region of the next
 * machine, even one built the same way right after.
 */
static void test_stale_region_of_a_freed_machine_is_an_error(void)
{
    static const char *const a_args[] = { "-M", "pc", "-m", "64M", NULL };
    static const char *const b_args[] = { "-M", "pc", "-m", "128M", NULL };
    MachineState *a = machine_new(a_args);
    MachineState *b;
    MemoryRegion stale;
    Error *err = NULL;

    if (!a) {
        return;
    }
    stale = *a->ram;
    board_machine_free(a);
    b = machine_new(b_args);
    CHECK(b != NULL);
    CHECK(memory_region_size(&stale) == 0);
    CHECK(memory_region_get_ram_ptr(&stale) == NULL);
    CHECK(!hm_memory_check(&err));
    error_free(err);
    if (b) {
        CHECK(memory_region_size(b->ram) == 128 * MiB);
    }
    board_machine_free(b);
}

/* A machine that fails to build leaves the previous machine current. */
static void test_failed_machine_keeps_the_current_one(void)
{
    static const char *const good[] = { "-M", "pc", "-m", "64M", NULL };
    /* fails after board init: the KVM attach refuses the slot size (or finds no KVM) */
    const char *bad[] = { "test-two-machines", "-M", "pc", "-m", "64M", "-accel", "kvm,max-slot-size=5" };
    MachineState *a = machine_new(good);
    MachineState *b;
    Error *err = NULL;

    if (!a) {
        return;
    }
    b = hm_machine_new_from_argv(7, bad, &err);
    CHECK(b == NULL);
    error_free(err);
    CHECK(hm_context_current() == a->context);
    CHECK(hm_memory_backend_find("pc.ram") == a->memdev);
    board_machine_free(a);
}

int main(void)
{
    Error *err = NULL;

    if (!boards_register_all(&err)) {
        error_report_err(err);
        return 1;
    }
    test_two_pcs_have_their_own_ram();
    test_same_backend_id_in_two_machines();
    test_globals_follow_the_current_machine();
    test_errors_leave_other_machines_alone();
    test_stale_region_of_a_freed_machine_is_an_error();
    test_failed_machine_keeps_the_current_one();
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("ok\n");
    return 0;
}
