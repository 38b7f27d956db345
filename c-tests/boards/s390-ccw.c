/*
 * The s390x "s390-ccw-virtio-10.0" machine, memory part (QEMU's hw/s390x/s390-virtio-ccw.c):
 * main RAM straight at guest address 0. Splitting it into KVM memslots is the accelerator's
 * business, not the board's.
 */
#include "boards.h"

static void s390_memory_init(MachineState *machine)
{
    /* Since 5.0 the SCLP reports memory in 1 MiB increments, so other sizes are refused. */
    if (machine->ram_size % MiB) {
        board_fatal("ram size must be multiples of 1 MiB");
    }
    memory_region_add_subregion(get_system_memory(), 0, machine->ram);
}

static const MachineClass s390_ccw_machine = {
    .name = "s390-ccw-virtio-10.0",
    .alias = "s390-ccw-virtio",
    .desc = "Virtual s390x machine (version 10.0)",
    .init = s390_memory_init,
    .cleanup = board_cleanup,
    .default_ram_size = 128 * MiB,
    .default_ram_id = "s390.ram",
    .numa_mem_supported = false,
    .is_default = false,
    .no_numa_support = true,
};

bool s390_ccw_machine_register(Error **errp)
{
    return hm_machine_class_register(&s390_ccw_machine, errp);
}
