/*
 * QEMU's C memory API over hostmem: containers, RAM, aliases, priorities,
 * migration registration and the pending-error convention of the void calls.
 */
#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hostmem.h"
#include "../test-util.h"


/* The pending error must exist and contain @needle; it is consumed. */
static void expect_pending(const char *what, const char *needle)
{
    Error *err = NULL;

    if (hm_memory_check(&err)) {
        fprintf(stderr, "%s: expected a pending error\n", what);
        failures++;
        return;
    }
    if (!strstr(error_get_pretty(err), needle)) {
        fprintf(stderr, "%s: error '%s' lacks '%s'\n", what,
                error_get_pretty(err), needle);
        failures++;
    }
    error_free(err);
}

static void test_containers_and_ram(void)
{
    MemoryRegion ram = { 0 }, box = { 0 };
    MemoryRegion *sysmem = get_system_memory();
    Error *err = NULL;
    char *idstr;
    unsigned char *p;

    CHECK(sysmem == get_system_memory());
    CHECK(memory_region_size(sysmem) == UINT64_MAX);
    CHECK(memory_region_size(get_system_io()) == 0x10000);
    CHECK(strcmp(memory_region_name(sysmem), "system") == 0);
    CHECK(strcmp(memory_region_name(get_system_io()), "io") == 0);

    memory_region_init(&box, NULL, "box", 16 * MiB);
    CHECK(memory_region_init_ram(&ram, NULL, "test.ram", 4 * MiB, &err));
    CHECK(err == NULL);
    memory_region_add_subregion(&box, 1 * MiB, &ram);
    memory_region_add_subregion(sysmem, 0x10000000, &box);
    expect_no_pending("map ram");

    CHECK(memory_region_size(&ram) == 4 * MiB);
    CHECK(strcmp(memory_region_name(&ram), "test.ram") == 0);
    p = memory_region_get_ram_ptr(&ram);
    CHECK(p != NULL);
    p[0] = 0x5a;
    p[4 * MiB - 1] = 0xa5;
    CHECK(memory_region_get_ram_ptr(&box) == NULL);

    idstr = hm_memory_region_ram_block_idstr(&ram, &err);
    CHECK(idstr && strcmp(idstr, "test.ram") == 0);
    hm_free(idstr);
    CHECK(hm_memory_region_is_migratable(&ram));

    memory_region_del_subregion(sysmem, &box);
    memory_region_del_subregion(&box, &ram);
    expect_no_pending("unmap");
    hm_memory_region_destroy(&ram);
    hm_memory_region_destroy(&box);
    expect_no_pending("destroy");
    /* A destroyed region reads as not initialised. */
    CHECK(memory_region_size(&ram) == 0);
    expect_pending("size of destroyed", "not initialised");
}

static void test_aliases_follow_to_ram(void)
{
    MemoryRegion ram = { 0 }, lo = { 0 }, hi = { 0 }, inner = { 0 };
    MemoryRegion *sysmem = get_system_memory();
    Error *err = NULL;
    unsigned char *base;

    CHECK(memory_region_init_ram_nomigrate(&ram, NULL, "pc.ram", 8 * MiB, &err));
    CHECK(!hm_memory_region_is_migratable(&ram));
    memory_region_init_alias(&lo, NULL, "ram-below-4g", &ram, 0, 6 * MiB);
    memory_region_init_alias(&hi, NULL, "ram-above-4g", &ram, 6 * MiB, 2 * MiB);
    memory_region_init_alias(&inner, NULL, "inner", &hi, 4096, 4096);
    memory_region_add_subregion(sysmem, 0, &lo);
    memory_region_add_subregion(sysmem, 0x100000000ULL, &hi);
    expect_no_pending("aliases");

    base = memory_region_get_ram_ptr(&ram);
    CHECK(memory_region_get_ram_ptr(&lo) == base);
    CHECK(memory_region_get_ram_ptr(&hi) == base + 6 * MiB);
    CHECK(memory_region_get_ram_ptr(&inner) == base + 6 * MiB + 4096);

    /* The target cannot go while aliases point at it. */
    hm_memory_region_destroy(&ram);
    expect_pending("destroy aliased", "still the target of alias");

    /* An alias of RAM registered for migration gets a RAMBlock of its own. */
    CHECK(!hm_memory_region_is_migratable(&hi));
    vmstate_register_ram_global(&lo);
    expect_no_pending("register alias");
    CHECK(hm_memory_region_is_migratable(&lo));
    {
        char *idstr = hm_memory_region_ram_block_idstr(&lo, &err);

        CHECK(idstr && strcmp(idstr, "ram-below-4g") == 0);
        hm_free(idstr);
    }
    vmstate_unregister_ram(&lo, NULL);
    CHECK(!hm_memory_region_is_migratable(&lo));

    memory_region_set_alias_offset(&hi, 4 * MiB);
    CHECK(memory_region_get_ram_ptr(&hi) == base + 4 * MiB);
    expect_no_pending("alias offset");

    memory_region_transaction_begin();
    memory_region_del_subregion(sysmem, &lo);
    memory_region_del_subregion(sysmem, &hi);
    memory_region_transaction_commit();
    expect_no_pending("transaction");
    hm_memory_region_destroy(&inner);
    hm_memory_region_destroy(&hi);
    hm_memory_region_destroy(&lo);
    hm_memory_region_destroy(&ram);
    expect_no_pending("cleanup aliases");
}

