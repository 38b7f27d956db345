/*
 * hostmem's KVM C API on a real VM: a pc-shaped layout (ram-below-4g and
 * ram-above-4g aliases over one pc.ram) split into 1 GiB memslots, the guest
 * check, guest writes read back through memory_region_get_ram_ptr(), a layout
 * change while the VM exists, dirty logging and "info memslots"; then an
 * s390-ccw-shaped machine (one RAM region) with a reduced max slot size.
 *
 * Without /dev/kvm the test is skipped (exit 77), except under CI=true where
 * it fails.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hostmem.h"
#include "../test-util.h"


static uint64_t ram_u64(MemoryRegion *ram, uint64_t offset)
{
    uint64_t v;

    memcpy(&v, (char *)memory_region_get_ram_ptr(ram) + offset, sizeof(v));
    return v;
}

static void attach_or_skip(uint64_t max_slot_size)
{
    Error *err = NULL;
    const char *ci = getenv("CI");

    if (hm_kvm_attach(max_slot_size, &err)) {
        return;
    }
    fprintf(stderr, "hm_kvm_attach: %s\n", error_get_pretty(err));
    if (hm_error_get_class(err) == HM_ERROR_CLASS_KVM && strstr(
            error_get_pretty(err), "Could not access KVM kernel module") &&
        !(ci && strcmp(ci, "true") == 0)) {
        error_free(err);
        exit(77);
    }
    error_free(err);
    exit(1);
}

/*
 * s390-ccw-shaped: one "s390.ram" region at 0, slots limited to 1 GiB as a
 * board limits them (QEMU's s390 uses 4 TiB; a smaller limit gives several
 * slots with little memory).
 */
static void test_s390_shape(void)
{
    MemoryRegion ram = { 0 };
    HmKvmSlot slots[4];
    HmGuestCheck check = { 0 };
    Error *err = NULL;
    size_t n, i;

    CHECK(memory_region_init_ram(&ram, NULL, "s390.ram", 3 * GiB + 512 * MiB,
                                 &err));
    memory_region_add_subregion(get_system_memory(), 0, &ram);
    expect_no_pending("s390 layout");
    attach_or_skip(1 * GiB);
    n = hm_kvm_get_slots(slots, 4);
    CHECK(n == 4);
    for (i = 0; i < n && i < 4; i++) {
        CHECK(slots[i].gpa == i * GiB);
        CHECK(slots[i].size == (i < 3 ? 1 * GiB : 512 * MiB));
    }
    if (!hm_kvm_guest_check(&check, &err)) {
        fprintf(stderr, "s390 guest check: %s\n", error_get_pretty(err));
        error_free(err);
        err = NULL;
        failures++;
    }
    CHECK(check.slots == 4 && check.signatures == 8);
    printf("guest check: ok (%" PRIu64 " slots, %" PRIu64 " bytes verified)\n",
           check.slots, check.bytes_verified);
    CHECK(ram_u64(&ram, 3 * GiB + 512 * MiB - 8) ==
          (HM_KVM_SIGNATURE ^ (3 * GiB + 512 * MiB - 8)));
    CHECK(hm_kvm_detach(NULL));
    memory_region_del_subregion(get_system_memory(), &ram);
    hm_memory_region_destroy(&ram);
    expect_no_pending("s390 teardown");
}

