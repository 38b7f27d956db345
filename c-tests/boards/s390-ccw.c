/*
 * The s390x machine types "s390-ccw-virtio-X.Y", memory part (QEMU's hw/s390x/s390-virtio-ccw.c):
 * main RAM straight at guest address 0. Splitting it into KVM memslots is the accelerator's
 * business, not the board's. One init serves every version.
 *
 * QEMU 10.0 offers 2.9 to 10.0; these are 4.0 to 10.0 (7.0 and older deprecated). Their one
 * RAM difference is the size rule (ccw_machine_4_2_class_options): 4.2 and older round the
 * size down to whole storage increments, as their SCLP did (s390_fixup_ram_size), newer ones
 * refuse sizes that are not whole MiB. QEMU 10's 4.1 and 4.0 lay RAM out as 4.2 does, one
 * "s390.ram" block (QEMU 4.1 itself split guests over 8 TiB into "s390.ram.N" blocks; QEMU 10
 * has no compat code for that). Older versions are left out: 3.1 and older name file and memfd
 * backends' RAMBlocks "/objects/<id>" (hw_compat_3_1), 3.0 and older refuse 1 MiB huge pages.
 *
 * Unlike in QEMU's s390x binary, s390-ccw-virtio-10.0 is not vmm's default machine: vmm has
 * every board, and its default is "pc".
 */
#include <inttypes.h>
#include <stdio.h>

#include "boards.h"

/* The SCLP of old machine types reports at most this many storage increments (sclp.h). */
#define MAX_STORAGE_INCREMENTS 1020

static void s390_memory_init(MachineState *machine)
{
    /* Since 5.0 the SCLP reports memory in 1 MiB increments, so other sizes are refused. */
    if (machine->ram_size % MiB) {
        board_fatal("ram size must be multiples of 1 MiB");
    }
    memory_region_add_subregion(get_system_memory(), 0, machine->ram);
}

/*
 * 4.2 and older: the RAM size is rounded down to whole storage increments, starting at 1 MiB
 * and doubling the increment until at most MAX_STORAGE_INCREMENTS are needed. QEMU says so
 * with qemu_printf, which goes to stdout while the command line is read.
 */
static uint64_t s390_fixup_ram_size(uint64_t sz)
{
    int increment_size = 20;
    uint64_t newsz;

    while ((sz >> increment_size) > MAX_STORAGE_INCREMENTS) {
        increment_size++;
    }
    newsz = sz >> increment_size << increment_size;

    if (sz != newsz) {
        printf("Ram size %" PRIu64 "MB was fixed up to %" PRIu64
               "MB to match machine restrictions. Consider updating "
               "the guest definition.\n", (uint64_t)(sz / MiB), (uint64_t)(newsz / MiB));
    }
    return newsz;
}

/* QEMU's DEFINE_CCW_MACHINE_IMPL: the description names the version. */
#define CCW_MACHINE(major, minor, alias_, fixup_)                                  \
    {                                                                              \
        .name = "s390-ccw-virtio-" MACHINE_VER_STR(major, minor),                  \
        .alias = alias_,                                                           \
        .desc = "Virtual s390x machine (version " MACHINE_VER_STR(major, minor) ")", \
        .init = s390_memory_init,                                                  \
        .cleanup = board_cleanup,                                                  \
        .default_ram_size = 128 * MiB,                                             \
        .default_ram_id = "s390.ram",                                              \
        .numa_mem_supported = false,                                               \
        .is_default = false,                                                       \
        .no_numa_support = true,                                                   \
        .deprecation_reason = MACHINE_VER_DEPRECATION(major, minor),               \
        .fixup_ram_size = fixup_,                                                  \
    }

static const MachineClass s390_ccw_machines[] = {
    CCW_MACHINE(10, 0, "s390-ccw-virtio", NULL),
    CCW_MACHINE(9, 2, NULL, NULL),
    CCW_MACHINE(9, 1, NULL, NULL),
    CCW_MACHINE(9, 0, NULL, NULL),
    CCW_MACHINE(8, 2, NULL, NULL),
    CCW_MACHINE(8, 1, NULL, NULL),
    CCW_MACHINE(8, 0, NULL, NULL),
    CCW_MACHINE(7, 2, NULL, NULL),
    CCW_MACHINE(7, 1, NULL, NULL),
    CCW_MACHINE(7, 0, NULL, NULL),
    CCW_MACHINE(6, 2, NULL, NULL),
    CCW_MACHINE(6, 1, NULL, NULL),
    CCW_MACHINE(6, 0, NULL, NULL),
    CCW_MACHINE(5, 2, NULL, NULL),
    CCW_MACHINE(5, 1, NULL, NULL),
    CCW_MACHINE(5, 0, NULL, NULL),
    CCW_MACHINE(4, 2, NULL, s390_fixup_ram_size),
    CCW_MACHINE(4, 1, NULL, s390_fixup_ram_size),
    CCW_MACHINE(4, 0, NULL, s390_fixup_ram_size),
};

bool s390_ccw_machine_register(Error **errp)
{
    return board_register_classes(s390_ccw_machines,
                                  sizeof(s390_ccw_machines) / sizeof(s390_ccw_machines[0]),
                                  errp);
}