static void test_priorities_and_overlap(void)
{
    MemoryRegion a = { 0 }, b = { 0 }, c = { 0 };
    MemoryRegion *sysmem = get_system_memory();
    Error *err = NULL;

    hm_memory_region_init_io(&a, NULL, "a", 0x1000);
    hm_memory_region_init_io(&b, NULL, "b", 0x1000);
    hm_memory_region_init_io(&c, NULL, "c", 0x1000);
    memory_region_add_subregion(sysmem, 0xfe000000, &a);

    /* Non-overlapping form refuses a collision... */
    CHECK(!hm_memory_region_add_subregion_err(sysmem, 0xfe000800, &b, &err));
    CHECK(err && strstr(error_get_pretty(err), "overlaps 'a'"));
    error_free(err);
    err = NULL;
    /* ... the void form reports it as pending ... */
    memory_region_add_subregion(sysmem, 0xfe000800, &b);
    expect_pending("collision", "overlaps 'a'");
    /* ... and the overlap form layers. */
    memory_region_add_subregion_overlap(sysmem, 0xfe000800, &b, 1);
    CHECK(hm_memory_region_add_subregion_overlap_err(sysmem, 0xfe000800, &c, -1,
                                                     &err));
    expect_no_pending("overlap");

    memory_region_set_enabled(&b, false);
    memory_region_set_address(&b, 0xfd000000);
    memory_region_set_enabled(&b, true);
    expect_no_pending("move");

    memory_region_del_subregion(sysmem, &a);
    memory_region_del_subregion(sysmem, &b);
    memory_region_del_subregion(sysmem, &c);
    memory_region_del_subregion(sysmem, &c);
    expect_pending("double del", "is not a subregion of 'system'");
    hm_memory_region_destroy(&a);
    hm_memory_region_destroy(&b);
    hm_memory_region_destroy(&c);
    expect_no_pending("cleanup prio");
}

static void test_vmstate_duplicate(void)
{
    MemoryRegion r1 = { 0 }, r2 = { 0 };
    Error *err = NULL;
    Object *dev = hm_object_new("0000:00:02.0", &err);
    char *idstr;

    CHECK(dev && strcmp(hm_object_get_path(dev), "0000:00:02.0") == 0);
    CHECK(memory_region_init_ram_nomigrate(&r1, NULL, "vga.vram", MiB, &err));
    CHECK(memory_region_init_ram_nomigrate(&r2, NULL, "vga.vram", MiB, &err));
    vmstate_register_ram_global(&r1);
    expect_no_pending("register");
    vmstate_register_ram_global(&r2);
    expect_pending("duplicate", "RAMBlock \"vga.vram\" already registered");
    CHECK(!hm_vmstate_register_ram_err(&r2, NULL, &err));
    CHECK(err && hm_error_get_class(err) == HM_ERROR_CLASS_DUPLICATE);
    CHECK(err && strcmp(error_get_pretty(err),
                        "RAMBlock \"vga.vram\" already registered") == 0);
    error_free(err);
    err = NULL;

    vmstate_register_ram(&r2, dev);
    expect_no_pending("register with owner");
    idstr = hm_memory_region_ram_block_idstr(&r2, &err);
    CHECK(idstr && strcmp(idstr, "0000:00:02.0/vga.vram") == 0);
    hm_free(idstr);

    vmstate_unregister_ram(&r1, NULL);
    CHECK(!hm_memory_region_is_migratable(&r1));
    vmstate_register_ram_global(&r1);
    expect_no_pending("re-register");

    /* init_ram registers at once, so a taken name fails it. */
    {
        MemoryRegion r3 = { 0 };

        CHECK(!memory_region_init_ram(&r3, NULL, "vga.vram", MiB, &err));
        CHECK(err != NULL);
        error_free(err);
        err = NULL;
        CHECK(memory_region_size(&r3) == 0);
        expect_pending("failed init leaves storage empty", "not initialised");
    }

    hm_memory_region_destroy(&r1);
    hm_memory_region_destroy(&r2);
    hm_object_free(dev);
    expect_no_pending("cleanup vmstate");
}

