/*
 * The "none" machine (QEMU's hw/core/null-machine.c): no devices; RAM, when -m asks for some,
 * at guest address 0. Its default size is 0, so without -m it has no RAM at all, and it has
 * no CPU (so no CPU address space) unless -smp asks for one.
 */
#include "boards.h"

static void machine_none_init(MachineState *machine)
{
    if (machine->ram_size && machine->ram) {
        memory_region_add_subregion(get_system_memory(), 0, machine->ram);
    }
}

static const MachineClass none_machine = {
    .name = "none",
    .alias = NULL,
    .desc = "empty machine",
    .init = machine_none_init,
    .cleanup = board_cleanup,
    .default_ram_size = 0,
    .default_ram_id = "ram",
    .numa_mem_supported = false,
    .is_default = false,
    .no_numa_support = true,
    .no_cpus_by_default = true,
};

bool none_machine_register(Error **errp)
{
    return hm_machine_class_register(&none_machine, errp);
}