int main(void)
{
    MemoryRegion ram = { 0 }, below = { 0 }, above = { 0 };
    MemoryRegion *sysmem = get_system_memory();
    HmKvmSlot slots[8];
    HmGuestCheck check = { 0 };
    Error *err = NULL;
    uint64_t gpas[3] = { 0x200000, 2 * GiB + 0x3000, 5 * GiB + 0x7000 };
    uint64_t values[3] = { 11, 22, 33 };
    uint64_t back[3] = { 0 };
    uint64_t dirty[8];
    size_t n, i;
    char *text;

    CHECK(!hm_kvm_enabled());
    CHECK(hm_kvm_vm_fd() == -1);

    CHECK(memory_region_init_ram(&ram, NULL, "pc.ram", 6 * GiB, &err));
    memory_region_init_alias(&below, NULL, "ram-below-4g", &ram, 0, 3 * GiB);
    memory_region_init_alias(&above, NULL, "ram-above-4g", &ram, 3 * GiB,
                             3 * GiB);
    memory_region_add_subregion(sysmem, 0, &below);
    memory_region_add_subregion(sysmem, 4 * GiB, &above);
    expect_no_pending("pc layout");

    attach_or_skip(1 * GiB);
    CHECK(hm_kvm_enabled());
    CHECK(hm_kvm_vm_fd() >= 0);

    /* Two aliases of 3 GiB, split into 1 GiB slots. */
    n = hm_kvm_get_slots(slots, 8);
    CHECK(n == 6);
    for (i = 0; i < n && i < 6; i++) {
        uint64_t gpa = i < 3 ? i * GiB : (i + 1) * GiB;

        CHECK(slots[i].slot == i);
        CHECK(slots[i].gpa == gpa);
        CHECK(slots[i].size == 1 * GiB);
        CHECK(slots[i].ramblock_offset == i * GiB);
        CHECK(slots[i].flags == 0);
    }

    /* Signatures at both ends of every slot, seen through pc.ram's pointer. */
    if (!hm_kvm_guest_check(&check, &err)) {
        fprintf(stderr, "guest check: %s\n", error_get_pretty(err));
        error_free(err);
        err = NULL;
        failures++;
    }
    CHECK(check.slots == 6 && check.signatures == 12);
    CHECK(check.bytes_verified == 96);
    printf("guest check: ok (%" PRIu64 " slots, %" PRIu64 " bytes verified)\n",
           check.slots, check.bytes_verified);
    CHECK(ram_u64(&ram, 3 * GiB) == (HM_KVM_SIGNATURE ^ (4 * GiB)));
    CHECK(ram_u64(&ram, 6 * GiB - 8) == (HM_KVM_SIGNATURE ^ (7 * GiB - 8)));

    /* Dirty logging: exactly the guest's pages. */
    CHECK(hm_kvm_dirty_log_start(NULL));
    CHECK(hm_kvm_dirty_log_sync(NULL));
    CHECK(hm_kvm_guest_write(gpas, values, 3, NULL));
    CHECK(hm_kvm_dirty_log_sync(NULL));
    n = hm_kvm_dirty_pages(dirty, 8);
    CHECK(n == 3);
    for (i = 0; i < n && i < 3; i++) {
        CHECK(dirty[i] == gpas[i]);
    }
    CHECK(ram_u64(&ram, 0x200000) == 11);
    CHECK(ram_u64(&ram, 4 * GiB + 0x7000) == 33);
    CHECK(hm_kvm_dirty_log_stop(NULL));

    /* Move ram-above-4g to 8 GiB while the VM exists. */
    memory_region_del_subregion(sysmem, &above);
    expect_no_pending("del above");
    CHECK(hm_kvm_get_slots(NULL, 0) == 3);
    CHECK(!hm_kvm_guest_read(&gpas[2], back, 1, &err));
    CHECK(err && strstr(error_get_pretty(err), "reached no memslot"));
    error_free(err);
    err = NULL;
    memory_region_add_subregion(sysmem, 8 * GiB, &above);
    expect_no_pending("add above at 8G");
    back[0] = 0;
    gpas[2] = 9 * GiB + 0x7000;
    CHECK(hm_kvm_guest_read(&gpas[2], back, 1, NULL));
    CHECK(back[0] == 33);

    text = hm_kvm_info_memslots();
    CHECK(text && strncmp(text, "KVM memslots: 6 used of ", 24) == 0);
    CHECK(text && strstr(text, "   3 0x0000000200000000-0x000000023fffffff "
                         "0x0000000040000000 "));
    printf("%s", text);
    hm_free(text);

    CHECK(hm_kvm_detach(NULL));
    CHECK(!hm_kvm_enabled());
    memory_region_del_subregion(sysmem, &above);
    memory_region_del_subregion(sysmem, &below);
    hm_memory_region_destroy(&above);
    hm_memory_region_destroy(&below);
    hm_memory_region_destroy(&ram);
    expect_no_pending("pc teardown");

    test_s390_shape();

    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    return 0;
}