static void test_misuse_is_reported_not_fatal(void)
{
    MemoryRegion zero = { 0 }, r = { 0 };
    Error *err = NULL;

    memory_region_add_subregion(NULL, 0, &zero);
    expect_pending("NULL parent", "Parameter 'mr' is missing");
    memory_region_add_subregion(get_system_memory(), 0, &zero);
    expect_pending("zeroed subregion", "'subregion' is a MemoryRegion that is not initialised");
    memory_region_set_enabled(&zero, true);
    expect_pending("zeroed", "not initialised");
    CHECK(memory_region_get_ram_ptr(&zero) == NULL);
    expect_pending("ram ptr zeroed", "not initialised");
    CHECK(memory_region_name(NULL) == NULL);
    expect_pending("name NULL", "missing");
    memory_region_init(&r, NULL, NULL, 1);
    expect_pending("NULL name", "Parameter 'name' is missing");
    CHECK(!memory_region_init_ram(&r, NULL, "zero", 0, &err));
    CHECK(err != NULL);
    error_free(err);
    err = NULL;
    memory_region_transaction_commit();
    expect_pending("unbalanced commit", "without memory_region_transaction_begin");

    /* Only the first of several errors is kept. */
    memory_region_set_enabled(NULL, true);
    memory_region_set_address(&zero, 1);
    expect_pending("first wins", "Parameter 'mr' is missing");
    expect_no_pending("taken");

    /* Storage holding a live region is not silently overwritten. */
    memory_region_init(&r, NULL, "live", 0x1000);
    memory_region_init(&r, NULL, "again", 0x1000);
    expect_pending("reinit", "already holds region 'live'");
    CHECK(strcmp(memory_region_name(&r), "live") == 0);
    hm_memory_region_destroy(&r);
    expect_no_pending("end");
}

static void test_io_space_and_rom(void)
{
    MemoryRegion port = { 0 }, rom = { 0 }, big = { 0 };
    Error *err = NULL;
    char *idstr;

    hm_memory_region_init_io(&port, NULL, "port92", 1);
    memory_region_add_subregion(get_system_io(), 0x92, &port);
    CHECK(memory_region_size(&port) == 1);
    CHECK(memory_region_get_ram_ptr(&port) == NULL);
    expect_no_pending("io port");

    CHECK(memory_region_init_rom(&rom, NULL, "pc.bios", 256 * 1024, &err));
    CHECK(hm_memory_region_is_migratable(&rom));
    CHECK(!memory_region_is_mapped(&rom));
    memory_region_add_subregion(get_system_memory(), 0xfffc0000, &rom);
    CHECK(memory_region_is_mapped(&rom));
    CHECK(memory_region_get_ram_ptr(&rom) != NULL);
    memory_region_set_readonly(&rom, false);
    memory_region_set_readonly(&rom, true);
    expect_no_pending("rom");
    {
        MemoryRegion rom2 = { 0 };

        CHECK(memory_region_init_rom_nomigrate(&rom2, NULL, "pc.bios", 4096, &err));
        CHECK(!hm_memory_region_is_migratable(&rom2));
        hm_memory_region_destroy(&rom2);
    }

    /* 2^64 containers report UINT64_MAX, as in QEMU. */
    memory_region_init(&big, NULL, "pci", UINT64_MAX);
    CHECK(memory_region_size(&big) == UINT64_MAX);
    idstr = hm_memory_region_ram_block_idstr(&big, &err);
    CHECK(idstr == NULL && err != NULL);
    CHECK(err && hm_error_get_class(err) == HM_ERROR_CLASS_NOT_FOUND);
    error_free(err);
    err = NULL;

    memory_region_del_subregion(get_system_io(), &port);
    memory_region_del_subregion(get_system_memory(), &rom);
    hm_memory_region_destroy(&port);
    hm_memory_region_destroy(&rom);
    hm_memory_region_destroy(&big);
    expect_no_pending("cleanup io");
}

int main(void)
{
    test_containers_and_ram();
    test_aliases_follow_to_ram();
    test_priorities_and_overlap();
    test_vmstate_duplicate();
    test_misuse_is_reported_not_fatal();
    test_io_space_and_rom();
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("memory API: all checks passed\n");
    return 0;
}
